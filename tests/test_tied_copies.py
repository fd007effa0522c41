"""Identical copies stored once (issue #22, point 1): DiT keeps a timestep + class embedder in every block, and
converted DiT-XL/2 checkpoints hold identical copies. Quantizing ties them into one module in memory; a saved
checkpoint stores one copy and lists the aliases in its metadata; a reload re-ties them and is bit-exact. Copies
that differ are left alone."""

import json

import pytest
import safetensors.torch
import torch
from conftest import make_tiny_transformer, reload_bit_exact
from diffusers import DiTTransformer2DModel
from safetensors import safe_open

from diffusers_ptq import HTGConfig, PTQ4DiTConfig, quantize
from diffusers_ptq.serialization import METADATA_KEY, TIED_KEY, CheckpointError, identical_copies

FAST = dict(num_samples=2, num_inference_steps=2)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def with_identical_embedders(seed: int = 0) -> DiTTransformer2DModel:
    """The tiny DiT with block 0's embedder copied into every block (as converted DiT-XL/2 checkpoints are)."""
    model = make_tiny_transformer(seed)
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return model


def embedder_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.transformer_blocks[0].norm1.emb.state_dict().values())


@pytest.mark.parametrize("config", [PTQ4DiTConfig(weight_bits=4, **FAST), HTGConfig(weight_bits=4, num_groups=2, **FAST)],
                         ids=["ptq4dit-w4a8", "htg-w4a8"])
def test_identical_embedders_are_tied_stored_once_and_reloaded_bit_exact(config, tmp_path, monkeypatch):
    model = with_identical_embedders()
    untied = make_tiny_transformer()
    quantize(model, config, progress=False)
    quantize(untied, type(config).from_dict(config.to_dict()), progress=False)
    blocks = model.transformer_blocks
    assert blocks[1].norm1.emb is blocks[0].norm1.emb  # one module in memory
    assert identical_copies(untied) == {}  # random copies differ: nothing tied
    reloaded = reload_bit_exact(model, tmp_path / "tied", monkeypatch)
    assert reloaded.transformer_blocks[1].norm1.emb is reloaded.transformer_blocks[0].norm1.emb
    with safe_open(str(tmp_path / "tied" / WEIGHTS), framework="pt") as f:
        keys, metadata = set(f.keys()), json.loads(f.metadata()[METADATA_KEY])
    assert metadata[TIED_KEY] == {"transformer_blocks.1.norm1.emb": "transformer_blocks.0.norm1.emb"}
    assert not any(k.startswith("transformer_blocks.1.norm1.emb.") for k in keys)
    assert any(k.startswith("transformer_blocks.0.norm1.emb.") for k in keys)
    untied.save_pretrained(tmp_path / "untied")
    saved = (tmp_path / "tied" / WEIGHTS).stat().st_size
    assert (tmp_path / "untied" / WEIGHTS).stat().st_size - saved >= embedder_bytes(model)  # one copy fewer


def test_a_tie_to_a_missing_module_is_refused(tmp_path):
    model = with_identical_embedders()
    quantize(model, PTQ4DiTConfig(**FAST), progress=False)
    model.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(str(path))
    meta = json.loads(metadata[METADATA_KEY])
    meta[TIED_KEY] = {"transformer_blocks.1.norm1.emb": "transformer_blocks.0.norm1.linear"}  # not a copy
    safetensors.torch.save_file(tensors, str(path), metadata={**metadata, METADATA_KEY: json.dumps(meta)})
    with pytest.raises(CheckpointError, match="tied_modules"):
        DiTTransformer2DModel.from_pretrained(tmp_path)


def test_tied_model_outputs_equal_the_untied_float_model():
    """Tying identical copies changes nothing in the float function."""
    from diffusers_ptq.serialization import tie_copies

    model = with_identical_embedders()
    from conftest import tiny_inputs

    with torch.no_grad():
        before = model(**tiny_inputs()).sample
        tie_copies(model, identical_copies(model))
        assert model.transformer_blocks[1].norm1.emb is model.transformer_blocks[0].norm1.emb
        assert torch.equal(model(**tiny_inputs()).sample, before)


def test_checkpoint_parts_count_one_copy_of_tied_embedders():
    """bench --footprint's size by part: a quantized checkpoint holds one copy of the 2 blocks' identical embedders
    (besides the patch embedding), the parts add up to what a save writes, and the table prints every part."""
    from diffusers_ptq.harness.bench import checkpoint_parts, footprint_table
    from diffusers_ptq.serialization import state_dict_and_metadata

    model = with_identical_embedders()
    float_parts = checkpoint_parts(model)
    quantize(model, PTQ4DiTConfig(weight_bits=4, **FAST), progress=False)
    parts = checkpoint_parts(model)
    assert float_parts["embedders"] - parts["embedders"] == embedder_bytes(model)  # one of the two copies
    assert 0 < parts["block weights"] < float_parts["block weights"] / 4 and parts["scales"] > 0
    written = state_dict_and_metadata(model, model.state_dict())[0]
    assert sum(parts.values()) == sum(t.numel() * t.element_size() for t in written.values())
    rows = [{"label": label, "state_dict_bytes": 1, "checkpoint_bytes": sum(p.values()), "checkpoint_parts": p,
             "peak_rss_bytes": 1, "quantize_seconds": 0.0, "forward_seconds": 0.0}
            for label, p in (("FP32", float_parts), ("W4A8", parts))]
    table = footprint_table(rows)
    assert "| embedders |" in table and "| W4A8 |" in table
