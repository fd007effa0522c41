"""Per-block scaling of a shared modulation vector (adaLN-single: PixArt-α/Σ).

In an adaLN-single model one Linear computes the modulation vector m ([B, K·D]) once from the timestep, and every
block adds its own table to it (`scale_shift_table[c] + m[c]`, chunk c). Smoothing block b's input by s moves
`(1 + scale)/s − 1` and `shift/s` into both parts: the table is rewritten offline, but m is shared by every block,
so block b's part of the division is one per-sample multiply, `m ⊙ v_b` ([B, K·D] elements, nothing per token)
before the block adds its table. That multiply is a `ModulationScale` module, `<block>.modulation_scale` (its
`scale` buffer v_b is in the state dict); HTG's per-timestep-group shifts on this path are group biases on it
(groupbias.py: it has `out_features` like a Linear).

The block receives m as a forward argument (PixArt: `timestep`); `scale_block_modulation(block, ...)` swaps the
block's class for a subclass whose forward multiplies that argument first — inside the block's forward, so hooks on
the block (calibration observers, input caches) see the block's real inputs, and deep copies, `torch.compile` and
the state dict see an ordinary submodule.
"""

from __future__ import annotations

import torch
from torch import nn

SCALER = "modulation_scale"  # the submodule name inside a block


class ModulationScale(nn.Module):
    """out = m ⊙ scale (per channel of the shared modulation vector); `argument` / `index`: where the block's forward
    takes m (keyword name, positional index)."""

    def __init__(self, width: int, argument: str, index: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(width))
        self.out_features = width
        self.argument, self.index = argument, index

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return m * self.scale.to(m.dtype)

    def scaled(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The block's call with its modulation argument multiplied."""
        if kwargs.get(self.argument) is not None:
            return args, {**kwargs, self.argument: self(kwargs[self.argument])}
        if len(args) > self.index and args[self.index] is not None:
            return args[: self.index] + (self(args[self.index]),) + args[self.index + 1:], kwargs
        raise RuntimeError(f"the block was called without its modulation argument {self.argument!r}")

    def extra_repr(self) -> str:
        return f"width={self.out_features}, argument={self.argument!r}"


_SCALED_CLASSES: dict[type, type] = {}


def _scaled_class(cls: type) -> type:
    """`cls` with a forward that multiplies its modulation argument by its `modulation_scale` first (one subclass per
    block class)."""
    if cls not in _SCALED_CLASSES:
        def forward(self, *args, **kwargs):
            args, kwargs = getattr(self, SCALER).scaled(args, kwargs)
            return cls.forward(self, *args, **kwargs)

        _SCALED_CLASSES[cls] = type(f"ModulationScaled{cls.__name__}", (cls,),
                                    {"forward": forward, "__module__": __name__, "__doc__": cls.__doc__})
    return _SCALED_CLASSES[cls]


def scale_block_modulation(block: nn.Module, width: int, argument: str, index: int) -> ModulationScale:
    """The block's ModulationScale (ones: the float function is unchanged), created on first use."""
    scaler = getattr(block, SCALER, None)
    if scaler is not None:
        if scaler.out_features != width or scaler.argument != argument:
            raise ValueError(f"{type(block).__name__} already scales {scaler.argument!r} of width "
                             f"{scaler.out_features}, not {argument!r} of width {width}")
        return scaler
    param = next(block.parameters(), None)
    scaler = ModulationScale(width, argument, index)
    if param is not None:
        scaler.to(param.device)
    block.add_module(SCALER, scaler)
    block.__class__ = _scaled_class(type(block))
    return scaler


def modulation_scales(model: nn.Module) -> dict[str, ModulationScale]:
    """{block name: its ModulationScale} of every block that has one."""
    return {name.rsplit(".", 1)[0] if "." in name else "": module for name, module in model.named_modules()
            if isinstance(module, ModulationScale)}
