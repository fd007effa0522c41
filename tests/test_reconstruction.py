"""Block reconstruction (diffusers_ptq.reconstruction): AdaRound-style learned rounding, BRECQ per DiT block."""

import pytest
import torch

from diffusers_ptq.api import quantize_transformer
from diffusers_ptq.config import PTQ4DiTConfig, QuantConfig
from diffusers_ptq.modules import quantize_linear
from diffusers_ptq.reconstruction import (
    CachedInputs,
    LearnedRounding,
    beta_at,
    cache_inputs,
    reconstruct_unit,
    rectified_sigmoid,
    rounding_regularizer,
)
from diffusers_ptq.rounding import nearest_round, quant_grid
from tests.conftest import assert_within_bound, bundled_relative_error, make_tiny_transformer, matmul_error_bound

FORMATS = [(8, None), (4, None), (4, 8)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The training loop is many small ops: on a shared CPU each one pays a thread barrier with more threads
    (measured: the bundled test took 612 s with 2 threads under load, 28.5 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gains = torch.logspace(-1, 1, d)[torch.randperm(d, generator=gen)]
    mix = torch.randn(d, d, generator=gen) / d**0.5 + torch.eye(d)
    return (torch.randn(n, d, generator=gen) @ mix + 0.3) * gains


class _Holder(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.lin = linear


def _single_linear(bits, group_size, iters=250, seed=0, input_scale=None):
    torch.manual_seed(1)
    linear = torch.nn.Linear(32, 12)
    x = _inputs(256, 32)
    holder = _Holder(linear)
    with torch.no_grad():
        target = linear(x)
    rounded, out = reconstruct_unit(holder, "lin", {"lin": None}, CachedInputs({"input": x}), {"output": target},
                                    bits=bits, group_size=group_size, input_scales={"lin": input_scale}, iters=iters,
                                    batch_size=64, seed=seed, progress=False)
    return linear, x, target, rounded["lin"], out["output"]


# ------------------------------------------------------------------------------------------------ pure pieces

def test_rectified_sigmoid_and_regularizer():
    v = torch.tensor([-100.0, 0.0, 100.0])
    assert torch.equal(rectified_sigmoid(v), torch.tensor([0.0, 0.5, 1.0]))
    h = torch.tensor([0.0, 1.0, 0.5])
    assert float(rounding_regularizer(h, 2.0)) == pytest.approx(1.0)
    assert beta_at(0, 100) is None and beta_at(19, 100) is None
    assert beta_at(20, 100) == pytest.approx(20.0) and beta_at(100, 100) == pytest.approx(2.0)


@pytest.mark.parametrize("bits,group_size", FORMATS)
def test_learned_rounding_starts_at_float_weight_and_nearest(bits, group_size):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 6)
    m = LearnedRounding(linear, bits, group_size)
    assert torch.allclose(m.soft_weight(), linear.weight, atol=1e-4)  # AdaRound's init: h(V0) = frac
    assert torch.equal(m.rounded().data, nearest_round(linear.weight.detach(), bits, group_size).data)


# ------------------------------------------------------------------------------------------------ a single Linear

@pytest.mark.parametrize("bits,group_size", FORMATS)
def test_reconstruction_beats_nearest_on_single_linear(bits, group_size):
    linear, x, target, rounded, out = _single_linear(bits, group_size)
    nearest = nearest_round(linear.weight.detach(), bits, group_size)
    w = linear.weight.detach()
    err = float((x @ (w - rounded.weight).T).pow(2).sum())
    err_nearest = float((x @ (w - nearest.weight).T).pow(2).sum())
    assert err < 0.95 * err_nearest, (err, err_nearest)
    # the unit's output ran in minibatches of 64 rows, the reference in one GEMM: two float32 orders of the same
    # K = 32 term sums, each within γ_{K+1} (Σ|x||w| + |b|) of the exact value (conftest.matmul_error_bound)
    assert_within_bound(out, torch.nn.functional.linear(x, rounded.weight, linear.bias),
                        2 * matmul_error_bound(x, rounded.weight, bias=linear.bias))


@pytest.mark.parametrize("bits,group_size", FORMATS)
def test_stored_weight_is_the_learned_rounding(bits, group_size):
    linear, _, _, rounded, _ = _single_linear(bits, group_size, iters=50)
    scale, shift = quant_grid(linear.weight.detach(), bits, group_size)
    assert torch.equal(rounded.scale, scale) and (shift is None or torch.equal(rounded.shift, shift))  # grid unchanged
    lo, hi = (-128, 127) if bits == 8 else (0, 15)
    assert int(rounded.data.min()) >= lo and int(rounded.data.max()) <= hi
    module = quantize_linear(linear, bits, None, group_size, rounded=rounded)
    assert torch.equal(module.dequantized_weight(), rounded.weight)
    # at most one step away from nearest: every code is floor or floor + 1 of the float weight
    nearest = nearest_round(linear.weight.detach(), bits, group_size)
    assert int((rounded.data.int() - nearest.data.int()).abs().max()) <= 1


def test_reconstruction_with_activation_quantization():
    x = _inputs(256, 32)
    scale = x.abs().max() / 127
    linear, x, target, rounded, _ = _single_linear(4, None, input_scale=scale)
    nearest = nearest_round(linear.weight.detach(), 4, None)
    xq = torch.clamp(torch.round(x / scale), -128, 127) * scale
    bias = linear.bias.detach()
    err = float((xq @ rounded.weight.T + bias - target).pow(2).sum())
    err_nearest = float((xq @ nearest.weight.T + bias - target).pow(2).sum())
    # most of this error is the input's rounding, which no weight rounding removes; the weights still help
    assert err < 0.98 * err_nearest, (err, err_nearest)


def test_deterministic_given_seed():
    a = _single_linear(4, None, iters=60, seed=3)[3]
    b = _single_linear(4, None, iters=60, seed=3)[3]
    assert torch.equal(a.data, b.data)


# ------------------------------------------------------------------------------------------------ the engine

def test_cache_inputs_keeps_the_chosen_rows(tiny_transformer):
    block = tiny_transformer.transformer_blocks[0]
    kwargs = dict(samples=10, num_inference_steps=3, num_samples=4, guidance_scale=1.5, progress=False)
    a = cache_inputs(tiny_transformer, {"b0": block, "p2": tiny_transformer.proj_out_2}, batch_size=4, **kwargs)
    b = cache_inputs(tiny_transformer, {"b0": block, "p2": tiny_transformer.proj_out_2}, batch_size=3, **kwargs)
    assert len(a["b0"]) == 10 and len(a["p2"]) == 10
    assert set(a["b0"].rows) == {"hidden_states", "timestep", "class_labels"}
    # the same rows whatever the batch size (values equal up to the float rounding of batched matmuls)
    assert torch.equal(a["b0"].rows["timestep"], b["b0"].rows["timestep"])
    assert torch.allclose(a["b0"].rows["hidden_states"], b["b0"].rows["hidden_states"], atol=1e-5)
    assert torch.equal(a["p2"].timesteps, a["b0"].rows["timestep"])
    assert (a["b0"].rows["class_labels"] == 1000).any() or (a["b0"].rows["class_labels"] < 1000).all()


def _tiny_error(config):
    model = make_tiny_transformer()
    reference = make_tiny_transformer()
    report = quantize_transformer(model, config, progress=False)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 4, 4, generator=gen)
    t = torch.tensor([999, 700, 500, 300, 100, 20])
    labels = torch.tensor([0, 1, 2, 3, 1000, 1000])
    with torch.no_grad():
        ref = reference(x, timestep=t, class_labels=labels).sample
        out = model(x, timestep=t, class_labels=labels).sample
    return float((out - ref).pow(2).mean() / ref.pow(2).mean()), report, model


def test_reconstruct_end_to_end_on_tiny_transformer():
    common = dict(weight_bits=4, act_bits=8, num_samples=4, num_inference_steps=4, batch_size=4, csb_alpha=0.5)
    nearest, _, _ = _tiny_error(QuantConfig(**common))
    recon, report, model = _tiny_error(QuantConfig(weight_rounding="reconstruct", reconstruct_iters=150,
                                                   reconstruct_samples=24, reconstruct_batch=8, **common))
    assert report.rounding_seconds > 0
    assert recon < nearest, (recon, nearest)
    again, _, model2 = _tiny_error(QuantConfig(weight_rounding="reconstruct", reconstruct_iters=150,
                                               reconstruct_samples=24, reconstruct_batch=8, **common))
    assert again == recon  # deterministic given the seed
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_reconstruct_options_validated_and_labelled():
    assert QuantConfig(weight_rounding="reconstruct", weight_bits=4).label == "W4A8 minmax+recon"
    assert "+recon100" in QuantConfig(weight_rounding="reconstruct", reconstruct_iters=100).label
    with pytest.raises(ValueError, match="weight_rounding.*allowed values.*reconstruct"):
        QuantConfig(weight_rounding="adaround")
    for name, bad in [("reconstruct_iters", 0), ("reconstruct_batch", -1), ("reconstruct_samples", 1.5),
                      ("reconstruct_lr", 0)]:
        with pytest.raises(ValueError, match=name):
            QuantConfig(**{name: bad})
    cfg = PTQ4DiTConfig(weight_bits=4, weight_rounding="reconstruct", reconstruct_iters=200)
    qc = cfg.to_quant_config()
    assert qc.weight_rounding == "reconstruct" and qc.reconstruct_iters == 200
    assert cfg.to_diff_dict()["reconstruct_iters"] == 200
    with pytest.raises(ValueError, match="reconstruct_lr"):
        PTQ4DiTConfig(reconstruct_lr=-1.0)


def test_reconstruct_beats_nearest_on_bundled_model_w4a16(bundled_pipe):
    common = dict(weight_bits=4, act_bits=None, num_samples=4, num_inference_steps=6, batch_size=4)
    nearest, _ = bundled_relative_error(bundled_pipe, QuantConfig(**common))
    recon, report = bundled_relative_error(bundled_pipe, QuantConfig(weight_rounding="reconstruct", reconstruct_iters=40,
                                                            reconstruct_samples=32, reconstruct_batch=16, **common))
    assert report.rounding_seconds > 0
    assert recon < 0.9 * nearest, (recon, nearest)
