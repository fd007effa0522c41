"""GPTQ time and memory at DiT-XL/2 layer shapes (random weights, random SPD Hessian), and the memory of
holding every Linear's Hessian of DiT-XL/2.

Each (shape, format) runs in a fresh process so its peak resident memory is its own:
"peak extra" = the process's peak RSS (ru_maxrss) minus its RSS just before `gptq_round` (inputs built),
an upper bound on what GPTQ itself allocates. Writes docs/results/gptq-dit-xl-shapes.{json,md}.

    python scripts/bench_gptq_shapes.py            # all shapes, 8-bit and 4-bit per channel
    python scripts/bench_gptq_shapes.py --quick    # q/k/v and fc2 only
    python scripts/bench_gptq_shapes.py --threads 8
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_ptq.harness.utils import machine_info  # noqa: E402
from diffusers_ptq.rounding import gptq_round, nearest_round  # noqa: E402

HIDDEN = 1152
SHAPES = {  # name: (out_features, in_features) of one DiT-XL/2 block's Linears
    "attn q/k/v/out": (HIDDEN, HIDDEN),
    "ff fc1": (4 * HIDDEN, HIDDEN),
    "ff fc2": (HIDDEN, 4 * HIDDEN),
    "adaLN (norm1.linear)": (6 * HIDDEN, HIDDEN),
    "proj_out_1": (2 * HIDDEN, HIDDEN),
    "proj_out_2": (32, HIDDEN),
}
FORMATS = {"W8 per channel": (8, None), "W4 per channel": (4, None)}
DIT_XL_2_256 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
OUT = ROOT / "docs" / "results" / "gptq-dit-xl-shapes"


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def random_spd_hessian(n: int, seed: int = 0) -> torch.Tensor:
    """A Hessian like a layer input's: XᵀX/rows of correlated rows with uneven channel scales."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen) / n**0.5
    gains = torch.logspace(-1, 1, n)
    h = (mix * gains).T @ (mix * gains)
    del mix
    return h + 1e-3 * torch.diagonal(h).mean() * torch.eye(n)


def worker(shape: str, fmt: str) -> dict:
    """In this process: GPTQ of one random weight of `shape` in `fmt`; time, peak memory, error vs nearest."""
    out_features, in_features = SHAPES[shape]
    bits, group_size = FORMATS[fmt]
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) * 0.02
    hessian = random_spd_hessian(in_features)
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    rounded = gptq_round(weight, hessian, bits, group_size, damp=0.01, act_order=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    nearest = nearest_round(weight, bits, group_size)
    nearest_seconds = time.perf_counter() - t0

    def proxy_error(w_hat: torch.Tensor) -> float:  # mean over inputs of ‖(W − Ŵ)x‖², = tr(ΔW H ΔWᵀ)
        delta = (weight - w_hat).double()
        return float(((delta @ hessian.double()) * delta).sum())

    return {"shape": shape, "format": fmt, "out_features": out_features, "in_features": in_features,
            "gptq_seconds": seconds, "nearest_seconds": nearest_seconds,
            "peak_extra_bytes": max(peak - rss_before, 0), "inputs_bytes": 4 * (weight.numel() + hessian.numel()),
            "output_error_gptq_over_nearest": proxy_error(rounded.weight) / proxy_error(nearest.weight)}


def hessian_memory() -> dict:
    """Bytes of one Hessian per Linear of DiT-XL/2 (architecture built on the meta device), by accumulator dtype,
    for the Linears quantized by default (the DiT adapter's default_include) and for every Linear."""
    from diffusers import DiTTransformer2DModel

    from diffusers_ptq.models.dit import DiTAdapter

    with torch.device("meta"):
        model = DiTTransformer2DModel(**DIT_XL_2_256)
    every = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = {n: m for n, m in every.items() if any(fnmatch.fnmatchcase(n, p) for p in DiTAdapter.default_include)}
    shared = [n for n in targets if n.endswith((".attn1.to_k", ".attn1.to_v"))]  # same input as to_q

    def floats(names):
        return sum(every[n].in_features ** 2 for n in names)

    largest_block = max(floats(n for n in targets if n.startswith(f"transformer_blocks.{i}.")) for i in range(28))
    shapes: dict[str, int] = {}
    for m in targets.values():
        key = f"{m.out_features}x{m.in_features}"
        shapes[key] = shapes.get(key, 0) + 1
    return {"linears": len(every), "targets": len(targets), "target_shapes": shapes,
            "targets_float32_bytes": 4 * floats(targets), "targets_float64_bytes": 8 * floats(targets),
            "targets_float32_qkv_shared_bytes": 4 * (floats(targets) - floats(shared)),
            "every_linear_float32_bytes": 4 * floats(every), "one_block_float32_bytes": 4 * largest_block}


def markdown(result: dict) -> str:
    m = result["machine"]
    gb = 1024**3
    mb = 1024**2
    lines = ["# GPTQ at DiT-XL/2 layer shapes (CPU)", "",
             f"Machine: {m.get('cpu_model')}, {m.get('threads')} torch threads, torch {m.get('torch')}; "
             f"CPU flags: {' '.join(m.get('cpu_flags_of_note', []))}.",
             "Random weights (N(0, 0.02²)) and a random SPD Hessian; act_order on, damp 0.01, block 128, float32 "
             "updates, Hessian factorized in float64. One fresh process per row. `peak extra` = peak RSS − RSS "
             "with the inputs built (upper bound on GPTQ's own allocations). `error ratio` = tr(ΔW H ΔWᵀ) of GPTQ "
             "over round-to-nearest on the same grid (random data: a sanity check, not a quality figure).", "",
             "| layer | out × in | format | GPTQ (s) | nearest (s) | peak extra (MB) | inputs (MB) | error ratio |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['out_features']}×{r['in_features']} | {r['format']} | {r['gptq_seconds']:.2f} "
                     f"| {r['nearest_seconds']:.3f} | {r['peak_extra_bytes'] / mb:.0f} | {r['inputs_bytes'] / mb:.0f} "
                     f"| {r['output_error_gptq_over_nearest']:.3f} |")
    h = result["hessian_memory"]
    lines += ["", f"The {h['targets']} Linears quantized by default in DiT-XL/2 (`DiTAdapter.default_include`: 7 per block "
              "+ proj_out_1/2), each shape timed above times the number of Linears of that shape, one after the "
              "other on this CPU:", ""]
    for fmt, s in result["model_seconds"].items():
        lines.append(f"- {fmt}: {s:.0f} s ({s / 60:.1f} min)")
    lines += ["", "Hessians of DiT-XL/2, one [in, in] matrix per Linear:", "",
              f"- the {h['targets']} default targets: {h['targets_float32_bytes'] / gb:.2f} GB in float32, "
              f"{h['targets_float64_bytes'] / gb:.2f} GB in float64; {h['targets_float32_qkv_shared_bytes'] / gb:.2f} GB "
              "float32 if to_q/to_k/to_v shared one (same input)",
              f"- every Linear ({h['linears']}, with the per-block timestep embedders): "
              f"{h['every_linear_float32_bytes'] / gb:.2f} GB float32",
              f"- one block: {h['one_block_float32_bytes'] / mb:.0f} MB float32 (fc2's 4608² is 81 MB of it)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "FORMAT"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="only the q/k/v and fc2 shapes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: GPTQ's column loop is many small ops, which extra threads "
                             "slow down badly on a loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    shapes = ["attn q/k/v/out", "ff fc2"] if args.quick else list(SHAPES)
    rows = []
    for shape in shapes:
        for fmt in FORMATS:
            out = subprocess.run([sys.executable, __file__, "--worker", shape, fmt, "--threads", str(args.threads)], capture_output=True, text=True,
                                 check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{shape:22s} {fmt:16s} {rows[-1]['gptq_seconds']:7.2f} s  "
                  f"peak extra {rows[-1]['peak_extra_bytes'] / 2**20:6.0f} MB", flush=True)
    memory = hessian_memory()
    seconds = {(f"{r['out_features']}x{r['in_features']}", r["format"]): r["gptq_seconds"] for r in rows}
    model_seconds = {}
    if not args.quick:
        for fmt in FORMATS:
            model_seconds[fmt] = sum(n * seconds[(shape, fmt)] for shape, n in memory["target_shapes"].items())
    result = {"machine": machine_info(), "settings": {"damp": 0.01, "act_order": True, "block_size": 128},
              "rows": rows, "model_seconds": model_seconds, "hessian_memory": memory}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    OUT.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
