"""`quantize_transformer(transformer, config)`: calibrate -> smooth (fold) -> choose ranges -> rewrite modules.

The one pipeline that the CLI, the benchmark and (later) the diffusers quantizer all call.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from diffusers_ptq.attention import install_quant_attention
from diffusers_ptq.calibration import CalibrationStats, LayerStats, calibrate, select_linears
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.groupbias import move_group_biases
from diffusers_ptq.methods import baselines, htg, ptq4dit, qdit
from diffusers_ptq.modules import quantize_linear
from diffusers_ptq.reconstruction import reconstruct_weights
from diffusers_ptq.reparam import SmoothingTarget, apply_smoothing, dit_smoothing_targets, shift_input_per_group
from diffusers_ptq.rounding import HessianRecorder, RoundedWeight, gptq_quantize_weights, scale_hessian


@dataclass
class QuantizationReport:
    config: dict
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {"input_scale": float | None, ...}
    smoothed_targets: list[str] = field(default_factory=list)
    timestep_groups: dict[str, list[int]] = field(default_factory=dict)  # HTG: first step of each group, per target
    group_sizes: dict[str, int | None] = field(default_factory=dict)  # 4-bit: each layer's group size (None: channel)
    group_search: dict | None = None  # Q-DiT's search: choice, bits per weight, proxy errors (methods/qdit.py)
    search_seconds: float = 0.0
    calibration_seconds: float = 0.0
    rounding_seconds: float = 0.0
    total_seconds: float = 0.0


def activation_range(stats: LayerStats, config: QuantConfig) -> torch.Tensor:
    """The clipping range of one layer's input under the configured method."""
    if config.act_range == "minmax":
        return baselines.minmax_range(stats.absmax)
    if stats.token_samples is None:
        raise ValueError(f"act_range={config.act_range!r} needs token samples: calibrate with tokens_per_call > 0")
    if config.act_range == "percentile":
        return baselines.percentile_range(stats.token_samples, config.percentile)
    return baselines.mse_range(stats.token_samples, bits=config.act_bits)


def smoothing_vector(stats: LayerStats, weights: list[torch.Tensor], config: QuantConfig) -> torch.Tensor:
    """The per-channel divisor of one target's input: SmoothQuant's, or PTQ4DiT's balancing vector B."""
    weight_sal = ptq4dit.weight_salience(*weights)
    if config.smoothquant_alpha is not None:
        return baselines.smoothquant_factors(stats.absmax.amax(dim=0), weight_sal, config.smoothquant_alpha)
    rows = ptq4dit.salience_rows(stats.absmax, stats.sample_absmax, config.ssc_rows)
    act_sal, _ = ptq4dit.activation_salience(rows, weight_sal, config.ssc)
    return ptq4dit.balancing_vector(act_sal, weight_sal, config.csb_alpha)


def smooth(transformer: nn.Module, layers: dict[str, LayerStats], config: QuantConfig,
           quantized: set[str]) -> dict[SmoothingTarget, torch.Tensor]:
    """Fold the configured smoothing into every target whose consumers are all quantized; updates `layers` to the
    smoothed inputs. Returns the smoothing vector of each target."""
    modules = dict(transformer.named_modules())
    done = {}
    for target in dit_smoothing_targets(transformer):
        if not set(target.consumers) <= quantized:
            continue
        s = smoothing_vector(layers[target.consumers[0]], [modules[c].weight for c in target.consumers], config)
        apply_smoothing(transformer, target, s)
        for c in target.consumers:
            layers[c] = layers[c].divided(s)
        done[target] = s
    return done


@dataclass
class HTGTransform:
    """What HTG folded into one target: group starts (step indices), timestep edges, shifts z̄_g, scale s."""

    starts: list[int]
    edges: torch.Tensor  # [G-1] decreasing timestep thresholds
    shifts: torch.Tensor  # [G, C]
    scale: torch.Tensor  # [C]


def htg_vectors(stats: LayerStats, weights: list[torch.Tensor], timesteps: torch.Tensor,
                config: QuantConfig) -> HTGTransform:
    """HTG's group shifts and scale of one target's input, from its per-step max/min (see methods/htg.py)."""
    steps, channels = stats.max.shape
    if config.htg_shift:
        z = htg.channel_shifts(stats.max, stats.min)
        starts = htg.cluster_timesteps(z, min(steps, config.htg_groups or max(1, steps // 10)), config.htg_linkage)
        shifts = htg.group_shifts(z, starts)
    else:
        starts, shifts = [0], torch.zeros(1, channels)
    if config.htg_scale:
        per_step = shifts[htg.group_index(starts, steps)]
        m = htg.ema_over_steps(htg.shifted_absmax(stats.max, stats.min, per_step), config.htg_ema)
        scale = htg.scaling_vector(m, ptq4dit.weight_salience(*weights), config.htg_scaling, config.htg_alpha)
    else:
        scale = torch.ones(channels)
    return HTGTransform(starts, htg.group_edges(timesteps, starts), shifts, scale)


def htg_fold(transformer: nn.Module, layers: dict[str, LayerStats], timesteps: torch.Tensor, config: QuantConfig,
             quantized: set[str]) -> dict[SmoothingTarget, HTGTransform]:
    """Fold HTG into every target whose consumers are all quantized: X̃ = (X − z̄_g(t)) / s, the scale into the
    producer rows and consumer columns, the group shifts into per-group biases."""
    modules = dict(transformer.named_modules())
    done = {}
    for target in dit_smoothing_targets(transformer):
        if not set(target.consumers) <= quantized:
            continue
        transform = htg_vectors(layers[target.consumers[0]], [modules[c].weight for c in target.consumers],
                                timesteps, config)
        apply_smoothing(transformer, target, transform.scale)
        if config.htg_shift:
            shift_input_per_group(transformer, target, transform.edges, -transform.shifts / transform.scale)
        done[target] = transform
    return done


def _salience_row_layers(transformer: nn.Module, config: QuantConfig) -> list[str]:
    """Layers whose per-sample rows PTQ4DiT's SSC needs: the first consumer of each smoothing target."""
    if config.csb_alpha is None or config.ssc_rows != "sample":
        return []
    return [target.consumers[0] for target in dit_smoothing_targets(transformer)]


def rewrite_linears(transformer: nn.Module, config: QuantConfig, input_scales: dict[str, torch.Tensor | None],
                    rounded: dict[str, RoundedWeight] | None = None,
                    group_sizes: dict[str, int | None] | None = None) -> None:
    """Replace each named Linear by a frozen QuantLinear (the only place modules are swapped); `rounded` holds the
    weights that GPTQ or block reconstruction rounded, the others are rounded to nearest. `group_sizes`: each
    4-bit layer's group size (default: `layer_group_sizes(transformer, config, input_scales)`)."""
    if group_sizes is None:
        group_sizes = layer_group_sizes(transformer, config, list(input_scales))
    for name, scale in input_scales.items():
        linear = transformer.get_submodule(name)
        quantized = quantize_linear(linear, config.weight_bits, scale, group_sizes.get(name),
                                    rounded=(rounded or {}).get(name), act_dynamic=config.act_dynamic)
        move_group_biases(linear, quantized)
        transformer.set_submodule(name, quantized)


def layer_group_sizes(transformer: nn.Module, config: QuantConfig, names: list[str]) -> dict[str, int | None]:
    """The configured group size of each named Linear (`QuantConfig.group_size_for`), checked against its shape."""
    if config.weight_bits != 4:
        return {name: None for name in names}
    sizes = {}
    for name in names:
        size = config.group_size_for(name)
        in_features = transformer.get_submodule(name).in_features
        if size is not None and (size <= 0 or in_features % size):
            source = "weight_group_sizes" if config.weight_group_sizes and size != config.weight_group_size \
                else "weight_group_size"
            raise ValueError(f"{name}: group size {size} (from {source}) does not divide in_features={in_features}; "
                             f"use a divisor of {in_features} or None (per output channel) for this layer")
        sizes[name] = size
    return sizes


def search_group_sizes(transformer: nn.Module, names: list[str], hessians: dict[str, torch.Tensor],
                       config: QuantConfig, inputs: dict[str, torch.Tensor] | None = None
                       ) -> tuple[qdit.GroupSearchResult, dict[str, RoundedWeight]]:
    """Q-DiT's group-size search on the transformer's (final, smoothed) weights: each layer's proxy error per
    candidate (methods/qdit.proxy_errors, or model_output_errors on the recorded transformer `inputs` for the
    "model" proxy), then the budgeted choice (methods/qdit.search_group_sizes). With GPTQ the candidates are
    GPTQ-rounded and the chosen ones are returned for reuse."""
    errors, shapes, kept = {}, {}, {}
    gptq = config.weight_rounding == "gptq"
    if config.group_search_proxy == "model":
        from diffusers_ptq.rounding import gptq_round, nearest_round

        def rounded_fn(name, weight, g):
            if gptq:
                r = gptq_round(weight, hessians[name], 4, g, damp=config.gptq_damp, act_order=config.gptq_act_order)
                kept.setdefault(name, {})[g] = r
                return r
            return nearest_round(weight, 4, g)

        errors = qdit.model_output_errors(transformer, names, inputs, config.group_candidates, rounded_fn,
                                          batch_size=config.batch_size * 4)
        shapes = {n: (transformer.get_submodule(n).out_features, transformer.get_submodule(n).in_features)
                  for n in names}
        result = qdit.search_group_sizes(errors, shapes, config.group_search_bits)
        rounded = {n: kept[n][g] for n, g in result.group_sizes.items()} if gptq else {}
        return result, rounded
    for name in names:
        linear = transformer.get_submodule(name)
        shapes[name] = (linear.out_features, linear.in_features)
        errors[name], kept[name] = qdit.proxy_errors(
            linear.weight, hessians.get(name), config.group_candidates, config.group_search_proxy,
            "gptq" if gptq else "nearest", damp=config.gptq_damp, act_order=config.gptq_act_order, keep_rounded=gptq)
    result = qdit.search_group_sizes(errors, shapes, config.group_search_bits)
    rounded = {n: kept[n][g] for n, g in result.group_sizes.items()} if gptq else {}
    return result, rounded


@torch.no_grad()
def quantize_transformer(
    transformer: nn.Module,
    config: QuantConfig,
    *,
    id2label: dict | None = None,
    scheduler_config: dict | None = None,
    stats: CalibrationStats | None = None,
    progress: bool = True,
) -> QuantizationReport:
    """Quantize a DiTTransformer2DModel in place and return what was done.

    Calibrates (unless `stats` is given, or the mode is weight-only without smoothing or GPTQ), folds SmoothQuant,
    PTQ4DiT or HTG if configured (HTG then calibrates the folded model again for the activation ranges and
    Hessians), computes each layer's static input scale, rounds the weights (to nearest, or GPTQ from each layer's
    input Hessian, or block reconstruction: reconstruction.py), and rewrites the selected Linears into QuantLinear.
    """
    t0 = time.time()
    report = QuantizationReport(config=config.to_dict())
    targets = select_linears(transformer, config.include, config.exclude)
    if not targets:
        raise ValueError(f"no Linear layer matches include={config.include} exclude={config.exclude}")
    smoothing = config.smoothquant_alpha is not None or config.csb_alpha is not None
    grouping = config.htg_shift or config.htg_scale
    use_gptq = config.weight_rounding == "gptq"
    searching = config.group_search_bits is not None
    use_hessians = use_gptq or (searching and config.group_search_proxy in ("output", "relative"))
    model_proxy = searching and config.group_search_proxy == "model"  # records transformer inputs to replay
    static_acts = config.act_bits is not None and not config.act_dynamic
    needs_stats = static_acts or smoothing or grouping or use_hessians or model_proxy
    if stats is not None and (config.quantize_attention or use_hessians or model_proxy):
        raise ValueError("quantize_attention, weight_rounding='gptq' and the group-size search observe the model "
                         "during calibration: do not pass precomputed stats")
    if config.weight_rounding == "reconstruct" and (searching or config.weight_group_sizes):
        raise ValueError("weight_rounding='reconstruct' takes one weight_group_size for every layer: per-layer "
                         "group sizes (weight_group_sizes, group_search_bits) need 'nearest' or 'gptq'")
    if config.quantize_attention:
        attention = install_quant_attention(transformer, config.act_bits)
    hessians: dict[str, torch.Tensor] = {}
    recorded: list[qdit.TransformerInputRecorder] = []

    def run_calibration() -> CalibrationStats:
        """One calibration pass; with GPTQ it also records each target's input Hessian (replacing earlier ones)."""
        t_cal = time.time()
        inputs = qdit.TransformerInputRecorder(transformer) if model_proxy and not recorded else None
        with HessianRecorder(targets if use_hessians else {}) as recorder, inputs or contextlib.nullcontext():
            result = calibrate(
                transformer, scheduler=config.scheduler, scheduler_config=scheduler_config,
                num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                num_samples=config.num_samples, id2label=id2label, seed=config.seed, batch_size=config.batch_size,
                include=list(targets), sample_rows=_salience_row_layers(transformer, config),
                tokens_per_call=config.tokens_per_call if config.act_range != "minmax" else 0,
                progress=progress,
            )
        hessians.update(recorder.hessians())
        recorded.extend([inputs] if inputs is not None else [])
        report.calibration_seconds += time.time() - t_cal
        return result

    if needs_stats and stats is None:
        stats = run_calibration()
    layers = dict(stats.layers) if stats is not None else {}
    if smoothing:
        vectors = smooth(transformer, layers, config, set(targets))
        report.smoothed_targets = [t.name for t in vectors]
        for target, s in vectors.items():
            for c in target.consumers if use_hessians else ():  # the Hessian of X / s
                hessians[c] = scale_hessian(hessians[c], s)
            if config.quantize_attention and target.kind == "value":  # V itself was divided by s
                processor = attention[target.producer.rsplit(".", 1)[0]]
                processor.absmax["v"] = processor.absmax["v"] / s
    if grouping:
        folded = htg_fold(transformer, layers, stats.timesteps, config, set(targets))
        report.smoothed_targets = [t.name for t in folded]
        report.timestep_groups = {t.name: f.starts for t, f in folded.items()}
        if static_acts or use_hessians:  # ranges and Hessians of the transformed inputs: measured again
            for processor in attention.values() if config.quantize_attention else ():
                processor.absmax.clear()
            layers = dict(run_calibration().layers)
    input_scales = {}
    for name in targets:
        if not static_acts:  # weight-only, or dynamic per-token scales computed at run time
            input_scales[name] = None
        else:
            clip = activation_range(layers[name], config)
            input_scales[name] = baselines.scale_from_range(clip.clamp(min=1e-8), config.act_bits)
        report.layers[name] = {"input_scale": None if input_scales[name] is None else float(input_scales[name])}
    rounded = None
    if searching:
        t_search = time.time()
        snapshot = {name: {k: v.clone() for k, v in p.absmax.items()}
                    for name, p in (attention.items() if config.quantize_attention else ())}
        result, rounded = search_group_sizes(transformer, list(targets), hessians, config,
                                             recorded[0].inputs() if model_proxy else None)
        for name, absmax in snapshot.items():  # the search's forwards must not widen the attention ranges
            attention[name].absmax = absmax
        group_sizes = result.group_sizes
        report.group_search = result.to_dict()
        report.search_seconds = time.time() - t_search
    else:
        group_sizes = layer_group_sizes(transformer, config, list(targets))
    report.group_sizes = dict(group_sizes)
    if use_gptq and not searching:  # (the search already rounded its choice with GPTQ)
        t_round = time.time()
        rounded = {}
        for size in dict.fromkeys(group_sizes.values()):  # one call per group size, in first-seen order
            names = [n for n in targets if group_sizes[n] == size]
            rounded.update(gptq_quantize_weights({n: transformer.get_submodule(n) for n in names}, hessians,
                                                 config.weight_bits, size, damp=config.gptq_damp,
                                                 act_order=config.gptq_act_order, progress=progress))
        report.rounding_seconds = time.time() - t_round
    elif config.weight_rounding == "reconstruct":  # BRECQ: learned rounding per block, its own sampler run
        t_round = time.time()
        rounded = reconstruct_weights(transformer, {n: transformer.get_submodule(n) for n in targets}, input_scales,
                                      config, scheduler_config=scheduler_config, id2label=id2label, progress=progress)
        report.rounding_seconds = time.time() - t_round
    rewrite_linears(transformer, config, input_scales, rounded, group_sizes)
    if config.quantize_attention:
        for processor in attention.values():
            processor.freeze()
    report.total_seconds = time.time() - t0
    return report
