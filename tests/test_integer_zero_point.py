"""4-bit weights with integer zero points (`weight_zero_point="integer"`, issue #21): the grid (shift = scale · z,
z an integer in [0, 15], rounding error at most half a step as on quanto's grid), the kernel folding z into the
int8 codes instead of adding a float shift term, and every rounding method storing its weights on that grid."""

import pytest
import torch
from conftest import gamma, make_tiny_transformer, tiny_inputs

from diffusers_ptq import BaselineConfig, HTGConfig, PTQ4DiTConfig, QDiTConfig, kernels, quantize
from diffusers_ptq.modules import quant_linears, quantize_linear
from diffusers_ptq.rounding import gptq_round, nearest_round, quant_grid

SMALL = dict(num_samples=2, num_inference_steps=2, batch_size=2)


def _weight(out_features=24, in_features=64, seed=0) -> torch.Tensor:
    """Random rows plus the edge cases: an all-positive row, an all-negative row, a zero row, a constant row."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    w[0] = w[0].abs() + 0.5
    w[1] = -w[1].abs() - 0.5
    w[2] = 0
    w[3] = 0.7
    return w


@pytest.mark.parametrize("group_size", [None, 16])
def test_integer_grid_has_integer_zero_points_and_half_step_rounding(group_size):
    w = _weight()
    scale, shift = quant_grid(w, 4, group_size, "integer")
    z = torch.round(shift / torch.where(scale == 0, torch.ones_like(scale), scale))
    assert float(z.min()) >= 0 and float(z.max()) <= 15
    assert torch.equal(scale * z, shift)  # exact in float32: the kernel's detection relies on it
    rounded = nearest_round(w, 4, group_size, "integer")
    groups = w.reshape(-1, group_size or w.shape[1])
    s = scale.expand_as(groups)
    # every weight, range ends included, is within half a step of the grid, plus float rounding: the value s·c − s·z
    # (|s·c|, |s·z| ≤ 15·s) is rounded three times, and the code chosen from fl((w + s·z) / s) may sit one step off a
    # tie by the same few roundings — γ_3 · 32·s covers both (32 > 15 + 15 + 1)
    err = (rounded.weight.reshape_as(groups) - groups).abs()
    assert float((err - (0.5 + 32 * gamma(3)) * s).max()) <= 0
    assert torch.equal(rounded.weight[2], torch.zeros_like(w[2]))  # a zero row stays exactly zero


def test_float_grid_is_unchanged_and_gptq_keeps_the_integer_grid():
    w = _weight()
    assert torch.equal(quant_grid(w, 4, None)[1], -w.amin(1, keepdim=True))  # quanto's shift = −min
    h = torch.eye(64) + 0.1
    nearest, gptq = nearest_round(w, 4, None, "integer"), gptq_round(w, h, 4, None, zero_point="integer")
    assert torch.equal(gptq.scale, nearest.scale) and torch.equal(gptq.shift, nearest.shift)
    with pytest.raises(ValueError, match="zero_point"):
        quant_grid(w, 4, None, "int")


def test_the_kernel_folds_integer_zero_points_and_only_those():
    """An integer grid is detected from the stored scale and shift (no flag in the checkpoint); a shift one ulp
    off it, or quanto's float grid, keeps the float epilogue."""
    lin = torch.nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(_weight())
    integer = quantize_linear(lin, 4, 0.02, rounded=nearest_round(lin.weight.detach(), 4, None, "integer"))
    floating = quantize_linear(lin, 4, 0.02)
    z = kernels.integer_zero_points(integer.weight._scale, integer.weight._shift)
    assert z is not None and z.dtype == torch.int8 and z.shape == (24, 1)
    assert kernels.integer_zero_points(floating.weight._scale, floating.weight._shift) is None
    nudged = integer.weight._shift.clone()
    nudged[5] = torch.nextafter(nudged[5], torch.full_like(nudged[5], 1e9))
    assert kernels.integer_zero_points(integer.weight._scale, nudged) is None
    if kernels.onednn_available():
        assert not kernels.prepare_onednn(integer).epilogue and kernels.prepare_onednn(floating).epilogue


CONFIGS = {
    "nearest": lambda: BaselineConfig(weight_bits=4, act_bits=8, weight_zero_point="integer", **SMALL),
    "gptq": lambda: PTQ4DiTConfig(weight_bits=4, act_bits=8, weight_rounding="gptq", weight_zero_point="integer",
                                  **SMALL),
    "reconstruct": lambda: HTGConfig(weight_bits=4, act_bits=8, num_groups=2, weight_rounding="reconstruct",
                                     reconstruct_iters=3, reconstruct_samples=8, reconstruct_batch=4,
                                     weight_zero_point="integer", **SMALL),
    "qdit-search": lambda: QDiTConfig(bits_per_weight=6, weight_zero_point="integer", **SMALL),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_rounding_stores_integer_zero_points(name):
    config = CONFIGS[name]()
    assert config.to_plan().scheme.weight_zero_point == "integer" and "zi" in config.label
    model = make_tiny_transformer()
    quantize(model, config, progress=False)
    layers = [m for _, m in quant_linears(model) if m.weight_qtype.bits == 4]
    assert layers
    for module in layers:
        assert kernels.integer_zero_points(module.weight._scale, module.weight._shift) is not None
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_inputs()).sample).all()


def test_weight_zero_point_is_validated():
    with pytest.raises(ValueError, match="weight_zero_point"):
        BaselineConfig(weight_bits=4, weight_zero_point="half")
    with pytest.raises(ValueError, match="4 only"):
        BaselineConfig(weight_bits=8, weight_zero_point="integer")
