"""PixArt-α / PixArt-Σ (`PixArtTransformer2DModel` in a `PixArtAlphaPipeline` / `PixArtSigmaPipeline`): adaLN-single
blocks with cross-attention to T5 text (issue #20). Every Linear of the blocks, the caption projection, the shared
modulation Linear and the output projection are quantizable; calibration runs from prompts as the pipelines do: the
prompts (`calibration_prompts`, default prompts.CALIBRATION_PROMPTS) through the pipeline's T5 encoder with its
attention mask (120 tokens for PixArt-α, 300 for PixArt-Σ, the pipelines' `max_sequence_length`), classifier-free
guidance on a doubled batch with the negative prompt "" (default 4.5), the pipeline's DPM-Solver++ (20 steps; DDIM
and DDPM also allowed), at the pipeline's default size or `calibration_resolution`. The doubled batch is
[cond..., uncond...] (the pipeline's is [uncond, cond]: each row is computed alone).

adaLN-single: `adaln_single.linear` computes one modulation vector m ([B, 6·D]) from the timestep for all blocks;
block b adds its own `scale_shift_table` ([6, D]): shift/scale = table[c] + m[c]. A per-block smoothing vector
cannot go into the shared Linear, so a fold rewrites block b's table ((1 + table_scale)/s − 1, table_shift/s) and
multiplies the block's copy of m's shift and scale chunks by 1/s — one per-sample multiply of a [B, 6·D] vector per
block, nothing per token (`modulation.ModulationScale`; the only operation a fold adds). HTG's per-group shifts are
group biases on that multiply.

Smoothing targets of block b (`BasicTransformerBlock`, norm_type "ada_norm_single"):

| target | consumers | producers |
|---|---|---|
| `qkv`     | attn1.to_q, to_k, to_v | the block's shift_msa (0), scale_msa (1): table rows + m's chunks, scaled in the block |
| `out`     | attn1.to_out.0         | attn1.to_v rows |
| `out2`    | attn2.to_out.0         | attn2.to_v rows (cross-attention: its V comes from the caption) |
| `fc1`     | ff.net.0.proj          | shift_mlp (3), scale_mlp (4): as `qkv` |

and one target for the whole model, `caption_kv`: every block's attn2.to_k and attn2.to_v read the caption
projection's output, so one vector for all of them is folded into `caption_projection.linear_2`'s rows.

Not foldable, quantized as they are: attn2.to_q (reads the residual stream itself: PixArt applies no norm before
cross-attention), ff.net.2 (follows GELU), caption_projection.linear_1 (reads the T5 output), proj_out (its
modulation adds the shared embedded timestep, which also feeds `adaln_single.linear`: no per-block multiply point
inside a submodule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

from diffusers_ptq.models.base import OutputRows, SharedModulationRows, SmoothingTarget
from diffusers_ptq.models.text import TextToImageAdapter

MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}  # the pipelines' defaults


class PixArtAdapter(TextToImageAdapter):
    name = "pixart"
    model_class = "PixArtTransformer2DModel"
    pipeline_class = "PixArtSigmaPipeline"
    description = "PixArtTransformer2DModel (PixArt-α / PixArt-Σ, in a PixArtAlphaPipeline or PixArtSigmaPipeline)"
    default_include = (
        "transformer_blocks.*.attn1.*",
        "transformer_blocks.*.attn2.*",
        "transformer_blocks.*.ff.net.*",
        "caption_projection.linear_*",
        "adaln_single.linear",
        "proj_out",
    )
    embedders = ("adaln_single.emb",)  # timestep embedder (PixArt-α 1024: resolution / aspect-ratio embedders too)
    forward_arguments = ("hidden_states", "encoder_hidden_states", "timestep", "added_cond_kwargs",
                         "cross_attention_kwargs", "attention_mask", "encoder_attention_mask")
    # where BasicTransformerBlock.forward takes the shared modulation vector (PixArt passes it as `timestep=`)
    block_modulation_argument: ClassVar[tuple[str, int]] = ("timestep", 4)

    def check(self, model: nn.Module) -> None:
        config = getattr(model, "config", {})
        if config.get("norm_type") != "ada_norm_single" or getattr(model, "caption_projection", None) is None:
            raise ValueError(f"diffusers_ptq quantizes {self.description} with norm_type='ada_norm_single' and a "
                             f"caption projection; this one has norm_type={config.get('norm_type')!r}, "
                             f"caption_channels={config.get('caption_channels')!r}")

    def blocks(self, model: nn.Module) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def smoothing_targets(self, model: nn.Module) -> list[SmoothingTarget]:
        argument, index = self.block_modulation_argument
        targets = []
        for b in self.blocks(model):
            def modulation(shift: int, scale: int, b: str = b) -> SharedModulationRows:
                return SharedModulationRows(b, f"{b}.scale_shift_table", shift, scale, 6, argument, index)

            targets += [
                SmoothingTarget(f"{b}.qkv", (modulation(0, 1),),
                                (f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v")),
                SmoothingTarget(f"{b}.out", (OutputRows(f"{b}.attn1.to_v", attention=f"{b}.attn1"),),
                                (f"{b}.attn1.to_out.0",)),
                SmoothingTarget(f"{b}.out2", (OutputRows(f"{b}.attn2.to_v"),), (f"{b}.attn2.to_out.0",)),
                SmoothingTarget(f"{b}.fc1", (modulation(3, 4),), (f"{b}.ff.net.0.proj",)),
            ]
        kv = tuple(f"{b}.attn2.{name}" for b in self.blocks(model) for name in ("to_k", "to_v"))
        targets.append(SmoothingTarget("caption_kv", (OutputRows("caption_projection.linear_2"),), kv))
        return targets

    def attention_modules(self, model: nn.Module) -> list[str]:
        """The self-attentions (no mask, no context); cross-attention's matmuls stay float."""
        return [f"{b}.attn1" for b in self.blocks(model)]

    conditioning_inputs = ("encoder_hidden_states", "encoder_attention_mask")

    def batched_inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        out = super().batched_inputs(args, kwargs)
        added = self.argument("added_cond_kwargs", args, kwargs) or {}
        if any(v is not None for v in added.values()):
            raise ValueError("replaying PixArt-α 1024's resolution/aspect-ratio conditions (added_cond_kwargs) is not "
                             "supported: use block or layer rounding (GPTQ) rather than Q-DiT's model-level search")
        return out

    # --- calibration from prompts -----------------------------------------------------------------------------------
    schedulers = ("dpm_solver", "ddim", "ddpm")
    # PixArt's training schedule (released scheduler configs: 1000 steps, linear betas 0.0001 .. 0.02, epsilon)
    default_noise_schedule = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)

    def calibration_defaults(self, model: nn.Module) -> dict:
        return {"scheduler": "dpm_solver", "num_inference_steps": 20, "guidance_scale": 4.5}

    def encode_prompts(self, pipe, prompts: list[str]) -> dict[str, dict]:
        """{prompt: T5 embeddings and attention mask, and those of the negative prompt ""} through the pipeline's
        encode_prompt (max_sequence_length as the pipeline class's default; captions not cleaned)."""
        length = MAX_SEQUENCE_LENGTH.get(type(pipe).__name__, 300)
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt="", device=pipe._execution_device,
            clean_caption=False, max_sequence_length=length)
        return {p: {"prompt_embeds": embeds[i].cpu(), "prompt_attention_mask": mask[i].cpu(),
                    "negative_prompt_embeds": negative[i].cpu(), "negative_prompt_attention_mask": negative_mask[i].cpu()}
                for i, p in enumerate(prompts)}

    def added_conditions(self, model: nn.Module, latents: torch.Tensor, batch: int) -> dict:
        """PixArt-α 1024's micro-conditions (resolution, aspect ratio: `use_additional_conditions`), as
        PixArtAlphaPipeline passes them; {"resolution": None, "aspect_ratio": None} otherwise."""
        if not getattr(model, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        height, width = latents.shape[-2] * 8, latents.shape[-1] * 8  # pixels: PixArt-α's VAE downsamples 8×
        resolution = torch.tensor([height, width], dtype=latents.dtype, device=latents.device).repeat(batch, 1)
        aspect = torch.tensor([float(height / width)], dtype=latents.dtype, device=latents.device).repeat(batch, 1)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def denoise(self, model: nn.Module, scheduler, latents: torch.Tensor, conditions: Sequence, *,
                guidance_scale: float, step_generator: torch.Generator,
                before_step: Callable[[int], None], after_step: Callable[[], None]) -> torch.Tensor:
        """PixArtSigmaPipeline.__call__'s loop without the VAE: T5 embeddings with their attention mask as the
        cross-attention mask, guidance on a doubled batch, the epsilon half of a learned-sigma output to the
        scheduler."""
        import inspect

        device, dtype = latents.device, latents.dtype
        embeds = torch.stack([c["prompt_embeds"] for c in conditions]).to(device, dtype)
        mask = torch.stack([c["prompt_attention_mask"] for c in conditions]).to(device)
        cfg = self.doubles_batch(model, guidance_scale)
        if cfg:
            embeds = torch.cat([embeds, torch.stack([c["negative_prompt_embeds"] for c in conditions]).to(embeds)])
            mask = torch.cat([mask, torch.stack([c["negative_prompt_attention_mask"] for c in conditions]).to(mask)])
        added = self.added_conditions(model, latents, embeds.shape[0])
        step_kwargs = {"generator": step_generator} \
            if "generator" in inspect.signature(scheduler.step).parameters else {}
        channels = latents.shape[1]
        for step_index, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            before_step(step_index)
            noise_pred = model(model_input, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                               timestep=t.reshape(1).to(device).expand(model_input.shape[0]),
                               added_cond_kwargs=added, return_dict=False)[0]
            if cfg:
                cond, uncond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            if model.config.out_channels // 2 == channels:  # learned sigma: the epsilon half
                noise_pred = noise_pred.chunk(2, dim=1)[0]
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            after_step()
        return latents
