"""Why one static scale per tensor fails on the bundled PixArt model (issue #20; a study, not library code).

Along the calibration run (32 digit prompts, 20 DPM-Solver++ steps, cfg 4.5, the float model), every quantized
Linear's input is reduced to one absmax per token (row) and call; per layer kind (summed over the 6 blocks) the table
gives how far the tensor's absmax over the whole run (what a static per-tensor scale covers) is above the median
token's, the same between sampling steps (max over min of the per-step absmax), between token positions, and between
the two CFG halves of the batch (conditional over unconditional absmax). Writes JSON and Markdown.

    python scripts/pixart_token_ranges.py --output docs/results/pixart-token-ranges.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

import torch

from diffusers_ptq.harness.bench import bench_context
from diffusers_ptq.harness.bundled import load_pipeline
from diffusers_ptq.harness.evaluation import digit_prompts
from diffusers_ptq.harness.utils import machine_info
from diffusers_ptq.sampling import prepare_sampling, sample_latents

STEPS, GUIDANCE, PROMPTS = 20, 4.5, 32


def token_absmax(pipe) -> dict[str, torch.Tensor]:
    """{Linear name: [calls, batch, tokens] input absmax per token} over the calibration run of the float model."""
    model = pipe.transformer
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    recorded = collections.defaultdict(list)

    def hook(name):
        def record(_module, args):
            x = args[0].detach()
            recorded[name].append((x if x.dim() == 3 else x[:, None]).abs().amax(-1))
        return record

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    pipe_context = {**bench_context(pipe), "prompts": digit_prompts(range(10)), "resolution": 32}
    run = prepare_sampling(model, num_inference_steps=STEPS, guidance_scale=GUIDANCE, num_samples=PROMPTS,
                           context=pipe_context)
    sample_latents(model, run.scheduler, run.conditions, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   batch_size=PROMPTS, progress=False, context=run.context)
    for h in hooks:
        h.remove()
    return {n: torch.stack(v) for n, v in recorded.items()}


def summarize(absmax: dict[str, torch.Tensor]) -> dict[str, dict]:
    kinds = collections.defaultdict(list)
    for name, a in absmax.items():
        kinds[re.sub(r"^transformer_blocks\.\d+\.", "", name)].append(a)
    rows = {}
    for kind, tensors in kinds.items():
        stats = []
        for a in tensors:  # [calls, batch, tokens]; the batch is [conditional, unconditional]
            half = a.shape[1] // 2
            step = a.amax(dim=(1, 2))
            position = a.amax(dim=(0, 1))
            stats.append([float(a.max() / a.median()), float(step.max() / step.min()),
                          float(position.max() / position.min()), float(a[:, :half].max() / a[:, half:].max())])
        s = torch.tensor(stats)
        rows[kind] = {"layers": len(tensors), "tokens": int(tensors[0].shape[2]),
                      "tensor_over_median_token": float(s[:, 0].max()), "step_max_over_min": float(s[:, 1].max()),
                      "position_max_over_min": float(s[:, 2].max()),
                      "conditional_over_unconditional": float(s[:, 3].max())}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/results/pixart-token-ranges.json"))
    args = parser.parse_args()
    rows = summarize(token_absmax(load_pipeline("bundled-pixart")))
    args.output.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")
    lines = ["| layer (max over blocks) | layers | tokens | tensor absmax / median token | step max / min | "
             "position max / min | conditional / unconditional |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {r['layers']} | {r['tokens']} | {r['tensor_over_median_token']:.1f} | "
              f"{r['step_max_over_min']:.1f} | {r['position_max_over_min']:.1f} | "
              f"{r['conditional_over_unconditional']:.1f} |" for k, r in rows.items()]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
