"""What the engine needs to know about one family of diffusers transformers, as data (`ModelAdapter`).

An adapter names, for its model class: the blocks (reconstruction units); every smoothing target as producers (the
modules whose output rows make a Linear input) → consumers (the Linears that read it); the Linears quantized by
default; the attention modules whose matmuls can be quantized; where the timestep and the conditioning are in a
forward call; and how to draw calibration batches and denoise them the way the family's pipeline does.
The engine (api.py, calibration.py, reparam.py, ...) reads only this; nothing outside `models/` names a module of
a particular family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class ModulationRows:
    """Producer: the shift and scale chunks of an adaLN modulation Linear whose output is `num_chunks` equal chunks
    (`LN(h)·(1 + scale) + shift` is the smoothed input)."""

    linear: str
    shift_chunk: int
    scale_chunk: int
    num_chunks: int


@dataclass(frozen=True)
class OutputRows:
    """Producer: every output row of a Linear (e.g. attention's `to_v`: each attention output channel is a convex
    combination of V's, so dividing V's rows divides the output). `attention`: the attention module whose V these
    rows are (its quantized V range follows the fold), or None."""

    linear: str
    attention: str | None = None


@dataclass(frozen=True)
class SharedModulationRows:
    """Producer (adaLN-single, PixArt): the block's modulation is its table row plus a vector shared by every block,
    `table[chunk] + m[chunk]`, where `table` ([num_chunks, D], a parameter of `block`) holds the block's rows and m
    ([B, num_chunks·D]) reaches the block as its forward argument `argument` (positional `index`). A fold rewrites
    the table and scales m by a per-block `modulation.ModulationScale` (a per-sample multiply)."""

    block: str
    table: str  # parameter name, e.g. PixArt's "<block>.scale_shift_table"
    shift_chunk: int
    scale_chunk: int
    num_chunks: int
    argument: str = "timestep"
    index: int = 4


Producer = ModulationRows | OutputRows | SharedModulationRows


@dataclass(frozen=True)
class SmoothingTarget:
    """One input that a smoothing method may divide per channel: made by `producers` (all of them are divided, so
    several streams may feed one input), read by `consumers` (Linear names; their columns are multiplied) in their
    input columns `columns` = (start, stop) (None: all of them; a range when the input is one part of a
    concatenation, e.g. the attention half of FLUX's single-stream proj_out)."""

    name: str  # e.g. "blocks.3.qkv"
    producers: tuple[Producer, ...]
    consumers: tuple[str, ...]
    columns: tuple[int, int] | None = None

    @property
    def column_slice(self) -> slice:
        return slice(None) if self.columns is None else slice(*self.columns)

    def widen(self, s: torch.Tensor, width: int) -> torch.Tensor:
        """A vector over the target's columns as one over all `width` input columns of a consumer (1 elsewhere)."""
        if self.columns is None:
            return s
        full = torch.ones(width, dtype=s.dtype, device=s.device)
        full[self.column_slice] = s
        return full


class ModelAdapter:
    """Base of the model adapters (one subclass per family in `models/<family>.py`, registered with
    `models.register_adapter`). Class attributes are data; the methods read a model instance."""

    name: ClassVar[str] = ""
    model_class: ClassVar[str] = ""  # the diffusers model class name this adapter handles
    pipeline_class: ClassVar[str] = ""  # the diffusers pipeline class that holds such a model
    default_include: ClassVar[tuple[str, ...]] = ()  # fnmatch patterns of the Linears quantized by default
    forward_arguments: ClassVar[tuple[str, ...]] = ()  # the forward's positional parameters, in order
    timestep_argument: ClassVar[str] = "timestep"
    # what a block returns, named as the next block's keyword inputs (a tuple when it returns several tensors)
    block_outputs: ClassVar[tuple[str, ...]] = ("hidden_states",)
    description: ClassVar[str] = ""
    # fnmatch patterns of modules that checkpoints often hold as identical copies (e.g. DiT's per-block embedders):
    # a saved checkpoint stores each distinct one once and a load ties the copies to one module (serialization.py)
    shared_copies: ClassVar[tuple[str, ...]] = ()
    # fnmatch patterns of the conditioning embedders (timestep / class / pooled-text / guidance embedders, text and
    # patch projections) outside `default_include`: with `embedder_bits=8` their Linears and embedding tables are
    # stored as 8-bit weights (api.quantize_embedders)
    embedders: ClassVar[tuple[str, ...]] = ()

    # --- structure -----------------------------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise ValueError naming what is supported if this instance of the class is a variant the adapter cannot
        handle (default: any instance is fine)."""

    def blocks(self, model: nn.Module) -> list[str]:
        """The transformer blocks in forward order (module names): block reconstruction's units."""
        raise NotImplementedError

    def smoothing_targets(self, model: nn.Module) -> list[SmoothingTarget]:
        raise NotImplementedError

    def attention_modules(self, model: nn.Module) -> list[str]:
        """Attention modules whose QKᵀ and PV matmuls `quantize_attention` rounds."""
        return []

    # --- forward calls -------------------------------------------------------------------------------------------
    def argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        """The value of forward parameter `name` in a call (args, kwargs), or None."""
        if name in kwargs:
            return kwargs[name]
        index = self.forward_arguments.index(name) if name in self.forward_arguments else len(args)
        return args[index] if index < len(args) else None

    def timestep(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        value = self.argument(self.timestep_argument, args, kwargs)
        return None if value is None else torch.as_tensor(value)

    def batched_inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """The call's tensor inputs by name, each with the batch as its first dimension (a scalar timestep is
        expanded): what replaying one row of the call needs."""
        raise NotImplementedError

    def shared_inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """The call's tensor inputs that every row shares and that have no batch dimension (e.g. FLUX's position
        ids), passed whole when rows of the call are replayed."""
        return {}

    # --- calibration ---------------------------------------------------------------------------------------------
    default_noise_schedule: ClassVar[dict | None] = None  # scheduler config for a model loaded without its pipeline's
    schedulers: ClassVar[tuple[str, ...]] = ("ddim", "ddpm")  # the sampling.SCHEDULERS kinds this family samples with

    def calibration_defaults(self, model: nn.Module) -> dict:
        """The family pipeline's defaults for the calibration settings left None: scheduler, num_inference_steps,
        guidance_scale."""
        return {"scheduler": self.schedulers[0], "num_inference_steps": 50, "guidance_scale": 1.5}

    def doubles_batch(self, model: nn.Module, guidance_scale: float) -> bool:
        """Whether the sampler runs classifier-free guidance by doubling the batch (rows [cond..., uncond...])."""
        return guidance_scale > 1

    def pipeline_context(self, pipe) -> dict:
        """Calibration context a loaded pipeline supplies (e.g. {"id2label": ...}); see calibration_conditions."""
        return {}

    def folder_context(self, root) -> dict:
        """Calibration context of the pipeline folder `root` (a Path with model_index.json) that a transformer is
        loaded from (the quantizer's from_pretrained path), e.g. its id2label or its text encoders."""
        return {}

    def calibration_conditions(self, model: nn.Module, num_samples: int, context: dict | None) -> list:
        """One conditioning per calibration sample (class ids, encoded prompts, ...); `context`: what the pipeline
        or the config supplied (e.g. {"id2label": ...}, {"prompts": [...], "encode_prompts": fn})."""
        raise NotImplementedError

    def noise_shape(self, model: nn.Module, batch: int, context: dict | None = None) -> tuple[int, ...]:
        """The initial noise of `batch` samples (default: square image latents, [B, in_channels, sample_size,
        sample_size] from the model's config)."""
        config = model.config
        return (batch, config.in_channels, config.sample_size, config.sample_size)

    def set_timesteps(self, model: nn.Module, scheduler, num_inference_steps: int, noise_shape: tuple) -> None:
        """Set the scheduler's timesteps as the family's pipeline does before its loop (called before every batch:
        a flow-matching scheduler counts its steps)."""
        scheduler.set_timesteps(num_inference_steps)

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The scheduler's timesteps as the transformer receives them (its `timestep` argument): what HTG's groups
        compare against at inference."""
        return timesteps

    def denoise(self, model: nn.Module, scheduler, latents: torch.Tensor, conditions: Sequence, *,
                guidance_scale: float, step_generator: torch.Generator,
                before_step: Callable[[int], None], after_step: Callable[[], None]) -> torch.Tensor:
        """Run the scheduler's timesteps on one batch of latents as the family's pipeline does (guidance
        included), calling before_step(step_index) before and after_step() after each transformer call."""
        raise NotImplementedError
