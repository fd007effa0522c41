import math

import numpy as np
import pytest
import torch

from diffusers_ptq.harness.evaluation import feature_statistics, frechet_distance, psnr, relative_mse


def test_psnr_matches_definition():
    ref = torch.zeros(3, 1, 4, 4)
    img = torch.full_like(ref, 0.1)  # mse 0.01 -> 20 dB
    assert psnr(img, ref) == pytest.approx(20.0)
    img[1] = 0.01  # mse 1e-4 -> 40 dB; mean over images
    assert psnr(img, ref) == pytest.approx((20 + 40 + 20) / 3)
    assert math.isinf(psnr(ref, ref))
    with pytest.raises(ValueError, match="shape"):
        psnr(img[:2], ref)


def test_relative_mse():
    ref = torch.tensor([[3.0, 4.0]])
    assert relative_mse(ref * 1.1, ref) == pytest.approx(0.01)
    assert relative_mse(ref, ref) == 0.0


def test_feature_statistics_matches_numpy():
    feats = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_statistics(feats)
    assert torch.allclose(mu, feats.double().mean(0))
    assert np.allclose(sigma.numpy(), np.cov(feats.double().numpy(), rowvar=False))


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    v1, v2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 1.0])
    expected = float(((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum())
    got = frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, torch.diag(v1), mu1, torch.diag(v1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_is_rotation_invariant():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(200, 5, generator=gen), torch.randn(200, 5, generator=gen) * 2 + 1
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    d = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    d_rot = frechet_distance(*feature_statistics(a.double() @ q), *feature_statistics(b.double() @ q))
    assert d == pytest.approx(d_rot, rel=1e-6)
