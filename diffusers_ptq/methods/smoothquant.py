"""SmoothQuant (Xiao et al., 2023) as a method plug-in: s = max|X|^α / max|W|^(1−α) per input channel, folded
offline into each smoothing target's producers (the factors: methods/baselines.smoothquant_factors)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusers_ptq.methods import baselines, ptq4dit
from diffusers_ptq.methods.base import Method, Observations, check_fraction, fold_smoothing, register_method_plugin


@register_method_plugin
@dataclass
class SmoothQuant(Method):
    """alpha: the migration strength in [0, 1]."""

    name = "smoothquant"
    kind = "transform"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        check_fraction("smoothquant alpha", self.alpha)

    def observations(self, scheme) -> Observations:
        return Observations(stats=True)

    def vector(self, stats, weights: list[torch.Tensor]) -> torch.Tensor:
        return baselines.smoothquant_factors(stats.absmax.amax(dim=0), ptq4dit.weight_salience(*weights), self.alpha)

    def transform(self, run) -> None:
        fold_smoothing(run, self.vector)
