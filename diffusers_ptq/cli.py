"""`diffusers-ptq` console script: `demo` (the main job on the bundled model), `evaluate`, `bench`, `quantize`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from diffusers_ptq.harness.bundled import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, load_pipeline
from diffusers_ptq.harness.evaluation import evaluate, write_json
from diffusers_ptq.harness.utils import machine_info
from diffusers_ptq.sampling import SCHEDULERS


def _sampling_args(parser: argparse.ArgumentParser, num_samples: int = 1000, seeds: list[int] = (0, 1, 2)) -> None:
    parser.add_argument("--num-samples", type=int, default=num_samples, help="samples per seed, balanced over classes")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="noise seeds (bench/demo: the first)")
    parser.add_argument("--steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS, help="sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None,
                        help="DiT: ddim (default) or ddpm; SD3/FLUX models keep their pipeline's flow-matching scheduler")
    parser.add_argument("--batch-size", type=int, default=250)


SUITES_NAMES = ("main", "baselines", "ptq4dit", "htg", "methods", "qdit", "mmdit", "mmdit-dynamic")  # keys of bench.SUITES (not imported here: bench pulls in the engine)
DEMO_CONFIGS = (dict(weight_bits=8, act_bits=8, csb_alpha=0.5), dict(weight_bits=4, act_bits=8),
                dict(weight_bits=4, act_bits=8, htg_shift=True, htg_scale=True, weight_rounding="gptq"))


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: quantize the bundled model (W8A8 PTQ4DiT, W4A8 min-max, W4A8 HTG + GPTQ), compare with FP."""
    from diffusers_ptq.config import QuantConfig
    from diffusers_ptq.harness.bench import run_benchmark

    out = Path(args.output_dir)
    configs = [QuantConfig(**c, num_samples=args.calibration_samples, num_inference_steps=args.steps,
                           guidance_scale=args.guidance_scale, scheduler=args.scheduler) for c in DEMO_CONFIGS]
    result = run_benchmark("bundled", configs, scheduler=args.scheduler, num_samples=args.num_samples,
                           seed=args.seeds[0], num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                           batch_size=args.batch_size, output=out / "results.json", grid=out / "grid.png")
    print(Path(out / "results.md").read_text())
    print(f"grid (rows: {', '.join(r['label'] for r in result['rows'])}; two samples per digit): {out / 'grid.png'}")
    print(f"results: {out / 'results.json'}, {out / 'results.md'} ({result['total_seconds']:.0f} s)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from diffusers_ptq.harness.bench import default_scheduler

    pipe = load_pipeline(args.model, scheduler=args.scheduler or default_scheduler(args.model))
    reference = load_pipeline(args.reference, scheduler=args.scheduler or default_scheduler(args.reference)) \
        if args.reference else None
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
    if args.footprint:
        from diffusers_ptq.harness.bench import run_footprint

        output = "footprint.json" if args.output == "results.json" else args.output
        result = run_footprint(output, labels=args.only)
        print(Path(output).with_suffix(".md").read_text())
        print(f"written: {output} and {Path(output).with_suffix('.md')} ({result['total_seconds']:.0f} s)")
        return 0
    if args.speed:
        from diffusers_ptq.harness.speed import run_speed_benchmark

        output = "speed.json" if args.output == "results.json" else args.output
        result = run_speed_benchmark(output, repeats=args.speed_repeats, modes=args.only, freezing=args.freezing,
                                     sampling=not args.freezing, head_to_head=args.head_to_head)
        print(Path(output).with_suffix(".md").read_text())
        print(f"written: {output} and {Path(output).with_suffix('.md')} ({result['total_seconds']:.0f} s)")
        return 0
    from diffusers_ptq.harness.bench import SUITES, run_benchmark

    calibration = dict(num_samples=args.calibration_samples, num_inference_steps=args.steps,
                       guidance_scale=args.guidance_scale, scheduler=args.scheduler)
    configs = [c for c in SUITES[args.suite](**calibration) if not args.only or any(o in c.label for o in args.only)]
    result = run_benchmark(args.model, configs, scheduler=args.scheduler, num_samples=args.num_samples, seed=args.seeds[0],
                           num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                           batch_size=args.batch_size, output=args.output, grid=args.grid,
                           dit_xl_footprint=args.dit_xl)
    print(Path(args.output).with_suffix(".md").read_text())
    print(f"written: {args.output} and {Path(args.output).with_suffix('.md')} ({result['total_seconds']:.0f} s)")
    return 0


def _parse_overrides(items: list[str] | None) -> dict:
    import yaml

    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE (VALUE in YAML syntax, e.g. num_samples=8)")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _quantize_device(requested: str | None) -> str | None:
    """Where `quantize` loads and calibrates the transformer: --device if given; under a distributed launch on
    GPUs this process's GPU (cuda:LOCAL_RANK); else None (the loader's default, the CPU)."""
    from diffusers_ptq import distributed

    if requested:
        return requested
    if distributed.is_distributed() and distributed.comm_device().type == "cuda":
        return str(distributed.comm_device())
    return None


def cmd_quantize(args: argparse.Namespace) -> int:
    """Load a float model with a recipe's config (calibrate + quantize), save the quantized checkpoint.

    Under `accelerate launch` / `torchrun` every process calibrates its share of the samples (docs/distributed.md),
    all end with the same quantized model, and only the main process writes the output folder."""
    from diffusers import AutoModel, DiffusionPipeline

    from diffusers_ptq import distributed
    from diffusers_ptq.config import load_recipe, read_recipe
    from diffusers_ptq.harness.bundled import keep_id2label, resolve_model_path

    recipe = read_recipe(args.recipe)
    config = load_recipe(args.recipe, **_parse_overrides(args.set))
    model = resolve_model_path(args.model or recipe["model"])
    metrics = None
    if args.metrics:
        data = json.loads(Path(args.metrics).read_text())
        metrics = data.get("metrics", data)
    local = Path(model)
    is_pipeline = not local.exists() or (local / "model_index.json").is_file()
    device = _quantize_device(args.device)
    if is_pipeline and not args.transformer_only and device is None:
        obj = DiffusionPipeline.from_pretrained(model, quantization_config=config)
        keep_id2label(obj, DiffusionPipeline.load_config(model).get("id2label"))
    else:
        subfolder = "transformer" if is_pipeline else None
        placement = {} if device is None else {"device_map": {"": device}}
        obj = AutoModel.from_pretrained(model, subfolder=subfolder, quantization_config=config, **placement)
        if is_pipeline and not args.transformer_only:  # the quantized transformer in its pipeline
            obj = DiffusionPipeline.from_pretrained(model, transformer=obj)
            keep_id2label(obj, DiffusionPipeline.load_config(model).get("id2label"))
    if distributed.is_main_process():  # every process holds the same model: one writes it
        from diffusers_ptq.hub import save_pretrained

        save_pretrained(obj, args.output, metrics=metrics)  # atomic, with the model card (and --metrics' figures)
        print(f"{recipe['name']}: {config.label} -> {args.output}")
    distributed.wait_for_everyone()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-ptq", description="Post-training quantization for DiTs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize the bundled model, compare with FP: table, JSON and a sample grid")
    demo.add_argument("--output-dir", default="demo-output")
    demo.add_argument("--calibration-samples", type=int, default=32)
    _sampling_args(demo, num_samples=500, seeds=[0])
    demo.set_defaults(func=cmd_demo)
    ev = sub.add_parser("evaluate", help="metrics of a pipeline folder, as JSON")
    ev.add_argument("model", help='a pipeline folder, or "bundled"')
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
    bench.add_argument("--suite", choices=sorted(SUITES_NAMES), default="baselines",
                       help="which rows: every method side by side (main); the baselines grid; PTQ4DiT or HTG (with "
                       "ablations) beside the baselines; every method once (methods); Q-DiT (qdit); or the "
                       "text-to-image table, every method × nearest/GPTQ × W4A8/W8A8 (mmdit: SD3, FLUX, PixArt), the same with "
                       "dynamic per-token activations (mmdit-dynamic)")
    bench.add_argument("--only", nargs="+", help="keep rows whose label contains one of these strings (with "
                       "--footprint: the modes to run, e.g. W4A8-GPTQ-seq; the others' rows of --output are kept; with --speed: the "
                       "modes to run, e.g. W8A8 torchao-int8dyn, beside FP32)")
    bench.add_argument("--grid", help="also write a PNG: one row of samples per method, same noise")
    bench.add_argument("--dit-xl", action="store_true",
                       help="also measure DiT-XL/2's state-dict size and peak memory per mode (random weights)")
    bench.add_argument("--speed", action="store_true",
                       help="instead: integer speed at DiT-XL/2 shapes (random weights, batch 2 x 256 tokens), FP32 vs "
                       "W8A8/W4A8/W8A16/W4A16 and the peers (torchao int8-dynamic where installed: `pip install "
                       "diffusers-ptq[peers]`; optimum-quanto W8A8), eager and compiled, beside the bare kernel's "
                       "ceiling, and the bundled pipeline's 50-step "
                       "sampling time (JSON + Markdown at --output, default speed.json)")
    bench.add_argument("--speed-repeats", type=int, default=3, help="timed forwards per mode for --speed (median)")
    bench.add_argument("--freezing", action="store_true",
                       help="with --speed: compile every mode with torch._inductor.config.freezing = True (Inductor "
                       "then lowers W8A8 layers with fused neighbours, docs/kernels.md); no sampling rows")
    bench.add_argument("--head-to-head", action="store_true",
                       help="with --speed: also time our quantized modes against torchao's int8-dynamic peer in one "
                       "process, compiled, interleaved rounds (the direct ratio; needs torchao)")
    bench.add_argument("--footprint", action="store_true",
                       help="instead: DiT-XL/2's state dict, checkpoint size by part and peak memory per mode (random "
                       "weights, one process per mode), and each mode's checkpoint loaded and run in a fresh process; "
                       "JSON + Markdown at --output, default footprint.json)")
    _sampling_args(bench, seeds=[0])
    bench.set_defaults(func=cmd_bench)
    quant = sub.add_parser("quantize", help="calibrate + quantize a float DiT with a recipe, save the checkpoint")
    quant.add_argument("--recipe", required=True, help="a recipe YAML path, or the name of one shipped with the "
                       "package (diffusers_ptq/recipes/, e.g. dit-xl-2-256-w8a8-ptq4dit-100; an unknown name lists them)")
    quant.add_argument("--model", help='float pipeline folder or hub id, a transformer folder, or "bundled" '
                                       "(default: the recipe's model)")
    quant.add_argument("--output", required=True, help="folder for the quantized checkpoint")
    quant.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config option (repeatable)")
    quant.add_argument("--transformer-only", action="store_true", help="save only the quantized transformer")
    quant.add_argument("--metrics", help="JSON of quality figures for the model card (e.g. `evaluate` output)")
    quant.add_argument("--device", help="device to load and calibrate on, e.g. cuda (default: the CPU; under "
                       "`accelerate launch` on GPUs, each process's own GPU)")
    quant.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
