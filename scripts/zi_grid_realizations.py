"""Why 4-bit integer zero points cost paired PSNR (issue #21): the integer grid against grids with the same error
statistics and no anchoring at 0.

The integer grid (`weight_zero_point="integer"`, rounding.quant_grid) is quanto's float grid moved by less than half
a step so that 0 is a grid point: each row's extremes are no longer on the grid. Controls, W4A8 min-max on the bundled
model with nearest and with GPTQ rounding (paired PSNR to the float model, same noise for every row):
- "offset-<seed>": the float grid (scale = (max − min) / 15) moved by u·scale, u uniform in (−½, ½) per row — as far
  from the extremes as the integer grid on average, at random;
- "extreme": an integer grid that keeps the larger-magnitude extreme exactly (−z·s or (15 − z)·s, z integer) and
  covers the other, at the price of a coarser step.
If the integer grid falls among the offsets, what it costs is not being aligned to each row's range, not the integer
anchoring. The variants replace `rounding.quant_grid` for the "integer" setting inside this script only.

    python scripts/zi_grid_realizations.py --samples 200     # writes docs/results/zi-grid-realizations.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffusers_ptq import rounding
from diffusers_ptq.api import quantize_transformer
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.harness.bench import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, _versions, bench_context
from diffusers_ptq.harness.bundled import load_pipeline
from diffusers_ptq.harness.evaluation import class_ids_of, generate_images, score_images, write_json
from diffusers_ptq.harness.utils import machine_info
from diffusers_ptq.models.dit import balanced_labels

ORIGINAL = rounding.quant_grid
OFFSET_SEEDS = (1, 2, 3, 4)


def offset_grid(lo: torch.Tensor, hi: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float grid moved by u·scale, u ~ U(−½, ½) per row (value = scale·code − shift)."""
    scale = (hi - lo) / 15
    u = torch.rand(lo.shape, generator=torch.Generator().manual_seed(seed)) - 0.5
    return scale, -lo + u * scale


def extreme_grid(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer zero point z, step s: the larger-magnitude extreme exactly on the grid, the other inside it."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    width = hi - lo
    safe = torch.where(width > 0, width, torch.ones_like(width))
    low_side = -lo >= hi
    z_low = torch.floor(15 * -lo / safe).clamp(1, 15)  # min = −z·s
    n_high = torch.floor(15 * hi / safe).clamp(1, 15)  # max = n·s, z = 15 − n
    scale = torch.where(width > 0, torch.where(low_side, -lo / z_low, hi / n_high), torch.zeros_like(width))
    return scale, scale * torch.where(low_side, z_low, 15 - n_high)


def install(variant: str) -> None:
    """rounding.quant_grid for 4-bit "integer" grids replaced by `variant` ("integer": the library's own)."""
    def grid(weight, bits, group_size=None, zero_point="float"):
        if bits != 4 or zero_point != "integer" or variant == "integer":
            return ORIGINAL(weight, bits, group_size, zero_point)
        rows = weight.reshape(-1, group_size) if group_size else weight
        lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
        return extreme_grid(lo, hi) if variant == "extreme" else offset_grid(lo, hi, int(variant.split("-")[1]))

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("diffusers_ptq") and hasattr(module, "quant_grid"):
            module.quant_grid = grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "results"
                                                 / "zi-grid-realizations.json"))
    args = parser.parse_args()
    t0 = time.time()
    sample = dict(seed=0, num_inference_steps=DEFAULT_NUM_INFERENCE_STEPS, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                  batch_size=250, progress=False)
    fp = load_pipeline("bundled", scheduler="ddim")
    labels = balanced_labels(class_ids_of(fp), args.samples)
    fp_images = generate_images(fp, labels, **sample)
    variants = ["float", "integer", *(f"offset-{s}" for s in OFFSET_SEEDS), "extreme"]
    rows = []
    for weight_rounding in ("nearest", "gptq"):
        for variant in variants:
            install(variant)
            pipe = load_pipeline("bundled", scheduler="ddim")
            config = QuantConfig(weight_bits=4, act_bits=8, weight_rounding=weight_rounding,
                                 weight_zero_point="float" if variant == "float" else "integer")
            quantize_transformer(pipe.transformer, config, context=bench_context(pipe),
                                 scheduler_config=pipe.scheduler.config, progress=False)
            scores = score_images(generate_images(pipe, labels, **sample), labels, fp_images, use_classifier=False)
            rows.append({"rounding": weight_rounding, "grid": variant, "psnr_db": scores["psnr_db"],
                         "relative_mse": scores["relative_mse"]})
            print(json.dumps(rows[-1]), flush=True)
    install("integer")
    result = {"model": "bundled", "num_samples": args.samples, **{k: v for k, v in sample.items() if k != "progress"},
              "rows": rows, "versions": _versions(), "machine": machine_info(), "total_seconds": time.time() - t0}
    write_json(result, args.output)
    lines = [f"# 4-bit grids: integer zero points against unaligned float grids\n\nBundled model, W4A8 min-max, "
             f"{args.samples} samples, {sample['num_inference_steps']} DDIM steps, guidance {sample['guidance_scale']}; "
             f"paired PSNR to the float model (dB). CPU: {result['machine']['cpu_model']}; torch "
             f"{result['versions']['torch']}. Written by scripts/zi_grid_realizations.py.\n",
             "| rounding | " + " | ".join(variants) + " | offsets: mean (min – max) |", "|---|" + "---|" * (len(variants) + 1)]
    for weight_rounding in ("nearest", "gptq"):
        psnr = {r["grid"]: r["psnr_db"] for r in rows if r["rounding"] == weight_rounding}
        offsets = [psnr[f"offset-{s}"] for s in OFFSET_SEEDS]
        lines.append(f"| {weight_rounding} | " + " | ".join(f"{psnr[v]:.2f}" for v in variants)
                     + f" | {sum(offsets) / len(offsets):.2f} ({min(offsets):.2f} – {max(offsets):.2f}) |")
    Path(args.output).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
