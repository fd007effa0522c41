"""The bundled default model: a small class-conditional DiT trained on MNIST, shipped as a DiTPipeline folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch

BUNDLED_MODEL_DIR = Path(__file__).parent / "assets" / "dit-mnist"
# Sampling settings the metrics of the bundled model are reported at (docs/bundled-model.md).
DEFAULT_NUM_INFERENCE_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 4.0


def resolve_model_path(path: str | os.PathLike | None) -> Path | str:
    """"bundled" or None -> the shipped model folder; anything else is passed through unchanged."""
    if path is None or str(path) == "bundled":
        return BUNDLED_MODEL_DIR
    return path


def keep_id2label(pipe, id2label: dict | None) -> None:
    """Register id2label on a DiTPipeline so that save_pretrained keeps it (DiTPipeline only reads it)."""
    if id2label:
        pipe.register_to_config(id2label={str(k): v for k, v in id2label.items()})


def load_pipeline(path: str | os.PathLike | None = "bundled", torch_dtype: torch.dtype = torch.float32,
                  scheduler: str | None = None, **kwargs):
    """Load a DiTPipeline ("bundled" = the shipped MNIST model) on the CPU in float32 by default.

    scheduler: None keeps the pipeline's own; "ddim" or "ddpm" builds that one from its config.
    """
    from diffusers import DiTPipeline

    from diffusers_ptq.sampling import make_scheduler

    path = resolve_model_path(path)
    pipe = DiTPipeline.from_pretrained(path, dtype=torch_dtype, **kwargs)
    keep_id2label(pipe, DiTPipeline.load_config(path).get("id2label"))
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe
