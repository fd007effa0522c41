"""Does a searched 4-bit weight grid help the bundled PixArt model? (issue #20; a study, not library code)

quanto's 4-bit grid spans each row's [min, max]. This study shrinks it, per output channel, to the factor r in
{1.0, 0.99, ..., 0.5} that minimizes the row's squared rounding error ("mse"), and rounds to nearest or with GPTQ on
that grid — by replacing `rounding.quant_grid` for the run. Rows: W4A16 with nearest weights, W4A8 with dynamic
per-token activations and GPTQ (no smoothing; HTG), each on quanto's grid and on the searched one; 100 samples, the model's reporting settings (20
DPM-Solver++ steps, cfg 4.5), calibration on 32 digit prompts. Writes JSON and Markdown (paired PSNR against FP).

    python scripts/pixart_weight_grid_study.py --output docs/results/pixart-weight-grid-study.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import diffusers_ptq.api as api
import diffusers_ptq.rounding as rounding
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.harness.bench import run_benchmark

SHRINK = torch.linspace(1.0, 0.5, 51)
MINMAX_GRID = rounding.quant_grid


def searched_grid(weight: torch.Tensor, bits: int, group_size: int | None = None):
    """(scale, shift) of the 4-bit per-channel grid shrunk to the best factor per row (other formats: quanto's)."""
    scale, shift = MINMAX_GRID(weight, bits, group_size)
    if bits != 4 or group_size is not None:
        return scale, shift
    lo, hi = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    best = torch.full_like(lo, float("inf"))
    for r in SHRINK:
        s, z = (hi - lo) * r / 15, -lo * r
        q = torch.clamp(torch.round((weight + z) / torch.where(s == 0, torch.ones_like(s), s)), 0, 15)
        err = ((s * q - z - weight) ** 2).sum(1, keepdim=True)
        better = err < best
        best, scale, shift = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, shift)
    return scale, shift


def nearest_everywhere(rewrite):
    """quanto's own freeze rounds on its min-max grid: hand it nearest-rounded weights on the current grid."""
    def wrapped(transformer, config, input_scales, rounded=None, group_sizes=None, **kwargs):
        rounded = dict(rounded or {})
        for name in input_scales:
            if name not in rounded and config.weight_bits == 4:
                rounded[name] = rounding.nearest_round(transformer.get_submodule(name).weight.detach(), 4,
                                                       (group_sizes or {}).get(name))
        return rewrite(transformer, config, input_scales, rounded, group_sizes, **kwargs)
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/results/pixart-weight-grid-study.json"))
    parser.add_argument("--num-samples", type=int, default=100)
    args = parser.parse_args()
    api.rewrite_linears = nearest_everywhere(api.rewrite_linears)
    cal = dict(num_samples=32, num_inference_steps=20, guidance_scale=4.5)
    w4a8 = dict(weight_bits=4, act_bits=8, act_dynamic=True, weight_rounding="gptq", **cal)
    studies = [("W4A16, nearest", QuantConfig(weight_bits=4, act_bits=None, **cal)),
               ("W4A8 dynamic, GPTQ", QuantConfig(**w4a8)),
               ("W4A8 dynamic, HTG, GPTQ", QuantConfig(htg_shift=True, htg_scale=True, **w4a8))]
    rows = []
    for name, config in studies:
        for grid in ("minmax", "mse"):
            rounding.quant_grid = MINMAX_GRID if grid == "minmax" else searched_grid
            scratch = args.output.with_suffix(".scratch.json")
            result = run_benchmark("bundled-pixart", [config], num_samples=args.num_samples, num_inference_steps=20,
                                   guidance_scale=4.5, batch_size=args.num_samples, output=scratch, progress=False,
                                   resume=False)
            r = result["rows"][1]
            rows.append({"study": name, "grid": grid, "label": r["label"], "psnr_db": r["psnr_db"],
                         "paired_fd": r["classifier_fid_to_reference"]})
            scratch.unlink()
            scratch.with_suffix(".md").unlink(missing_ok=True)
            print(rows[-1], flush=True)
    rounding.quant_grid = MINMAX_GRID
    out = {"num_samples": args.num_samples, "machine": result["machine"], "versions": result["versions"], "rows": rows}
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| configuration | 4-bit grid | PSNR vs FP (dB) | paired FD |", "|---|---|---|---|"]
    lines += [f"| {r['study']} | {r['grid']} | {r['psnr_db']:.2f} | {r['paired_fd']:.3f} |" for r in rows]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
