"""FLUX.1 (`FluxTransformer2DModel` in a `FluxPipeline`, dev and schnell): MM-DiT double-stream blocks, then
single-stream blocks (issue #19). Structure only so far, like models/sd3.py: every Linear of the blocks is
quantizable and the fold targets are described; calibration from prompts (text encoders, FLUX dev's guidance
embedding, the flow-matching scheduler) is not built yet, so configs that calibrate raise a NotImplementedError
that says so, and weight-only configs without smoothing run.

Double-stream blocks (`transformer_blocks`, `FluxTransformerBlock`): SD3's joint-block targets (models/sd3.py)
— qkv, ctx_qkv, joint `out` (to_v and add_v_proj rows → to_out.0 and to_add_out columns), fc1, ctx_fc1.
Single-stream block s (`single_transformer_blocks`, `FluxSingleTransformerBlock`):

| target | consumers | producers |
|---|---|---|
| `qkv_mlp` | attn.to_q, to_k, to_v **and** proj_mlp | norm.linear shift (0), scale (1) of 3: one modulation feeds attention and MLP |

Not folded yet: `proj_out` reads cat([attention output, GELU(proj_mlp)]); its attention columns could take to_v's
rows (a consumer column range, which `SmoothingTarget` cannot express yet), its MLP columns follow GELU and cannot.
Output layer: `norm_out.linear` (scale before shift) → `proj_out`, as SD3.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.models.base import ModulationRows, SmoothingTarget
from diffusers_ptq.models.sd3 import SD3Adapter


class FluxAdapter(SD3Adapter):
    name = "flux"
    model_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    description = "FluxTransformer2DModel (FLUX.1 dev / schnell; weight-only until calibration lands, #19)"
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
        for i in range(len(model.single_transformer_blocks)):
            s = f"single_transformer_blocks.{i}"
            targets.append(SmoothingTarget(f"{s}.qkv_mlp", (ModulationRows(f"{s}.norm.linear", 0, 1, 3),),
                                           (f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp")))
        return targets + [self.final_target()]

    def batched_inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        out = super().batched_inputs(args, kwargs)
        guidance = self.argument("guidance", args, kwargs)
        if guidance is not None:
            out["guidance"] = torch.as_tensor(guidance).reshape(-1).expand(out["hidden_states"].shape[0])
        return out

    def noise_shape(self, model: nn.Module, batch: int) -> tuple[int, ...]:
        raise NotImplementedError("FLUX's packed latents come with calibration from prompts (issue #19)")
