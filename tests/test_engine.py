import copy

import numpy as np
import pytest
import torch
from conftest import assert_within_bound, bundled_relative_error, matmul_error_bound, randomize_modulation

from diffusers_ptq.api import quantize_transformer
from diffusers_ptq.calibration import calibrate
from diffusers_ptq.config import QuantConfig
from diffusers_ptq.kernels import unpack_bits
from diffusers_ptq.methods.baselines import (
    mse_range,
    percentile_range,
    scale_from_range,
    smoothquant_factors,
    weight_input_absmax,
)
from diffusers_ptq.models import adapter_for
from diffusers_ptq.modules import QuantLinear, quantize_linear
from diffusers_ptq.reparam import apply_smoothing


def _forward(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(4, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    t = torch.tensor([999, 500, 20, 500])
    labels = torch.tensor([1, 2, 1000, 1000])
    with torch.no_grad():
        return model(x, timestep=t, class_labels=labels).sample


def test_folding_without_quantization_reproduces_float_model(tiny_transformer):
    randomize_modulation(tiny_transformer)
    reference = _forward(tiny_transformer)
    folded = copy.deepcopy(tiny_transformer)
    gen = torch.Generator().manual_seed(2)
    targets = adapter_for(folded).smoothing_targets(folded)
    assert [t.name for t in targets][:3] == ["transformer_blocks.0.qkv", "transformer_blocks.0.out",
                                             "transformer_blocks.0.fc1"] and targets[-1].name == "final"
    for target in targets:
        width = folded.get_submodule(target.consumers[0]).in_features
        s = torch.exp(torch.empty(width).uniform_(-2.5, 2.5, generator=gen))  # 0.08x .. 12x
        apply_smoothing(folded, target, s)
    assert not torch.allclose(folded.transformer_blocks[0].attn1.to_q.weight,
                              tiny_transformer.transformer_blocks[0].attn1.to_q.weight)
    torch.testing.assert_close(_forward(folded), reference, rtol=1e-4, atol=1e-5)


def _reference_int8_weight(w):
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.clamp(torch.round(w / scale), -128, 127) * scale


def _reference_int4_weight(w, group_size):
    rows = w.reshape(-1, group_size) if group_size else w
    lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    scale = (hi - lo) / 15
    q = torch.clamp(torch.round((rows - lo) / scale), 0, 15)
    return (q * scale + lo).reshape(w.shape)


@pytest.mark.parametrize("weight_bits,group_size,act_scale", [(8, None, 0.02), (4, None, 0.02), (4, 16, 0.02),
                                                              (8, None, None), (4, 32, None)])
@pytest.mark.parametrize("kernel", ["emulated", "quanto"])
def test_quant_linear_matches_fake_quant_reference(weight_bits, group_size, act_scale, kernel):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)
    x = torch.randn(2, 7, 64)
    module = quantize_linear(linear, weight_bits, act_scale, group_size)
    module.kernel = kernel
    assert isinstance(module, QuantLinear)
    w_ref = _reference_int8_weight(linear.weight) if weight_bits == 8 else _reference_int4_weight(linear.weight, group_size)
    torch.testing.assert_close(module.dequantized_weight(), w_ref, rtol=1e-5, atol=1e-6)
    x_ref = x if act_scale is None else torch.clamp(torch.round(x / act_scale), -128, 127) * act_scale
    expected = torch.nn.functional.linear(x_ref, w_ref, linear.bias)
    # both are float32 sums of K = 64 terms, in the kernel's order and F.linear's: each within γ_{K+6}
    # (Σ|x_ref|·|weight terms| + |bias|) of the exact value (conftest.matmul_error_bound; 6 roundings: the input's
    # q·s, the scale product and multiply, the 4-bit shift term; its terms code·scale and −lo are ≤ |w| + 2 max|w|)
    w_terms = w_ref.abs() + (2 * w_ref.abs().amax(1, keepdim=True) if weight_bits == 4 else 0)
    with torch.no_grad():
        assert_within_bound(module(x), expected, 2 * matmul_error_bound(x_ref, w_terms, bias=linear.bias,
                                                                        extra_roundings=6))


def test_pure_unpack_matches_quanto_layout():
    """unpack_bits reads back what quanto's own packer wrote (odd row counts included)."""
    from optimum.quanto.tensor.packed import PackedTensor

    for rows in (12, 7):
        codes = torch.randint(0, 16, (rows, 5), dtype=torch.uint8)
        packed = PackedTensor.pack(codes, bits=4)
        assert torch.equal(unpack_bits(packed._data, 4, rows), codes)
    packed = torch.randint(0, 256, (6, 5), dtype=torch.uint8)
    unpacked = unpack_bits(packed, 4, 12)
    assert torch.equal(unpacked[:6], packed & 15) and torch.equal(unpacked[6:], packed >> 4)


def test_quanto_cpu_unpack_is_left_as_quanto_registers_it(monkeypatch):
    """Importing diffusers_ptq replaces nothing of quanto's: its CPU unpack op still calls quanto's C++ extension
    (faked here, so nothing is compiled)."""
    from optimum.quanto.library.extensions import cpp

    import diffusers_ptq  # noqa: F401

    class FakeLibrary:
        @staticmethod
        def unpack(t, bits):
            return torch.full_like(t, 7)

    monkeypatch.setattr(cpp.ext, "_lib", FakeLibrary())
    packed = torch.zeros(3, 2, dtype=torch.uint8)
    assert torch.equal(torch.ops.quanto.unpack(packed, 4), torch.full_like(packed, 7))


def test_percentile_and_mse_ranges_match_direct_computation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=gen)
    x[0, 0] = 40.0  # one outlier
    flat = np.sort(x.abs().flatten().numpy())
    assert float(percentile_range(x, 99.0)) == pytest.approx(flat[int(round(0.99 * flat.size)) - 1])
    assert float(percentile_range(x, 100.0)) == pytest.approx(40.0)
    clip = float(mse_range(x, bits=8, num_candidates=50))
    grid = np.linspace(0.2, 1.0, 50) * 40.0

    def err(c):
        s = c / 127
        return float(((torch.clamp(torch.round(x / s), -128, 127) * s - x) ** 2).sum())

    best = min(grid, key=err)
    assert clip == pytest.approx(best, rel=1e-5)
    assert err(clip) < err(40.0)


def test_smoothquant_factors_formula():
    act = torch.tensor([8.0, 1.0, 0.5])
    w = torch.tensor([0.5, 2.0, 1.0])
    s = smoothquant_factors(act, w, 0.5)
    torch.testing.assert_close(s, (act / w).sqrt())
    torch.testing.assert_close(smoothquant_factors(act, w, 1.0), act)
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    torch.testing.assert_close(weight_input_absmax(a, b), torch.cat([a, b]).abs().amax(0))
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_factors(act, w, 1.5)


def test_minmax_input_scales_match_hand_computation(tiny_transformer):
    cfg = QuantConfig(weight_bits=8, act_bits=8, num_inference_steps=3, num_samples=3, batch_size=2)
    stats = calibrate(tiny_transformer, num_inference_steps=3, num_samples=3, batch_size=2, progress=False)
    captured = {}
    name = "transformer_blocks.1.ff.net.2"
    hook = tiny_transformer.get_submodule(name).register_forward_pre_hook(
        lambda m, a: captured.__setitem__("max", max(captured.get("max", 0.0), float(a[0].abs().max()))))
    calibrate(tiny_transformer, num_inference_steps=3, num_samples=3, batch_size=2, include=[name], progress=False)
    hook.remove()
    report = quantize_transformer(tiny_transformer, cfg, stats=stats, progress=False)
    assert report.layers[name]["input_scale"] == pytest.approx(captured["max"] / 127, rel=1e-6)
    assert isinstance(tiny_transformer.get_submodule(name), QuantLinear)
    assert not isinstance(tiny_transformer.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1, QuantLinear)


@pytest.mark.parametrize("config", [
    QuantConfig(weight_bits=8, act_bits=None),
    QuantConfig(weight_bits=4, act_bits=None, weight_group_size=16),
    QuantConfig(weight_bits=4, act_bits=8, act_range="percentile", percentile=99.9, num_inference_steps=2, num_samples=2),
    QuantConfig(weight_bits=8, act_bits=8, act_range="mse", smoothquant_alpha=0.5, num_inference_steps=2, num_samples=2),
], ids=lambda c: c.label)
def test_quantized_model_stays_close_to_float(tiny_transformer, config):
    randomize_modulation(tiny_transformer)
    reference = _forward(tiny_transformer)
    report = quantize_transformer(tiny_transformer, config, progress=False)
    out = _forward(tiny_transformer)
    rel = float((out - reference).pow(2).sum() / reference.pow(2).sum())
    assert 0 < rel < (0.05 if config.weight_bits == 4 else 0.01), rel
    assert len(report.layers) == 2 * 7 + 2
    assert bool(report.smoothed_targets) == (config.smoothquant_alpha is not None)


def test_w8a8_through_quanto_int_mm_on_cpu(tiny_transformer):
    """quanto's own W8A8 path (torch._int_mm) runs on CPU; tiny inputs keep it quick on CPUs without VNNI."""
    randomize_modulation(tiny_transformer)
    reference = _forward(tiny_transformer)
    quantize_transformer(tiny_transformer, QuantConfig(num_inference_steps=2, num_samples=2), progress=False)
    emulated = _forward(tiny_transformer)
    for m in tiny_transformer.modules():
        if isinstance(m, QuantLinear):
            m.kernel = "quanto"
    torch.testing.assert_close(_forward(tiny_transformer), emulated, rtol=1e-4, atol=1e-4)
    assert not torch.equal(emulated, reference)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="weight_bits=3"):
        QuantConfig(weight_bits=3)
    with pytest.raises(ValueError, match="act_range='absmax'.*minmax"):
        QuantConfig(act_range="absmax")
    with pytest.raises(ValueError, match="weight_group_size applies"):
        QuantConfig(weight_bits=8, weight_group_size=64)
    with pytest.raises(ValueError, match="group_size 24 must divide"):
        quantize_linear(torch.nn.Linear(64, 8), 4, None, 24)
    assert QuantConfig(weight_bits=4, weight_group_size=64, smoothquant_alpha=0.5).label == "W4A8g64 minmax+sq0.5"
    assert float(scale_from_range(127.0)) == 1.0


def test_outlier_profile_direct():
    from diffusers_ptq.methods.baselines import outlier_profile

    a = torch.tensor([[1.0, 2.0, 3.0, 30.0, 2.0], [0.5, 1.0, 1.0, 4.0, 1.0]])
    p = outlier_profile(a)
    assert p["max_over_median"] == pytest.approx(15.0) and p["max_over_median_mean"] == pytest.approx(9.5)
    assert (p["median_first"], p["median_last"], p["absmax"]) == (2.0, 1.0, 30.0)


def test_attention_processor_observing_matches_float_and_quantizes_after_freeze(tiny_transformer):
    from diffusers_ptq.attention import QuantAttnProcessor, fake_quantize_probabilities, install_quant_attention

    randomize_modulation(tiny_transformer)
    reference = _forward(tiny_transformer)
    processors = install_quant_attention(tiny_transformer)
    assert len(processors) == 2 and all(isinstance(p, QuantAttnProcessor) for p in processors.values())
    torch.testing.assert_close(_forward(tiny_transformer), reference, rtol=1e-5, atol=1e-5)
    to_q = tiny_transformer.transformer_blocks[0].attn1.to_q
    seen = []
    h = to_q.register_forward_hook(lambda m, a, out: seen.append(out.abs().amax()))
    _forward(tiny_transformer)
    h.remove()
    p0 = processors["transformer_blocks.0.attn1"]
    assert float(p0.absmax["q"].max()) == pytest.approx(float(max(seen)))
    for p in processors.values():
        p.freeze()
    assert float(p0.scales["q"]) == pytest.approx(float(max(seen)) / 127)
    out = _forward(tiny_transformer)
    rel = float((out - reference).pow(2).sum() / reference.pow(2).sum())
    assert 0 < rel < 0.01
    assert torch.equal(fake_quantize_probabilities(torch.tensor([0.0, 0.5, 1.0, 0.001])),
                       torch.round(torch.tensor([0.0, 127.5, 255.0, 0.255])) / 255)


def test_quantize_attention_through_the_engine(tiny_transformer):
    randomize_modulation(tiny_transformer)
    reference = _forward(tiny_transformer)
    config = QuantConfig(quantize_attention=True, smoothquant_alpha=0.5, num_inference_steps=2, num_samples=2)
    quantize_transformer(tiny_transformer, config, progress=False)
    processor = tiny_transformer.transformer_blocks[0].attn1.processor
    assert not processor.observing and set(processor.scales) == {"q", "k", "v"}
    rel = float((_forward(tiny_transformer) - reference).pow(2).sum() / reference.pow(2).sum())
    assert 0 < rel < 0.02
    with pytest.raises(ValueError, match="quantize_attention needs act_bits=8"):
        QuantConfig(act_bits=None, quantize_attention=True)


@pytest.mark.parametrize("extra", [dict(), dict(smoothquant_alpha=0.5, act_bits=8),
                                   dict(htg_shift=True, htg_scale=True, htg_groups=2, act_bits=8)])
def test_gptq_beats_round_to_nearest_on_bundled_model(bundled_pipe, extra):
    common = dict(weight_bits=4, act_bits=None, num_samples=4, num_inference_steps=6, batch_size=4)
    common.update(extra)
    nearest, _ = bundled_relative_error(bundled_pipe, QuantConfig(**common))
    gptq, report = bundled_relative_error(bundled_pipe, QuantConfig(weight_rounding="gptq", **common))
    assert report.rounding_seconds > 0
    assert gptq < 0.8 * nearest, (gptq, nearest)


def test_gptq_refuses_precomputed_stats(tiny_transformer):
    stats = calibrate(tiny_transformer, num_inference_steps=2, num_samples=2, progress=False)
    with pytest.raises(ValueError, match="precomputed stats"):
        quantize_transformer(tiny_transformer, QuantConfig(weight_rounding="gptq"), stats=stats, progress=False)
