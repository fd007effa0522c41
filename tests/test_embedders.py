"""8-bit conditioning embedders (issue #22, point 1): `embedder_bits=8` stores the Linears and embedding tables of
each family's embedders (ModelAdapter.embedders) as int8 weights — weight-only per-output-channel QuantLinear, int8
per-row QuantEmbedding — keeps tied copies one module, and saves / reloads bit-exactly in a smaller checkpoint.

Tolerances: an 8-bit weight code q = round(w / s), |q| ≤ 127, is within half a step of w / s, plus the rounding
of the division (≤ u·127 steps), so |q·s − w| ≤ s·(1/2 + 127u) per element (u = 2⁻²⁴); a table row's product
q·s is rounded once more (≤ u·127·s): a row element is within s·(1/2 + 2·127u). A Linear's output moves by at most
Σ_i |x_i| · s_o·(1/2 + 127u), plus the float32 rounding of the two dot products — on the float and on the
dequantized weight — γ_(K+2) · Σ|x_i w_oi| each (conftest.matmul_error_bound), which also covers the one rounding
of each dequantized weight.
"""

from __future__ import annotations

import pytest
import torch
from conftest import matmul_error_bound, reload_bit_exact, unit_roundoff
from diffusers import PixArtSigmaPipeline
from test_tied_copies import with_identical_embedders

import diffusers_ptq
from diffusers_ptq import BaselineConfig, HTGConfig, QuantConfig
from diffusers_ptq.harness.text import tiny_pipeline
from diffusers_ptq.modules import QuantEmbedding, QuantLinear

FAST = dict(num_samples=2, num_inference_steps=2)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_quant_embedding_matches_a_direct_computation():
    torch.manual_seed(0)
    table = torch.nn.Embedding(11, 24)
    table.weight.data[3] = 0.0  # an all-zero row: scale 1, codes 0
    quantized = QuantEmbedding.from_embedding(table)
    w = table.weight.detach()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round(w / scale)
    ids = torch.tensor([[0, 3, 10], [5, 5, 1]])
    expected = (codes * scale)[ids]
    assert torch.equal(quantized(ids), expected)  # one float32 multiply each, as computed here
    assert quantized.codes.dtype == torch.int8 and int(quantized.codes.abs().max()) == 127
    assert torch.all((quantized(ids) - w[ids]).abs() <= scale[ids] * (0.5 + 2 * 127 * unit_roundoff()))
    with pytest.raises(ValueError, match="padding_idx"):
        QuantEmbedding.from_embedding(torch.nn.Embedding(4, 8, padding_idx=0))


def _check_linear(quantized: QuantLinear, float_weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    x = torch.randn(5, quantized.in_features, generator=torch.Generator().manual_seed(1))
    step = x.abs().sum(1, keepdim=True).double() * quantized.weight._scale.reshape(1, -1).double()
    bound = step * (0.5 + 127 * unit_roundoff()) + matmul_error_bound(x, float_weight, bias=bias) + \
        matmul_error_bound(x, quantized.dequantized_weight(), bias=bias)
    error = (quantized(x) - torch.nn.functional.linear(x, float_weight, bias)).double().abs()
    assert torch.all(error <= bound)


def test_dit_embedders_are_8_bit_tied_within_the_bound_and_reload_bit_exact(tmp_path, monkeypatch):
    model = with_identical_embedders()
    emb = model.transformer_blocks[0].norm1.emb
    floats = {n: (m.weight.detach().clone(), None if getattr(m, "bias", None) is None else m.bias.detach().clone())
              for n, m in emb.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    plain = with_identical_embedders()  # the same model and method, float embedders
    diffusers_ptq.quantize(plain, HTGConfig(weight_bits=4, num_groups=2, **FAST), progress=False)
    diffusers_ptq.quantize(model, HTGConfig(weight_bits=4, num_groups=2, embedder_bits=8, **FAST), progress=False)
    blocks = model.transformer_blocks
    assert blocks[1].norm1.emb is blocks[0].norm1.emb  # still one module
    emb = blocks[0].norm1.emb
    assert set(floats) == {"timestep_embedder.linear_1", "timestep_embedder.linear_2", "class_embedder.embedding_table"}
    for name, (weight, bias) in floats.items():
        module = emb.get_submodule(name)
        if name.startswith("timestep"):
            assert isinstance(module, QuantLinear) and module.weight_qtype.bits == 8
            assert module.activation_qtype is None  # weight-only: nothing calibrated
            _check_linear(module, weight, bias)
        else:
            assert isinstance(module, QuantEmbedding)
            ids = torch.arange(weight.shape[0])
            assert torch.all((module(ids) - weight).abs() <= module.scale * (0.5 + 2 * 127 * unit_roundoff()))
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Embedding) for m in emb.modules())
    reloaded = reload_bit_exact(model, tmp_path / "emb8", monkeypatch)
    assert reloaded.transformer_blocks[1].norm1.emb is reloaded.transformer_blocks[0].norm1.emb
    assert isinstance(reloaded.transformer_blocks[1].norm1.emb.class_embedder.embedding_table, QuantEmbedding)
    plain_dir = tmp_path / "plain"
    plain.save_pretrained(plain_dir)
    float_bytes = sum(w.numel() * 4 for w, _ in floats.values())
    rows = sum(w.shape[0] for w, _ in floats.values())
    saved = (plain_dir / WEIGHTS).stat().st_size - (tmp_path / "emb8" / WEIGHTS).stat().st_size
    # int8 codes for float32 weights save 3/4 of them; each row adds a float32 scale, and the metadata header grows
    # by three module entries (well under 1 KiB each)
    assert saved >= float_bytes * 3 / 4 - 4 * rows - 3 * 1024


@pytest.mark.parametrize("family, kwargs", [("sd3", {}), ("flux", {"guidance_embeds": True}), ("pixart", {})])
def test_text_to_image_embedders_are_8_bit_and_reload_bit_exact(family, kwargs, tmp_path):
    pipe = tiny_pipeline(family, **kwargs)
    config = BaselineConfig(embedder_bits=8, num_samples=2, num_inference_steps=2, calibration_resolution=32,
                            batch_size=2)
    diffusers_ptq.quantize(pipe, config, progress=False)
    model = pipe.transformer
    roots = {"sd3": ["time_text_embed", "context_embedder"], "flux": ["time_text_embed", "context_embedder",
                                                                     "x_embedder"], "pixart": ["adaln_single.emb"]}
    for root in roots[family]:
        quantized = [m for m in model.get_submodule(root).modules() if isinstance(m, QuantLinear)]
        assert quantized and all(m.activation_qtype is None and m.weight_qtype.bits == 8 for m in quantized)
        assert not any(type(m) is torch.nn.Linear for m in model.get_submodule(root).modules())
    if family == "flux":
        assert isinstance(model.time_text_embed.guidance_embedder.linear_1, QuantLinear)
    expected = _latents(pipe)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    pipe.transformer = reloaded
    assert torch.equal(_latents(pipe), expected)


def _latents(pipe) -> torch.Tensor:
    extra = dict(use_resolution_binning=False, clean_caption=False) if isinstance(pipe, PixArtSigmaPipeline) else {}
    return pipe("a handwritten seven", num_inference_steps=2, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0), guidance_scale=3.5, **extra).images


def test_embedder_bits_other_than_8_are_refused():
    with pytest.raises(ValueError, match="embedder_bits"):
        QuantConfig(embedder_bits=4)
    with pytest.raises(ValueError, match="embedder_bits"):
        HTGConfig(embedder_bits=16)
    assert QuantConfig(embedder_bits=8).label.endswith("+emb8")


def test_8_bit_embedders_run_as_diffusers_models_run():
    """inference_mode, no_grad and grad mode give the same output; a deepcopy is independent and equal."""
    import copy

    from conftest import tiny_inputs

    model = with_identical_embedders()
    diffusers_ptq.quantize(model, BaselineConfig(embedder_bits=8, **FAST), progress=False)
    inputs = tiny_inputs()
    with torch.inference_mode():
        expected = model(**inputs).sample.clone()
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, expected)
    assert torch.equal(model(**inputs).sample.detach(), expected)
    twin = copy.deepcopy(model)
    assert twin.transformer_blocks[1].norm1.emb is twin.transformer_blocks[0].norm1.emb  # still tied in the copy
    twin.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.codes.zero_()
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, expected)
        assert not torch.equal(twin(**inputs).sample, expected)


def test_8_bit_embedders_compile_fullgraph():
    """Inductor compiles a model with 8-bit embedders (QuantEmbedding and weight-only Linears) with no graph break
    and agrees with eager to the conformance tests' tolerance (test_diffusers_conformance.compiled_tolerance)."""
    from conftest import tiny_inputs
    from test_diffusers_conformance import compiled_tolerance

    model = with_identical_embedders()
    diffusers_ptq.quantize(model, BaselineConfig(embedder_bits=8, **FAST), progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expected = model(**tiny_inputs()).sample
        torch.testing.assert_close(compiled(**tiny_inputs()).sample, expected, **compiled_tolerance(expected))
    torch._dynamo.reset()
