"""GPTQ (Frantar et al., 2023) as a rounding plug-in: each Linear's weight rounded column by column with the
error compensated through the inverse of its input Hessian, recorded during calibration (the math: rounding.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusers_ptq.methods.base import Method, Observations, register_method_plugin
from diffusers_ptq.rounding import gptq_quantize_weights, gptq_round


@register_method_plugin
@dataclass
class GPTQ(Method):
    """damp: the Hessian damping as a fraction of its mean diagonal, in [0, 1); act_order: process the columns by
    decreasing Hessian diagonal."""

    name = "gptq"
    kind = "rounding"
    rounds_candidates = True
    damp: float = 0.01
    act_order: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise ValueError(f"gptq damp must be in [0, 1), got {self.damp!r}")

    def observations(self, scheme) -> Observations:
        return Observations(hessians=True)

    def proxy_rounding(self) -> tuple[str, dict]:
        return "gptq", {"damp": self.damp, "act_order": self.act_order}

    def round_candidate(self, run, name: str, weight: torch.Tensor, group_size: int | None):
        return gptq_round(weight, run.hessians[name], run.plan.scheme.weight_bits, group_size, damp=self.damp,
                          act_order=self.act_order, zero_point=run.plan.scheme.weight_zero_point)

    def round(self, run, names: list[str]) -> dict:
        out = {}
        for size in dict.fromkeys(run.group_sizes[n] for n in names):  # one call per group size, first-seen order
            group = [n for n in names if run.group_sizes[n] == size]
            out.update(gptq_quantize_weights({n: run.targets[n] for n in group}, run.hessians,
                                             run.plan.scheme.weight_bits, size, damp=self.damp,
                                             act_order=self.act_order, progress=run.progress,
                                             zero_point=run.plan.scheme.weight_zero_point))
        return out
