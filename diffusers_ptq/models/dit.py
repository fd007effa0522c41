"""DiT (`DiTTransformer2DModel` in a `DiTPipeline`): class-conditional, adaLN-Zero blocks, learned sigma.

Smoothing targets of a block (`BasicTransformerBlock` with adaLN-Zero), and of the final layer:

| target | consumers (read the input) | producer (folded into) |
|---|---|---|
| `qkv`   | attn1.to_q, to_k, to_v | norm1.linear rows shift_msa (0), scale_msa (1) |
| `out`   | attn1.to_out.0         | attn1.to_v rows (attention output channel c is a convex combination of V[:, c]) |
| `fc1`   | ff.net.0.proj          | norm1.linear rows shift_mlp (3), scale_mlp (4) |
| `final` | proj_out_2             | proj_out_1 rows shift (0), scale (1) |

`ff.net.2` has no target: its input follows GELU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from diffusers_ptq.models.base import ModelAdapter, ModulationRows, OutputRows, SmoothingTarget


def model_class_ids(transformer, id2label: dict | None = None) -> list[int]:
    """Class ids to condition on: the keys of id2label when known, else every class the model embeds."""
    if id2label:
        return sorted({int(k) for k in id2label})
    num_classes = transformer.config.num_embeds_ada_norm
    if not num_classes:
        raise ValueError("the transformer is not class-conditional (num_embeds_ada_norm is None): pass class_labels")
    return list(range(num_classes))


def balanced_labels(class_ids: Sequence[int], num_samples: int) -> list[int]:
    """num_samples labels cycling through class_ids."""
    return [int(class_ids[i % len(class_ids)]) for i in range(num_samples)]


class DiTAdapter(ModelAdapter):
    name = "dit"
    model_class = "DiTTransformer2DModel"
    pipeline_class = "DiTPipeline"
    description = "DiTTransformer2DModel (class-conditional, norm_type='ada_norm_zero', as in DiTPipeline)"
    # Every Linear of the blocks (attention, MLP), the adaLN modulation, and the final layer; not the timestep/class
    # embedders.
    default_include = (
        "transformer_blocks.*.attn1.to_*",
        "transformer_blocks.*.ff.net.*",
        "transformer_blocks.*.norm1.linear",
        "proj_out_1",
        "proj_out_2",
    )
    forward_arguments = ("hidden_states", "timestep", "class_labels")
    # every block's adaLN-Zero carries its own timestep + class embedder; converted DiT-XL/2 checkpoints hold 28
    # identical copies (77.8 M of 675 M parameters)
    shared_copies = ("transformer_blocks.*.norm1.emb",)
    embedders = ("transformer_blocks.*.norm1.emb",)  # timestep MLP and class table
    # DiT's training schedule, for a transformer loaded without its pipeline's scheduler config.
    default_noise_schedule = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                  clip_sample=False)

    def check(self, model: nn.Module) -> None:
        config = getattr(model, "config", {})
        if config.get("norm_type") != "ada_norm_zero" or not config.get("num_embeds_ada_norm"):
            raise ValueError(f"diffusers_ptq quantizes {self.description}; this {type(model).__name__} has "
                             f"norm_type={config.get('norm_type')!r}, num_embeds_ada_norm="
                             f"{config.get('num_embeds_ada_norm')!r}")

    def blocks(self, model: nn.Module) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(getattr(model, "transformer_blocks", None) or []))]

    def smoothing_targets(self, model: nn.Module) -> list[SmoothingTarget]:
        targets = []
        for b in self.blocks(model):
            modulation = f"{b}.norm1.linear"
            targets += [
                SmoothingTarget(f"{b}.qkv", (ModulationRows(modulation, 0, 1, 6),),
                                (f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v")),
                SmoothingTarget(f"{b}.out", (OutputRows(f"{b}.attn1.to_v", attention=f"{b}.attn1"),),
                                (f"{b}.attn1.to_out.0",)),
                SmoothingTarget(f"{b}.fc1", (ModulationRows(modulation, 3, 4, 6),), (f"{b}.ff.net.0.proj",)),
            ]
        if hasattr(model, "proj_out_1"):
            targets.append(SmoothingTarget("final", (ModulationRows("proj_out_1", 0, 1, 2),), ("proj_out_2",)))
        return targets

    def attention_modules(self, model: nn.Module) -> list[str]:
        return [name for name, module in model.named_modules()
                if name.endswith("attn1") and hasattr(module, "set_processor")]

    def batched_inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        x = self.argument("hidden_states", args, kwargs)
        t, y = self.timestep(args, kwargs), self.argument("class_labels", args, kwargs)
        out = {"hidden_states": x}
        if t is not None:
            out["timestep"] = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        if y is not None:
            out["class_labels"] = torch.as_tensor(y).reshape(-1)
        return out

    # --- calibration -----------------------------------------------------------------------------------------------
    def calibration_conditions(self, model: nn.Module, num_samples: int, context: dict | None) -> list[int]:
        """`num_samples` class labels balanced over context["class_labels"] (checked against the model's classes),
        else over id2label's keys, else over every class the model embeds."""
        context = context or {}
        labels = context.get("class_labels")
        if labels is not None:
            num_classes = model.config.num_embeds_ada_norm
            bad = [c for c in labels if c >= num_classes]
            if bad:
                raise ValueError(f"class_labels {bad} out of range: the model has {num_classes} classes "
                                 f"(0..{num_classes - 1})")
            return balanced_labels(sorted(set(labels)), num_samples)
        return balanced_labels(model_class_ids(model, context.get("id2label")), num_samples)

    def pipeline_context(self, pipe) -> dict:
        """Calibration context from a loaded DiTPipeline: its labels (name -> id) as id2label."""
        labels = getattr(pipe, "labels", None)
        return {"id2label": {int(v): k for k, v in labels.items()} if labels else None}

    def folder_context(self, root) -> dict:
        """The pipeline folder's id2label (model_index.json)."""
        import json

        return {"id2label": json.loads((root / "model_index.json").read_text()).get("id2label") or None}

    def denoise(self, model: nn.Module, scheduler, latents: torch.Tensor, conditions: Sequence, *,
                guidance_scale: float, step_generator: torch.Generator,
                before_step: Callable[[int], None], after_step: Callable[[], None]) -> torch.Tensor:
        """`DiTPipeline.__call__`'s loop without the VAE: with guidance_scale > 1 the batch is doubled with the null
        class (`num_embeds_ada_norm`) and the guided epsilon is used for both halves; with learned sigma only the
        epsilon channels go to the scheduler."""
        from diffusers import DDPMScheduler

        config = model.config
        device = latents.device
        labels = torch.tensor(list(conditions), device=device)
        use_cfg = guidance_scale > 1
        model_input = torch.cat([latents] * 2) if use_cfg else latents
        labels_input = torch.cat([labels, torch.full_like(labels, config.num_embeds_ada_norm)]) if use_cfg else labels
        for step_index, t in enumerate(scheduler.timesteps):
            if use_cfg:
                half = model_input[: len(model_input) // 2]
                model_input = torch.cat([half, half], dim=0)
            model_input = scheduler.scale_model_input(model_input, t)
            t_batch = t.reshape(1).to(device).expand(model_input.shape[0])
            before_step(step_index)
            noise_pred = model(model_input, timestep=t_batch, class_labels=labels_input).sample
            channels = config.in_channels
            if use_cfg:
                eps, rest = noise_pred[:, :channels], noise_pred[:, channels:]
                cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
                half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
                noise_pred = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
            model_output = noise_pred[:, :channels] if config.out_channels // 2 == channels else noise_pred
            step_kwargs = {"generator": step_generator} if isinstance(scheduler, DDPMScheduler) else {}
            model_input = scheduler.step(model_output, t, model_input, **step_kwargs).prev_sample
            after_step()
        return model_input[: len(latents)] if use_cfg else model_input
