"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel` in a `StableDiffusion3Pipeline`): MM-DiT joint-attention
blocks, SD3.5's dual-attention blocks and qk-norm (issue #19). Structure only so far: every Linear of the blocks is
quantizable and every fold target is described; calibration from prompts (the pipeline's text encoders, CFG,
flow-matching scheduler) is not built yet, so configs that calibrate raise a NotImplementedError that says so, and
weight-only configs without smoothing (W8A16, W4A16: no calibration) run.

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

import torch
from torch import nn

from diffusers_ptq.models.base import ModelAdapter, ModulationRows, OutputRows, SmoothingTarget

CALIBRATION_PENDING = ("calibrating a StableDiffusion3 transformer (from prompts, through the pipeline's text "
                       "encoders and flow-matching scheduler) is not built yet (issue #19); weight-only configs "
                       "without smoothing or GPTQ (act_bits=None) need no calibration and work")


class SD3Adapter(ModelAdapter):
    name = "sd3"
    model_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    description = "SD3Transformer2DModel (Stable Diffusion 3 / 3.5; weight-only until calibration lands, #19)"
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

    def batched_inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        x = self.argument("hidden_states", args, kwargs)
        out = {"hidden_states": x}
        for name in ("encoder_hidden_states", "pooled_projections"):
            value = self.argument(name, args, kwargs)
            if value is not None:
                out[name] = value
        t = self.timestep(args, kwargs)
        if t is not None:
            out["timestep"] = t.to(x.device).reshape(-1).expand(x.shape[0])
        return out

    def calibration_conditions(self, model: nn.Module, num_samples: int, context: dict | None) -> list:
        raise NotImplementedError(CALIBRATION_PENDING)

    def denoise(self, model: nn.Module, scheduler, latents: torch.Tensor, conditions: Sequence, *,
                guidance_scale: float, step_generator: torch.Generator,
                before_step: Callable[[int], None], after_step: Callable[[], None]) -> torch.Tensor:
        raise NotImplementedError(CALIBRATION_PENDING)
