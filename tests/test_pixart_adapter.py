"""The PixArt adapter (issue #20): adaLN-single folds — each block's table plus a per-sample multiply of the shared
modulation vector — the caption projection's one vector for every block's cross-attention K/V, V-row folds, and
HTG's per-group shifts on the multiply path: every one reproduces the float model with quantization off. Calibration
from prompts through the T5 encoder with its mask, checkpoints of the multiplier.

Tolerances: a fold changes each product by a few float32 roundings (s·(x/s), a table row rewritten as (1 + r)/s − 1)
in dot products of length ≤ 64 through 2 blocks: ~1e-6 relative (measured 2e-7..5e-7 absolute on outputs of size
~1); rtol = atol = 1e-4 as the other adapters' fold tests (tests/test_sd3_adapter.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_fold_exact

import diffusers_ptq
from diffusers_ptq import sampling, scheme
from diffusers_ptq.harness.text import tiny_pipeline, tiny_transformer
from diffusers_ptq.models import SharedModulationRows, adapter_for
from diffusers_ptq.models.pixart import PixArtAdapter
from diffusers_ptq.modulation import ModulationScale
from diffusers_ptq.reparam import apply_smoothing, shift_input_per_group
from diffusers_ptq.sampling import prepare_sampling
from diffusers_ptq.serialization import CheckpointError

RTOL = ATOL = 1e-4
CALIBRATION = dict(num_samples=2, num_inference_steps=3, calibration_resolution=32, batch_size=2)


def random_model():
    """The tiny PixArt with random modulations: tables and the shared modulation Linear at a scale that matters."""
    model = tiny_transformer("pixart").eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "scale_shift_table" in name or name.startswith("adaln_single.linear"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def inputs(timestep=(999, 20)):
    gen = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0  # padding the second caption: masked keys
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=gen), encoder_attention_mask=mask,
                timestep=torch.tensor(timestep), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def forward(model, **kw):
    with torch.no_grad():
        return model(**inputs(**kw)).sample


def test_found_by_class_and_targets():
    model = random_model()
    adapter = adapter_for(model)
    assert isinstance(adapter, PixArtAdapter)
    targets = adapter.smoothing_targets(model)
    assert [t.name.split(".")[-1] for t in targets] == ["qkv", "out", "out2", "fc1"] * 2 + ["caption_kv"]
    caption = targets[-1]
    assert caption.consumers == tuple(f"transformer_blocks.{b}.attn2.{n}" for b in (0, 1) for n in ("to_k", "to_v"))
    qkv = targets[0].producers[0]
    assert isinstance(qkv, SharedModulationRows) and (qkv.shift_chunk, qkv.scale_chunk) == (0, 1)
    assert model.get_parameter(qkv.table).shape == (6, 16)
    names = dict(model.named_modules())
    assert all(isinstance(names[c], torch.nn.Linear) for t in targets for c in t.consumers)
    assert not any("attn2.to_q" in c for t in targets for c in t.consumers)  # reads the residual stream: no fold
    with pytest.raises(ValueError, match="PixArtTransformer2DModel"):
        adapter_for(tiny_transformer("pixart", caption_channels=None))  # no text: not a PixArt the adapter knows


@pytest.mark.parametrize("index", range(9))
def test_each_fold_with_quantization_off_reproduces_the_float_model(index):
    """A random s and shift folded into the target: producers (table + shared-vector multiply, V rows, the caption
    projection's rows) and consumers; the float function must not change."""
    model = random_model()
    assert_fold_exact(model, PixArtAdapter().smoothing_targets(model)[index], forward, seed=10 + index,
                      rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("index", [0, 3])
def test_the_per_sample_multiply_is_what_makes_the_fold_exact(index):
    """The one operation a fold adds: the block's copy of the shared vector times 1/s. With the multiplier reset to
    ones (only the table folded) the output changes; with it, it does not — at timesteps far apart, so the shared
    part differs between the rows."""
    model = random_model()
    target = PixArtAdapter().smoothing_targets(model)[index]
    folded = copy.deepcopy(model)
    s = 0.5 + 1.5 * torch.rand(16, generator=torch.Generator().manual_seed(3))
    apply_smoothing(folded, target, s)
    block = folded.get_submodule(target.producers[0].block)
    assert isinstance(block.modulation_scale, ModulationScale) and type(block).__name__.startswith("ModulationScaled")
    torch.testing.assert_close(forward(folded), forward(model), rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        block.modulation_scale.scale.fill_(1.0)
    assert not torch.allclose(forward(folded), forward(model), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("index", [0, 3, 8])
def test_htg_per_group_shifts_on_the_modulation_path_are_exact(index):
    """Per-timestep-group offsets (group biases on the block's multiply, or on the caption projection), then a
    scale fold on top: exact at timesteps in either group."""
    model = random_model()
    target = PixArtAdapter().smoothing_targets(model)[index]
    folded = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(4)
    shift_input_per_group(folded, target, torch.tensor([500.0]), torch.randn(2, 16, generator=gen))
    apply_smoothing(folded, target, 0.5 + 1.5 * torch.rand(16, generator=gen))
    for timestep in ((999, 20), (20, 999), (600, 400)):
        torch.testing.assert_close(forward(folded, timestep=timestep), forward(model, timestep=timestep),
                                   rtol=RTOL, atol=ATOL)


def test_defaults_schedulers_and_the_t5_length_of_each_pipeline():
    pipe = tiny_pipeline("pixart")
    model = pipe.transformer
    run = prepare_sampling(model, conditions=[None], context={"resolution": 32})
    assert (run.kind, run.num_inference_steps, run.guidance_scale, run.cfg) == ("dpm_solver", 20, 4.5, True)
    assert prepare_sampling(model, scheduler="ddim", conditions=[None]).kind == "ddim"
    with pytest.raises(ValueError, match="dpm_solver"):
        prepare_sampling(model, scheduler="flow_match_euler", conditions=[None])
    assert set(scheme.SCHEDULERS) == set(sampling.SCHEDULERS)  # what a config accepts is what sampling builds
    adapter = adapter_for(model)
    sigma = adapter.encode_prompts(pipe, ["a handwritten seven"])["a handwritten seven"]
    assert sigma["prompt_embeds"].shape == (300, 32) and sigma["prompt_attention_mask"].sum() < 300
    from diffusers import PixArtAlphaPipeline

    alpha = PixArtAlphaPipeline(**pipe.components)
    encoded = adapter.encode_prompts(alpha, ["a handwritten seven"])["a handwritten seven"]
    assert encoded["prompt_embeds"].shape == (120, 32)  # PixArtAlphaPipeline's max_sequence_length
    torch.testing.assert_close(encoded["prompt_embeds"][:4], sigma["prompt_embeds"][:4])


def test_a_checkpoint_without_the_multiplier_is_refused(tmp_path):
    pipe = tiny_pipeline("pixart")
    diffusers_ptq.quantize(pipe, diffusers_ptq.HTGConfig(**CALIBRATION), progress=False)
    block = pipe.transformer.transformer_blocks[0]
    assert isinstance(block.modulation_scale, ModulationScale)
    pipe.transformer.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    file = next(tmp_path.glob("*.safetensors"))
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    del tensors["transformer_blocks.0.modulation_scale.scale"]
    save_file(tensors, file, metadata=metadata)
    from diffusers import PixArtTransformer2DModel

    with pytest.raises(CheckpointError, match="transformer_blocks.0.modulation_scale.*missing"):
        PixArtTransformer2DModel.from_pretrained(tmp_path)


def test_quantized_self_attention_only_and_reload_bit_exact(tmp_path):
    """quantize_attention rounds the self-attention's matmuls (no mask, no context); cross-attention stays float;
    the processors' scales and the modulation multipliers come back bit for bit."""
    from diffusers import PixArtTransformer2DModel

    from diffusers_ptq.attention import QuantAttnProcessor

    pipe = tiny_pipeline("pixart")
    diffusers_ptq.quantize(pipe, diffusers_ptq.PTQ4DiTConfig(quantize_attention=True, **CALIBRATION), progress=False)
    model = pipe.transformer
    blocks = model.transformer_blocks
    assert all(isinstance(b.attn1.processor, QuantAttnProcessor) for b in blocks)
    assert not any(isinstance(b.attn2.processor, QuantAttnProcessor) for b in blocks)
    with torch.no_grad():
        expected = model(**inputs()).sample
    model.save_pretrained(tmp_path)
    reloaded = PixArtTransformer2DModel.from_pretrained(tmp_path)
    assert isinstance(reloaded.transformer_blocks[0].modulation_scale, ModulationScale)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs()).sample, expected)
