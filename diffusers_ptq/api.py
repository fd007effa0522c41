"""`quantize_transformer(transformer, config)`: calibrate -> smooth (fold) -> choose ranges -> rewrite modules.

The one pipeline that the CLI, the benchmark and (later) the diffusers quantizer all call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from diffusers_ptq.attention import install_quant_attention
from diffusers_ptq.calibration import CalibrationStats, LayerStats, calibrate, select_linears
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.groupbias import move_group_biases
from diffusers_ptq.methods import baselines, htg, ptq4dit
from diffusers_ptq.modules import quantize_linear
from diffusers_ptq.rounding import HessianRecorder, RoundedWeight, gptq_quantize_weights, scale_hessian
from diffusers_ptq.reconstruction import reconstruct_weights
from diffusers_ptq.reparam import SmoothingTarget, apply_smoothing, dit_smoothing_targets, shift_input_per_group


@dataclass
class QuantizationReport:
    config: dict
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {"input_scale": float | None, ...}
    smoothed_targets: list[str] = field(default_factory=list)
    timestep_groups: dict[str, list[int]] = field(default_factory=dict)  # HTG: first step of each group, per target
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
                    rounded: dict[str, RoundedWeight] | None = None) -> None:
    """Replace each named Linear by a frozen QuantLinear (the only place modules are swapped); `rounded` holds the
    weights that GPTQ or block reconstruction rounded, the others are rounded to nearest."""
    for name, scale in input_scales.items():
        linear = transformer.get_submodule(name)
        quantized = quantize_linear(linear, config.weight_bits, scale, config.weight_group_size,
                                    rounded=(rounded or {}).get(name))
        move_group_biases(linear, quantized)
        transformer.set_submodule(name, quantized)


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
    needs_stats = config.act_bits is not None or smoothing or grouping or use_gptq
    if stats is not None and (config.quantize_attention or use_gptq):
        raise ValueError("quantize_attention and weight_rounding='gptq' observe the model during calibration: "
                         "do not pass precomputed stats")
    if config.quantize_attention:
        attention = install_quant_attention(transformer, config.act_bits)
    hessians: dict[str, torch.Tensor] = {}

    def run_calibration() -> CalibrationStats:
        """One calibration pass; with GPTQ it also records each target's input Hessian (replacing earlier ones)."""
        t_cal = time.time()
        with HessianRecorder(targets if use_gptq else {}) as recorder:
            result = calibrate(
                transformer, scheduler=config.scheduler, scheduler_config=scheduler_config,
                num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                num_samples=config.num_samples, id2label=id2label, seed=config.seed, batch_size=config.batch_size,
                include=list(targets), sample_rows=_salience_row_layers(transformer, config),
                tokens_per_call=config.tokens_per_call if config.act_range != "minmax" else 0,
                progress=progress,
            )
        hessians.update(recorder.hessians())
        report.calibration_seconds += time.time() - t_cal
        return result

    if needs_stats and stats is None:
        stats = run_calibration()
    layers = dict(stats.layers) if stats is not None else {}
    if smoothing:
        vectors = smooth(transformer, layers, config, set(targets))
        report.smoothed_targets = [t.name for t in vectors]
        for target, s in vectors.items():
            for c in target.consumers if use_gptq else ():  # the Hessian of X / s
                hessians[c] = scale_hessian(hessians[c], s)
            if config.quantize_attention and target.kind == "value":  # V itself was divided by s
                processor = attention[target.producer.rsplit(".", 1)[0]]
                processor.absmax["v"] = processor.absmax["v"] / s
    if grouping:
        folded = htg_fold(transformer, layers, stats.timesteps, config, set(targets))
        report.smoothed_targets = [t.name for t in folded]
        report.timestep_groups = {t.name: f.starts for t, f in folded.items()}
        if config.act_bits is not None or use_gptq:  # ranges and Hessians of the transformed inputs: measured again
            for processor in attention.values() if config.quantize_attention else ():
                processor.absmax.clear()
            layers = dict(run_calibration().layers)
    input_scales = {}
    for name in targets:
        if config.act_bits is None:
            input_scales[name] = None
        else:
            clip = activation_range(layers[name], config)
            input_scales[name] = baselines.scale_from_range(clip.clamp(min=1e-8), config.act_bits)
        report.layers[name] = {"input_scale": None if input_scales[name] is None else float(input_scales[name])}
    rounded = None
    if use_gptq:
        t_round = time.time()
        rounded = gptq_quantize_weights({n: transformer.get_submodule(n) for n in targets}, hessians, config.weight_bits,
                                        config.weight_group_size, damp=config.gptq_damp,
                                        act_order=config.gptq_act_order, progress=progress)
        report.rounding_seconds = time.time() - t_round
    elif config.weight_rounding == "reconstruct":  # BRECQ: learned rounding per block, its own sampler run
        t_round = time.time()
        rounded = reconstruct_weights(transformer, {n: transformer.get_submodule(n) for n in targets}, input_scales,
                                      config, scheduler_config=scheduler_config, id2label=id2label, progress=progress)
        report.rounding_seconds = time.time() - t_round
    rewrite_linears(transformer, config, input_scales, rounded)
    if config.quantize_attention:
        for processor in attention.values():
            processor.freeze()
    report.total_seconds = time.time() - t0
    return report
