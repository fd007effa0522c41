"""Does weighting GPTQ's Hessian per timestep help? Uniform H = mean over all steps vs PTQ4DiT's SSC weights.

    python scripts/gptq_timestep_weighting.py --num-samples 200 --output docs/results/gptq-timestep-weighting.json

The SSC weight of step t (PTQ4DiT, per-timestep rows): η_t = softmax_t(−ρ_t), ρ_t = Spearman ρ between the
step's activation salience (per-channel absmax) and the weight salience, for each smoothing target's input;
averaged over the targets. The GPTQ Hessian of every Linear is then Σ_t η_t·Σ xᵀx / Σ_t η_t·rows
(`HessianRecorder(weight_fn=...)`) instead of the plain mean. Same calibration set, seed and noise; quality =
PSNR of the decoded samples against the FP pipeline's (same noise). Writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusers_ptq import api
from diffusers_ptq.calibration import calibrate
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.harness.bundled import load_pipeline
from diffusers_ptq.harness.evaluation import generate_images, psnr
from diffusers_ptq.harness.utils import machine_info
from diffusers_ptq.methods import ptq4dit
from diffusers_ptq.models import adapter_for
from diffusers_ptq.models.dit import balanced_labels
from diffusers_ptq.rounding import HessianRecorder


def ssc_step_weights(pipe, config: QuantConfig) -> dict[int, float]:
    """{timestep value: η_t} averaged over the smoothing targets (PTQ4DiT's SSC over per-timestep rows)."""
    transformer = pipe.transformer
    stats = calibrate(transformer, scheduler_config=pipe.scheduler.config, id2label={i: str(i) for i in range(10)},
                      num_inference_steps=config.num_inference_steps,
                      guidance_scale=config.guidance_scale, num_samples=config.num_samples, seed=config.seed,
                      batch_size=config.batch_size, progress=False)
    modules = dict(transformer.named_modules())
    etas = []
    for target in adapter_for(transformer).smoothing_targets(transformer):
        weight_sal = ptq4dit.weight_salience(*[modules[c].weight for c in target.consumers])
        _, eta = ptq4dit.activation_salience(stats.layers[target.consumers[0]].absmax, weight_sal, ssc=True)
        etas.append(eta)
    eta = torch.stack(etas).mean(dim=0)
    return {int(t): float(e) for t, e in zip(stats.timesteps, eta)}


def quantize(pipe, config: QuantConfig, step_weights: dict[int, float] | None) -> float:
    """Quantize pipe.transformer in place (GPTQ Hessians weighted by step_weights if given); seconds taken."""
    original = api.HessianRecorder

    class Weighted(HessianRecorder):
        def __init__(self, layers):
            super().__init__(layers, weight_fn=lambda t: step_weights[int(t.reshape(-1)[0])],
                             transformer=pipe.transformer)

    api.HessianRecorder = Weighted if step_weights else original
    try:
        t0 = time.time()
        api.quantize_transformer(pipe.transformer, config, id2label={i: str(i) for i in range(10)},
                                 scheduler_config=pipe.scheduler.config, progress=False)
        return time.time() - t0
    finally:
        api.HessianRecorder = original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--output", default="docs/results/gptq-timestep-weighting.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # GPTQ's column loop: see docs/rounding.md "Threads"
    labels = balanced_labels(list(range(10)), args.num_samples)
    gen = dict(seed=0, num_inference_steps=50, guidance_scale=1.5, batch_size=100, progress=False)
    reference = generate_images(load_pipeline("bundled"), labels, **gen)
    rows = []
    for method in ({}, dict(csb_alpha=0.5)):
        config = QuantConfig(weight_bits=4, act_bits=8, weight_rounding="gptq", **method)
        weights = ssc_step_weights(load_pipeline("bundled"), config)
        for name, step_weights in (("uniform", None), ("ssc-eta", weights)):
            pipe = load_pipeline("bundled")
            seconds = quantize(pipe, config, step_weights)
            value = psnr(generate_images(pipe, labels, **gen), reference)
            rows.append({"label": config.label, "hessian_weighting": name, "psnr_db": value,
                         "quantize_seconds": seconds})
            print(rows[-1], flush=True)
        rows[-1]["eta_range"] = [min(weights.values()), max(weights.values())]
    result = {"num_samples": args.num_samples, "rows": rows, "machine": machine_info()}
    out = Path(args.output)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# GPTQ Hessian weighted per timestep (bundled model, W4A8)", "",
             f"{args.num_samples} samples, seed 0, 50 DDIM steps, guidance 1.5; PSNR vs FP on the same noise. "
             f"CPU: {result['machine'].get('cpu_model')}, 1 thread.", "",
             "| row | Hessian | PSNR vs FP (dB) | quantize (s) |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['hessian_weighting']} | {r['psnr_db']:.2f} | {r['quantize_seconds']:.0f} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
