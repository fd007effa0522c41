"""Overhead of dynamic per-token activation quantization against static per-tensor, per kernel (docs/qdit.md).

For DiT-XL/2 256×256 Linear shapes (2 × 256 tokens: one CFG pair) and the bundled model's, times one layer call
with static and with dynamic int8 inputs on each kernel that runs it here ("onednn": per-channel W8A8 / W4A8;
"emulated": grouped W4A8), and the input quantization step alone. Minimum (and median) over repeats, one thread.
The quantized-input cache is cleared before every call so each call quantizes its input.

    OMP_NUM_THREADS=1 python scripts/qdit_dynamic_overhead.py  # -> docs/results/qdit-dynamic-overhead.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from diffusers_ptq import kernels
from diffusers_ptq.harness.evaluation import write_json
from diffusers_ptq.harness.utils import machine_info
from diffusers_ptq.modules import quantize_linear

parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=15)
parser.add_argument("--output", default="docs/results/qdit-dynamic-overhead.json")
args = parser.parse_args()
torch.set_num_threads(1)

SHAPES = {  # name: (tokens, in, out)
    "DiT-XL/2 qkv/out (512×1152→1152)": (512, 1152, 1152),
    "DiT-XL/2 fc1 (512×1152→4608)": (512, 1152, 4608),
    "DiT-XL/2 fc2 (512×4608→1152)": (512, 4608, 1152),
    "bundled fc1 (512×192→768)": (512, 192, 768),
}
LAYERS = {  # name: (weight bits, group size, kernel)
    "W8A8 onednn": (8, None, "onednn"),
    "W4A8 per-channel onednn": (4, None, "onednn"),
    "W4A8 g128 emulated": (4, 128, "emulated"),
}


def timed_pair(fn_a, fn_b, repeats):
    """Calls of a and b interleaved (a, b, a, b, ...) so that load drifts on a shared machine hit both alike:
    ((min, median) of a, (min, median) of b, median of the per-pair ratios b / a)."""
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    ratio = statistics.median(b / a for a, b in zip(times_a, times_b))
    return (min(times_a), statistics.median(times_a)), (min(times_b), statistics.median(times_b)), ratio


rows = []
with torch.no_grad():
    for shape_name, (m, k, n) in SHAPES.items():
        torch.manual_seed(0)
        linear = torch.nn.Linear(k, n)
        x = torch.randn(m, k) * torch.rand(m, 1) * 3
        for layer_name, (bits, group, kernel) in LAYERS.items():
            if group is not None and k % group:
                continue
            static = quantize_linear(linear, bits, float(x.abs().max()) / 127, group_size=group)
            dynamic = quantize_linear(linear, bits, None, group_size=group, act_dynamic=True)
            if kernels.kernel_problem(static, kernel) or kernels.kernel_problem(dynamic, kernel):
                continue
            static.kernel = dynamic.kernel = kernel
            for module in (static, dynamic):  # warm up (oneDNN prepacks the weight once)
                for _ in range(3):
                            module(x)
            # B023: timed_pair calls the lambdas within this iteration, so they see its variables
            t_static, t_dynamic, ratio = timed_pair(lambda: static(x), lambda: dynamic(x), args.repeats)  # noqa: B023
            scale = static.input_scale
            q_static, q_dynamic, _ = timed_pair(
                lambda: torch.clamp(torch.round(x / scale), -128, 127),  # noqa: B023
                lambda: torch.clamp(torch.round(x / kernels.per_token_scale(x)), -128, 127),  # noqa: B023
                args.repeats)
            rows.append({"shape": shape_name, "layer": layer_name, "tokens": m, "in": k, "out": n,
                         "static_s": t_static[0], "dynamic_s": t_dynamic[0],
                         "static_median_s": t_static[1], "dynamic_median_s": t_dynamic[1],
                         "overhead": ratio - 1, "overhead_of_minima": t_dynamic[0] / t_static[0] - 1,
                         "quantize_static_s": q_static[0], "quantize_dynamic_s": q_dynamic[0],
                         "scale_step_share": (q_dynamic[0] - q_static[0]) / t_static[0]})
            print(rows[-1], flush=True)

result = {"rows": rows, "repeats": args.repeats, "threads": 1, "machine": machine_info(),
          "kernel_machine": kernels.machine_kernel_info(), "torch": torch.__version__}
write_json(result, args.output)
info = result["machine"]
lines = ["# Dynamic per-token vs static per-tensor int8 activations: one Linear call", "",
         f"CPU: {info.get('cpu_model')}; VNNI flags: {result['kernel_machine']['vnni_flags'] or 'none'}; "
         f"oneDNN full-range exact: {result['kernel_machine']['onednn_full_range_exact']}; torch {torch.__version__}; "
         f"1 thread; static and dynamic calls interleaved, {args.repeats} pairs: times are minima, the overhead is the median "
         "of the per-pair ratios (a shared machine: interleaving cancels load drifts). "
         "`quantize` columns: the rounding step alone (x / s, round, clamp), the dynamic one including the per-token "
         "max|x|.", "",
         "| shape | layer | static (ms) | dynamic (ms) | overhead | quantize static (ms) | quantize dynamic (ms) | "
         "extra scale step / static call |", "|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['shape']} | {r['layer']} | {r['static_s'] * 1e3:.3f} | {r['dynamic_s'] * 1e3:.3f} | "
                 f"{r['overhead'] * 100:+.1f} % | {r['quantize_static_s'] * 1e3:.3f} | "
                 f"{r['quantize_dynamic_s'] * 1e3:.3f} | {r['scale_step_share'] * 100:.1f} % |")
Path(args.output).with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
