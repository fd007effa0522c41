"""Quantization settings. `QuantConfig` holds what the engine needs; validated on construction, JSON-safe.

(The diffusers-registered config classes — PTQ4DiTConfig, HTGConfig, ... — build on these fields.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Every Linear of the blocks (attention, MLP), the adaLN modulation, and the final layer; not the
# timestep/class embedders.
DEFAULT_INCLUDE = (
    "transformer_blocks.*.attn1.to_*",
    "transformer_blocks.*.ff.net.*",
    "transformer_blocks.*.norm1.linear",
    "proj_out_1",
    "proj_out_2",
)
ACT_RANGES = ("minmax", "percentile", "mse")
SCHEDULERS = ("ddim", "ddpm")
SSC_ROWS = ("sample", "timestep")
WEIGHT_ROUNDINGS = ("nearest", "gptq")


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
    weight_rounding: "nearest" (round to nearest) or "gptq" (error-compensating rounding from each layer's
        input Hessian over the calibration run; `gptq_damp` is the damping as a fraction of the mean diagonal,
        `gptq_act_order` processes columns by decreasing Hessian diagonal).
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    weight_group_size: int | None = None
    act_range: str = "minmax"
    percentile: float = 99.99
    smoothquant_alpha: float | None = None
    quantize_attention: bool = False
    csb_alpha: float | None = None
    ssc: bool = True
    ssc_rows: str = "sample"
    weight_rounding: str = "nearest"
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=list)
    # calibration
    scheduler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 1.5
    num_samples: int = 32
    seed: int = 0
    batch_size: int = 16
    tokens_per_call: int = 64

    def __post_init__(self) -> None:
        _check("weight_bits", self.weight_bits, (8, 4))
        _check("act_bits", self.act_bits, (8, None))
        _check("act_range", self.act_range, ACT_RANGES)
        _check("scheduler", self.scheduler, SCHEDULERS)
        _check("ssc_rows", self.ssc_rows, SSC_ROWS)
        _check("weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS)
        if self.smoothquant_alpha is not None and self.csb_alpha is not None:
            raise ValueError("smoothquant_alpha and csb_alpha both set: choose one smoothing method (set the other to None)")
        if self.csb_alpha is not None and not 0 <= self.csb_alpha <= 1:
            raise ValueError(f"csb_alpha must be in [0, 1] or None, got {self.csb_alpha}")
        if not 0 <= self.gptq_damp < 1:
            raise ValueError(f"gptq_damp must be in [0, 1), got {self.gptq_damp}")
        if self.weight_group_size is not None:
            if self.weight_bits != 4:
                raise ValueError("weight_group_size applies to weight_bits=4 only (8-bit weights are per channel)")
            if self.weight_group_size <= 0:
                raise ValueError(f"weight_group_size must be positive or None, got {self.weight_group_size}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.quantize_attention and self.act_bits is None:
            raise ValueError("quantize_attention needs act_bits=8 (attention inputs are quantized like activations)")
        if self.smoothquant_alpha is not None and not 0 <= self.smoothquant_alpha <= 1:
            raise ValueError(f"smoothquant_alpha must be in [0, 1] or None, got {self.smoothquant_alpha}")
        for name in ("num_inference_steps", "num_samples", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self.include, self.exclude = list(self.include), list(self.exclude)

    @property
    def label(self) -> str:
        """Short name such as "W4A8 minmax+sq0.5"."""
        bits = f"W{self.weight_bits}A{self.act_bits or 16}"
        if self.weight_group_size:
            bits += f"g{self.weight_group_size}"
        method = self.act_range if self.act_bits else "weight-only"
        if self.smoothquant_alpha is not None:
            method += f"+sq{self.smoothquant_alpha:g}"
        if self.csb_alpha is not None:
            method += f"+csb{'' if self.csb_alpha == 0.5 else f'{self.csb_alpha:g}'}{'+ssc' if self.ssc else ''}"
        if self.weight_rounding != "nearest":
            method += f"+{self.weight_rounding}"
        if self.quantize_attention:
            method += " +attn"
        return f"{bits} {method}"

    def to_dict(self) -> dict:
        return asdict(self)
