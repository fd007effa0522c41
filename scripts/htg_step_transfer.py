"""What HTG costs when sampling with another number of steps than it was calibrated with.

HTG stores its group boundaries as timestep values, so a model calibrated over 50 steps maps every timestep of
a 25- or 100-step schedule to a group. This measures the price: for each sampling step count, HTG calibrated at
that count vs HTG calibrated at `--calibration-steps`, both against full precision sampled from the same noise.

    python scripts/htg_step_transfer.py --model bundled-outliers --output docs/results/htg-step-transfer.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers_ptq.api import quantize_transformer
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.harness.bundled import load_pipeline
from diffusers_ptq.harness.evaluation import evaluate, write_json
from diffusers_ptq.harness.utils import machine_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled-outliers")
    parser.add_argument("--calibration-steps", type=int, default=50)
    parser.add_argument("--sampling-steps", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--weight-bits", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--output", default="docs/results/htg-step-transfer.json")
    args = parser.parse_args()

    fp = load_pipeline(args.model)
    id2label = {v: k for k, v in fp.labels.items()} if fp.labels else None
    rows = []
    for steps in args.sampling_steps:
        for calibrated in (steps, args.calibration_steps):
            pipe = load_pipeline(args.model)
            config = QuantConfig(weight_bits=args.weight_bits, act_bits=8, htg_shift=True, htg_scale=True,
                                 num_inference_steps=calibrated)
            quantize_transformer(pipe.transformer, config, id2label=id2label, scheduler_config=pipe.scheduler.config)
            metrics = evaluate(pipe, reference_pipe=fp, num_samples=args.num_samples, seeds=[0],
                               num_inference_steps=steps)["metrics"]
            rows.append({"sampling_steps": steps, "calibration_steps": calibrated, "label": config.label,
                         "psnr_db": metrics["psnr_db"]["mean"],
                         "classifier_fid_to_reference": metrics.get("classifier_fid_to_reference", {}).get("mean"),
                         "classifier_accuracy": metrics.get("classifier_accuracy", {}).get("mean")})
            print(rows[-1])
    result = {"model": args.model, "num_samples": args.num_samples, "seed": 0, "rows": rows, "machine": machine_info()}
    write_json(result, args.output)
    lines = [f"# HTG with another sampling step count than calibration ({args.model})", "",
             f"{rows[0]['label']}, {args.num_samples} samples, seed 0, DDIM, guidance 1.5; paired metrics against FP "
             "sampled with the same steps and noise.", "",
             "| sampling steps | calibrated at | PSNR vs FP (dB) | paired FD | accuracy |", "|---|---|---|---|---|"]
    for r in rows:
        fd = "–" if r["classifier_fid_to_reference"] is None else f"{r['classifier_fid_to_reference']:.3f}"
        acc = "–" if r["classifier_accuracy"] is None else f"{r['classifier_accuracy']:.3f}"
        lines.append(f"| {r['sampling_steps']} | {r['calibration_steps']} | {r['psnr_db']:.2f} | {fd} | {acc} |")
    Path(args.output).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
