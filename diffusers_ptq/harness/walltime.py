"""Wall time of block-sequential calibration at a model's full depth, derived from measured per-block times (issue #22,
point 4): `python -m diffusers_ptq.harness.walltime`.

Measure: a full-width text-to-image transformer with a few blocks (harness/speed.py's MMDIT_SPEED_MODELS: FLUX.1-dev
width with 1 double + 2 single blocks; random weights, prompts as random embeddings) calibrated block-sequentially with
a recipe's settings on fewer samples and steps, on one device. The run's report times the sampling run that records
the first block's inputs and, per block, its observation (replays of its recorded calls, recalibration included),
its quantization (transform, rounding, packing) and the replay that makes the next block's inputs
(`QuantizationReport.first_run_seconds`, `.block_seconds`).

Derive, for the full depth (FLUX.1-dev: 19 double + 38 single blocks), the recipe's samples and steps and N processes
(each process calibrates a contiguous share of the samples, distributed.shard):

    calls per process   C_N = ⌈⌈samples / N⌉ / batch_size⌉ · steps
    per block kind k    c_k = (observe + replay) / calls      seconds per call, mean over the measured blocks of kind k
                        q_k = quantize                        seconds per block: does not depend on the calls
    first run, per call f = first_run / calls · Σ_k n_k c_k / Σ_measured c    (scaled by the blocks' relative cost)
    wall(N) = C_N · (f + Σ_k n_k c_k) + Σ_k n_k q_k

Not modelled: the collectives (each block's statistics and Hessians all-reduced across the processes before it is
quantized), the text encoders, loading and saving. Every process rounds every block (the same result), so q_k does
not shrink with N. An unrecorded 1-step run comes first (warm-up: measured on the CPU, the first run of a process
gave the first block 1.35× its observation time and 1.9× its quantization time). `--validate` checks both
extrapolations against runs of the same machinery: twice the steps on the measured blocks (linearity in the calls)
and twice the blocks of each kind at the measured steps (the depth), each against what the first run predicts.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

# blocks of each kind at full depth (the adapter's block names without their index), per MMDIT_SPEED_MODELS entry
FULL_DEPTH = {
    "flux": ("FLUX.1-dev", {"transformer_blocks": 19, "single_transformer_blocks": 38}),
    "sd3-medium": ("SD3-medium", {"transformer_blocks": 24}),
    "pixart-sigma": ("PixArt-Σ", {"transformer_blocks": 28}),
}
DEFAULT_RECIPES = {"flux": "flux1-dev-w4a8-htg-gptq", "sd3-medium": "sd35-medium-w4a8-htg-gptq",
                   "pixart-sigma": "pixart-sigma-1024-w4a8-htg-gptq"}


def calls_per_process(samples: int, batch_size: int, steps: int, processes: int) -> int:
    """Transformer calls of the busiest process: its ⌈samples / N⌉ samples in batches, once per step."""
    return math.ceil(math.ceil(samples / processes) / batch_size) * steps


def block_kind(name: str) -> str:
    """'single_transformer_blocks.1' -> 'single_transformer_blocks'."""
    return name.rsplit(".", 1)[0]


def per_kind(block_seconds: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per block kind: seconds per recorded call (observe + replay) and fixed seconds per block (quantize), means
    over the measured blocks of that kind."""
    kinds: dict[str, list[dict]] = {}
    for name, t in block_seconds.items():
        kinds.setdefault(block_kind(name), []).append(t)
    return {k: {"per_call": sum((t["calibrate"] + t["replay"]) / t["calls"] for t in ts) / len(ts),
                "fixed": sum(t["quantize"] for t in ts) / len(ts), "measured_blocks": len(ts)}
            for k, ts in kinds.items()}


def wall_time(first_run_seconds: float, block_seconds: dict[str, dict[str, float]], depth: dict[str, int],
              samples: int, batch_size: int, steps: int, processes: int) -> dict:
    """The wall time of the formula in this module's docstring (seconds), and its parts."""
    kinds = per_kind(block_seconds)
    missing = sorted(set(depth) - set(kinds))
    if missing:
        raise ValueError(f"no measured block of kind(s) {missing}: measure a model with at least one of each")
    calls = {t["calls"] for t in block_seconds.values()}
    if len(calls) != 1:
        raise ValueError(f"the measured blocks replayed different numbers of calls: {sorted(calls)}")
    measured_calls = calls.pop()
    measured_cost = sum(kinds[block_kind(name)]["per_call"] for name in block_seconds)
    full_cost = sum(n * kinds[k]["per_call"] for k, n in depth.items())
    first_per_call = first_run_seconds / measured_calls * full_cost / measured_cost
    c = calls_per_process(samples, batch_size, steps, processes)
    first = c * first_per_call
    per_call_blocks = c * full_cost
    fixed = sum(n * kinds[k]["fixed"] for k, n in depth.items())
    return {"processes": processes, "calls_per_process": c, "first_run_seconds": first,
            "block_calls_seconds": per_call_blocks, "block_quantize_seconds": fixed,
            "total_seconds": first + per_call_blocks + fixed}


def _subject(model_name: str, depth_factor: int = 1):
    """The few-block model of MMDIT_SPEED_MODELS (random weights) with `depth_factor` times its blocks of each kind,
    and its calibration context (prompts as random embeddings)."""
    import torch

    from diffusers_ptq.harness.speed import _speed_subject

    model, _, context = _speed_subject(model_name)
    if depth_factor != 1:
        config = dict(model.config)
        for key in ("num_layers", "num_single_layers"):
            if key in config:
                config[key] *= depth_factor
        torch.manual_seed(0)
        model = type(model).from_config(config).eval()
    return model, context


def measure(model_name: str, recipe: str, steps: int, samples: int, batch_size: int, resolution: int | None,
            device: str, depth_factor: int = 1) -> dict:
    """One block-sequential run of the few-block model `model_name` (`depth_factor` times its blocks) with
    `recipe`'s settings at the given size."""
    import torch

    from diffusers_ptq.api import quantize_transformer
    from diffusers_ptq.config import load_recipe

    model, context = _subject(model_name, depth_factor)
    model.to(device)
    overrides = dict(num_inference_steps=steps, num_samples=samples, batch_size=batch_size, sequential=True)
    if resolution is not None:
        overrides["calibration_resolution"] = resolution
    config = load_recipe(recipe, **overrides).to_quant_config()
    t0 = time.time()
    with torch.no_grad():
        report = quantize_transformer(model, config, context=context)
    return {"steps": steps, "samples": samples, "batch_size": batch_size, "resolution": config.calibration_resolution,
            "first_run_seconds": report.first_run_seconds, "block_seconds": report.block_seconds,
            "total_seconds": time.time() - t0}


def _markdown(result: dict) -> str:
    m, name = result["measured"], FULL_DEPTH[result["model"]][0]
    lines = [f"# Block-sequential calibration: wall time at full depth ({name})", "",
             f"Measured on {result['device']} ({result['machine'].get('cpu_model')}; torch {result['torch']}): "
             f"{result['model']} few-block model, recipe `{result['recipe']}`, {m['samples']} sample(s), "
             f"{m['steps']} steps, batch {m['batch_size']}, {m['resolution']} px. Derived with "
             "diffusers_ptq/harness/walltime.py's formula (collectives, text encoders, loading not modelled).", "",
             "| block kind | measured blocks | s per call (observe + replay) | s per block (quantize) |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {v['measured_blocks']} | {v['per_call']:.3f} | {v['fixed']:.2f} |"
              for k, v in result["kinds"].items()]
    t = result["target"]
    lines += ["", f"{name} at full depth ({', '.join(f'{n} {k}' for k, n in t['depth'].items())}), "
              f"{t['samples']} samples, batch {t['batch_size']}, {t['steps']} steps, at the measured size:", "",
              "| processes | calls per process | first run (s) | block calls (s) | block quantize (s) | total (h) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {e['processes']} | {e['calls_per_process']} | {e['first_run_seconds']:.0f} | "
              f"{e['block_calls_seconds']:.0f} | {e['block_quantize_seconds']:.0f} | {e['total_seconds'] / 3600:.2f} |"
              for e in result["estimates"]]
    if result.get("validation"):
        lines += ["", "Validation (first run + blocks, predicted from the run above against a run of it):", "",
                  "| run | blocks | steps | predicted (s) | measured (s) | predicted / measured |", "|---|---|---|---|---|---|"]
        lines += [f"| {what} | {', '.join(f'{n} {k}' for k, n in v['depth'].items())} | {v['steps']} | "
                  f"{v['predicted_seconds']:.1f} | {v['measured_seconds']:.1f} | {v['ratio']:.3f} |"
                  for what, v in result["validation"].items()]
    return "\n".join(lines) + "\n"


def sequential_seconds(run: dict) -> float:
    """What the formula covers in a measured run: the first sampling run and every block's three parts."""
    return run["first_run_seconds"] + sum(t["calibrate"] + t["quantize"] + t["replay"]
                                          for t in run["block_seconds"].values())


def validate(measured: dict, model_name: str, recipe: str, resolution: int | None, device: str) -> dict:
    """Twice the steps on the measured blocks, and twice the blocks of each kind at the measured steps: each run
    against the wall time `measured` predicts for it (one process)."""
    depth: dict[str, int] = {}
    for name in measured["block_seconds"]:
        depth[block_kind(name)] = depth.get(block_kind(name), 0) + 1
    checks = {}
    for what, steps, factor in (("twice the steps", 2 * measured["steps"], 1),
                                ("twice the blocks", measured["steps"], 2)):
        run = measure(model_name, recipe, steps, measured["samples"], measured["batch_size"], resolution, device,
                      depth_factor=factor)
        target = {k: n * factor for k, n in depth.items()}
        predicted = wall_time(measured["first_run_seconds"], measured["block_seconds"], target, measured["samples"],
                              measured["batch_size"], steps, 1)["total_seconds"]
        actual = sequential_seconds(run)
        checks[what] = {"depth": target, "steps": steps, "predicted_seconds": predicted, "measured_seconds": actual,
                        "ratio": predicted / actual, "run": run}
    return checks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(FULL_DEPTH), default="flux")
    parser.add_argument("--recipe", help="recipe whose settings calibrate (default: the family's W4A8 HTG + GPTQ)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps of the measured run")
    parser.add_argument("--samples", type=int, help="samples of the measured run (default: the recipe's batch size)")
    parser.add_argument("--resolution", type=int, help="calibration pixels (default: the recipe's)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--validate", action="store_true",
                        help="also run twice the steps and twice the blocks, each against its prediction")
    parser.add_argument("--no-warmup", action="store_true", help="skip the unrecorded 1-step run done first")
    parser.add_argument("--output", default="sequential-wall-time.json")
    args = parser.parse_args(argv)

    import torch

    from diffusers_ptq.config import read_recipe
    from diffusers_ptq.harness.utils import machine_info

    recipe = args.recipe or DEFAULT_RECIPES[args.model]
    settings = read_recipe(recipe)["config"]
    batch = settings.get("batch_size", 1)
    samples = args.samples or batch
    if not args.no_warmup:  # one-time costs (kernel and allocator set-up, lazy imports) would land in the first block
        measure(args.model, recipe, 1, samples, batch, args.resolution, args.device)
    measured = measure(args.model, recipe, args.steps, samples, batch, args.resolution, args.device)
    depth = FULL_DEPTH[args.model][1]
    target = {"depth": depth, "samples": settings["num_samples"], "batch_size": batch,
              "steps": settings["num_inference_steps"]}
    estimates = [wall_time(measured["first_run_seconds"], measured["block_seconds"], depth, target["samples"], batch,
                           target["steps"], n) for n in args.processes]
    result = {"model": args.model, "recipe": recipe, "device": args.device, "torch": torch.__version__,
              "machine": machine_info(), "measured": measured, "kinds": per_kind(measured["block_seconds"]),
              "target": target, "estimates": estimates}
    if args.validate:
        result["validation"] = validate(measured, args.model, recipe, args.resolution, args.device)
    Path(args.output).write_text(json.dumps(result, indent=2))
    Path(args.output).with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return result


if __name__ == "__main__":
    main()
