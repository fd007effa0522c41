"""Block reconstruction (BRECQ with AdaRound's learned rounding) as a rounding plug-in (the math and the driver:
reconstruction.py; docs/rounding.md)."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers_ptq.methods.base import Method, register_method_plugin


@register_method_plugin
@dataclass
class Reconstruct(Method):
    """iters Adam steps per block with learning rate lr on minibatches of `batch` rows out of `samples` cached
    (timestep, sample) rows; one weight_group_size for every layer."""

    name = "reconstruct"
    kind = "rounding"
    rounds_candidates = False
    per_block = False
    per_block_reason = "block reconstruction makes its own pass over the blocks, from one sampling run of the model"
    iters: int = 500
    lr: float = 1e-2
    batch: int = 32
    samples: int = 256

    def __post_init__(self) -> None:
        for name in ("iters", "batch", "samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"reconstruct_{name} must be a positive int, got {value!r}")
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise ValueError(f"reconstruct_lr must be a positive number, got {self.lr!r}")

    def check(self, plan) -> None:
        if plan.method("group_sizes") is not None or plan.scheme.weight_group_sizes:
            raise ValueError("weight_rounding='reconstruct' takes one weight_group_size for every layer: per-layer "
                             "group sizes (weight_group_sizes, group_search_bits) need 'nearest' or 'gptq'")

    def round(self, run, names: list[str]) -> dict:
        from diffusers_ptq.reconstruction import reconstruct_weights

        scheme, calibration = run.plan.scheme, run.plan.calibration
        return reconstruct_weights(
            run.transformer, {n: run.targets[n] for n in names}, run.input_scales, bits=scheme.weight_bits,
            group_size=scheme.weight_group_size, iters=self.iters, lr=self.lr, batch=self.batch,
            samples=self.samples, calibration=calibration, scheduler_config=run.scheduler_config,
            context=run.context, progress=run.progress, zero_point=scheme.weight_zero_point)
