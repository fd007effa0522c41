import copy

import pytest
import torch
from diffusers import DiTTransformer2DModel

torch.set_num_threads(2)


def make_tiny_transformer(seed: int = 0) -> DiTTransformer2DModel:
    """A random DiT built from a config (2 blocks, 32 channels): fast, with nonzero adaLN so stats differ."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=1000)
    return model.eval()


@pytest.fixture
def tiny_transformer() -> DiTTransformer2DModel:
    return make_tiny_transformer()


@pytest.fixture(scope="session")
def bundled_pipe():
    from diffusers_ptq.bundled import load_pipeline

    return load_pipeline("bundled")


def bundled_relative_error(pipe, config):
    """Quantize a copy of the pipeline's transformer with `config`; its relative output MSE against the float one
    on 8 fixed inputs (timesteps 999..20, conditional and unconditional), and the quantization report."""
    from diffusers_ptq.api import quantize_transformer

    model = copy.deepcopy(pipe.transformer)
    report = quantize_transformer(model, config, id2label={i: str(i) for i in range(10)},
                                  scheduler_config=pipe.scheduler.config, progress=False)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, 8, 8, generator=gen)
    t = torch.tensor([999, 800, 600, 400, 300, 200, 100, 20])
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 1000, 1000])
    with torch.no_grad():
        reference = pipe.transformer(x, timestep=t, class_labels=labels).sample
        out = model(x, timestep=t, class_labels=labels).sample
    return float((out - reference).pow(2).mean() / reference.pow(2).mean()), report


def randomize_modulation(model, seed: int = 1, std: float = 0.2) -> None:
    """adaLN-Zero starts at zero: give the modulation and final layers real weights so every fold is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def tiny_inputs() -> dict:
    """A fixed batch of three samples at three timesteps (one unconditional) for the tiny transformer."""
    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(3, 4, 4, 4, generator=gen), timestep=torch.tensor([999, 500, 3]),
                class_labels=torch.tensor([0, 5, 1000]))


def reload_bit_exact(model, folder, monkeypatch) -> DiTTransformer2DModel:
    """Save a quantized transformer, reload it without calibrating or unpickling, and check that the output and
    every state-dict tensor are bit-identical; returns the reloaded model."""
    with torch.no_grad():
        expected = model(**tiny_inputs()).sample
    model.save_pretrained(folder)
    with monkeypatch.context() as patch:
        patch.setattr("diffusers_ptq.api.calibrate", lambda *a, **k: pytest.fail("calibrated on reload"))
        patch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
        reloaded = DiTTransformer2DModel.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(reloaded(**tiny_inputs()).sample, expected)
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return reloaded
