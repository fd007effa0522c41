"""What the text-to-image families (SD3/SD3.5, FLUX.1, PixArt-α/Σ) share: calibration from prompts.

`TextToImageAdapter` draws one condition per calibration sample from the config's `calibration_prompts` (default:
prompts.CALIBRATION_PROMPTS), each distinct prompt encoded once by the family pipeline's own text encoders — those
of a loaded pipeline (`pipeline_context`) or of the pipeline folder a transformer is loaded from (`folder_context`:
loaded for the encode and freed right after) — and draws square latents at the pipeline's default size or the
config's `calibration_resolution`. A family adds `encode_prompts(pipe, prompts)` and its denoising loop.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from diffusers_ptq.models.base import ModelAdapter
from diffusers_ptq.prompts import cycle_prompts

NO_TEXT_ENCODERS = ("calibrating a {model} runs the calibration prompts through its pipeline's text encoders, and "
                    "none were found: quantize the pipeline (`{pipeline}.from_pretrained(folder, "
                    "quantization_config=cfg)` on the pipeline folder, or `diffusers_ptq.quantize(pipe, cfg)` on a "
                    "loaded pipeline), or load the transformer from the `transformer` subfolder of a pipeline folder "
                    "that has them")


def vae_scale_factor(root: Path) -> int:
    """The latent downsampling of the pipeline folder's VAE (2^(blocks − 1), as the pipelines compute it; 8
    without a VAE config)."""
    config_file = root / "vae" / "config.json"
    if not config_file.is_file():
        return 8
    return 2 ** (len(json.loads(config_file.read_text())["block_out_channels"]) - 1)


def load_text_pipeline(root: Path, transformer: nn.Module, optional: Sequence[str] = ()):
    """The pipeline of folder `root` around `transformer` (already loaded), without its VAE: the text encoders and
    tokenizers are loaded (encode_prompt may read the transformer's config, e.g. SD3 without T5).
    `optional`: components the pipeline may lack, passed as None when model_index.json lists none (diffusers saves
    a None component, e.g. SD3 without T5, as [null, null] and then needs it passed explicitly to load)."""
    from diffusers import DiffusionPipeline

    listed = json.loads((root / "model_index.json").read_text())
    absent = {name: None for name in optional if listed.get(name) in (None, [None, None])}
    return DiffusionPipeline.from_pretrained(root, transformer=transformer, vae=None, **absent)


class TextToImageAdapter(ModelAdapter):
    """Base of the adapters calibrated from prompts."""

    def encode_prompts(self, pipe, prompts: list[str]) -> dict[str, dict]:
        """{prompt: its condition} through the pipeline's text encoders (the family's encode_prompt)."""
        raise NotImplementedError

    conditioning_inputs: ClassVar[tuple[str, ...]] = ()  # the forward's batched text inputs (besides the latents)

    def batched_inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """hidden_states, the `conditioning_inputs` present in the call, and the timestep expanded to the batch."""
        x = self.argument("hidden_states", args, kwargs)
        out = {"hidden_states": x}
        for name in self.conditioning_inputs:
            value = self.argument(name, args, kwargs)
            if value is not None:
                out[name] = value
        t = self.timestep(args, kwargs)
        if t is not None:
            out["timestep"] = t.to(x.device).reshape(-1).expand(x.shape[0])
        return out

    def pipeline_context(self, pipe) -> dict:
        """The loaded pipeline's text encoders (as a prompt encoder: (transformer, prompts) -> {prompt: condition})
        and its VAE's downsampling."""
        return {"encode_prompts": lambda _model, prompts: self.encode_prompts(pipe, prompts),
                "vae_scale_factor": pipe.vae_scale_factor}

    def folder_context(self, root) -> dict:
        """The folder's text encoders, loaded when the prompts are encoded and freed right after."""
        return {"encode_prompts": functools.partial(self._encode_from_folder, Path(root)),
                "vae_scale_factor": vae_scale_factor(Path(root))}

    # pipeline components that may be absent (saved as [null, null]), passed as None when loading the folder
    optional_components: ClassVar[tuple[str, ...]] = ()

    def _encode_from_folder(self, root: Path, model: nn.Module, prompts: list[str]) -> dict[str, dict]:
        """Encode with the folder's text encoders; they are freed when this returns (nothing keeps the pipeline)."""
        return self.encode_prompts(load_text_pipeline(root, model, self.optional_components), prompts)

    @torch.no_grad()
    def calibration_conditions(self, model: nn.Module, num_samples: int, context: dict | None) -> list:
        """`num_samples` prompts cycling through context["prompts"] (None: the bundled set), each distinct prompt
        encoded once by context["encode_prompts"](model, prompts) (the pipeline's text encoders)."""
        context = context or {}
        prompts = cycle_prompts(context.get("prompts"), num_samples)
        encode = context.get("encode_prompts")
        if encode is None:
            raise ValueError(NO_TEXT_ENCODERS.format(model=type(model).__name__, pipeline=self.pipeline_class))
        encoded = encode(model, list(dict.fromkeys(prompts)))
        return [encoded[p] for p in prompts]

    def latent_size(self, model: nn.Module, context: dict | None) -> int:
        """The side of the square latent: the pipeline's default (the transformer's sample_size) or
        context["resolution"] pixels / the VAE's downsampling."""
        context = context or {}
        resolution, factor = context.get("resolution"), context.get("vae_scale_factor") or 8
        if resolution is None:
            return model.config.sample_size
        multiple = factor * model.config.patch_size
        if resolution % multiple:
            raise ValueError(f"calibration_resolution={resolution} must be a multiple of {multiple} (the VAE's "
                             f"downsampling {factor} × patch size {model.config.patch_size})")
        return resolution // factor

    def noise_shape(self, model: nn.Module, batch: int, context: dict | None = None) -> tuple[int, ...]:
        size = self.latent_size(model, context)
        return (batch, model.config.in_channels, size, size)
