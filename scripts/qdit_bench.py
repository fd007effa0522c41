"""The `qdit` benchmark suite (docs/qdit.md), as `diffusers-ptq bench --suite qdit` runs it with its defaults.

    OMP_NUM_THREADS=1 python scripts/qdit_bench.py --num-samples 500 \
        --output docs/results/bundled-qdit.json --grid docs/results/bundled-qdit.png

Resumable row by row (rows already in --output with the same settings are kept)."""

import argparse
from pathlib import Path

from diffusers_ptq.harness.bench import qdit_configs, run_benchmark

parser = argparse.ArgumentParser()
parser.add_argument("--num-samples", type=int, default=500)
parser.add_argument("--output", default="docs/results/bundled-qdit.json")
parser.add_argument("--grid", default="docs/results/bundled-qdit.png")
parser.add_argument("--only", nargs="*", default=None, help="run only rows whose label contains one of these")
args = parser.parse_args()
configs = [c for c in qdit_configs(num_samples=32, num_inference_steps=50, guidance_scale=1.5, scheduler="ddim")
           if not args.only or any(o in c.label for o in args.only)]
run_benchmark("bundled", configs, num_samples=args.num_samples, output=args.output, grid=args.grid)
print(Path(args.output).with_suffix(".md").read_text())
