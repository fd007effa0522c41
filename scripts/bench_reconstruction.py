"""Block reconstruction vs nearest vs GPTQ on the bundled model: quantization time and PSNR vs FP (same noise).

    python scripts/bench_reconstruction.py --num-samples 200 --out runs/reconstruction.jsonl

Variants (W4A8 PTQ4DiT, csb_alpha=0.5 by default): nearest, gptq, reconstruct (init nearest), reconstruct with
GPTQ's codes as the starting point (measurement only: the engine starts from nearest), and extra learning rates.
One JSON line per variant. Runs with 1 torch thread (`--threads`).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import subprocess
import time

import torch

from diffusers_ptq import api, reconstruction
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.harness.bundled import load_pipeline
from diffusers_ptq.harness.evaluation import generate_images, psnr, relative_mse
from diffusers_ptq.methods import gptq as gptq_plugin
from diffusers_ptq.models.dit import balanced_labels


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--act-bits", type=int, default=8)
    parser.add_argument("--csb-alpha", type=float, default=0.5)
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2])
    parser.add_argument("--variants", nargs="+", default=["nearest", "gptq", "reconstruct", "reconstruct-gptq-init"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/reconstruction.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp = load_pipeline("bundled")
    id2label = {i: str(i) for i in range(10)}
    labels = balanced_labels(list(range(10)), args.num_samples)
    gen = dict(seed=0, num_inference_steps=50, guidance_scale=1.5, batch_size=100, progress=False)
    reference = generate_images(fp, labels, **gen)
    common = dict(weight_bits=args.weight_bits, act_bits=args.act_bits, csb_alpha=args.csb_alpha)
    captured = {}
    original_gptq, original_recon = gptq_plugin.gptq_quantize_weights, reconstruction.reconstruct_weights

    def capturing_gptq(*a, **k):
        captured.update(original_gptq(*a, **k))
        return captured

    runs = []
    for variant in args.variants:
        for lr in (args.lrs if variant.startswith("reconstruct") else [None]):
            if variant == "nearest":
                config = QuantConfig(**common)
            elif variant == "gptq":
                config = QuantConfig(weight_rounding="gptq", **common)
            else:
                config = QuantConfig(weight_rounding="reconstruct", reconstruct_iters=args.iters, reconstruct_lr=lr,
                                     **common)
            gptq_plugin.gptq_quantize_weights = capturing_gptq if variant == "gptq" else original_gptq
            reconstruction.reconstruct_weights = (functools.partial(original_recon, init=dict(captured))
                                       if variant == "reconstruct-gptq-init" else original_recon)
            pipe = copy.deepcopy(fp)
            t0 = time.time()
            report = api.quantize_transformer(pipe.transformer, config, id2label=id2label,
                                              scheduler_config=pipe.scheduler.config, progress=False)
            seconds = time.time() - t0
            images = generate_images(pipe, labels, **gen)
            row = dict(variant=variant, label=config.label, lr=lr, iters=args.iters if lr else None,
                       psnr=psnr(images, reference), rel_mse=relative_mse(images, reference),
                       quantize_seconds=round(seconds, 1), calibration_seconds=round(report.calibration_seconds, 1),
                       rounding_seconds=round(report.rounding_seconds, 1), num_samples=args.num_samples,
                       threads=args.threads, cpu=cpu_model(), torch=torch.__version__)
            print(json.dumps(row), flush=True)
            runs.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    gptq_plugin.gptq_quantize_weights, reconstruction.reconstruct_weights = original_gptq, original_recon


if __name__ == "__main__":
    main()
