"""The FLUX.1 adapter (issue #19, first step): the double-stream joint targets and the single-stream target (one
modulation feeding q/k/v and the MLP) are exact folds on a random FLUX transformer; weight-only quantization runs
(calibration from prompts: tests/test_text_to_image.py).
Tolerances as in tests/test_sd3_adapter.py (a few float32 roundings per product in dot products of length ≤ 64:
~1e-5 relative; rtol = atol = 1e-4)."""


import pytest
import torch
from conftest import assert_fold_exact

from diffusers_ptq.models import adapter_for
from diffusers_ptq.models.flux import FluxAdapter

RTOL = ATOL = 1e-4


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name or name.startswith("norm_out"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def inputs():
    gen = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(2, 6, 8, generator=gen), encoder_hidden_states=torch.randn(2, 4, 16, generator=gen),
                pooled_projections=torch.randn(2, 8, generator=gen), timestep=torch.tensor([0.9, 0.05]),
                img_ids=torch.randint(0, 4, (6, 3), generator=gen).float(), txt_ids=torch.zeros(4, 3),
                guidance=torch.tensor([3.5, 3.5]))


def forward(model):
    with torch.no_grad():
        return model(**inputs()).sample


def test_found_by_class_and_targets():
    model = tiny_flux()
    adapter = adapter_for(model)
    assert isinstance(adapter, FluxAdapter)
    targets = adapter.smoothing_targets(model)
    assert [t.name.split(".")[-1] for t in targets] == ["qkv", "ctx_qkv", "out", "fc1", "ctx_fc1"] * 2 + \
        ["qkv_mlp", "out"] * 2 + ["final"]
    assert targets[10].consumers[-1] == "single_transformer_blocks.0.proj_mlp"
    out = targets[11]  # the attention half of proj_out's input: to_v's rows, columns 0..D-1
    assert out.consumers == ("single_transformer_blocks.0.proj_out",) and out.columns == (0, 16)
    assert model.get_submodule(out.consumers[0]).in_features == 16 + 4 * 16  # attention + MLP (after GELU)
    names = dict(model.named_modules())
    assert all(isinstance(names[c], torch.nn.Linear) for t in targets for c in t.consumers)
    assert all(p.linear in names for t in targets for p in t.producers)


@pytest.mark.parametrize("index", range(15))
def test_each_fold_with_quantization_off_reproduces_the_float_model(index):
    """Divide the target's input by a random s (producers' rows, consumers' columns) and shift it by a random offset
    (producers' shift rows or V biases, consumers' biases): the float function must not change."""
    model = tiny_flux()
    assert_fold_exact(model, FluxAdapter().smoothing_targets(model)[index], forward, seed=10 + index, rtol=RTOL, atol=ATOL)


def test_weight_only_quantization_runs_and_a_bare_transformer_cannot_calibrate():
    from diffusers_ptq.api import quantize_transformer
    from diffusers_ptq.config import QuantConfig

    model = tiny_flux()
    reference = forward(model)
    report = quantize_transformer(model, QuantConfig(weight_bits=8, act_bits=None), progress=False)
    embedders = ("time_text_embed", "context_embedder", "x_embedder")
    assert all(not n.startswith(embedders) for n in report.layers) and len(report.layers) == 2 * 14 + 2 * 6 + 2
    rel = float((forward(model) - reference).pow(2).mean() / reference.pow(2).mean())
    assert rel < 1e-3, rel
    with pytest.raises(ValueError, match="text encoders.*FluxPipeline.from_pretrained"):
        quantize_transformer(tiny_flux(), QuantConfig(weight_bits=8, act_bits=8), progress=False)


def test_a_fold_on_the_wrong_columns_is_caught():
    """The single-stream `out` fold must compensate in proj_out's attention columns: the same fold with proj_out's
    first MLP columns (16..31) instead changes the output far beyond the tolerance."""
    from dataclasses import replace

    model = tiny_flux()
    target = next(t for t in FluxAdapter().smoothing_targets(model) if t.name == "single_transformer_blocks.0.out")
    with pytest.raises(AssertionError):
        assert_fold_exact(model, replace(target, columns=(16, 32)), forward, seed=3, rtol=RTOL, atol=ATOL)
