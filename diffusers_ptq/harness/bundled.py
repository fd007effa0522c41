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

# The bundled PixArt-Sigma-family model (docs/bundled-pixart.md): a small PixArtTransformer2DModel trained on MNIST
# with prompts, shipped as a PixArtSigmaPipeline folder (scripts/train_bundled_pixart.py).
PIXART_MODEL = "bundled-pixart"
BUNDLED_PIXART_DIR = Path(__file__).parent.parent / "assets" / "pixart-mnist"
PIXART_MODELS = {PIXART_MODEL: BUNDLED_PIXART_DIR}
PIXART_PIPELINES = ("PixArtSigmaPipeline",)
# Its metrics are reported at the pipeline's defaults (DPMSolverMultistepScheduler, 20 steps, guidance 4.5, negative
# prompt ""), 32x32. use_resolution_binning=False: the pipeline's default bins the size to its 256..2048-pixel
# aspect-ratio tables and refuses a transformer sample_size other than 32/64/128/256 (here 8). clean_caption=False:
# the default cleans only with bs4 and ftfy installed (and warns without them); training prompts are not cleaned.
PIXART_SAMPLING = dict(num_inference_steps=20, guidance_scale=4.5, height=32, width=32, use_resolution_binning=False,
                       clean_caption=False)


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
    "bundled-pixart" (or a local folder holding a PixArtSigmaPipeline) loads that PixArtSigmaPipeline; sample it
    with PIXART_SAMPLING (use_resolution_binning=False, see there).

    scheduler: None keeps the pipeline's own; "ddim" or "ddpm" builds that one from its config (DiT); for PixArt
    any of diffusers_ptq.sampling.SCHEDULERS' DDPM-family ones ("ddim", "ddpm", "dpm_solver").
    """
    mmdit = MMDIT_MODELS.get(str(path))
    pixart = PIXART_MODELS.get(str(path))
    if mmdit is None and pixart is None and path is not None and (Path(path) / "model_index.json").is_file():
        import json

        class_name = json.loads((Path(path) / "model_index.json").read_text()).get("_class_name")
        if class_name in MMDIT_PIPELINES:
            mmdit = Path(path)
        elif class_name in PIXART_PIPELINES:
            pixart = Path(path)
    if pixart is not None:
        from diffusers import PixArtSigmaPipeline

        from diffusers_ptq.sampling import make_scheduler

        if scheduler == "flow_match_euler":
            raise ValueError(f"{path}: PixArt is a DDPM (epsilon) model, not a flow-matching one")
        pipe = PixArtSigmaPipeline.from_pretrained(pixart, dtype=torch_dtype, **kwargs)
        if scheduler is not None:
            pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        return pipe
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
