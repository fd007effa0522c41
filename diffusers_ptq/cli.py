"""`diffusers-ptq` console script: `demo` (the main job on the bundled model) and `evaluate`."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusers_ptq.bundled import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, load_pipeline
from diffusers_ptq.evaluation import class_ids_of, evaluate, generate_images, write_json
from diffusers_ptq.sampling import SCHEDULERS


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> None:
    """Write [N, C, H, W] images in [0, 1] as one PNG grid, nrow images per row."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.ones(c, rows * (h + 2) + 2, nrow * (w + 2) + 2)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = img
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if c == 1 else array).save(path)


def machine_info() -> dict:
    """CPU model and flags (lscpu), torch version and threads: recorded with every timing."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        flags = fields.get("Flags", "").split()
        info["cpu_flags_of_note"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))
    except (OSError, subprocess.CalledProcessError):
        info["cpu_model"] = platform.processor()
    return info


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-samples", type=int, default=1000, help="samples per seed, balanced over classes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS, help="sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    parser.add_argument("--batch-size", type=int, default=250)


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.output_dir)
    pipe = load_pipeline("bundled", scheduler=args.scheduler)
    t0 = time.time()
    classes = class_ids_of(pipe)
    grid_labels = [c for c in classes for _ in range(10)]
    images = generate_images(pipe, grid_labels, seed=args.seeds[0], num_inference_steps=args.steps,
                             guidance_scale=args.guidance_scale, batch_size=args.batch_size)
    save_grid(images, out / "grid.png", nrow=10)
    grid_seconds = time.time() - t0
    result = evaluate(pipe, num_samples=args.num_samples, seeds=args.seeds, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, batch_size=args.batch_size)
    result.update(model="bundled", grid_seconds=grid_seconds, machine=machine_info())
    write_json(result, out / "metrics.json")
    print(f"grid: {out / 'grid.png'} (rows = classes {classes[0]}..{classes[-1]})")
    for name, s in result["metrics"].items():
        print(f"{name:>28}: {s['mean']:.4g} ± {s['std']:.2g} over seeds {args.seeds}")
    print(f"metrics: {out / 'metrics.json'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model, scheduler=args.scheduler)
    reference = load_pipeline(args.reference, scheduler=args.scheduler) if args.reference else None
    reference_images = _load_image_folder(args.reference_images) if args.reference_images else None
    result = evaluate(pipe, reference, num_samples=args.num_samples, seeds=args.seeds, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                      inception_weights=args.inception_weights, reference_images=reference_images)
    result.update(model=str(args.model), reference=args.reference, machine=machine_info())
    write_json(result, args.output)
    print(json.dumps(result["metrics"], indent=2))
    print(f"written: {args.output}")
    return 0


def _load_image_folder(folder: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not files:
        raise SystemExit(f"--reference-images {folder}: no .png/.jpg files found")
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def cmd_bench(args: argparse.Namespace) -> int:
    from diffusers_ptq.bench import default_configs, run_benchmark

    calibration = dict(num_samples=args.calibration_samples, num_inference_steps=args.steps,
                       guidance_scale=args.guidance_scale, scheduler=args.scheduler)
    configs = [c for c in default_configs(**calibration) if not args.only or any(o in c.label for o in args.only)]
    result = run_benchmark(args.model, configs, scheduler=args.scheduler, num_samples=args.num_samples, seed=args.seeds[0],
                           num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                           batch_size=args.batch_size, output=args.output)
    print(Path(args.output).with_suffix(".md").read_text())
    print(f"written: {args.output} and {Path(args.output).with_suffix('.md')} ({result['total_seconds']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-ptq", description="Post-training quantization for DiTs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample the bundled model, evaluate it, write a grid and metrics.json")
    demo.add_argument("--output-dir", default="demo-output")
    _sampling_args(demo)
    demo.set_defaults(func=cmd_demo)
    ev = sub.add_parser("evaluate", help="metrics of a DiTPipeline folder, as JSON")
    ev.add_argument("model", help='a DiTPipeline folder, or "bundled"')
    ev.add_argument("--reference", help="full-precision pipeline folder for paired metrics (PSNR, paired FD)")
    ev.add_argument("--output", default="metrics.json")
    ev.add_argument("--inception-weights", help="local FID Inception weights, for FID/IS of RGB models")
    ev.add_argument("--reference-images", help="folder of real images for FID (with --inception-weights)")
    _sampling_args(ev)
    ev.set_defaults(func=cmd_evaluate)
    bench = sub.add_parser("bench", help="FP vs W8A8/W4A8/W4A16 with each baseline: JSON + Markdown table")
    bench.add_argument("--model", default="bundled")
    bench.add_argument("--output", default="results.json")
    bench.add_argument("--calibration-samples", type=int, default=32)
    bench.add_argument("--only", nargs="+", help="keep rows whose label contains one of these strings")
    _sampling_args(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
