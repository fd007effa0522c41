"""Where the bundled PixArt model's W8A8 / W4A8 error comes from (issue #20): static per-tensor int8 activations
against per-token dynamic ones, other range rules, 4-bit weights alone, and W8A8 with one group of layers left
float at a time. Writes JSON and a Markdown table (paired PSNR against FP from the same noise).

    python scripts/pixart_activation_study.py --output docs/results/pixart-activation-study.json

30 samples (3 per digit), seed 0, the model's reporting settings (20 DPM-Solver++ steps, guidance 4.5); calibration
32 digit prompts at the same settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusers_ptq.config import QuantConfig
from diffusers_ptq.harness.bench import run_benchmark

EXCLUDED = {"adaln_single.linear": ["adaln_single.linear"], "caption_projection": ["caption_projection.*"],
            "proj_out": ["proj_out"], "attn1 (self-attention)": ["*attn1*"], "attn2.to_out": ["*attn2.to_out*"],
            "attn2.to_q/k/v": ["*attn2.to_q", "*attn2.to_k", "*attn2.to_v"], "ff (MLP)": ["*ff.net*"]}


def studies(calibration: dict) -> list[tuple[str, QuantConfig]]:
    w8a8 = dict(weight_bits=8, act_bits=8, **calibration)
    rows = [("W8A8 static min-max (per tensor)", QuantConfig(**w8a8)),
            ("W8A8 static MSE range", QuantConfig(act_range="mse", **w8a8)),
            ("W8A8 static 99.99th percentile", QuantConfig(act_range="percentile", **w8a8)),
            ("W8A8 dynamic per token", QuantConfig(act_dynamic=True, **w8a8)),
            ("W8A16 (weights only)", QuantConfig(weight_bits=8, act_bits=None, **calibration)),
            ("W4A16 GPTQ (weights only)", QuantConfig(weight_bits=4, act_bits=None, weight_rounding="gptq", **calibration)),
            ("W4A8 GPTQ, dynamic per token", QuantConfig(weight_bits=4, act_bits=8, act_dynamic=True,
                                                          weight_rounding="gptq", **calibration))]
    rows += [(f"W8A8 static, {name} float", QuantConfig(exclude=patterns, **w8a8)) for name, patterns in EXCLUDED.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/results/pixart-activation-study.json"))
    parser.add_argument("--num-samples", type=int, default=30)
    args = parser.parse_args()
    calibration = dict(num_samples=32, num_inference_steps=20, guidance_scale=4.5)
    named = studies(calibration)
    scratch = args.output.with_suffix(".bench.json")
    run_benchmark("bundled-pixart", [c for _, c in named], num_samples=args.num_samples, num_inference_steps=20,
                  guidance_scale=4.5, batch_size=args.num_samples, output=scratch, progress=False)
    result = json.loads(scratch.read_text())
    rows = result["rows"][1:]  # after FP32, in the order given
    out = {"machine": result["machine"], "versions": result["versions"], "num_samples": args.num_samples,
           "rows": [{"study": name, "psnr_db": r["psnr_db"], "paired_fd": r["classifier_fid_to_reference"], "label": r["label"]}
                    for (name, _), r in zip(named, rows, strict=True)]}
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| configuration | PSNR vs FP (dB) | paired FD |", "|---|---|---|"]
    lines += [f"| {r['study']} | {r['psnr_db']:.2f} | {r['paired_fd']:.3f} |" for r in out["rows"]]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    scratch.unlink()
    scratch.with_suffix(".md").unlink(missing_ok=True)  # run_benchmark's own table of the scratch run
    print("\n".join(lines))


if __name__ == "__main__":
    main()
