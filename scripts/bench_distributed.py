"""Calibration wall time with 1 process and with 2 processes (torchrun, gloo), and whether the results agree.

The default calibration (`calibrate` on every Linear: 32 samples × 50 DDIM steps, guidance 1.5, batch 16) of the
bundled model, timed inside the processes (barrier, calibrate including its reductions, barrier), `--repeats`
times in each launch (median reported); the CPU cores are shared out: 1 process × `--threads` threads vs
2 processes × threads/2. The launch's whole wall time (start-up, imports, model load) is recorded too. The 2-process
statistics are compared with the 1-process ones (max/min/absmax bit-exact expected: DDIM, 16 samples per process =
one batch, the single-process batches). Writes docs/results/calibration-processes.{json,md}.

    python scripts/bench_distributed.py                      # bundled model, CPU
    python scripts/bench_distributed.py --dit-xl --device cuda --samples 8 --steps 10   # DiT-XL/2 512 shapes,
                                                             # random weights, needs GPUs (one per process)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers_ptq import distributed  # noqa: E402
from diffusers_ptq.harness.utils import machine_info  # noqa: E402

OUTPUT = ROOT / "docs" / "results" / "calibration-processes.json"


def _model(args):
    """(transformer, scheduler_config, id2label) on this process's device."""
    if args.dit_xl:  # DiT-XL/2 at 512×512: the shapes, random weights
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                      num_layers=args.layers or 28, sample_size=64, patch_size=2,
                                      num_embeds_ada_norm=1000).eval()
        scheduler_config, id2label = None, None
    else:
        from diffusers_ptq.harness.bundled import load_pipeline

        pipe = load_pipeline("bundled")
        model, scheduler_config = pipe.transformer, dict(pipe.scheduler.config)
        id2label = {i: str(i) for i in range(10)}
    device = args.device
    if device == "cuda" and distributed.is_distributed():
        device = str(distributed.comm_device())
    return model.to(device), scheduler_config, id2label


def worker(args) -> None:
    from diffusers_ptq.calibration import calibrate

    rank, world = distributed.process_info()
    model, scheduler_config, id2label = _model(args)
    times = []
    for _ in range(args.repeats):
        distributed.wait_for_everyone()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = calibrate(model, scheduler_config=scheduler_config, num_inference_steps=args.steps,
                          num_samples=args.samples, batch_size=args.batch_size, id2label=id2label, progress=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        distributed.wait_for_everyone()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        torch.save({n: (s.max, s.min, s.absmax) for n, s in stats.layers.items()}, args.worker + ".stats.pt")
        Path(args.worker).write_text(json.dumps({"processes": world, "threads_per_process": torch.get_num_threads(),
                                                 "device": str(model.device), "calibrate_seconds": times}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, threads: int, args, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"}}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    script = [str(Path(__file__).resolve()), "--worker", str(out), "--samples", str(args.samples), "--steps",
              str(args.steps), "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--device",
              args.device]
    if args.dit_xl:
        script += ["--dit-xl"] + (["--layers", str(args.layers)] if args.layers else [])
    command = [sys.executable] + script if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
        "127.0.0.1", "--master_port", str(_free_port())] + script
    t0 = time.perf_counter()
    subprocess.run(command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, check=True)
    result = json.loads(out.read_text())
    result["launch_seconds"] = time.perf_counter() - t0
    result["calibrate_median_seconds"] = statistics.median(result["calibrate_seconds"])
    return result


def _lscpu() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {"model_name": fields.get("Model name", "").strip(), "flags": fields.get("Flags", "").split()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (split among the processes)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    parser.add_argument("--dit-xl", action="store_true", help="DiT-XL/2 512×512 shapes, random weights")
    parser.add_argument("--layers", type=int, help="with --dit-xl: fewer blocks than 28 (smoke runs)")
    parser.add_argument("--output", default=str(OUTPUT))
    parser.add_argument("--note", default="", help="free text recorded in the JSON")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md of an existing --output JSON")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.markdown_only:
        output = Path(args.output)
        print(write_markdown(json.loads(output.read_text()), output.with_suffix(".md")))
        return None

    load_before = os.getloadavg()
    rows, stats = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.processes:
            out = Path(tmp) / f"p{n}.json"
            rows.append(launch(n, max(1, args.threads // n), args, out))
            stats[n] = torch.load(str(out) + ".stats.pt")
    base = rows[0]["calibrate_median_seconds"]
    for row in rows:
        row["speedup"] = base / row["calibrate_median_seconds"]
        first = stats[args.processes[0]]
        row["stats_bit_exact_vs_first"] = all(
            torch.equal(a, b) for name in first for a, b in zip(first[name], stats[row["processes"]][name]))
    model = "DiT-XL/2 512x512 shapes (random weights)" + (f", {args.layers} blocks" if args.layers else "") \
        if args.dit_xl else "bundled (diffusers_ptq/assets/dit-mnist)"
    result = {
        "model": model, "device": args.device,
        "calibration": dict(samples=args.samples, steps=args.steps, scheduler="ddim", guidance_scale=1.5,
                            batch_size=args.batch_size, layers="every Linear"),
        "repeats": args.repeats, "rows": rows, "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "lscpu": _lscpu(), "machine": machine_info(), "note": args.note,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(write_markdown(result, output.with_suffix(".md")))


def write_markdown(result: dict, path: Path) -> str:
    """The table of a result JSON (also: `--markdown-only` rebuilds it from an existing JSON)."""
    cal = result["calibration"]
    before, after = result["load_average_before"][0], result["load_average_after"][0]
    lines = [f"# Calibration wall time by process count — {result['model']}", "",
             f"`calibrate` of every Linear, {cal['samples']} samples × {cal['steps']} DDIM steps, guidance "
             f"{cal['guidance_scale']}, batch {cal['batch_size']}, on {result['device']} "
             f"({result['lscpu'].get('model_name', '?')}); median of {result['repeats']} runs inside each launch "
             f"(barrier to barrier, reductions included). Load average before/after: {before:.2f} / {after:.2f}.", "",
             "| processes | threads each | calibrate (s), median | runs (s) | speed-up | whole launch (s) | "
             "stats = 1 process |",
             "|---:|---:|---:|---|---:|---:|---|"]
    for row in result["rows"]:
        runs = ", ".join(f"{t:.2f}" for t in row["calibrate_seconds"])
        lines.append(f"| {row['processes']} | {row['threads_per_process']} | {row['calibrate_median_seconds']:.2f} | "
                     f"{runs} | {row['speedup']:.2f}× | {row['launch_seconds']:.1f} | "
                     f"{'bit-exact' if row['stats_bit_exact_vs_first'] else 'differs'} |")
    if result.get("note"):
        lines += ["", result["note"]]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


if __name__ == "__main__":
    main()
