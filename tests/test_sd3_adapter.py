"""The SD3 / SD3.5 adapter (issue #19, first step): its fold targets are exact on a random MM-DiT with a dual-attention
block, qk-norm and the context_pre_only last block; weight-only quantization runs through the engine; a bare
transformer cannot calibrate (no text encoders) and says so. Calibration from prompts: tests/test_text_to_image.py.

Tolerances: each fold multiplies and divides by s ∈ [0.5, 2] and adds/subtracts offsets, a few float32 roundings per
product (relative u = 6e-8 each) inside dot products of length ≤ 64, so the folded model's output differs from the
reference by ~K·u·(sum of |terms|) per layer ≈ 1e-5 relative through the two blocks; rtol = atol = 1e-4 leaves a
margin of ~10× while a wrong fold (a factor s left over, a shift on the wrong rows) moves the output by O(1).
"""


import pytest
import torch
from conftest import assert_fold_exact

from diffusers_ptq.models import adapter_for
from diffusers_ptq.models.sd3 import SD3Adapter

RTOL = ATOL = 1e-4


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=16, caption_projection_dim=32,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                                  dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # real modulations, so every chunk of every fold matters
        for name, p in model.named_parameters():
            if "norm1" in name or "norm_out" in name or "norm1_context" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def inputs():
    gen = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=gen),
                pooled_projections=torch.randn(2, 8, generator=gen), timestep=torch.tensor([900.0, 30.0]))


def forward(model):
    with torch.no_grad():
        return model(**inputs()).sample


def test_found_by_class_and_every_target_names_real_modules():
    model = tiny_sd3()
    adapter = adapter_for(model)
    assert isinstance(adapter, SD3Adapter)
    targets = adapter.smoothing_targets(model)
    # block 0 (dual attention): qkv, ctx_qkv, out, qkv2, out2, fc1, ctx_fc1; block 1 (last): qkv, ctx_qkv, out, fc1
    assert [t.name.split(".")[-1] for t in targets] == ["qkv", "ctx_qkv", "out", "qkv2", "out2", "fc1", "ctx_fc1",
                                                        "qkv", "ctx_qkv", "out", "fc1", "final"]
    names = dict(model.named_modules())
    assert all(p.linear in names for t in targets for p in t.producers)
    assert all(isinstance(names[c], torch.nn.Linear) for t in targets for c in t.consumers)
    joint = targets[2]
    assert [p.linear for p in joint.producers] == ["transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_v_proj"]
    assert joint.consumers == ("transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out")
    assert targets[9].consumers == ("transformer_blocks.1.attn.to_out.0",)  # context_pre_only: no to_add_out


@pytest.mark.parametrize("index", range(12))
def test_each_fold_with_quantization_off_reproduces_the_float_model(index):
    """Divide the target's input by a random s (producers' rows, consumers' columns) and shift it by a random offset
    (producers' shift rows or V biases, consumers' biases): the float function must not change."""
    model = tiny_sd3()
    assert_fold_exact(model, SD3Adapter().smoothing_targets(model)[index], forward, seed=10 + index, rtol=RTOL, atol=ATOL)


def test_a_wrong_fold_is_caught():
    """The test above can fail: folding a target's s into its producers only (consumers untouched) changes the
    output far beyond the tolerance."""
    from diffusers_ptq.reparam import divide_modulation

    model = tiny_sd3()
    reference = forward(model)
    target = SD3Adapter().smoothing_targets(model)[0]
    producer = target.producers[0]
    with torch.no_grad():
        divide_modulation(model.get_submodule(producer.linear), torch.full((32,), 2.0), producer.shift_chunk,
                          producer.scale_chunk, producer.num_chunks)
    assert not torch.allclose(forward(model), reference, rtol=RTOL, atol=ATOL)


def test_weight_only_quantization_runs_without_calibration():
    from diffusers_ptq.api import quantize_transformer
    from diffusers_ptq.config import QuantConfig

    model = tiny_sd3()
    reference = forward(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    report = quantize_transformer(model, QuantConfig(weight_bits=8, act_bits=None), progress=False)
    # every Linear but the timestep/pooled-text embedders and the context embedder: blocks, norm_out, proj_out
    assert set(report.layers) == {n for n in linears if not n.startswith(("time_text_embed", "context_embedder"))}
    assert len(report.layers) == 31
    rel = float((forward(model) - reference).pow(2).mean() / reference.pow(2).mean())
    assert rel < 1e-3, rel  # int8 per-channel weights: ~1e-5 measured; 1e-3 would be a broken layer


def test_calibrating_a_bare_transformer_asks_for_its_pipeline():
    """Calibration encodes prompts with the pipeline's text encoders: a bare transformer has none, and the error
    says how to quantize it instead."""
    from diffusers_ptq.api import quantize_transformer
    from diffusers_ptq.config import QuantConfig

    with pytest.raises(ValueError, match="text encoders.*StableDiffusion3Pipeline.from_pretrained"):
        quantize_transformer(tiny_sd3(), QuantConfig(weight_bits=8, act_bits=8), progress=False)
