"""Quantization settings. `QuantConfig` holds what the engine needs; validated on construction, JSON-safe.

(The diffusers-registered config classes — PTQ4DiTConfig, HTGConfig, ... — build on these fields.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffusers_ptq.methods.htg import LINKAGES as HTG_LINKAGES
from diffusers_ptq.methods.ptq4dit import SSC_ROWS

# Q-DiT's group-size search: candidate group sizes (None = per output channel) and the proxy that scores them
from diffusers_ptq.methods.qdit import CANDIDATES as GROUP_CANDIDATES
from diffusers_ptq.methods.qdit import PROXIES as GROUP_SEARCH_PROXIES
from diffusers_ptq.prompts import check_prompts
from diffusers_ptq.rounding import ZERO_POINTS
from diffusers_ptq.scheme import ACT_RANGES, SCHEDULERS

WEIGHT_ROUNDINGS = ("nearest", "gptq", "reconstruct")
HTG_SCALINGS = ("migration", "printed")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {list(allowed)}")


@dataclass
class QuantConfig:
    """Bits, activation range method, smoothing and calibration settings of one quantization run.

    weight_bits: 8 (per-output-channel qint8) or 4 (qint4, per output channel or in `weight_group_size` groups).
    act_bits: 8 (static per-tensor int8 inputs) or None (weight-only: W8A16 / W4A16).
    act_range: "minmax" (absmax over all calibration steps), "percentile" (of |x|), "mse" (clip minimizing
        the quantization MSE on sampled activations).
    smoothquant_alpha: None, or SmoothQuant's migration strength in [0, 1], folded offline.
    quantize_attention: also round the attention matmuls' inputs (Q, K, V to int8, softmax output to 8 bits).
    csb_alpha: None, or PTQ4DiT's channel-wise salience balancing with B = (s(X)/s(W))^α (α = 0.5 in the paper),
        folded offline. `ssc` weights the calibration rows by softmax(−Spearman ρ) (PTQ4DiT's SSC); False gives
        every row the same weight (the paper's "CSB without SSC" ablation). `ssc_rows`: "sample" (one row per
        timestep × calibration sample, as the official code) or "timestep" (one row per timestep).
    htg_shift / htg_scale: HTG's timestep-grouped channel shift and EMA channel scaling (both: HTG; one: the
        paper's ablations). `htg_groups`: number of timestep groups G (None: ⌊T/10⌋, at least 1); `htg_linkage`:
        "ward" | "centroid" | "average" (the paper's greedy adjacent merging) or "optimal" (exact minimizer of the
        within-group sum of squares); `htg_ema`: the EMA coefficient of the channel max; `htg_scaling`: "migration"
        (s = m^a / max|W|^(1−a), a = `htg_alpha`) or "printed" (s = m / max|W|, the paper's formula as printed).
    weight_group_sizes: per-layer 4-bit group sizes, {exact Linear name or fnmatch pattern: group size | None
        (per output channel)}; an exact name wins, then the first matching pattern, then `weight_group_size`.
        Each size must divide its layer's in_features (checked when the layer is quantized). Q-DiT's search writes one.
    group_search_bits: None, or Q-DiT's group-size search (methods/qdit.py) under this budget of average bits per
        quantized weight, scale and shift included (quanto stores both in float32: 4 + 64/g bits for groups of g,
        4 + 64/in_features per output channel); every layer picks one of `group_candidates` (those dividing its
        in_features) to minimize the summed `group_search_proxy` error: "model" (the transformer's output error
        with only that layer rounded, on transformer inputs recorded along the calibration run), "output" (the layer's output error
        trace(ΔW H ΔWᵀ) over the calibration inputs, H = E[xᵀx] over every timestep), "relative" (the same divided
        by trace(W H Wᵀ)), "weight" (‖ΔW‖², no calibration). With weight_rounding="gptq" ΔW is GPTQ's.
    act_dynamic: 8-bit activations quantized per token at run time (symmetric, scale = max|x_token| / 127)
        instead of a static per-tensor scale; act_range is then unused.
    embedder_bits: None (the conditioning embedders stay float) or 8: their Linears (timestep, guidance, pooled-text
        embedders) stored as weight-only per-output-channel int8 and their embedding tables (DiT's class table) as
        int8 per row; which modules are embedders is the model family's (ModelAdapter.embedders). Calibration and
        the methods are unchanged (embedders are not calibrated). The checkpoint gets smaller; in memory the
        weight-only Linears run on the `emulated` kernel, which keeps a dequantized float copy beside the codes.
    weight_zero_point: the 4-bit grid (rounding.quant_grid). "float" (quanto's own: scale = (max − min) / 15, shift
        = −min) or "integer" (the range widened to hold 0, shift = scale · z with an integer zero point z ∈ [0, 15]:
        w = scale · (code − z), which the oneDNN kernel multiplies as int8 codes without the float shift term that
        costs "float" 4-bit layers their speed; same checkpoint format, the grid moves by at most half a step).
    weight_rounding: "nearest" (round to nearest) or "gptq" (error-compensating rounding from each layer's
        input Hessian over the calibration run; `gptq_damp` is the damping as a fraction of the mean diagonal,
        `gptq_act_order` processes columns by decreasing Hessian diagonal), or "reconstruct" (AdaRound-style
        learned rounding of each DiT block's Linears against the full-precision block output, BRECQ; see
        docs/rounding.md): `reconstruct_iters` Adam steps per block (the official PTQ4DiT code: 20k) with learning
        rate `reconstruct_lr` on minibatches of `reconstruct_batch` rows out of `reconstruct_samples` cached
        (timestep, sample) rows; seeded by `seed`.
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    weight_group_size: int | None = None
    weight_group_sizes: dict[str, int | None] | None = None
    group_search_bits: float | None = None
    group_candidates: list[int | None] = field(default_factory=lambda: list(GROUP_CANDIDATES))
    group_search_proxy: str = "model"
    act_dynamic: bool = False
    act_range: str = "minmax"
    percentile: float = 99.99
    smoothquant_alpha: float | None = None
    quantize_attention: bool = False
    csb_alpha: float | None = None
    ssc: bool = True
    ssc_rows: str = "sample"
    htg_shift: bool = False
    htg_scale: bool = False
    htg_groups: int | None = None
    htg_linkage: str = "ward"
    htg_ema: float = 0.99
    htg_scaling: str = "migration"
    htg_alpha: float = 0.5
    weight_rounding: str = "nearest"
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    reconstruct_iters: int = 500
    reconstruct_lr: float = 1e-2
    reconstruct_batch: int = 32
    reconstruct_samples: int = 256
    include: list[str] | None = None  # None: the model family's default (ModelAdapter.default_include)
    exclude: list[str] = field(default_factory=list)
    embedder_bits: int | None = None
    weight_zero_point: str = "float"
    # calibration (scheduler / steps / guidance None: the model family's pipeline defaults, DiT "ddim", 50, 1.5)
    scheduler: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_samples: int = 32
    seed: int = 0
    batch_size: int = 16
    tokens_per_call: int = 64
    calibration_prompts: list[str] | None = None  # text-to-image families; None: prompts.CALIBRATION_PROMPTS
    calibration_resolution: int | None = None  # pixels; None: the pipeline's default size
    sequential: bool = False  # block-sequential calibration (api.quantize_sequential)
    sequential_inputs: str = "quantized"  # what feeds each block: the quantized blocks' outputs, or "float"
    sequential_cache: str | None = None  # a folder for the cached block inputs; None: in memory

    def __post_init__(self) -> None:
        _check("weight_bits", self.weight_bits, (8, 4))
        _check("act_bits", self.act_bits, (8, None))
        _check("act_range", self.act_range, ACT_RANGES)
        _check("embedder_bits", self.embedder_bits, (8, None))
        _check("weight_zero_point", self.weight_zero_point, ZERO_POINTS)
        if self.weight_zero_point != "float" and self.weight_bits != 4:
            raise ValueError("weight_zero_point applies to weight_bits=4 only (8-bit weights are symmetric): leave it "
                             "'float'")
        _check("scheduler", self.scheduler, (None, *SCHEDULERS))
        _check("ssc_rows", self.ssc_rows, SSC_ROWS)
        _check("weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS)
        if self.smoothquant_alpha is not None and self.csb_alpha is not None:
            raise ValueError("smoothquant_alpha and csb_alpha both set: choose one smoothing method (set the other to None)")
        _check("htg_linkage", self.htg_linkage, HTG_LINKAGES)
        _check("htg_scaling", self.htg_scaling, HTG_SCALINGS)
        if (self.htg_shift or self.htg_scale) and (self.smoothquant_alpha is not None or self.csb_alpha is not None):
            raise ValueError("HTG (htg_shift/htg_scale) cannot be combined with smoothquant_alpha or csb_alpha: "
                             "choose one smoothing method")
        if self.htg_groups is not None and self.htg_groups <= 0:
            raise ValueError(f"htg_groups must be positive or None (⌊T/10⌋), got {self.htg_groups}")
        if not 0 < self.htg_ema < 1 or not 0 <= self.htg_alpha <= 1:
            raise ValueError(f"htg_ema must be in (0, 1) and htg_alpha in [0, 1], got {self.htg_ema}, {self.htg_alpha}")
        if self.csb_alpha is not None and not 0 <= self.csb_alpha <= 1:
            raise ValueError(f"csb_alpha must be in [0, 1] or None, got {self.csb_alpha}")
        if not 0 <= self.gptq_damp < 1:
            raise ValueError(f"gptq_damp must be in [0, 1), got {self.gptq_damp}")
        for name in ("reconstruct_iters", "reconstruct_batch", "reconstruct_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.reconstruct_lr, (int, float)) and 0 < self.reconstruct_lr < float("inf")):
            raise ValueError(f"reconstruct_lr must be a positive number, got {self.reconstruct_lr!r}")
        if self.weight_group_size is not None:
            if self.weight_bits != 4:
                raise ValueError("weight_group_size applies to weight_bits=4 only (8-bit weights are per channel)")
            if self.weight_group_size <= 0:
                raise ValueError(f"weight_group_size must be positive or None, got {self.weight_group_size}")
        self._validate_groups()
        if not isinstance(self.act_dynamic, bool):
            raise ValueError(f"act_dynamic must be True or False, got {self.act_dynamic!r}")
        if self.act_dynamic and self.act_bits is None:
            raise ValueError("act_dynamic=True needs act_bits=8 (dynamic per-token int8 activations)")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.quantize_attention and self.act_bits is None:
            raise ValueError("quantize_attention needs act_bits=8 (attention inputs are quantized like activations)")
        if self.smoothquant_alpha is not None and not 0 <= self.smoothquant_alpha <= 1:
            raise ValueError(f"smoothquant_alpha must be in [0, 1] or None, got {self.smoothquant_alpha}")
        for name in ("num_inference_steps", "num_samples", "batch_size", "calibration_resolution"):
            value = getattr(self, name)
            if (value is not None or name in ("num_samples", "batch_size")) and (
                    isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int{' or None' * (name not in ('num_samples', 'batch_size'))}"
                                 f", got {value!r}")
        if self.guidance_scale is not None and (isinstance(self.guidance_scale, bool) or not isinstance(
                self.guidance_scale, (int, float)) or not 0 <= self.guidance_scale < math.inf):
            raise ValueError(f"guidance_scale must be a number >= 0 or None, got {self.guidance_scale!r}")
        if self.calibration_prompts is not None:
            self.calibration_prompts = check_prompts(self.calibration_prompts)
        self._validate_sequential()
        self.include = None if self.include is None else list(self.include)
        self.exclude = list(self.exclude)

    def _validate_sequential(self) -> None:
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be True or False, got {self.sequential!r}")
        _check("sequential_inputs", self.sequential_inputs, ("quantized", "float"))
        cache = self.sequential_cache
        if cache is not None and (not isinstance(cache, (str, os.PathLike)) or not os.path.isdir(cache)):
            raise ValueError(f"sequential_cache must be an existing folder (the cached block inputs are written "
                             f"there) or None (in memory), got {cache!r}")
        if cache is not None:
            self.sequential_cache = os.fspath(cache)

    def _validate_groups(self) -> None:
        def valid_size(g) -> bool:
            return g is None or (isinstance(g, int) and not isinstance(g, bool) and g > 0)

        if self.weight_group_sizes is not None:
            if not isinstance(self.weight_group_sizes, dict) or not all(
                    isinstance(k, str) and valid_size(v) for k, v in self.weight_group_sizes.items()):
                raise ValueError("weight_group_sizes must be a mapping {layer name or fnmatch pattern: positive int "
                                 f"group size or None (per output channel)}}, got {self.weight_group_sizes!r}")
            self.weight_group_sizes = dict(self.weight_group_sizes)
        if isinstance(self.group_candidates, (str, bytes)) or not hasattr(self.group_candidates, "__iter__"):
            raise ValueError(f"group_candidates must be a list of group sizes (positive ints or None), got "
                             f"{self.group_candidates!r}")
        self.group_candidates = list(self.group_candidates)
        if not self.group_candidates or not all(valid_size(g) for g in self.group_candidates) or \
                len(set(self.group_candidates)) != len(self.group_candidates):
            raise ValueError(f"group_candidates must be distinct positive ints or None (per output channel), got "
                             f"{self.group_candidates!r}")
        _check("group_search_proxy", self.group_search_proxy, GROUP_SEARCH_PROXIES)
        if self.group_search_bits is not None:
            bits = self.group_search_bits
            if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not (4 < bits < math.inf):
                raise ValueError(f"group_search_bits must be a number of bits per weight above 4 (scales included) "
                                 f"or None, got {bits!r}")
            if self.weight_group_sizes is not None or self.weight_group_size is not None:
                raise ValueError("group_search_bits searches the group sizes: do not also fix them with "
                                 "weight_group_size / weight_group_sizes (set one)")
        if (self.weight_group_sizes or self.group_search_bits is not None) and self.weight_bits != 4:
            raise ValueError("weight_group_sizes / group_search_bits apply to weight_bits=4 only (8-bit weights are "
                             "per channel)")

    @property
    def label(self) -> str:
        """Short name such as "W4A8 minmax+sq0.5"."""
        bits = f"W{self.weight_bits}A{self.act_bits or 16}"
        if self.weight_group_size:
            bits += f"g{self.weight_group_size}"
        if self.weight_bits == 4 and self.weight_zero_point == "integer":
            bits += "zi"
        if self.weight_group_sizes:
            digest = hashlib.sha1(json.dumps(self.weight_group_sizes, sort_keys=True).encode()).hexdigest()[:6]
            bits += f"gmix-{digest}"
        if self.group_search_bits is not None:
            bits += f"gs{self.group_search_bits:g}"
            if self.group_search_proxy != "model":
                bits += f"-{self.group_search_proxy}"
            if self.group_candidates != list(GROUP_CANDIDATES):
                bits += "{" + ",".join("ch" if g is None else str(g) for g in self.group_candidates) + "}"
        method = ("dynamic" if self.act_dynamic else self.act_range) if self.act_bits else "weight-only"
        if self.smoothquant_alpha is not None:
            method += f"+sq{self.smoothquant_alpha:g}"
        if self.csb_alpha is not None:
            method += f"+csb{'' if self.csb_alpha == 0.5 else f'{self.csb_alpha:g}'}{('+ssc' if self.ssc_rows == 'sample' else '+ssc(t)') if self.ssc else ''}"
        if self.htg_shift or self.htg_scale:
            parts = "" if self.htg_shift and self.htg_scale else ("(shift)" if self.htg_shift else "(scale)")
            groups = f" G{self.htg_groups}" if self.htg_shift and self.htg_groups else ""
            scaling = "" if self.htg_scaling == "migration" and self.htg_alpha == 0.5 else (
                " printed" if self.htg_scaling == "printed" else f" a{self.htg_alpha:g}")
            method += f"+htg{parts}{groups}{scaling if self.htg_scale else ''}"
        if self.weight_rounding == "reconstruct":
            method += "+recon" + ("" if self.reconstruct_iters == 500 else f"{self.reconstruct_iters}")
        elif self.weight_rounding != "nearest":
            method += f"+{self.weight_rounding}"
        if self.quantize_attention:
            method += " +attn"
        if self.embedder_bits:
            method += f" +emb{self.embedder_bits}"
        if self.sequential:
            method += " +seq" + ("(float)" if self.sequential_inputs == "float" else "")
        return f"{bits} {method}"

    def to_dict(self) -> dict:
        return asdict(self)

    def plan(self):
        """This flat form as the engine's Plan: the scheme, the calibration settings and the methods it names."""
        from diffusers_ptq.methods import gptq, htg, ptq4dit, qdit, reconstruct, smoothquant
        from diffusers_ptq.scheme import CalibrationSettings, Plan, QuantScheme

        scheme = QuantScheme(
            weight_bits=self.weight_bits, act_bits=self.act_bits, weight_group_size=self.weight_group_size,
            weight_group_sizes=self.weight_group_sizes, act_dynamic=self.act_dynamic, act_range=self.act_range,
            percentile=self.percentile, quantize_attention=self.quantize_attention,
            include=None if self.include is None else tuple(self.include), exclude=tuple(self.exclude),
            embedder_bits=self.embedder_bits, weight_zero_point=self.weight_zero_point)
        calibration = CalibrationSettings(
            scheduler=self.scheduler, num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
            num_samples=self.num_samples, seed=self.seed, batch_size=self.batch_size,
            tokens_per_call=self.tokens_per_call, calibration_prompts=None if self.calibration_prompts is None
            else tuple(self.calibration_prompts), calibration_resolution=self.calibration_resolution,
            sequential=self.sequential, sequential_inputs=self.sequential_inputs,
            sequential_cache=self.sequential_cache)
        methods = []
        if self.smoothquant_alpha is not None:
            methods.append(smoothquant.SmoothQuant(alpha=self.smoothquant_alpha))
        if self.csb_alpha is not None:
            methods.append(ptq4dit.PTQ4DiT(csb_alpha=self.csb_alpha, ssc=self.ssc, ssc_rows=self.ssc_rows))
        if self.htg_shift or self.htg_scale:
            methods.append(htg.HTG(num_groups=self.htg_groups, linkage=self.htg_linkage, ema_alpha=self.htg_ema,
                                   migration_alpha=None if self.htg_scaling == "printed" else self.htg_alpha,
                                   shift=self.htg_shift, scale=self.htg_scale))
        if self.group_search_bits is not None:
            methods.append(qdit.GroupSearch(bits_per_weight=self.group_search_bits,
                                            group_sizes=list(self.group_candidates),
                                            search_proxy=self.group_search_proxy))
        if self.weight_rounding == "gptq":
            methods.append(gptq.GPTQ(damp=self.gptq_damp, act_order=self.gptq_act_order))
        elif self.weight_rounding == "reconstruct":
            methods.append(reconstruct.Reconstruct(iters=self.reconstruct_iters, lr=self.reconstruct_lr,
                                                   batch=self.reconstruct_batch, samples=self.reconstruct_samples))
        return Plan(scheme, calibration, methods)


# ---------------------------------------------------------------------------------------------------------------
# diffusers-facing configs: one class per method, on diffusers' QuantizationConfigMixin.
# ---------------------------------------------------------------------------------------------------------------

import copy  # noqa: E402
import enum  # noqa: E402
from typing import Any, ClassVar  # noqa: E402

from diffusers.quantizers import PipelineQuantizationConfig  # noqa: E402
from diffusers.quantizers.quantization_config import QuantizationConfigMixin  # noqa: E402

# Method name -> config class. `quantizer.py` registers every entry with diffusers (and transformers) on
# `import diffusers_ptq`; `register_method` adds new ones (see quantizer.register_method).
METHODS: dict[str, type[DiffusersPTQConfig]] = {}
# The pipeline component a bare config quantizes when passed to `DiffusionPipeline.from_pretrained`.
PIPELINE_COMPONENT = "transformer"
# quant_method as written into a saved config.json: diffusers' "Unknown quantization type, got <this>" error then
# tells a process that has not imported the plugin what to do.
SAVED_METHOD_TEMPLATE = "{name} (requires `import diffusers_ptq`)"

# Options shared by every method: bits, activation range, rounding, layer selection, calibration.
COMMON_OPTIONS: dict[str, Any] = dict(
    weight_bits=8,
    act_bits=8,
    weight_group_size=None,
    weight_group_sizes=None,
    act_dynamic=False,
    act_range="minmax",
    percentile=99.99,
    quantize_attention=False,
    weight_rounding="nearest",
    gptq_damp=0.01,
    gptq_act_order=True,
    reconstruct_iters=500,
    reconstruct_lr=1e-2,
    reconstruct_batch=32,
    reconstruct_samples=256,
    include=None,
    exclude=[],
    embedder_bits=None,
    weight_zero_point="float",
    scheduler=None,
    num_inference_steps=None,
    guidance_scale=None,
    num_samples=32,
    class_labels=None,
    calibration_prompts=None,
    calibration_resolution=None,
    seed=0,
    batch_size=16,
    tokens_per_call=64,
    sequential=False,
    sequential_inputs="quantized",
    sequential_cache=None,
)


def saved_method_name(name: str) -> str:
    return SAVED_METHOD_TEMPLATE.format(name=name)


def register_config(cls: type[DiffusersPTQConfig]) -> type[DiffusersPTQConfig]:
    """Class decorator: add a config class to METHODS under `cls.method` (diffusers registration: quantizer.py)."""
    name = cls.method
    if not name or not isinstance(name, str):
        raise ValueError(f"{cls.__name__}.method must be a non-empty string")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is already registered by {METHODS[name].__name__}")
    # diffusers reads `quant_method.value`: a str Enum member, one enum per method so that methods stay addable.
    cls.quant_method_member = enum.Enum(f"{cls.__name__}Method", {name.upper().replace("-", "_"): name}, type=str)[
        name.upper().replace("-", "_")]
    METHODS[name] = cls
    return cls


class DiffusersPTQConfig(QuantizationConfigMixin, PipelineQuantizationConfig):
    """Base of the diffusers quantization configs: the engine's options plus calibration settings.

    Common options (defaults in `COMMON_OPTIONS`): weight_bits (8 | 4), act_bits (8 | None), weight_group_size
    (None = per output channel, 4-bit only), weight_group_sizes (per-layer group sizes: {name or fnmatch pattern:
    size | None}), act_dynamic (per-token int8 activations computed at run time), act_range ("minmax" | "percentile" | "mse"), percentile,
    quantize_attention, weight_rounding ("nearest" | "gptq" | "reconstruct"), gptq_damp, gptq_act_order,
    reconstruct_iters, reconstruct_lr, reconstruct_batch, reconstruct_samples (block reconstruction), include / exclude (fnmatch
    patterns on Linear names), embedder_bits (None | 8: the conditioning embedders as 8-bit weights),
    weight_zero_point ("float" | "integer": the 4-bit grid; "integer" runs faster on the oneDNN kernel), and
    calibration: scheduler ("ddim" | "ddpm" | "dpm_solver" | "flow_match_euler"),
    num_inference_steps, guidance_scale (each None = the model family's pipeline default: DiT "ddim", 50 steps,
    1.5; SD3 flow-matching Euler, 28, 7.0; FLUX.1 dev 28, 3.5 embedded, schnell 4, none; PixArt DPM-Solver++, 20,
    4.5), num_samples,
    class_labels (class-conditional models; None = balanced over all the model's classes; else the classes to
    draw the num_samples labels from, cycling), calibration_prompts (text-to-image models; None = the bundled set
    `diffusers_ptq.prompts.CALIBRATION_PROMPTS`; else a list of strings, cycled), calibration_resolution (pixels;
    None = the pipeline's default size), seed, batch_size, tokens_per_call, and sequential (True: calibrate and
    quantize block by block, docs/sequential.md), sequential_inputs ("quantized" | "float": what feeds each block),
    sequential_cache (None: the cached block inputs in memory; a folder: in files there).

    The same object is a model-level config (`<Model>.from_pretrained(..., quantization_config=cfg)` for a model class
    with an adapter in diffusers_ptq.models,
    `PipelineQuantizationConfig(quant_mapping={"transformer": cfg})`) and, through PipelineQuantizationConfig, a
    pipeline-level one that applies to the pipeline's "transformer" component only
    (`<Pipeline>.from_pretrained(..., quantization_config=cfg)`).
    """

    method: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, Any]] = {}  # method-specific options and their defaults
    quant_method_member: ClassVar[enum.Enum]

    def __init__(self, **kwargs):
        method = kwargs.pop("quant_method", None)
        if not type(self).method or METHODS.get(type(self).method) is not type(self):
            raise TypeError(f"{type(self).__name__} is not a registered method config (use a subclass such as "
                            f"{', '.join(c.__name__ for c in METHODS.values())})")
        if method is not None and str(getattr(method, "value", method)) not in (self.method,
                                                                              saved_method_name(self.method)):
            raise ValueError(f"quant_method={method!r} does not match {type(self).__name__} ({self.method!r})")
        allowed = self.option_names()
        unknown = sorted(k for k in kwargs if k not in allowed)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown option(s) {unknown}; allowed options: {sorted(allowed)}")
        self.quant_method = self.quant_method_member
        for name, default in {**COMMON_OPTIONS, **self.OPTIONS}.items():
            value = kwargs.get(name, default)
            setattr(self, name, copy.deepcopy(list(value) if isinstance(value, tuple) else value))
        self.validate()

    # --- options -------------------------------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        return list({**COMMON_OPTIONS, **cls.OPTIONS})

    def options(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self, name)) for name in self.option_names()}

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the allowed values."""
        self._engine_fields()  # QuantConfig validates the shared fields
        labels = self.class_labels
        if labels is not None:
            if isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
                raise ValueError(f"class_labels must be None or a list of class ids (ints >= 0), got {labels!r}")
            labels = list(labels)
            if not labels or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in labels):
                raise ValueError(f"class_labels must be None or a non-empty list of class ids (ints >= 0), got {labels!r}")
            self.class_labels = labels
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is None and name == "include":  # the model family's default Linears
                continue
            if value is None or isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"{name} must be a list of fnmatch patterns (strings){' or None' * (name == 'include')}"
                                 f", got {value!r}")
            setattr(self, name, list(value))

    def _engine_fields(self) -> QuantConfig:
        """QuantConfig from every option that is one of its fields (method options included: csb_alpha, ...)."""
        return QuantConfig(**{k: v for k, v in self.options().items() if k in QuantConfig.__dataclass_fields__})

    def to_quant_config(self) -> QuantConfig:
        """These settings in the engine's flat form (QuantConfig)."""
        return self._engine_fields()

    def to_plan(self):
        """What the engine runs (`scheme.Plan`): the common options as the scheme and the calibration settings, the
        method's own options as its plug-in dataclass(es) — the same names, not renamed — and the rounding method
        named by `weight_rounding`, from the options prefixed with its name (`gptq_damp` → GPTQ.damp)."""
        from dataclasses import fields

        from diffusers_ptq.methods import PLUGINS
        from diffusers_ptq.scheme import CalibrationSettings, Plan, QuantScheme

        scheme = {f.name: getattr(self, f.name) for f in fields(QuantScheme)}
        scheme.update(include=None if self.include is None else tuple(self.include), exclude=tuple(self.exclude))
        calibration = {f.name: getattr(self, f.name) for f in fields(CalibrationSettings)}
        if self.calibration_prompts is not None:
            calibration["calibration_prompts"] = tuple(self.calibration_prompts)
        calibration = CalibrationSettings(**calibration)
        rounding = []
        if self.weight_rounding != "nearest":  # its options are the config's "<method>_<option>" fields
            plugin = PLUGINS[self.weight_rounding]
            rounding = [plugin(**{f.name: getattr(self, f"{plugin.name}_{f.name}") for f in fields(plugin)})]
        return Plan(QuantScheme(**scheme), calibration, self.method_plugins() + rounding)

    def method_plugins(self) -> list:
        """The method's plug-ins, built from its own options (methods/)."""
        return []

    @property
    def label(self) -> str:
        return f"{self.method} {self.to_quant_config().label}"

    # --- JSON ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": saved_method_name(self.method), **self.options()}

    def to_diff_dict(self) -> dict[str, Any]:
        defaults = {**COMMON_OPTIONS, **self.OPTIONS}
        return {"quant_method": self.method,
                **{k: v for k, v in self.options().items() if v != defaults[k]}}

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    __hash__ = None

    # --- the pipeline-level form ---------------------------------------------------------------------------------
    def _resolve_quant_config(self, is_diffusers: bool = True, module_name: str | None = None):
        """DiffusionPipeline.from_pretrained asks this for each component: the transformer gets this config."""
        return self if is_diffusers and module_name == PIPELINE_COMPONENT else None


@register_config
class PTQ4DiTConfig(DiffusersPTQConfig):
    """PTQ4DiT (Wu et al., NeurIPS 2024): channel-wise salience balancing with migration strength `csb_alpha`
    (0.5 in the paper), weighted over calibration rows by Spearman-ρ salience calibration (`ssc`; False is the
    paper's "CSB without SSC" ablation), folded offline into adaLN / to_v. `ssc_rows`: "sample" | "timestep"."""

    method = "ptq4dit"
    OPTIONS = dict(csb_alpha=0.5, ssc=True, ssc_rows="sample")

    def method_plugins(self) -> list:
        from diffusers_ptq.methods.ptq4dit import PTQ4DiT

        return [PTQ4DiT(csb_alpha=self.csb_alpha, ssc=self.ssc, ssc_rows=self.ssc_rows)]

    def validate(self) -> None:
        if self.csb_alpha is None:
            raise ValueError("csb_alpha must be a number in [0, 1] for PTQ4DiTConfig (use BaselineConfig for no "
                             "balancing)")
        if not isinstance(self.ssc, bool):
            raise ValueError(f"ssc must be True or False, got {self.ssc!r}")
        super().validate()


@register_config
class BaselineConfig(DiffusersPTQConfig):
    """Baselines: per-tensor activation ranges by `act_range` ("minmax" | "percentile" | "mse"), optionally with
    SmoothQuant folded offline (`smoothquant_alpha` in [0, 1], None = off)."""

    method = "baseline"
    OPTIONS = dict(smoothquant_alpha=None)

    def method_plugins(self) -> list:
        from diffusers_ptq.methods.smoothquant import SmoothQuant

        return [] if self.smoothquant_alpha is None else [SmoothQuant(alpha=self.smoothquant_alpha)]



@register_config
class HTGConfig(DiffusersPTQConfig):
    """HTG (hierarchical timestep grouping): timestep-grouped channel shifting + EMA channel scaling, folded into
    adaLN / to_v and per-group biases (docs/htg.md).

    Options: num_groups (None = ⌊T/10⌋), linkage ("ward" | "centroid" | "average": the paper's greedy adjacent
    merging; "optimal": exact minimizer of the within-group sum of squares), ema_alpha (0 < α < 1, 0.99),
    migration_alpha (s = m^a / max|W|^(1−a), default 0.5 — chosen by measurement over the paper's printed
    s = m / max|W|, which `migration_alpha=None` selects; docs/htg.md), shift / scale (the ablation switches).
    """

    method = "htg"
    OPTIONS = dict(num_groups=None, linkage="ward", ema_alpha=0.99, migration_alpha=0.5, shift=True, scale=True)

    def method_plugins(self) -> list:
        from diffusers_ptq.methods.htg import HTG

        return [HTG(**{name: getattr(self, name) for name in self.OPTIONS})]

    def validate(self) -> None:
        self.method_plugins()  # the HTG dataclass validates its options (methods/htg.py)
        super().validate()

    def to_quant_config(self) -> QuantConfig:
        """HTG's options as the engine's htg_* fields."""
        from dataclasses import replace

        return replace(self._engine_fields(), htg_shift=self.shift, htg_scale=self.scale, htg_groups=self.num_groups,
                       htg_linkage=self.linkage, htg_ema=self.ema_alpha,
                       htg_scaling="printed" if self.migration_alpha is None else "migration",
                       htg_alpha=0.5 if self.migration_alpha is None else self.migration_alpha)


@register_config
class QDiTConfig(DiffusersPTQConfig):
    """Q-DiT (Chen et al., CVPR 2025): 4-bit weights in groups whose size is chosen per layer, and dynamic per-token
    int8 activations (docs/qdit.md).

    Options: bits_per_weight (the group-size search's budget: average bits per quantized weight, float32 scale and
    shift included; 4.5 = uniform groups of 128), group_sizes (the candidates; None = per output channel; a layer
    only takes those dividing its in_features), search_proxy ("model": the transformer's output error with only
    that layer rounded, on inputs recorded along the calibration trajectory; "output": each layer's output error
    trace(ΔW H ΔWᵀ) on the calibration inputs over all timesteps; "relative": the same over trace(W H Wᵀ);
    "weight": ‖ΔW‖²), act_dynamic (True: per-token scales at run time; False: static per-tensor, `act_range`),
    shift / scale (HTG's timestep-grouped shift and channel scaling folded first; off by default, docs/qdit.md).
    Fixed group sizes win over the search: with `weight_group_size` or `weight_group_sizes` set, nothing is searched
    (nor with weight_bits=8: per-channel weights, dynamic activations).
    Defaults weight_bits=4, act_bits=8 (W4A8).
    """

    method = "qdit"
    OPTIONS = dict(weight_bits=4, bits_per_weight=4.5, group_sizes=list(GROUP_CANDIDATES), search_proxy="model",
                   act_dynamic=True, shift=False, scale=False)

    def validate(self) -> None:
        if not isinstance(self.shift, bool) or not isinstance(self.scale, bool):
            raise ValueError(f"shift and scale must be True or False, got {self.shift!r}, {self.scale!r}")
        super().validate()

    def method_plugins(self) -> list:
        from dataclasses import fields

        from diffusers_ptq.methods.htg import HTG
        from diffusers_ptq.methods.qdit import GroupSearch

        plugins = [HTG(shift=self.shift, scale=self.scale)] if self.shift or self.scale else []
        if self.searches():
            plugins.append(GroupSearch(**{f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(GroupSearch)}))
        return plugins

    def searches(self) -> bool:
        """Whether quantizing runs the group-size search (no fixed group sizes given, a budget set)."""
        return (self.bits_per_weight is not None and self.weight_bits == 4 and self.weight_group_size is None
                and not self.weight_group_sizes)

    def to_quant_config(self) -> QuantConfig:
        """The search budget, candidates and proxy as the engine's group_search_* fields; HTG's switches."""
        from dataclasses import replace

        return replace(self._engine_fields(), htg_shift=self.shift, htg_scale=self.scale)

    def _engine_fields(self) -> QuantConfig:
        fields = {k: v for k, v in self.options().items() if k in QuantConfig.__dataclass_fields__}
        return QuantConfig(**fields, group_search_bits=self.bits_per_weight if self.searches() else None,
                           group_candidates=list(self.group_sizes), group_search_proxy=self.search_proxy)


def config_from_dict(data: dict) -> DiffusersPTQConfig:
    """A config from `to_dict()` output, a saved config.json's quantization_config, or a recipe's
    {"method": name, ...options}."""
    data = dict(data)
    name = data.pop("method", None) or data.get("quant_method")
    name = str(getattr(name, "value", name))
    for method, cls in METHODS.items():
        if name in (method, saved_method_name(method)):
            return cls(**data)
    raise ValueError(f"unknown method {name!r}; allowed values: {sorted(METHODS)}")


# ---------------------------------------------------------------------------------------------------------------
# Recipes (YAML)
# ---------------------------------------------------------------------------------------------------------------

# The recipes ship inside the package (package data: diffusers_ptq/recipes/*.yaml) and are found through
# importlib.resources, so a name loads the same from a source checkout, an installed wheel or a zip.
# (E402: this section's imports are kept with it on purpose.)
from importlib import resources  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

RECIPE_PACKAGE = "diffusers_ptq"
RECIPE_FOLDER = "recipes"
RECIPE_KEYS = ("name", "description", "model", "method", "requires", "config")


def recipe_dir() -> Traversable:
    """The folder of the shipped recipes, as importlib.resources sees it (a Path, or a zip member)."""
    return resources.files(RECIPE_PACKAGE) / RECIPE_FOLDER


RECIPE_DIR = recipe_dir()


def recipe_names() -> list[str]:
    """The names of the shipped recipes (file names without `.yaml`), sorted."""
    folder = recipe_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml") and p.is_file())


def resolve_recipe(path_or_name: str | os.PathLike) -> Path | Traversable:
    """A recipe file: an existing path, or the name (with or without `.yaml`) of one shipped in the package."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.name if path.name.endswith(".yaml") else f"{path.name}.yaml"
    candidate = recipe_dir() / name
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"recipe {str(path_or_name)!r} not found (a path, or one of the recipes shipped in "
                            f"{RECIPE_PACKAGE}/{RECIPE_FOLDER}: {recipe_names()})")


def read_recipe(path_or_name: str | os.PathLike) -> dict:
    """The recipe as a dict: name, description, model, method, requires (None or what it waits for), config."""
    import yaml

    path = resolve_recipe(path_or_name)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping with keys {list(RECIPE_KEYS)}")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown recipe key(s) {unknown}; allowed: {list(RECIPE_KEYS)}")
    if data.get("method") not in METHODS:
        raise ValueError(f"{path}: method={data.get('method')!r}; allowed values: {sorted(METHODS)}")
    if not isinstance(data.get("config", {}), dict):
        raise ValueError(f"{path}: config must be a mapping of options")
    return {"name": data.get("name", Path(path.name).stem), "description": data.get("description", ""),
            "model": data.get("model"), "method": data["method"], "requires": data.get("requires"),
            "config": dict(data.get("config") or {}), "path": str(path)}


def load_recipe(path_or_name: str | os.PathLike, **overrides) -> DiffusersPTQConfig:
    """The quantization config a recipe describes (options validated); keyword overrides win over the file."""
    recipe = read_recipe(path_or_name)
    return METHODS[recipe["method"]](**{**recipe["config"], **overrides})
