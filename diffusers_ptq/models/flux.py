"""FLUX.1 (`FluxTransformer2DModel` in a `FluxPipeline`, dev and schnell): MM-DiT double-stream blocks, then
single-stream blocks (issue #19). Every Linear of the blocks is quantizable, the fold targets are below, and
calibration runs from prompts as `FluxPipeline.__call__` does: the prompts encoded by the pipeline's CLIP and T5
encoders, no classifier-free guidance (FLUX.1-dev's distilled guidance goes in through the guidance embedding,
`guidance_scale` default 3.5; FLUX.1-schnell has none), the flow-matching Euler scheduler with FLUX's sigmas
(linspace(1, 1/steps)) and the resolution-dependent shift `mu`, the transformer called with timestep/1000 (so
HTG's groups are in those units), packed 2×2 latents with their image and text position ids; 28 steps (dev) or 4
(schnell), 1024 px or `calibration_resolution`.

Double-stream blocks (`transformer_blocks`, `FluxTransformerBlock`): SD3's joint-block targets (models/sd3.py)
— qkv, ctx_qkv, joint `out` (to_v and add_v_proj rows → to_out.0 and to_add_out columns), fc1, ctx_fc1.
Single-stream block s (`single_transformer_blocks`, `FluxSingleTransformerBlock`):

| target | consumers | producers |
|---|---|---|
| `qkv_mlp` | attn.to_q, to_k, to_v **and** proj_mlp | norm.linear shift (0), scale (1) of 3: one modulation feeds attention and MLP |
| `out`     | proj_out, input columns 0..D−1 only     | attn.to_v rows |

`proj_out` reads cat([attention output, GELU(proj_mlp)]): its attention columns take to_v's rows (a column range,
`SmoothingTarget.columns`); its MLP columns follow GELU, which does not commute with a per-channel division, so
they cannot be smoothed and are quantized as they are (one per-tensor input scale covers both parts).
Output layer: `norm_out.linear` (scale before shift) → `proj_out`, as SD3.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from diffusers_ptq.models.base import ModulationRows, OutputRows, SmoothingTarget
from diffusers_ptq.models.sd3 import SD3Adapter

DEFAULT_RESOLUTION = 1024  # FluxPipeline: default_sample_size 128 × the VAE's downsampling 8


class FluxAdapter(SD3Adapter):
    name = "flux"
    model_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    description = "FluxTransformer2DModel (FLUX.1 dev / schnell, in a FluxPipeline)"
    default_include = (
        "transformer_blocks.*.norm1.linear",
        "transformer_blocks.*.norm1_context.linear",
        "transformer_blocks.*.attn.*",
        "transformer_blocks.*.ff.net.*",
        "transformer_blocks.*.ff_context.net.*",
        "single_transformer_blocks.*.norm.linear",
        "single_transformer_blocks.*.attn.*",
        "single_transformer_blocks.*.proj_mlp",
        "single_transformer_blocks.*.proj_out",
        "norm_out.linear",
        "proj_out",
    )
    forward_arguments = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
                         "txt_ids", "guidance")

    def blocks(self, model: nn.Module) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))] + \
            [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))]

    def smoothing_targets(self, model: nn.Module) -> list[SmoothingTarget]:
        targets = self.joint_block_targets(model)
        for i, block in enumerate(model.single_transformer_blocks):
            s = f"single_transformer_blocks.{i}"
            width = block.attn.to_v.out_features
            targets += [
                SmoothingTarget(f"{s}.qkv_mlp", (ModulationRows(f"{s}.norm.linear", 0, 1, 3),),
                                (f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp")),
                SmoothingTarget(f"{s}.out", (OutputRows(f"{s}.attn.to_v"),), (f"{s}.proj_out",), columns=(0, width)),
            ]
        return targets + [self.final_target()]

    def batched_inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        out = super().batched_inputs(args, kwargs)
        guidance = self.argument("guidance", args, kwargs)
        if guidance is not None:
            out["guidance"] = torch.as_tensor(guidance).reshape(-1).expand(out["hidden_states"].shape[0])
        return out

    def shared_inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """The image and text position ids ([tokens, 3], no batch dimension)."""
        out = {}
        for name in ("img_ids", "txt_ids"):
            value = self.argument(name, args, kwargs)
            if value is not None:
                out[name] = value
        return out

    # --- calibration from prompts (the rest as SD3: prompts, text encoders from the pipeline or its folder) ------
    def calibration_defaults(self, model: nn.Module) -> dict:
        if model.config.guidance_embeds:  # FLUX.1-dev
            return {"scheduler": "flow_match_euler", "num_inference_steps": 28, "guidance_scale": 3.5}
        return {"scheduler": "flow_match_euler", "num_inference_steps": 4, "guidance_scale": 0.0}  # schnell

    default_noise_schedule = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                              "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                              "max_image_seq_len": 4096}

    optional_components = ()

    def doubles_batch(self, model: nn.Module, guidance_scale: float) -> bool:
        return False  # guidance is an input of the transformer (dev) or absent (schnell), never a second batch

    def encode_prompts(self, pipe, prompts: list[str]) -> dict[str, dict]:
        """{prompt: its T5 and pooled CLIP embeddings} through FluxPipeline.encode_prompt."""
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe._execution_device)
        return {p: {"prompt_embeds": embeds[i].cpu(), "pooled_projections": pooled[i].cpu()}
                for i, p in enumerate(prompts)}

    def noise_shape(self, model: nn.Module, batch: int, context: dict | None = None) -> tuple[int, ...]:
        """Unpacked latents [B, in_channels / 4, h, w] (as FluxPipeline.prepare_latents draws them before packing
        2×2 patches into tokens): h = w = 2·(resolution // (2·VAE downsampling))."""
        context = context or {}
        resolution, factor = context.get("resolution") or DEFAULT_RESOLUTION, context.get("vae_scale_factor") or 8
        size = 2 * (resolution // (factor * 2))
        if size <= 0 or resolution % (factor * 2):
            raise ValueError(f"calibration_resolution={resolution} must be a positive multiple of {factor * 2} (2 × "
                             f"the VAE's downsampling {factor})")
        return (batch, model.config.in_channels // 4, size, size)

    def set_timesteps(self, model: nn.Module, scheduler, num_inference_steps: int, noise_shape: tuple) -> None:
        """FluxPipeline's sigmas and shift: sigmas linspace(1, 1/steps) (none with use_flow_sigmas), mu from the
        packed image's token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas", False) else \
            np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift((noise_shape[-2] // 2) * (noise_shape[-1] // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        if sigmas is None:
            scheduler.set_timesteps(num_inference_steps, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps / 1000  # FluxPipeline calls the transformer with timestep / 1000

    def denoise(self, model: nn.Module, scheduler, latents: torch.Tensor, conditions: Sequence, *,
                guidance_scale: float, step_generator: torch.Generator,
                before_step: Callable[[int], None], after_step: Callable[[], None]) -> torch.Tensor:
        """FluxPipeline.__call__'s loop without the VAE (no true CFG), on latents packed as the pipeline packs
        them; returns them unpacked."""
        from diffusers import FluxPipeline

        batch, channels, height, width = latents.shape
        device, dtype = latents.device, latents.dtype
        embeds = torch.stack([c["prompt_embeds"] for c in conditions]).to(device, dtype)
        pooled = torch.stack([c["pooled_projections"] for c in conditions]).to(device, dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        guidance = torch.full([batch], guidance_scale, device=device, dtype=torch.float32) \
            if model.config.guidance_embeds else None
        packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
        for step_index, t in enumerate(scheduler.timesteps):
            timestep = t.expand(batch).to(dtype)
            before_step(step_index)
            noise_pred = model(hidden_states=packed, timestep=timestep / 1000, guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                               img_ids=image_ids, return_dict=False)[0]
            packed = scheduler.step(noise_pred, t, packed, return_dict=False)[0]
            after_step()
        return packed.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
            batch, channels, height, width)
