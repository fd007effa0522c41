"""Side-by-side quality benchmark: full precision and each quantization config on the same noise.

`run_benchmark` writes a JSON (every number, plus versions and the CPU) and a Markdown table beside it.
Each row is a fresh copy of the float pipeline quantized with one `QuantConfig`; all rows sample the same
labels from the same noise, so paired metrics (PSNR, relative MSE, paired Fréchet distance) compare each row
with the full-precision samples, and ratios come from one run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from diffusers_ptq.api import quantize_transformer
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.groupbias import group_bias_bytes
from diffusers_ptq.harness.bundled import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    MMDIT_MODELS,
    MMDIT_PIPELINES,
    PIXART_MODELS,
    PIXART_PIPELINES,
    load_pipeline,
)
from diffusers_ptq.harness.evaluation import (
    class_ids_of,
    digit_prompts,
    generate_images,
    is_text_to_image,
    score_images,
    uses_mnist_classifier,
    write_json,
)
from diffusers_ptq.harness.speed import _dit_xl_model
from diffusers_ptq.harness.utils import machine_info, process_memory, save_grid
from diffusers_ptq.models import adapter_for
from diffusers_ptq.models.dit import balanced_labels


def default_configs(**calibration) -> list[QuantConfig]:
    """The baseline grid: W8A8 and W4A8 with each activation range and SmoothQuant, W8A16 and W4A16."""
    rows = []
    for weight_bits in (8, 4):
        for act_range in ("minmax", "percentile", "mse"):
            rows.append(QuantConfig(weight_bits=weight_bits, act_bits=8, act_range=act_range, **calibration))
        rows.append(QuantConfig(weight_bits=weight_bits, act_bits=8, smoothquant_alpha=0.5, **calibration))
    rows += [QuantConfig(weight_bits=8, act_bits=None, **calibration),
             QuantConfig(weight_bits=4, act_bits=None, **calibration)]
    return rows


def ptq4dit_configs(**calibration) -> list[QuantConfig]:
    """PTQ4DiT beside the baselines it must beat, W8A8 and W4A8: min-max, SmoothQuant, CSB without SSC, CSB + SSC;
    the same three with the attention matmuls quantized; and SSC over per-timestep rows at W4A8."""
    rows = []
    for weight_bits in (8, 4):
        for attention in (False, True):
            common = dict(weight_bits=weight_bits, act_bits=8, quantize_attention=attention, **calibration)
            rows += [QuantConfig(**common), QuantConfig(smoothquant_alpha=0.5, **common)]
            if not attention:
                rows.append(QuantConfig(csb_alpha=0.5, ssc=False, **common))
            rows.append(QuantConfig(csb_alpha=0.5, **common))
    rows.append(QuantConfig(weight_bits=4, act_bits=8, csb_alpha=0.5, ssc_rows="timestep", **calibration))
    return rows


def htg_configs(**calibration) -> list[QuantConfig]:
    """HTG beside min-max, SmoothQuant and PTQ4DiT: the paper's ablation (shift only, scale only, both) at W8A8
    and W4A8; at W4A8 also G = T and ⌊T/25⌋, the paper's printed scaling formula, and attention matmuls quantized."""
    steps = calibration.get("num_inference_steps", DEFAULT_NUM_INFERENCE_STEPS)
    rows = []
    for weight_bits in (8, 4):
        common = dict(weight_bits=weight_bits, act_bits=8, **calibration)
        rows += [QuantConfig(**common), QuantConfig(smoothquant_alpha=0.5, **common),
                 QuantConfig(csb_alpha=0.5, **common), QuantConfig(htg_shift=True, **common),
                 QuantConfig(htg_scale=True, **common), QuantConfig(htg_shift=True, htg_scale=True, **common)]
    w4 = dict(weight_bits=4, act_bits=8, htg_shift=True, htg_scale=True, **calibration)
    rows += [QuantConfig(htg_groups=steps, **w4), QuantConfig(htg_groups=max(1, steps // 25), **w4),
             QuantConfig(htg_scaling="printed", **w4), QuantConfig(quantize_attention=True, **w4)]
    return rows


def compact_configs(**calibration) -> list[QuantConfig]:
    """Every method once at W8A8 and W4A8: min-max, SmoothQuant, PTQ4DiT, HTG."""
    return [QuantConfig(weight_bits=bits, act_bits=8, **method, **calibration) for bits in (8, 4)
            for method in ({}, dict(smoothquant_alpha=0.5), dict(csb_alpha=0.5), dict(htg_shift=True, htg_scale=True))]


def main_configs(**calibration) -> list[QuantConfig]:
    """Every method side by side, most important rows first (the benchmark resumes row by row): at W4A8 min-max,
    SmoothQuant, PTQ4DiT (CSB + SSC), HTG, each with round-to-nearest and GPTQ weights; the same methods at W8A8;
    the ablations (CSB without SSC; HTG shift only, scale only, the paper's printed scaling) at W4A8 and W8A8;
    PTQ4DiT and HTG with the attention matmuls quantized; W4A16 (weight-only) for the four methods with nearest and
    GPTQ rounding; W4A8 PTQ4DiT with block reconstruction (BRECQ)."""
    methods = {"minmax": {}, "sq": dict(smoothquant_alpha=0.5), "ptq4dit": dict(csb_alpha=0.5),
               "htg": dict(htg_shift=True, htg_scale=True), "csb": dict(csb_alpha=0.5, ssc=False),
               "htg-shift": dict(htg_shift=True), "htg-scale": dict(htg_scale=True),
               "htg-printed": dict(htg_shift=True, htg_scale=True, htg_scaling="printed")}
    main, ablations = ("minmax", "sq", "ptq4dit", "htg"), ("csb", "htg-shift", "htg-scale", "htg-printed")

    def row(bits, method, **extra):
        return QuantConfig(weight_bits=bits, act_bits=8, **methods[method], **extra, **calibration)

    rows = [row(4, m, weight_rounding=r) for r in ("nearest", "gptq") for m in main]
    rows += [row(8, m) for m in main]
    rows += [row(bits, m) for bits in (4, 8) for m in ablations]
    rows += [row(4, m, quantize_attention=True, weight_rounding="gptq") for m in ("ptq4dit", "htg")]
    rows += [QuantConfig(weight_bits=4, act_bits=None, **methods[m], weight_rounding=r, **calibration)
             for r in ("nearest", "gptq") for m in main]
    rows.append(row(4, "ptq4dit", weight_rounding="reconstruct"))
    return rows


QDIT_FID_SEARCH = Path(__file__).resolve().parents[2] / "docs" / "results" / "qdit-fid-search.json"


def qdit_configs(**calibration) -> list[QuantConfig]:
    """Q-DiT at W4A8 (docs/qdit.md): the searched group sizes (4.5 bits per weight = uniform groups of 128 with
    float32 scale and shift; proxy "model") with dynamic and static activations; with GPTQ; fixed groups of 64
    (5.0 bits: 128 does not divide the bundled model's 192 channels), dynamic; with HTG's shift and scale; fixed 64,
    static; the search at 5.0 bits; per-channel 4-bit weights with dynamic activations; the choice of the classifier-FID-scored
    evolutionary search (scripts/qdit_fid_search.py) when its result file exists; the calibration-free proxy."""
    w4 = dict(weight_bits=4, act_bits=8, **calibration)
    search = dict(group_search_bits=4.5)
    rows = [QuantConfig(**search, act_dynamic=True, **w4), QuantConfig(**search, **w4),
            QuantConfig(**search, act_dynamic=True, weight_rounding="gptq", **w4),
            QuantConfig(weight_group_size=64, act_dynamic=True, **w4),
            QuantConfig(**search, act_dynamic=True, htg_shift=True, htg_scale=True, **w4),
            QuantConfig(weight_group_size=64, **w4), QuantConfig(group_search_bits=5.0, act_dynamic=True, **w4),
            QuantConfig(act_dynamic=True, **w4)]
    if QDIT_FID_SEARCH.is_file():
        found = json.loads(QDIT_FID_SEARCH.read_text())["fid_search"]["group_sizes"]
        rows.append(QuantConfig(weight_group_sizes=found, act_dynamic=True, **w4))
    rows.append(QuantConfig(**search, group_search_proxy="weight", act_dynamic=True, **w4))
    return rows


def mmdit_configs(**calibration) -> list[QuantConfig]:
    """The text-to-image families' table (issue #19): min-max, SmoothQuant, PTQ4DiT, HTG, each with nearest and GPTQ
    weights, at W4A8 then W8A8; Q-DiT (groups searched at 4.5 bits, dynamic activations) with nearest and GPTQ."""
    methods = ({}, dict(smoothquant_alpha=0.5), dict(csb_alpha=0.5), dict(htg_shift=True, htg_scale=True))
    rows = [QuantConfig(weight_bits=bits, act_bits=8, weight_rounding=r, **m, **calibration)
            for bits in (4, 8) for m in methods for r in ("nearest", "gptq")]
    rows += [QuantConfig(weight_bits=4, act_bits=8, group_search_bits=4.5, act_dynamic=True, weight_rounding=r,
                         **calibration) for r in ("nearest", "gptq")]
    return rows


def mmdit_dynamic_configs(**calibration) -> list[QuantConfig]:
    """The `mmdit` table's methods with dynamic per-token int8 activations instead of static per-tensor scales
    (the smoothing folds still apply; nothing else is calibrated for the activations)."""
    methods = ({}, dict(smoothquant_alpha=0.5), dict(csb_alpha=0.5), dict(htg_shift=True, htg_scale=True))
    return [QuantConfig(weight_bits=bits, act_bits=8, act_dynamic=True, weight_rounding=r, **m, **calibration)
            for bits in (4, 8) for m in methods for r in ("nearest", "gptq")]


SUITES = {"main": main_configs, "baselines": default_configs, "ptq4dit": ptq4dit_configs, "htg": htg_configs,
          "methods": compact_configs, "qdit": qdit_configs, "mmdit": mmdit_configs,
          "mmdit-dynamic": mmdit_dynamic_configs}


def state_dict_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's state dict tensors (quanto weights flattened into their int8/packed data and scales):
    the size of its safetensors file up to the small JSON header."""
    return sum(v.numel() * v.element_size() for v in module.state_dict().values())


def outlier_summary(transformer, *, id2label=None, scheduler_config=None, num_samples: int = 16,
                    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
                    guidance_scale: float = DEFAULT_GUIDANCE_SCALE, context: dict | None = None,
                    progress: bool = True) -> dict:
    """Per layer kind (the name after the block index), the outlier profile of its input over the blocks.
    `context`: the calibration context (text-to-image: the pipeline's prompt encoder and the prompts)."""
    from diffusers_ptq.calibration import calibrate
    from diffusers_ptq.methods.baselines import outlier_profile
    from diffusers_ptq.models import adapter_for

    stats = calibrate(transformer, scheduler_config=scheduler_config, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, num_samples=num_samples, id2label=id2label, context=context,
                      include=list(adapter_for(transformer).default_include), progress=progress)
    kinds: dict[str, list[dict]] = {}
    for name, layer in stats.layers.items():
        blocks, _, rest = name.partition("transformer_blocks.")
        kind = f"{blocks}{rest.split('.', 1)[1]}" if rest else name  # FLUX: "single_attn.to_q" apart from "attn.to_q"
        kinds.setdefault(kind, []).append(outlier_profile(layer.absmax))
    summary = {}
    for kind, profiles in kinds.items():
        ratios = [p["max_over_median"] for p in profiles]
        summary[kind] = {"layers": len(profiles), "max_over_median_max": max(ratios),
                         "max_over_median_mean": sum(ratios) / len(ratios),
                         "median_first_mean": sum(p["median_first"] for p in profiles) / len(profiles),
                         "median_last_mean": sum(p["median_last"] for p in profiles) / len(profiles)}
    return summary


def default_scheduler(model: str | os.PathLike) -> str | None:
    """The sampler a benchmark uses when none is named: DiT's "ddim"; None (the pipeline's own scheduler: SD3/FLUX's
    flow matching, PixArt's DPM-Solver++) for the bundled text-to-image models and folders holding such a
    pipeline."""
    if str(model) in MMDIT_MODELS or str(model) in PIXART_MODELS:
        return None
    index = Path(model) / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") in MMDIT_PIPELINES + PIXART_PIPELINES:
        return None
    return "ddim"


def bench_context(pipe) -> dict:
    """The calibration context of a benchmarked pipeline: what its adapter reads from it (DiT's id2label; a text
    pipeline's prompt encoder) and, for the bundled text-to-image models, the digit prompts at the VAE's size."""
    context = adapter_for(pipe.transformer).pipeline_context(pipe)
    if is_text_to_image(pipe):
        context.update(prompts=digit_prompts(range(10)), resolution=pipe.vae.config.sample_size)
    return context


def run_benchmark(
    model: str | os.PathLike = "bundled",
    configs: Sequence[QuantConfig] | None = None,
    *,
    scheduler: str | None = None,
    num_samples: int = 1000,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    batch_size: int = 250,
    output: str | os.PathLike = "results.json",
    grid: str | os.PathLike | None = None,
    dit_xl_footprint: bool = False,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Benchmark `configs` against full precision; writes `output` (JSON) and the Markdown table beside it.

    grid: also write a PNG with one row per method (FP first) and two samples per class, same noise everywhere.
    The results are written after every row; with `resume`, rows already in `output` from a run with the same
    settings are kept (by label) instead of being measured again (the FP reference is always sampled again).
    scheduler: DiT's sampler ("ddim" | "ddpm"); None: `default_scheduler(model)` (DiT "ddim"; SD3/FLUX keep their
    pipeline's own).
    """
    configs = list(configs) if configs is not None else default_configs()
    scheduler = scheduler if scheduler is not None else default_scheduler(model)
    settings = {"model": str(model), "num_samples": num_samples, "seed": seed,
                "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "scheduler_kind": scheduler}
    done, done_grid = _finished_rows(output, settings, grid) if resume else ({}, {})
    fp = load_pipeline(model, scheduler=scheduler)
    classes = class_ids_of(fp)
    labels = balanced_labels(classes, num_samples)
    use_classifier = uses_mnist_classifier(fp)
    sample = dict(seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  batch_size=batch_size, progress=progress)
    t0 = time.time()
    fp_images = generate_images(fp, labels, **sample)
    fp_row = {"label": "FP32", "config": None, "sampling_seconds": time.time() - t0, "calibration_seconds": 0.0,
              "state_dict_bytes": state_dict_bytes(fp.transformer)}
    fp_row.update(score_images(fp_images, labels, fp_images, use_classifier))
    rows = [fp_row]
    grid_labels = [c for c in classes[:10] for _ in range(2)]
    grid_rows = {"FP32": generate_images(fp, grid_labels, **dict(sample, progress=False))} if grid else {}
    selected = {c.label for c in configs}
    for label, row in done.items():  # finished rows this run does not redo (e.g. `--only`): kept, not dropped
        if label not in selected and (not grid or label in done_grid):
            rows.append(row)
            grid_rows.update({label: done_grid[label]} if grid else {})
    outliers = outlier_summary(fp.transformer, scheduler_config=fp.scheduler.config,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               context=bench_context(fp), progress=progress)
    result = {**settings, "scheduler": type(fp.scheduler).__name__, "rows": rows, "outliers": outliers,
              "dit_xl_2_footprint": None, "versions": _versions(), "machine": machine_info()}
    for config in configs:
        if config.label in done and (not grid or config.label in done_grid):
            rows.append(done[config.label])
            grid_rows.update({config.label: done_grid[config.label]} if grid else {})
            continue
        pipe = load_pipeline(model, scheduler=scheduler)
        report = quantize_transformer(pipe.transformer, config, context=bench_context(pipe),
                                      scheduler_config=pipe.scheduler.config, progress=progress)
        t_sample = time.time()
        images = generate_images(pipe, labels, **sample)
        row = {"label": config.label, "config": config.to_dict(), "sampling_seconds": time.time() - t_sample,
               "calibration_seconds": report.calibration_seconds, "rounding_seconds": report.rounding_seconds,
               "quantize_seconds": report.total_seconds, "state_dict_bytes": state_dict_bytes(pipe.transformer),
               "group_bias_bytes": group_bias_bytes(pipe.transformer),
               "search_seconds": report.search_seconds, "group_sizes": report.group_sizes or None,
               "kernels": sorted({m.kernel for m in pipe.transformer.modules() if hasattr(m, "kernel")})}
        row.update(score_images(images, labels, fp_images, use_classifier))
        rows.append(row)
        if grid:
            grid_rows[config.label] = generate_images(pipe, grid_labels, **dict(sample, progress=False))
        _write_results(result, output, grid_rows)  # after every row: an interrupted run resumes from here
        if progress:
            print(format_row(row, fp_row))
    result["dit_xl_2_footprint"] = architecture_footprint() if dit_xl_footprint else None
    result["total_seconds"] = time.time() - t0
    _write_results(result, output, grid_rows)
    if grid:
        save_grid(torch.cat([grid_rows[r["label"]] for r in rows]), grid, nrow=len(grid_labels))
        result["grid"] = str(grid)
    return result


def _grid_file(output: str | os.PathLike) -> Path:
    return Path(output).with_suffix(".grid.safetensors")


def _write_results(result: dict, output: str | os.PathLike, grid_rows: dict[str, torch.Tensor]) -> None:
    write_json(result, output)
    Path(output).with_suffix(".md").write_text(markdown_table(result))
    if grid_rows:
        from safetensors.torch import save_file

        tmp = _grid_file(output).with_suffix(".tmp")
        as_bytes = {k: v if v.dtype == torch.uint8 else (v.clamp(0, 1) * 255).round().to(torch.uint8)
                    for k, v in grid_rows.items()}  # the PNG is 8-bit anyway; 4x smaller on disk
        save_file({k: v.contiguous() for k, v in as_bytes.items()}, str(tmp))
        os.replace(tmp, _grid_file(output))


def _finished_rows(output: str | os.PathLike, settings: dict, grid) -> tuple[dict, dict]:
    """Rows (and grid samples) of an earlier run of the same benchmark at `output`, by label, to resume from."""
    path = Path(output)
    if not path.is_file():
        return {}, {}
    earlier = json.loads(path.read_text())
    if any(earlier.get(k) != v for k, v in settings.items()):
        return {}, {}
    rows = {r["label"]: r for r in earlier.get("rows", [])[1:]}
    grid_rows = {}
    if grid and _grid_file(output).is_file():
        from safetensors.torch import load_file

        grid_rows = {k: v.float() / 255 if v.dtype == torch.uint8 else v
                     for k, v in load_file(str(_grid_file(output))).items()}
    return rows, grid_rows


def _versions() -> dict:
    import diffusers
    import optimum.quanto

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "optimum-quanto": optimum.quanto.__version__}


COLUMNS = [
    ("method", lambda r, fp: r["label"]),
    ("cFID↓ (real)", lambda r, fp: f"{r['classifier_fid']:.3f}" if "classifier_fid" in r else "–"),
    ("cFID / FP", lambda r, fp: f"{r['classifier_fid'] / fp['classifier_fid']:.3f}" if "classifier_fid" in r else "–"),
    ("acc", lambda r, fp: f"{r['classifier_accuracy']:.3f}" if "classifier_accuracy" in r else "–"),
    ("PSNR vs FP (dB)", lambda r, fp: f"{r['psnr_db']:.2f}"),
    ("rel. MSE", lambda r, fp: f"{r['relative_mse']:.2e}"),
    ("paired FD↓", lambda r, fp: f"{r['classifier_fid_to_reference']:.3f}" if "classifier_fid_to_reference" in r else "–"),
    ("size (MB)", lambda r, fp: f"{r['state_dict_bytes'] / 1e6:.2f}"),
    ("size / FP", lambda r, fp: f"{r['state_dict_bytes'] / fp['state_dict_bytes']:.3f}"),
    ("calib (s)", lambda r, fp: f"{r['calibration_seconds']:.1f}"),
    ("sampling (s)", lambda r, fp: f"{r['sampling_seconds']:.1f}"),
]


def format_row(row: dict, fp_row: dict) -> str:
    return " | ".join(f"{name} {fn(row, fp_row)}" for name, fn in COLUMNS)


GRID_METHODS = {"minmax": "min-max", "minmax+sq0.5": "SmoothQuant", "minmax+csb+ssc": "PTQ4DiT", "minmax+htg": "HTG",
                "gs4.5 dynamic": "Q-DiT (4.5 b)"}


def _grid_cell(label: str) -> tuple[str, str, str] | None:
    """(bits and activations, rounding, method) of an `mmdit` / `mmdit-dynamic` suite row label, e.g.
    "W4A8 minmax+sq0.5+gptq" -> ("W4A8 static", "GPTQ", "SmoothQuant"), "W8A8 dynamic+htg" -> ("W8A8 dynamic",
    "nearest", "HTG"); None for others. "min-max" with dynamic activations is no smoothing at all."""
    rounding = "GPTQ" if label.endswith("+gptq") else "nearest"
    stem = label[: -len("+gptq")] if label.endswith("+gptq") else label
    for bits in ("W4A8", "W8A8"):
        if stem.startswith(bits):
            method = stem[len(bits):].strip()
            acts = "dynamic" if "dynamic" in method else "static"
            if method.startswith("dynamic"):
                method = "minmax" + method[len("dynamic"):]
            method = GRID_METHODS.get(method)
            return (f"{bits} {acts}", rounding, method) if method else None
    return None


def method_grid(result: dict) -> str:
    """The `mmdit` suites' rows as one grid: bits, activations (static per-tensor / dynamic per-token) and rounding
    down, methods across; each cell "PSNR vs FP dB / paired FD / accuracy" ("" for a row not run yet); only the
    bits × activations that have a row. Empty when the result has none of those rows."""
    cells = {}
    for r in result["rows"][1:]:
        key = _grid_cell(r["label"])
        if key is not None:
            fd = f"{r['classifier_fid_to_reference']:.2f}" if "classifier_fid_to_reference" in r else "–"
            acc = f"{r['classifier_accuracy']:.2f}" if "classifier_accuracy" in r else "–"
            cells[key] = f"{r['psnr_db']:.2f} / {fd} / {acc}"
    if not cells:
        return ""
    methods = list(GRID_METHODS.values())
    lines = ["| PSNR vs FP (dB) / paired FD / acc | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for kind in ("W8A8 static", "W8A8 dynamic", "W4A8 static", "W4A8 dynamic"):
        if not any(key[0] == kind for key in cells):
            continue
        for rounding in ("nearest", "GPTQ"):
            lines.append(f"| {kind}, {rounding} | " + " | ".join(cells.get((kind, rounding, m), "")
                                                                   for m in methods) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(result: dict) -> str:
    rows = result["rows"]
    fp_row = rows[0]
    lines = [
        f"# Benchmark: {result['model']}",
        "",
        f"{result['num_samples']} samples, seed {result['seed']}, {result['num_inference_steps']} "
        f"{result['scheduler']} steps, guidance {result['guidance_scale']}; every row from the same noise. "
        f"CPU: {result['machine'].get('cpu_model')}; torch {result['versions']['torch']}, "
        f"optimum-quanto {result['versions']['optimum-quanto']}. Sampling times are wall times on a shared machine, "
        "not speed measurements (`diffusers-ptq bench --speed`, docs/kernels.md); every kernel computes the same "
        "integer arithmetic.",
        "",
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(fn(r, fp_row) for _, fn in COLUMNS) + " |" for r in rows]
    grid = method_grid(result)
    if grid:
        lines += ["", "The same rows by method (empty: not run yet):", "", grid.rstrip("\n")]
    lines += ["", "Activation outliers of the float model (per input channel absmax; ratio = largest channel over the "
              "median channel at one step; median = the median channel's absmax at the first / last step):", "",
              "| layer | layers | max ratio | mean ratio | median first → last |", "|---|---|---|---|---|"]
    for kind, o in result.get("outliers", {}).items():
        lines.append(f"| {kind} | {o['layers']} | {o['max_over_median_max']:.1f} | {o['max_over_median_mean']:.1f} | "
                     f"{o['median_first_mean']:.3g} → {o['median_last_mean']:.3g} |")
    if result.get("dit_xl_2_footprint"):
        lines += ["", "DiT-XL/2 architecture built from its config (random weights), one process per row:", "",
                  footprint_table(result["dit_xl_2_footprint"])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- DiT-XL/2 footprint

FOOTPRINT_CONFIGS = {
    "FP32": None,
    "W8A16": dict(weight_bits=8, act_bits=None),
    "W4A16": dict(weight_bits=4, act_bits=None),
    "W8A8": dict(weight_bits=8, act_bits=8),
    "W4A8": dict(weight_bits=4, act_bits=8),
    "W4A8-GPTQ": dict(weight_bits=4, act_bits=8, weight_rounding="gptq"),
    # block-sequential calibration (issue #22): Hessians and rounded weights of one block at a time
    "W8A8-GPTQ-seq": dict(weight_bits=8, act_bits=8, weight_rounding="gptq", sequential=True),
    "W4A8-GPTQ-seq": dict(weight_bits=4, act_bits=8, weight_rounding="gptq", sequential=True),
    # HTG's checkpoint with its per-group biases: 5 groups (the HTG paper's G = ⌊50/10⌋), calibrated on 10 steps
    "W4A8-HTG": dict(weight_bits=4, act_bits=8, htg_shift=True, htg_scale=True, htg_groups=5, num_inference_steps=10),
    # the same with the embedders stored as 8-bit weights (issue #22)
    "W4A8-HTG-emb8": dict(weight_bits=4, act_bits=8, htg_shift=True, htg_scale=True, htg_groups=5,
                          num_inference_steps=10, embedder_bits=8),
}


def checkpoint_parts(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of what a save writes, by part: block weights (quantized codes or float), quantization scales, HTG group
    biases, embedders, other float tensors (biases, norms, positional tables); a quantized model's checkpoint stores
    identical copies once (serialization.state_dict_and_metadata), a float one is its plain state dict."""
    from diffusers_ptq.serialization import GROUP_BIAS_INFIX, state_dict_and_metadata

    quantized = any(getattr(m, "weight_qtype", None) is not None for m in model.modules())
    tensors = state_dict_and_metadata(model, model.state_dict())[0] if quantized else model.state_dict()
    parts = {"block weights": 0, "scales": 0, "group biases": 0, "embedders": 0, "other float": 0}
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if f".{GROUP_BIAS_INFIX}." in name:
            parts["group biases"] += size
        elif name.endswith(("_scale", "_shift", "input_scale", "output_scale")):
            parts["scales"] += size
        elif ".emb." in name or name.startswith(("pos_embed", "adaln_single.emb", "time_text_embed",
                                                  "context_embedder", "x_embedder")):
            parts["embedders"] += size
        elif ".weight._data" in name or (name.endswith("weight") and t.ndim == 2):
            parts["block weights"] += size
        else:
            parts["other float"] += size
    return parts


def _footprint_subject(model_name: str):
    """(model, forward inputs, calibration context) of a footprint row: DiT-XL/2 (random weights; every block's
    timestep/class embedder a copy of block 0's, as in converted DiT-XL/2 checkpoints), or a text-to-image model at
    full width from harness/speed.py (MMDIT_SPEED_MODELS: random weights, a few blocks)."""
    if model_name != "dit-xl-2":
        from diffusers_ptq.harness.speed import _speed_subject

        return _speed_subject(model_name)
    model = _dit_xl_model()
    inputs = dict(hidden_states=torch.randn(2, 4, 32, 32), timestep=torch.tensor([500, 500]),
                  class_labels=torch.tensor([1, 1000]))
    return model, inputs, {}


def save_footprint_checkpoint(model, folder: str | os.PathLike, inputs: dict, weight_bits: int | None,
                              act_bits: int | None) -> int:
    """Save a footprint row's model as a diffusers checkpoint (float, or pre-quantized: the quantizer attached with
    a plain config of its bit widths — loading reads the tensors and the metadata, not the config's method) and its
    forward inputs beside it; returns the checkpoint files' bytes."""
    from safetensors.torch import save_file

    from diffusers_ptq.config import BaselineConfig
    from diffusers_ptq.quantizer import DiffusersPTQQuantizer, attach

    folder = Path(folder)
    if weight_bits is not None:
        attach(model, DiffusersPTQQuantizer(BaselineConfig(weight_bits=weight_bits, act_bits=act_bits)))
    model.save_pretrained(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(folder / "inputs.safetensors"))
    return size


def load_worker(folder: str | os.PathLike, class_name: str) -> dict:
    """In this (fresh) process: load the checkpoint in `folder` with diffusers' `from_pretrained` (a pre-quantized
    one is rebuilt without calibrating) and run one forward on the inputs saved beside it; resident memory after the
    imports, after loading, and the peak over loading and the forward; then the time of a second forward. The kernel
    choice is the environment's (DIFFUSERS_PTQ_KERNEL_CHOICE, kernels.KERNEL_CHOICE): the kernels the layers took
    are recorded, and glibc's MALLOC_MMAP_THRESHOLD_ as this process saw it."""
    import diffusers
    from safetensors.torch import load_file

    import diffusers_ptq  # noqa: F401 (registers the quantizer)
    from diffusers_ptq.modules import kernel_summary

    folder = Path(folder)
    inputs = load_file(str(folder / "inputs.safetensors"))
    row = {"imports_rss_bytes": process_memory()["rss"]}
    t0 = time.time()
    model = getattr(diffusers, class_name).from_pretrained(folder)
    row["load_seconds"] = time.time() - t0
    row["loaded_rss_bytes"] = process_memory()["rss"]
    row["kernels"] = kernel_summary(model)
    row["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    with torch.no_grad():
        model(**inputs)
        row["load_forward_peak_bytes"] = process_memory()["peak"]
        t0 = time.time()
        model(**inputs)
        row["forward_seconds"] = time.time() - t0
    return row


# A quantized checkpoint's further loads (issue #22), each in a fresh process with these environment variables: the
# kernels chosen for memory (KERNEL_CHOICE "memory"), and the same with glibc told to map every allocation of 1 MiB or
# more on its own, so that a freed activation or weight slice goes back to the system instead of staying in its heap
# (docs/diffusers.md, "Running in about the memory of the files").
MEMORY_LOADS = {
    "memory_kernels": ("memory kernels", {"DIFFUSERS_PTQ_KERNEL_CHOICE": "memory"}),
    "memory_kernels_mmap": ("memory kernels, MALLOC_MMAP_THRESHOLD_=1 MiB",
                            {"DIFFUSERS_PTQ_KERNEL_CHOICE": "memory", "MALLOC_MMAP_THRESHOLD_": str(2**20)}),
}


def measure_load(model, inputs: dict, weight_bits: int | None, act_bits: int | None) -> dict:
    """Save the model (`save_footprint_checkpoint`) and load it and run it in a fresh process (`load_worker`):
    memory and the checkpoint's file bytes; a quantized checkpoint again once per MEMORY_LOADS entry."""
    import tempfile

    def load(folder, env=None):
        out = subprocess.run([sys.executable, "-m", "diffusers_ptq.harness.bench", "--load-worker", folder,
                              type(model).__name__], capture_output=True, text=True, check=True,
                             env=None if env is None else {**os.environ, **env})
        return json.loads(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as folder:
        files = save_footprint_checkpoint(model, folder, inputs, weight_bits, act_bits)
        row = {"checkpoint_file_bytes": files, **load(folder)}
        if weight_bits is not None:
            row.update({key: load(folder, env) for key, (_, env) in MEMORY_LOADS.items()})
    return row


def footprint_worker(label: str, model_name: str = "dit-xl-2") -> dict:
    """In this process: the model (`_footprint_subject`) quantized per FOOTPRINT_CONFIGS[label], then one forward;
    state-dict bytes, checkpoint bytes by part, and the process's peak resident memory. Then the model saved and
    loaded again in a fresh process (`measure_load`)."""
    model, inputs, context = _footprint_subject(model_name)
    row = {"label": label, "model": model_name,
           "parameters": sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))}
    t0 = time.time()
    options = FOOTPRINT_CONFIGS[label]
    if options is not None:
        config = QuantConfig(**{"num_inference_steps": 2, **options}, num_samples=1, batch_size=1)
        report = quantize_transformer(model, config, context=context, progress=False)
        row["calibration_seconds"] = report.calibration_seconds
    row["quantize_seconds"] = time.time() - t0
    row["state_dict_bytes"] = state_dict_bytes(model)
    row["checkpoint_parts"] = checkpoint_parts(model)
    row["checkpoint_bytes"] = sum(row["checkpoint_parts"].values())
    with torch.no_grad():
        t0 = time.time()
        model(**inputs)
        row["forward_seconds"] = time.time() - t0
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bits = (None, None) if options is None else (options["weight_bits"], options["act_bits"])
    row["load"] = measure_load(model, inputs, *bits)
    return row


def architecture_footprint(labels: Sequence[str] = tuple(FOOTPRINT_CONFIGS), model_name: str = "dit-xl-2") -> list[dict]:
    """Run `footprint_worker` for each label in a fresh process (so peak memory is that mode's own)."""
    rows = []
    for label in labels:
        out = subprocess.run([sys.executable, "-m", "diffusers_ptq.harness.bench", "--footprint-worker", label,
                              model_name], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def _gb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e9:.2f}"


def footprint_table(rows: list[dict], title: str = "DiT-XL/2 (random weights)") -> str:
    fp = rows[0]
    base = fp.get("checkpoint_bytes", fp["state_dict_bytes"])
    lines = [f"| {title} | state dict (MB) | checkpoint (MB) | / FP32 | peak RSS (GB) | quantize (s) | "
             "forward (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        saved = r.get("checkpoint_bytes", r["state_dict_bytes"])
        lines.append(f"| {r['label']} | {r['state_dict_bytes'] / 1e6:.0f} | {saved / 1e6:.0f} | {saved / base:.3f} "
                     f"| {r['peak_rss_bytes'] / 1e9:.2f} | {r['quantize_seconds']:.1f} | {r['forward_seconds']:.2f} |")
    if all("checkpoint_parts" in r for r in rows):
        names = list(rows[0]["checkpoint_parts"])
        lines += ["", "| checkpoint part (MB) | " + " | ".join(r["label"] for r in rows) + " |",
                  "|---|" + "---|" * len(rows)]
        lines += [f"| {n} | " + " | ".join(f"{r['checkpoint_parts'][n] / 1e6:.1f}" for r in rows) + " |" for n in names]
    loaded = [r for r in rows if r.get("load")]
    if loaded:
        lines += ["", "| loading the saved checkpoint, then one forward (fresh process) | files (MB) | after imports (GB) "
                  "| after loading (GB) | peak (GB) | peak − imports (GB) | / files | load (s) | next forward (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in loaded:
            files = r["load"]["checkpoint_file_bytes"]
            runs = [(r["label"], r["load"])] + [(f"{r['label']} ({name})", r["load"][key])  # the same files again
                                                 for key, (name, _) in MEMORY_LOADS.items() if r["load"].get(key)]
            for label, load in runs:
                imports, peak = load["imports_rss_bytes"], load["load_forward_peak_bytes"]
                over = None if imports is None else peak - imports  # no current figure off Linux (process_memory)
                forward = load.get("forward_seconds")
                cells = [f"{files / 1e6:.0f}", _gb(imports), _gb(load["loaded_rss_bytes"]), _gb(peak), _gb(over),
                         "–" if over is None else f"{over / files:.2f}", f"{load['load_seconds']:.1f}",
                         "–" if forward is None else f"{forward:.2f}"]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_footprint(output: str | os.PathLike, labels: Sequence[str] | None = None,
                  models: Sequence[str] = ("dit-xl-2", "flux")) -> dict:
    """`bench --footprint`: the size and memory tables alone, DiT-XL/2 and a FLUX.1-width model with a few blocks
    (one process per mode), JSON + Markdown. `labels`: only these modes (None: every one); the other modes' rows
    of an existing `output` JSON are kept (so one mode can be rerun, or a long run resumed)."""
    from diffusers_ptq.harness.speed import MMDIT_SPEED_MODELS

    unknown = [label for label in labels or () if label not in FOOTPRINT_CONFIGS]
    if unknown:
        raise ValueError(f"unknown footprint mode(s) {unknown}; the modes: {list(FOOTPRINT_CONFIGS)}")
    t0 = time.time()
    kept = json.loads(Path(output).read_text())["models"] if labels is not None and Path(output).is_file() else {}
    tables = {}
    for name in models:
        rows = {r["label"]: r for r in kept.get(name, [])}
        for row in architecture_footprint(list(labels or FOOTPRINT_CONFIGS), name):
            rows[row["label"]] = row
        tables[name] = [rows[label] for label in FOOTPRINT_CONFIGS if label in rows]
    result = {"models": tables, "versions": _versions(), "machine": machine_info(), "total_seconds": time.time() - t0}
    write_json(result, output)
    text = [f"# Footprint\n\nCPU: {result['machine']['cpu_model']}; torch {result['versions']['torch']}; one process "
            "per mode, random weights. DiT-XL/2: every block's embedder is a copy of block 0's, as in converted DiT-XL/2 "
            "checkpoints; a quantized checkpoint stores it once. `-seq`: block-sequential calibration "
            "(docs/sequential.md).\n"]
    for name, rows in tables.items():
        title = "DiT-XL/2 (random weights)" if name == "dit-xl-2" else MMDIT_SPEED_MODELS[name][2]
        text.append(footprint_table(rows, title))
    Path(output).with_suffix(".md").write_text("\n".join(text))
    return result


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--footprint-worker":
        print(json.dumps(footprint_worker(sys.argv[2], *sys.argv[3:])))
    elif len(sys.argv) == 4 and sys.argv[1] == "--load-worker":
        print(json.dumps(load_worker(sys.argv[2], sys.argv[3])))
