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
from diffusers_ptq.methods import baselines, ptq4dit
from diffusers_ptq.modules import quantize_linear
from diffusers_ptq.reparam import SmoothingTarget, apply_smoothing, dit_smoothing_targets


@dataclass
class QuantizationReport:
    config: dict
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {"input_scale": float | None, ...}
    smoothed_targets: list[str] = field(default_factory=list)
    calibration_seconds: float = 0.0
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


def _salience_row_layers(transformer: nn.Module, config: QuantConfig) -> list[str]:
    """Layers whose per-sample rows PTQ4DiT's SSC needs: the first consumer of each smoothing target."""
    if config.csb_alpha is None or config.ssc_rows != "sample":
        return []
    return [target.consumers[0] for target in dit_smoothing_targets(transformer)]


def rewrite_linears(transformer: nn.Module, config: QuantConfig, input_scales: dict[str, torch.Tensor | None]) -> None:
    """Replace each named Linear by a frozen QuantLinear (the only place modules are swapped)."""
    for name, scale in input_scales.items():
        linear = transformer.get_submodule(name)
        transformer.set_submodule(name, quantize_linear(linear, config.weight_bits, scale, config.weight_group_size))


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

    Calibrates (unless `stats` is given, or the mode is weight-only without smoothing), folds SmoothQuant if
    configured, computes each layer's static input scale, and rewrites the selected Linears into QuantLinear.
    """
    t0 = time.time()
    report = QuantizationReport(config=config.to_dict())
    targets = select_linears(transformer, config.include, config.exclude)
    if not targets:
        raise ValueError(f"no Linear layer matches include={config.include} exclude={config.exclude}")
    smoothing = config.smoothquant_alpha is not None or config.csb_alpha is not None
    needs_stats = config.act_bits is not None or smoothing
    if config.quantize_attention:
        if stats is not None:
            raise ValueError("quantize_attention observes Q/K/V during calibration: do not pass precomputed stats")
        attention = install_quant_attention(transformer, config.act_bits)
    if needs_stats and stats is None:
        t_cal = time.time()
        stats = calibrate(
            transformer, scheduler=config.scheduler, scheduler_config=scheduler_config,
            num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
            num_samples=config.num_samples, id2label=id2label, seed=config.seed, batch_size=config.batch_size,
            include=list(targets), sample_rows=_salience_row_layers(transformer, config),
            tokens_per_call=config.tokens_per_call if config.act_range != "minmax" else 0,
            progress=progress,
        )
        report.calibration_seconds = time.time() - t_cal
    layers = dict(stats.layers) if stats is not None else {}
    if smoothing:
        smoothing = smooth(transformer, layers, config, set(targets))
        report.smoothed_targets = [t.name for t in smoothing]
        for target, s in smoothing.items():
            if config.quantize_attention and target.kind == "value":  # V itself was divided by s
                processor = attention[target.producer.rsplit(".", 1)[0]]
                processor.absmax["v"] = processor.absmax["v"] / s
    input_scales = {}
    for name in targets:
        if config.act_bits is None:
            input_scales[name] = None
        else:
            clip = activation_range(layers[name], config)
            input_scales[name] = baselines.scale_from_range(clip.clamp(min=1e-8), config.act_bits)
        report.layers[name] = {"input_scale": None if input_scales[name] is None else float(input_scales[name])}
    rewrite_linears(transformer, config, input_scales)
    if config.quantize_attention:
        for processor in attention.values():
            processor.freeze()
    report.total_seconds = time.time() - t0
    return report
