"""A quantized transformer behaves like any diffusers model, for every method config — the behaviours diffusers'
own quantizer tests expect of a backend (tests/quantization/quanto/test_quanto.py and its torchao twin):
quantized layers, a smaller footprint, outputs close to fp32, dtype casts refused, bit-exact save/load,
torch.compile and LoRA training; plus the ways users call models: inference_mode / no_grad / grad enabled, and
copy.deepcopy; and nothing on a quantized model's instance shadows a diffusers method (only documented quantizer
hooks: diffusers' own save_pretrained / push_to_hub run).

Tolerances:
- eager vs eager (inference_mode, no_grad, grad, deepcopy, reload): bit-identical — the same ops run.
- compiled vs eager: Inductor may fuse and reorder the float parts (LayerNorm, GELU, the modulation), which
  changes results by float rounding (|Δ| ≤ γ_n·Σ|terms|, a few ulps); where such a change moves a value across an
  int8 rounding boundary, one activation moves by one quantization step s (≤ range/127) and its effect spreads
  through the later layers. `compiled_tolerance` bounds that: one step on a few activations, relative to the
  output range; a kernel that computed something else (a wrong scale, a dropped bias) is off by far more.
"""

import copy

import pytest
import torch
import torch._inductor.config  # noqa: F401 (torch._inductor.config.patch below)
from conftest import make_tiny_transformer, randomize_modulation, reload_bit_exact, tiny_inputs
from diffusers import DiTTransformer2DModel

from diffusers_ptq import BaselineConfig, HTGConfig, PTQ4DiTConfig, QDiTConfig, kernels, quantize
from diffusers_ptq.modules import QuantLinear, kernel_summary, quant_linears, set_kernel

SMALL = dict(num_samples=2, num_inference_steps=4, batch_size=2)
CONFIGS = {
    "ptq4dit-w8a8": lambda: PTQ4DiTConfig(weight_bits=8, act_bits=8, **SMALL),
    "ptq4dit-w4a8-gptq": lambda: PTQ4DiTConfig(weight_bits=4, act_bits=8, weight_rounding="gptq", **SMALL),
    "htg-w8a8": lambda: HTGConfig(weight_bits=8, act_bits=8, num_groups=2, **SMALL),
    "htg-w4a8-attention": lambda: HTGConfig(weight_bits=4, act_bits=8, num_groups=2, quantize_attention=True,
                                            **SMALL),
    "htg-w4a8-integer-zero-point-gptq": lambda: HTGConfig(weight_bits=4, act_bits=8, num_groups=2,
                                                          weight_rounding="gptq", weight_zero_point="integer",
                                                          **SMALL),
    "qdit-w4a8": lambda: QDiTConfig(bits_per_weight=6, **SMALL),  # the tiny model's layers need > 4.5 bits
    "baseline-w4a16": lambda: BaselineConfig(weight_bits=4, act_bits=None, **SMALL),
}
# output error against fp32 (relative MSE on the fixed inputs): a tiny random model calibrated on 2 samples × 4 steps
# lands at 1e-4..2e-2 (HTG's groups see few timesteps); a broken fold, scale or kernel gives ~1 or more
MAX_RELATIVE_MSE = 5e-2


def _float_model():
    model = make_tiny_transformer()
    randomize_modulation(model)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def quantized(request):
    """(name, config, float model, quantized model): quantized once per module; tests that change it copy it."""
    config = CONFIGS[request.param]()
    model = _float_model()
    quantize(model, config, progress=False)
    return request.param, config, _float_model(), model


def _forward(model, **overrides):
    return model(**{**tiny_inputs(), **overrides}).sample


def _codes(module: QuantLinear) -> torch.Tensor:
    """The stored integer codes (int8, or quanto's packed uint8 for 4-bit)."""
    data = module.weight._data
    return data if data.dtype == torch.int8 else data._data


def compiled_tolerance(reference: torch.Tensor) -> dict:
    """One activation quantization step (range/127) reaching the output on a few elements, as a fraction of the
    output range: 1e-3·max|y|; float reassociation alone is ~1e-6 relative (see the module docstring)."""
    return dict(rtol=1e-4, atol=1e-3 * float(reference.abs().max()))


# ------------------------------------------------------------------------------------------------ the seven


def test_quantized_layers(quantized):
    name, config, _, model = quantized
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 16  # 2 blocks × (q, k, v, out, fc1, fc2, adaLN) + proj_out_1 and proj_out_2
    assert {m.weight_qtype.bits for m in layers.values()} == {config.weight_bits}
    assert {m.activation_qtype is None for m in layers.values()} == {config.act_bits is None}
    assert not any(isinstance(m, QuantLinear) for n, m in model.named_modules() if "emb" in n)  # embedders stay float
    assert model.is_quantized and model.hf_quantizer.quantization_config is config
    assert sum(kernel_summary(model).values()) == 16


def test_memory_footprint_of_the_quantized_layers(quantized):
    """Each quantized weight stores `bits` per weight (4-bit: two codes a byte, rows padded to an even count), and the
    whole model's tensors take fewer bytes than the float model's."""
    _, config, fp, model = quantized
    for module in model.modules():
        if isinstance(module, QuantLinear):
            stored = _codes(module).numel()
            n, k = module.out_features, module.in_features
            assert stored == (n * k if config.weight_bits == 8 else (n + n % 2) * k // 2)

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in m.state_dict().values())

    assert nbytes(model) < nbytes(fp)


def test_outputs_close_to_fp32(quantized):
    _, config, fp, model = quantized
    with torch.no_grad():
        reference, out = _forward(fp), _forward(model)
    rel = float((out - reference).pow(2).mean() / reference.pow(2).mean())
    assert 0 < rel < MAX_RELATIVE_MSE, rel


def test_nothing_on_the_instance_shadows_a_diffusers_method(quantized):
    """diffusers_ptq.quantize sets what diffusers sets after a quantized load (hf_quantizer, is_quantized,
    quantization_method, the config) and replaces no method: save_pretrained and push_to_hub are ModelMixin's."""
    model = quantized[3]
    assert "save_pretrained" not in vars(model) and "push_to_hub" not in vars(model)
    assert not [name for name in vars(model) if callable(getattr(type(model), name, None))]
    assert type(model).save_pretrained is DiTTransformer2DModel.save_pretrained
    assert {"hf_quantizer", "is_quantized", "quantization_method"} <= set(vars(model))


def test_dtype_casts_are_refused(quantized):
    model = quantized[3]
    for cast in (lambda: model.to(torch.float16), lambda: model.half(), lambda: model.to("cpu", torch.bfloat16)):
        with pytest.raises(ValueError, match="quantized"):
            cast()
    assert model.to("cpu") is model  # a device move is fine


def _feedforward_classes(model) -> set[str]:
    from diffusers.models.attention import FeedForward

    return {type(m).__name__ for m in model.modules() if isinstance(m, FeedForward)}


def test_save_and_reload_bit_exact(quantized, tmp_path, monkeypatch):
    reloaded = reload_bit_exact(copy.deepcopy(quantized[3]), tmp_path / "q", monkeypatch)
    # both Linears of each FeedForward quantized: fused for torch.compile (modules.fuse_feedforwards), after a reload too
    assert _feedforward_classes(quantized[3]) == _feedforward_classes(reloaded) == {"FusedFeedForward"}
    if quantized[0] == "htg-w4a8-attention":  # a freshly loaded model compiles (fullgraph) before any eager forward
        reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "q")
        torch._dynamo.reset()
        with torch.no_grad():
            out = _forward(torch.compile(reloaded, fullgraph=True))
        torch._dynamo.reset()
        expected = _forward(quantized[3]).detach()
        torch.testing.assert_close(out, expected, **compiled_tolerance(expected))


@pytest.mark.parametrize("fullgraph", [True, False])
def test_torch_compile(quantized, fullgraph):
    """Inductor compiles the quantized model (with no graph break when fullgraph=True) and agrees with eager."""
    name, _, _, model = quantized
    if not fullgraph and name != "htg-w8a8":
        pytest.skip("default mode on one config; fullgraph=True (stricter) on every config")
    model = copy.deepcopy(model)  # a copy has never run: its kernels were prepared when it was made, not traced
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=fullgraph)
    with torch.no_grad():
        expected = _forward(model)
        torch.testing.assert_close(_forward(compiled), expected, **compiled_tolerance(expected))
        other = dict(timestep=torch.tensor([10, 10, 10]))  # a new timestep, same shapes: no recompilation needed
        expected = _forward(model, **other)
        torch.testing.assert_close(_forward(compiled, **other), expected, **compiled_tolerance(expected))
    with torch.inference_mode():
        torch.testing.assert_close(_forward(compiled), _forward(model), **compiled_tolerance(expected))
    torch._dynamo.reset()


def test_torch_compile_with_freezing(quantized):
    """With `torch._inductor.config.freezing` (weights constant to Inductor), the oneDNN layers — W8A8, and W4A8
    with its shift epilogue — are lowered by Inductor's own x86 quantization passes (kernels.py): both agree with
    eager."""
    name, _, _, model = quantized
    if name not in ("ptq4dit-w8a8", "htg-w4a8-attention"):
        pytest.skip("one W8A8 and one W4A8 config (with quantized attention)")
    bits = 4 if "w4" in name else 8
    if kernels.onednn_available():  # the path under test runs: oneDNN layers of this bit width
        assert any(m.kernel == "onednn" and m.weight_qtype.bits == bits for _, m in quant_linears(model))
    model = copy.deepcopy(model)
    torch._dynamo.reset()
    with torch._inductor.config.patch(freezing=True):
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            expected = _forward(model)
            torch.testing.assert_close(_forward(compiled), expected, **compiled_tolerance(expected))
        with torch.inference_mode():
            torch.testing.assert_close(_forward(compiled), expected, **compiled_tolerance(expected))
    torch._dynamo.reset()


def test_torch_compile_on_the_float_emulation(quantized):
    """The measured kernel choice (kernels.py) may run a W8A8 layer on the float emulation (input rounded to its
    static or per-token grid, dequantized weight): that path compiles without a graph break too and agrees with
    eager."""
    name, _, _, model = quantized
    if name not in ("htg-w8a8", "qdit-w4a8"):
        pytest.skip("static (HTG W8A8) and per-token (Q-DiT) activations")
    model = copy.deepcopy(model)
    set_kernel(model, "emulated")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expected = _forward(model)
        torch.testing.assert_close(_forward(compiled), expected, **compiled_tolerance(expected))
    torch._dynamo.reset()


def test_lora_training_on_a_quantized_model(quantized):
    """A LoRA adapter (peft's usual wrapping of a Linear) around the quantized attention layers trains: gradients
    reach the adapters through the quantized layers, the quantized weights stay frozen, the loss goes down."""
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(quantized[3])
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    config = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model = peft.inject_adapter_in_model(config, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(adapters) == 2 * 4 * 2  # A and B × 4 layers × 2 blocks
    optimizer = torch.optim.Adam(adapters, lr=1e-2)
    target = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(8):
        loss = (_forward(model) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in adapters)
        no_grad = [n for n, p in model.named_parameters() if "lora_B" in n and not p.grad.abs().sum() > 0]
        assert not no_grad  # (lora_B starts at 0, so A's gradient is 0 on the first step)
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.95 * losses[0], losses
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items() if k in state)  # base weights untouched


# ------------------------------------------------------------------------------------------------ how users call it


def test_inference_mode_no_grad_and_grad_give_identical_outputs(quantized):
    model = quantized[3]
    with torch.no_grad():
        expected = _forward(model)
    with torch.inference_mode():
        assert torch.equal(_forward(model), expected)
    out = _forward(model)  # grad enabled (no parameter requires grad: a plain forward)
    assert torch.equal(out.detach(), expected)
    x = tiny_inputs()["hidden_states"].requires_grad_(True)
    out = _forward(model, hidden_states=x)
    assert torch.equal(out.detach(), expected)
    out.sum().backward()  # the input gradient flows through every quantized layer
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_deepcopy_is_independent(quantized):
    """A deep copy runs alike and owns its state: its timestep context (HTG group biases), its kernels' prepared
    weights, its scales and its quantizer."""
    model = quantized[3]
    with torch.no_grad():
        expected, expected_late = _forward(model), _forward(model, timestep=torch.tensor([5, 5, 5]))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(_forward(twin), expected)
        # interleaved calls at other timesteps: neither publishes into the other's timestep context
        _forward(twin, timestep=torch.tensor([5, 5, 5]))
        assert torch.equal(_forward(model), expected)
        _forward(model)
        assert torch.equal(_forward(twin, timestep=torch.tensor([5, 5, 5])), expected_late)
    ours = dict(model.named_modules())
    for name, module in twin.named_modules():
        if isinstance(module, QuantLinear):
            assert _codes(module).data_ptr() != _codes(ours[name]).data_ptr()
            assert module.input_scale.data_ptr() != ours[name].input_scale.data_ptr()
    with torch.no_grad():
        for module in twin.modules():  # damage the copy: the original does not change
            if isinstance(module, QuantLinear) and module.bias is not None:
                module.bias.add_(1.0)
        assert torch.equal(_forward(model), expected)
    assert twin.hf_quantizer is not model.hf_quantizer
    assert twin.hf_quantizer._model() is twin and model.hf_quantizer._model() is model  # each saves its own model
