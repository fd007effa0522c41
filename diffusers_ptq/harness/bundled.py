"""The bundled default model: a small class-conditional DiT trained on MNIST, shipped as a DiTPipeline folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch

BUNDLED_MODEL_DIR = Path(__file__).parent.parent / "assets" / "dit-mnist"
# Sampling settings the metrics of the bundled model are reported at (docs/bundled-model.md).
DEFAULT_NUM_INFERENCE_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 1.5  # the papers evaluate DiT-XL/2 at classifier-free guidance 1.5


OUTLIER_MODEL = "bundled-outliers"


def resolve_model_path(path: str | os.PathLike | None) -> Path | str:
    """"bundled", "bundled-outliers" or None -> the shipped model folder; anything else passes through unchanged."""
    if path is None or str(path) in ("bundled", OUTLIER_MODEL):
        return BUNDLED_MODEL_DIR
    return path


@torch.no_grad()
def plant_outliers(transformer, channels_per_target: int = 4, factor_range: tuple[float, float] = (8.0, 32.0),
                   offset: float = 2.0, seed: int = 0) -> dict[str, list[int]]:
    """Give the inputs of q/k/v, to_out and fc1 (and the final layer) DiT-XL/2-like outlier channels, exactly.

    Per target, `channels_per_target` channels are magnified by factors drawn log-uniformly from factor_range
    (folded as a smoothing vector 1/m: the producer's rows are multiplied by m, the consumers' columns divided by
    m), and half of them also get a constant offset of ±offset·m (compensated in the consumers' biases).
    The float function is unchanged; per-tensor activation quantization now meets a few channels 8-32x above
    the rest. Returns the planted channels per target.
    """
    from diffusers_ptq.models import adapter_for
    from diffusers_ptq.reparam import apply_smoothing, shift_input

    gen = torch.Generator().manual_seed(seed)
    planted = {}
    lo, hi = torch.log(torch.tensor(factor_range))
    for target in adapter_for(transformer).smoothing_targets(transformer):
        width = transformer.get_submodule(target.consumers[0]).in_features if target.columns is None else \
            target.columns[1] - target.columns[0]
        channels = torch.randperm(width, generator=gen)[:channels_per_target]
        factors = torch.exp(lo + (hi - lo) * torch.rand(channels_per_target, generator=gen))
        s = torch.ones(width)
        s[channels] = 1 / factors
        apply_smoothing(transformer, target, s)
        shift = torch.zeros(width)
        half = channels[: channels_per_target // 2]
        signs = torch.where(torch.rand(len(half), generator=gen) < 0.5, -1.0, 1.0)
        shift[half] = signs * offset * factors[: len(half)]
        shift_input(transformer, target, shift)
        planted[target.name] = channels.tolist()
    return planted


def keep_id2label(pipe, id2label: dict | None) -> None:
    """Register id2label on a DiTPipeline so that save_pretrained keeps it (DiTPipeline only reads it)."""
    if id2label:
        pipe.register_to_config(id2label={str(k): v for k, v in id2label.items()})


def load_pipeline(path: str | os.PathLike | None = "bundled", torch_dtype: torch.dtype = torch.float32,
                  scheduler: str | None = None, **kwargs):
    """Load a DiTPipeline on the CPU in float32 by default. "bundled" = the shipped MNIST model;
    "bundled-outliers" = the same with outlier channels planted by `plant_outliers` (same float function).

    scheduler: None keeps the pipeline's own; "ddim" or "ddpm" builds that one from its config.
    """
    from diffusers import DiTPipeline

    from diffusers_ptq.sampling import make_scheduler

    outliers = str(path) == OUTLIER_MODEL
    path = resolve_model_path(path)
    pipe = DiTPipeline.from_pretrained(path, dtype=torch_dtype, **kwargs)
    keep_id2label(pipe, DiTPipeline.load_config(path).get("id2label"))
    if outliers:
        plant_outliers(pipe.transformer)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe
