"""What every method shares: the quantization scheme (bits, groups, activations, attention, which Linears), the
calibration run's settings, and a plan = scheme + calibration + the methods to run (methods/base.py).

`config.QuantConfig` (the flat form) and the diffusers config classes build a `Plan`; the engine
(`api.quantize_transformer`) runs one.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

ACT_RANGES = ("minmax", "percentile", "mse")
SCHEDULERS = ("ddim", "ddpm", "dpm_solver", "flow_match_euler")


@dataclass(frozen=True)
class QuantScheme:
    """weight_bits 8 | 4; weight_group_size (4-bit: None = per output channel) and weight_group_sizes (per layer:
    {name or fnmatch pattern: size}); act_bits 8 | None (weight-only); act_dynamic (per-token scales at run time)
    or static per-tensor scales from act_range ("minmax" | "percentile" | "mse", percentile); quantize_attention
    (QKᵀ and PV on int8 inputs); include / exclude: fnmatch patterns on Linear names (include None: the model
    family's default, ModelAdapter.default_include); embedder_bits 8 | None: the conditioning embedders'
    Linears and tables (ModelAdapter.embedders) stored as 8-bit weights, or left float; weight_zero_point "float" |
    "integer": the 4-bit grid (rounding.quant_grid: quanto's float shift, or integer zero points that an int8 GEMM
    takes without a shift term). Validated by QuantConfig."""

    weight_bits: int = 8
    act_bits: int | None = 8
    weight_group_size: int | None = None
    weight_group_sizes: dict | None = None
    act_dynamic: bool = False
    act_range: str = "minmax"
    percentile: float = 99.99
    quantize_attention: bool = False
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    embedder_bits: int | None = None
    weight_zero_point: str = "float"

    @property
    def static_activations(self) -> bool:
        """Static per-tensor input scales, measured by calibration."""
        return self.act_bits is not None and not self.act_dynamic

    @property
    def token_samples(self) -> bool:
        """The activation range searches over sampled input rows (percentile, MSE)."""
        return self.act_range != "minmax"

    def group_size_for(self, name: str) -> int | None:
        """The configured group size of one Linear: exact name, first matching pattern, weight_group_size."""
        sizes = self.weight_group_sizes or {}
        if name in sizes:
            return sizes[name]
        for pattern, size in sizes.items():
            if fnmatch.fnmatchcase(name, pattern):
                return size
        return self.weight_group_size


@dataclass(frozen=True)
class CalibrationSettings:
    """The calibration run: `num_samples` samples denoised in `num_inference_steps` steps of `scheduler` with
    `guidance_scale` (each None: the model family's pipeline default, `ModelAdapter.calibration_defaults`), noise
    seeded by `seed`, `batch_size` samples per call; `tokens_per_call` input rows kept per layer and call when the
    activation range needs samples. Text-to-image families: `calibration_prompts` (None: the bundled set,
    prompts.CALIBRATION_PROMPTS) at `calibration_resolution` pixels (None: the pipeline's default size).
    `sequential`: calibrate and quantize block by block (api.quantize_sequential), each block fed the
    `sequential_inputs` ("quantized": the quantized blocks' outputs; "float": the float model's), its cached inputs
    in memory or, with `sequential_cache` (a folder), in files."""

    scheduler: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_samples: int = 32
    seed: int = 0
    batch_size: int = 16
    tokens_per_call: int = 64
    calibration_prompts: tuple[str, ...] | None = None
    calibration_resolution: int | None = None
    sequential: bool = False
    sequential_inputs: str = "quantized"
    sequential_cache: str | None = None

    def context(self) -> dict:
        """What these settings tell the model's adapter about the conditions and the noise (calibration context)."""
        return {"prompts": self.calibration_prompts, "resolution": self.calibration_resolution}


@dataclass
class Plan:
    """One quantization run: the scheme, the calibration settings, the methods in stage order."""

    scheme: QuantScheme
    calibration: CalibrationSettings
    methods: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for kind in ("transform", "group_sizes", "rounding"):
            chosen = [m.name for m in self.methods if m.kind == kind]
            if len(chosen) > 1:
                raise ValueError(f"methods {chosen} both {kind.replace('_', ' ')}: choose one")

    def method(self, kind: str):
        """The plan's method of one kind, or None."""
        return next((m for m in self.methods if m.kind == kind), None)
