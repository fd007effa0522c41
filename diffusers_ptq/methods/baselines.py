"""Baseline activation ranges and SmoothQuant factors (tensors in, tensors out).

All ranges are for symmetric per-tensor int8 activations: the scale is `range / 127`.
"""

from __future__ import annotations

import torch

from diffusers_ptq.kernels import fake_quantize_symmetric


def scale_from_range(clip: torch.Tensor | float, bits: int = 8) -> torch.Tensor:
    """Symmetric scale that maps ±clip onto ±(2^(bits-1) − 1)."""
    return torch.as_tensor(clip, dtype=torch.float32) / (2 ** (bits - 1) - 1)


def minmax_range(absmax_per_step: torch.Tensor) -> torch.Tensor:
    """Absmax over every calibration timestep and channel ([T, C] -> scalar)."""
    return absmax_per_step.amax()


def percentile_range(samples: torch.Tensor, percentile: float) -> torch.Tensor:
    """The `percentile` (0-100] of |x| over sampled activations (exact order statistic, no interpolation)."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    flat = samples.abs().flatten().float()
    k = max(1, min(flat.numel(), int(round(percentile / 100 * flat.numel()))))
    return flat.kthvalue(k).values


def mse_range(samples: torch.Tensor, bits: int = 8, num_candidates: int = 100, min_fraction: float = 0.2) -> torch.Tensor:
    """Clip c in absmax·linspace(min_fraction, 1) minimizing ‖x − fq(x; c)‖² over sampled activations
    (Q-Diffusion's MSE range search, on a grid)."""
    flat = samples.flatten().float()
    absmax = flat.abs().max()
    if absmax == 0:
        return absmax
    fractions = torch.linspace(min_fraction, 1.0, num_candidates)
    errors = torch.stack([
        (fake_quantize_symmetric(flat, scale_from_range(absmax * f, bits), bits) - flat).pow(2).sum()
        for f in fractions
    ])
    return absmax * fractions[int(errors.argmin())]


def weight_input_absmax(*weights: torch.Tensor) -> torch.Tensor:
    """max over output rows of |W[:, j]|, over the concatenation of the given [out, in] weights ([in])."""
    return torch.cat([w.detach().float() for w in weights]).abs().amax(dim=0)


def smoothquant_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float,
                        eps: float = 1e-5) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_j|^(1−α); the model then computes (X/s)·(diag(s)W)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    s = act_absmax.float().clamp(min=eps).pow(alpha) / weight_absmax.float().clamp(min=eps).pow(1 - alpha)
    return s.clamp(min=eps)


def outlier_profile(absmax_per_step: torch.Tensor) -> dict[str, float]:
    """How outlier-dominated one layer's input is, from its [T, C] per-step channel absmax.

    ratio_t = max_c / median_c at step t: `max_over_median` is its largest value over steps, `max_over_median_mean`
    its mean; `median_first`/`median_last` are the median channel's absmax at the first (noisiest) and last step
    (HTG Fig. 1: on DiT-XL/2 fc1 the median drifts from ~10 to ~3 while a few channels stay far above).
    """
    a = absmax_per_step.float()
    median = a.median(dim=1).values.clamp(min=1e-12)
    ratio = a.amax(dim=1) / median
    return {"max_over_median": float(ratio.max()), "max_over_median_mean": float(ratio.mean()),
            "median_first": float(median[0]), "median_last": float(median[-1]),
            "absmax": float(a.max())}
