"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel` in a `StableDiffusion3Pipeline`): MM-DiT joint-attention
blocks, SD3.5's dual-attention blocks and qk-norm (issue #19). Every Linear of the blocks is quantizable, every fold
target is described below, and calibration runs from prompts as `StableDiffusion3Pipeline.__call__` does:
the prompts (the config's `calibration_prompts`, default prompts.CALIBRATION_PROMPTS) encoded by the pipeline's
own text encoders (CLIP-L, CLIP-G and T5 when present) with the negative prompt "", classifier-free guidance
(default 7.0) on a doubled batch, the flow-matching Euler scheduler (static shift 3.0, or the dynamic shift when
the scheduler config asks for it) over float timesteps, 28 steps, at the pipeline's default size or
`calibration_resolution`. The doubled batch is [cond..., uncond...] (the pipeline's is [uncond, cond]: each row
is computed alone, so only the row order of the recorded statistics differs).

Smoothing targets of block b (`JointTransformerBlock`), and of the output layer:

| target | consumers | producers |
|---|---|---|
| `qkv`     | attn.to_q, to_k, to_v                   | norm1.linear shift_msa (0), scale_msa (1) of 6 (9 with dual attention) |
| `ctx_qkv` | attn.add_q_proj, add_k_proj, add_v_proj | norm1_context.linear chunks 0, 1 of 6; the last block's `AdaLayerNormContinuous`: shift 1, scale 0 of 2 |
| `out`     | attn.to_out.0 and attn.to_add_out       | attn.to_v **and** attn.add_v_proj rows: joint attention mixes both streams' V, one shared vector |
| `qkv2`    | attn2.to_q, to_k, to_v (SD3.5 dual)     | norm1.linear shift_msa2 (6), scale_msa2 (7) of 9 |
| `out2`    | attn2.to_out.0                          | attn2.to_v rows |
| `fc1`     | ff.net.0.proj                           | norm1.linear shift_mlp (3), scale_mlp (4) |
| `ctx_fc1` | ff_context.net.0.proj                   | norm1_context.linear chunks 3, 4 of 6 (not in the last block: it has no context MLP) |
| `final`   | proj_out                                | norm_out.linear shift 1, scale 0 of 2 (`AdaLayerNormContinuous`: scale before shift) |

The last block (`context_pre_only`) has no `to_add_out`: its `out` target has one consumer, both producers. qk-norm
normalizes Q and K after their projections: folding into the projections' inputs is unaffected. `ff.net.2` /
`ff_context.net.2` read GELU's output: no fold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

from diffusers_ptq.models.base import ModulationRows, OutputRows, SmoothingTarget
from diffusers_ptq.models.text import TextToImageAdapter


class SD3Adapter(TextToImageAdapter):
    name = "sd3"
    model_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    description = "SD3Transformer2DModel (Stable Diffusion 3 / 3.5, in a StableDiffusion3Pipeline)"
    default_include = (
        "transformer_blocks.*.norm1.linear",
        "transformer_blocks.*.norm1_context.linear",
        "transformer_blocks.*.attn.*",
        "transformer_blocks.*.attn2.*",
        "transformer_blocks.*.ff.net.*",
        "transformer_blocks.*.ff_context.net.*",
        "norm_out.linear",
        "proj_out",
    )
    forward_arguments = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
    # timestep / pooled-text (FLUX.1 dev: guidance) embedders, the text projection, FLUX's patch projection
    embedders = ("time_text_embed", "context_embedder", "x_embedder")
    block_outputs = ("encoder_hidden_states", "hidden_states")  # every MM-DiT block returns both streams
    conditioning_inputs = ("encoder_hidden_states", "pooled_projections")

    def blocks(self, model: nn.Module) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def smoothing_targets(self, model: nn.Module) -> list[SmoothingTarget]:
        return self.joint_block_targets(model) + [self.final_target()]

    def final_target(self) -> SmoothingTarget:
        return SmoothingTarget("final", (ModulationRows("norm_out.linear", 1, 0, 2),), ("proj_out",))

    def joint_block_targets(self, model: nn.Module) -> list[SmoothingTarget]:
        """The targets of the MM-DiT joint-attention blocks (`transformer_blocks`; FLUX's double-stream blocks are
        the same without dual attention or a context_pre_only block)."""
        targets = []
        for i, block in enumerate(model.transformer_blocks):
            b = f"transformer_blocks.{i}"
            dual = getattr(block, "attn2", None) is not None
            chunks = 9 if dual else 6
            attn, mod = f"{b}.attn", f"{b}.norm1.linear"
            last = getattr(block, "context_pre_only", False)
            ctx = ModulationRows(f"{b}.norm1_context.linear", 1, 0, 2) if last else \
                ModulationRows(f"{b}.norm1_context.linear", 0, 1, 6)
            targets += [
                SmoothingTarget(f"{b}.qkv", (ModulationRows(mod, 0, 1, chunks),),
                                (f"{attn}.to_q", f"{attn}.to_k", f"{attn}.to_v")),
                SmoothingTarget(f"{b}.ctx_qkv", (ctx,), (f"{attn}.add_q_proj", f"{attn}.add_k_proj",
                                                         f"{attn}.add_v_proj")),
                SmoothingTarget(f"{b}.out", (OutputRows(f"{attn}.to_v"), OutputRows(f"{attn}.add_v_proj")),
                                (f"{attn}.to_out.0",) + (() if last else (f"{attn}.to_add_out",))),
            ]
            if dual:
                targets += [
                    SmoothingTarget(f"{b}.qkv2", (ModulationRows(mod, 6, 7, 9),),
                                    (f"{b}.attn2.to_q", f"{b}.attn2.to_k", f"{b}.attn2.to_v")),
                    SmoothingTarget(f"{b}.out2", (OutputRows(f"{b}.attn2.to_v"),), (f"{b}.attn2.to_out.0",)),
                ]
            targets.append(SmoothingTarget(f"{b}.fc1", (ModulationRows(mod, 3, 4, chunks),), (f"{b}.ff.net.0.proj",)))
            if not last:
                targets.append(SmoothingTarget(f"{b}.ctx_fc1", (ModulationRows(f"{b}.norm1_context.linear", 3, 4, 6),),
                                               (f"{b}.ff_context.net.0.proj",)))
        return targets

    # --- calibration from prompts ---------------------------------------------------------------------------------
    schedulers = ("flow_match_euler",)
    default_noise_schedule = {"num_train_timesteps": 1000, "shift": 3.0}

    def calibration_defaults(self, model: nn.Module) -> dict:
        return {"scheduler": "flow_match_euler", "num_inference_steps": 28, "guidance_scale": 7.0}

    optional_components: ClassVar[tuple[str, ...]] = ("text_encoder_3", "tokenizer_3")  # T5 is optional in SD3

    def encode_prompts(self, pipe, prompts: list[str]) -> dict[str, dict]:
        """{prompt: its condition} through the pipeline's text encoders: prompt and pooled embeddings, and those of
        the negative prompt "" (used when guidance doubles the batch)."""
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=pipe._execution_device, do_classifier_free_guidance=True)
        return {p: {"prompt_embeds": embeds[i].cpu(), "pooled_projections": pooled[i].cpu(),
                    "negative_prompt_embeds": negative[i].cpu(), "negative_pooled_projections": negative_pooled[i].cpu()}
                for i, p in enumerate(prompts)}

    def set_timesteps(self, model: nn.Module, scheduler, num_inference_steps: int, noise_shape: tuple) -> None:
        """As StableDiffusion3Pipeline: the dynamic shift `mu` from the image's token count when the scheduler
        config asks for it, else the static shift."""
        if scheduler.config.get("use_dynamic_shifting", None):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            patch = model.config.patch_size
            config = scheduler.config
            mu = calculate_shift((noise_shape[-2] // patch) * (noise_shape[-1] // patch),
                                 config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.16))
            scheduler.set_timesteps(num_inference_steps, mu=mu)
        else:
            scheduler.set_timesteps(num_inference_steps)

    def denoise(self, model: nn.Module, scheduler, latents: torch.Tensor, conditions: Sequence, *,
                guidance_scale: float, step_generator: torch.Generator,
                before_step: Callable[[int], None], after_step: Callable[[], None]) -> torch.Tensor:
        """StableDiffusion3Pipeline.__call__'s loop without the VAE (no skip-layer guidance)."""
        device = latents.device
        embeds = torch.stack([c["prompt_embeds"] for c in conditions]).to(device, latents.dtype)
        pooled = torch.stack([c["pooled_projections"] for c in conditions]).to(device, latents.dtype)
        cfg = self.doubles_batch(model, guidance_scale)
        if cfg:
            embeds = torch.cat([embeds, torch.stack([c["negative_prompt_embeds"] for c in conditions]).to(embeds)])
            pooled = torch.cat([pooled, torch.stack([c["negative_pooled_projections"] for c in conditions]).to(pooled)])
        for step_index, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            before_step(step_index)
            noise_pred = model(hidden_states=model_input, timestep=t.expand(model_input.shape[0]),
                               encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
            if cfg:
                cond, uncond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            after_step()
        return latents
