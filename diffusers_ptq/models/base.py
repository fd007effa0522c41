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


Producer = ModulationRows | OutputRows


@dataclass(frozen=True)
class SmoothingTarget:
    """One input that a smoothing method may divide per channel: made by `producers` (all of them are divided, so
    several streams may feed one input), read by `consumers` (Linear names; their columns are multiplied)."""

    name: str  # e.g. "blocks.3.qkv"
    producers: tuple[Producer, ...]
    consumers: tuple[str, ...]


class ModelAdapter:
    """Base of the model adapters (one subclass per family in `models/<family>.py`, registered with
    `models.register_adapter`). Class attributes are data; the methods read a model instance."""

    name: ClassVar[str] = ""
    model_class: ClassVar[str] = ""  # the diffusers model class name this adapter handles
    pipeline_class: ClassVar[str] = ""  # the diffusers pipeline class that holds such a model
    default_include: ClassVar[tuple[str, ...]] = ()  # fnmatch patterns of the Linears quantized by default
    forward_arguments: ClassVar[tuple[str, ...]] = ()  # the forward's positional parameters, in order
    timestep_argument: ClassVar[str] = "timestep"
    description: ClassVar[str] = ""

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

    # --- calibration ---------------------------------------------------------------------------------------------
    default_noise_schedule: ClassVar[dict | None] = None  # scheduler config for a model loaded without its pipeline's

    def pipeline_context(self, pipe) -> dict:
        """Calibration context a loaded pipeline supplies (e.g. {"id2label": ...}); see calibration_conditions."""
        return {}

    def calibration_conditions(self, model: nn.Module, num_samples: int, context: dict | None) -> list:
        """One conditioning per calibration sample (class ids, prompts, ...); `context`: what the pipeline or the
        config supplied (e.g. {"id2label": ...})."""
        raise NotImplementedError

    def noise_shape(self, model: nn.Module, batch: int) -> tuple[int, ...]:
        """The initial noise of `batch` samples (default: square image latents, [B, in_channels, sample_size,
        sample_size] from the model's config)."""
        config = model.config
        return (batch, config.in_channels, config.sample_size, config.sample_size)

    def denoise(self, model: nn.Module, scheduler, latents: torch.Tensor, conditions: Sequence, *,
                guidance_scale: float, step_generator: torch.Generator,
                before_step: Callable[[int], None], after_step: Callable[[], None]) -> torch.Tensor:
        """Run the scheduler's timesteps on one batch of latents as the family's pipeline does (guidance
        included), calling before_step(step_index) before and after_step() after each transformer call."""
        raise NotImplementedError
