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
