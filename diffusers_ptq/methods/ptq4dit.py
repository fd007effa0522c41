"""PTQ4DiT (Wu et al., NeurIPS 2024): channel-wise salience balancing (CSB) guided by Spearman's ρ (SSC).

Pure functions on statistics and weights (tensors in, tensors out). For one smoothing target (the shared input
of q/k/v, the input of the attention output projection, or the input of the MLP's first Linear):

- weight salience s(W_j) = max over output rows of |W[:, j]| (q/k/v: over the three weights stacked);
- activation salience of calibration row r (one timestep × sample, or one timestep): s(X_r)_j = max over
  tokens of |X_j|;
- SSC: ρ_r = Spearman(s(X_r), s(W)) over channels, η = softmax(−ρ): rows whose salient channels do *not*
  coincide with the weight's get more weight (complementarity is what balancing exploits);
- s(X) = Σ_r η_r s(X_r);  B = (s(X) / s(W))^α, α = 0.5 in the paper, so that both saliences become
  sqrt(s(X)·s(W)). The model then computes (X / B)·(diag(B) Wᵀ), folded offline by `reparam.apply_smoothing`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusers_ptq.methods.base import Method, Observations, check_fraction, fold_smoothing, register_method_plugin
from diffusers_ptq.methods.baselines import weight_input_absmax

EPS = 1e-5


def weight_salience(*weights: torch.Tensor) -> torch.Tensor:
    """s(W) per input channel, over the concatenation of weights that share the input ([in])."""
    return weight_input_absmax(*weights)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..C along the last dim, ties sharing their average rank (scipy's `rankdata(method="average")`)."""
    x = x.double()
    ordered = x.sort(dim=-1).values
    below = torch.searchsorted(ordered, x, right=False)  # number of entries < x
    at_most = torch.searchsorted(ordered, x, right=True)  # number of entries <= x
    return (below + at_most + 1).double() / 2


def spearman_rho(rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Spearman's ρ between each row of `rows` ([R, C]) and `reference` ([C]), over the C channels ([R]).

    ρ is Pearson's correlation of the average ranks; a constant row (no ranking) gets ρ = 0.
    """
    rx = average_ranks(rows)
    ry = average_ranks(reference)
    rx = rx - rx.mean(dim=-1, keepdim=True)
    ry = ry - ry.mean()
    denom = rx.norm(dim=-1) * ry.norm()
    rho = (rx @ ry) / denom.clamp(min=1e-30)
    return torch.where(denom > 0, rho, torch.zeros_like(rho)).float()


def ssc_weights(rho: torch.Tensor, ssc: bool = True) -> torch.Tensor:
    """Row weights η: softmax(−ρ) with SSC, uniform without ([R])."""
    if not ssc:
        return torch.full_like(rho, 1.0 / rho.numel())
    return torch.softmax(-rho.double(), dim=0).float()


def activation_salience(rows: torch.Tensor, weight_sal: torch.Tensor, ssc: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SSC-aggregated s(X) ([C]) from per-row activation saliences ([R, C]), and the row weights η ([R])."""
    eta = ssc_weights(spearman_rho(rows, weight_sal), ssc)
    return (eta.double() @ rows.double()).float(), eta


def balancing_vector(act_sal: torch.Tensor, weight_sal: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """B = (s(X) / s(W))^α per channel; X is divided by B and W's columns multiplied by B."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"csb_alpha must be in [0, 1], got {alpha}")
    return (act_sal.float().clamp(min=EPS) / weight_sal.float().clamp(min=EPS)).pow(alpha)


def salience_rows(absmax: torch.Tensor, sample_absmax: torch.Tensor | None, rows: str) -> torch.Tensor:
    """Calibration rows [R, C]: one per timestep × sample (`rows="sample"`, from [T, S, C]) or per timestep ([T, C])."""
    if rows == "timestep":
        return absmax
    if rows == "sample":
        if sample_absmax is None:
            raise ValueError("ssc_rows='sample' needs per-sample rows: calibrate with sample_rows for this layer")
        return sample_absmax.reshape(-1, sample_absmax.shape[-1])
    raise ValueError(f"ssc_rows={rows!r} is not supported; allowed values: ['sample', 'timestep']")


# --- the method plug-in ---------------------------------------------------------------------------------------------

SSC_ROWS = ("sample", "timestep")


@register_method_plugin
@dataclass
class PTQ4DiT(Method):
    """CSB with migration strength `csb_alpha`, weighted over calibration rows by SSC (`ssc`; False: every row the
    same weight), rows per "sample" (timestep × calibration sample, as the official code) or per "timestep"."""

    name = "ptq4dit"
    kind = "transform"
    csb_alpha: float = 0.5
    ssc: bool = True
    ssc_rows: str = "sample"

    def __post_init__(self) -> None:
        check_fraction("csb_alpha", self.csb_alpha)
        if not isinstance(self.ssc, bool):
            raise ValueError(f"ssc must be True or False, got {self.ssc!r}")
        if self.ssc_rows not in SSC_ROWS:
            raise ValueError(f"ssc_rows={self.ssc_rows!r} is not supported; allowed values: {list(SSC_ROWS)}")

    def observations(self, scheme) -> Observations:
        return Observations(stats=True, sample_rows=self.ssc_rows == "sample")

    def vector(self, stats, weights: list[torch.Tensor]) -> torch.Tensor:
        """The balancing vector B of one target's input."""
        weight_sal = weight_salience(*weights)
        rows = salience_rows(stats.absmax, stats.sample_absmax, self.ssc_rows)
        act_sal, _ = activation_salience(rows, weight_sal, self.ssc)
        return balancing_vector(act_sal, weight_sal, self.csb_alpha)

    def transform(self, run) -> None:
        fold_smoothing(run, self.vector)
