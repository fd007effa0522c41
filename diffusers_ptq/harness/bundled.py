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

# The bundled SD3- and FLUX.1-family models (docs/bundled-mmdit.md): small MM-DiTs trained on MNIST with prompts,
# shipped as StableDiffusion3Pipeline / FluxPipeline folders (scripts/train_bundled_mmdit.py).
SD3_MODEL = "bundled-sd3"
FLUX_MODEL = "bundled-flux"
BUNDLED_SD3_DIR = Path(__file__).parent.parent / "assets" / "sd3-mnist"
BUNDLED_FLUX_DIR = Path(__file__).parent.parent / "assets" / "flux-mnist"
MMDIT_MODELS = {SD3_MODEL: BUNDLED_SD3_DIR, FLUX_MODEL: BUNDLED_FLUX_DIR}
MMDIT_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
# Sampling settings their metrics are reported at (docs/bundled-mmdit.md); SD3 uses negative prompt "". The size is
# explicit because FluxPipeline's default is fixed (128 latent pixels: 512x512 here), not read from the model.
SD3_SAMPLING = dict(num_inference_steps=28, guidance_scale=5.0, height=32, width=32)
FLUX_SAMPLING = dict(num_inference_steps=8, guidance_scale=0.0, height=32, width=32)  # schnell-style: no guidance


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

    "bundled-sd3" / "bundled-flux" (or a local folder holding a StableDiffusion3Pipeline or FluxPipeline) load that
    pipeline instead, offline; SD3's folder has no T5, so text_encoder_3=None, tokenizer_3=None are passed for it.

    scheduler: None keeps the pipeline's own; "ddim" or "ddpm" builds that one from its config (DiT only).
    """
    mmdit = MMDIT_MODELS.get(str(path))
    if mmdit is None and path is not None and (Path(path) / "model_index.json").is_file():
        import json

        if json.loads((Path(path) / "model_index.json").read_text()).get("_class_name") in MMDIT_PIPELINES:
            mmdit = Path(path)
    if mmdit is not None:
        from diffusers import DiffusionPipeline

        if scheduler is not None:
            raise ValueError(f"{path}: SD3/FLUX pipelines keep their flow-matching scheduler, got scheduler={scheduler!r}")
        if DiffusionPipeline.load_config(mmdit)["_class_name"] == "StableDiffusion3Pipeline":
            kwargs = {"text_encoder_3": None, "tokenizer_3": None, **kwargs}
        return DiffusionPipeline.from_pretrained(mmdit, dtype=torch_dtype, **kwargs)

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
