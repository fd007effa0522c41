"""Each exact kernel on one quantized Linear at DiT-XL/2 shapes (batch 2 × 256 tokens; the adaLN Linear on the batch
of 2): oneDNN on its prepacked weight, `int8-per-call` (the codes unpacked at each call, `torch._int_mm`), the float
emulation with its cached weight and per call, and a bare fp32 F.linear, for W8A8, W4A8 (quanto's float shift) and
W4A8 with integer zero points (issue #22: what the memory choice costs in speed). Best of `--repeats` calls after a
warm-up, kernels interleaved shape by shape; nothing else should run. Writes docs/results/layer-kernels.{json,md}.

    python scripts/bench_layer_kernels.py [--repeats 7] [--output docs/results/layer-kernels.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_ptq import kernels  # noqa: E402
from diffusers_ptq.harness.utils import machine_info  # noqa: E402
from diffusers_ptq.modules import quantize_linear  # noqa: E402
from diffusers_ptq.rounding import nearest_round  # noqa: E402

SHAPES = ((512, 1152, 1152), (512, 1152, 4608), (512, 4608, 1152), (2, 1152, 6912))  # M, K, N
KERNEL_NAMES = ("onednn", "int8-per-call", "emulated", "emulated-per-call")


def layer(k: int, n: int, mode: str):
    linear = torch.nn.Linear(k, n)
    if mode == "W8A8":
        return quantize_linear(linear, 8, 0.02)
    rounded = nearest_round(linear.weight.detach(), 4, None, "integer") if mode == "W4A8-zi" else None
    return quantize_linear(linear, 4, 0.02, rounded=rounded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "layer-kernels.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for m, k, n in SHAPES:
        x = torch.randn(m, k)
        weight = torch.randn(n, k)
        row = {"m": m, "k": k, "n": n,
               "fp32_ms": 1e3 * kernels.best_seconds(lambda: F.linear(x, weight), args.repeats)}  # noqa: B023
        for mode in ("W8A8", "W4A8", "W4A8-zi"):
            module = layer(k, n, mode)
            for name in KERNEL_NAMES:
                if kernels.kernel_problem(module, name) is None:
                    row[f"{mode} {name}_ms"] = 1e3 * kernels.time_kernel(kernels.KERNELS[name], module, x,
                                                                         args.repeats)
        rows.append(row)
        print(row, flush=True)
    result = {"machine": machine_info(), "repeats": args.repeats, "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=1))
    lines = [f"# Kernels on one layer at DiT-XL/2 shapes\n\nCPU: {result['machine'].get('cpu_model')}; "
             f"{result['machine']['threads']} threads; torch {result['machine']['torch']}; ISA: "
             f"{', '.join(result['machine'].get('cpu_flags_of_note', []))}. Best of {args.repeats} calls after a "
             "warm-up (ms); `scripts/bench_layer_kernels.py`.\n",
             "| M×K→N | fp32 | mode | " + " | ".join(KERNEL_NAMES) + " |",
             "|---|---|---|" + "---|" * len(KERNEL_NAMES)]
    for row in rows:
        for mode in ("W8A8", "W4A8", "W4A8-zi"):
            cells = [f"{row[f'{mode} {name}_ms']:.2f}" if f"{mode} {name}_ms" in row else "–" for name in KERNEL_NAMES]
            lines.append(f"| {row['m']}×{row['k']}→{row['n']} | {row['fp32_ms']:.2f} | {mode} | " + " | ".join(cells)
                         + " |")
    Path(args.output).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"written: {args.output} and its .md")


if __name__ == "__main__":
    main()
