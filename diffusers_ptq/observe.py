"""The one observation mechanism: `Observer`, the hook set of a calibration pass that every stage subscribes to.

A subscriber is any object with `modules` ({name: module} whose inputs it reads) and any of:
- `on_call(timestep, args, kwargs)`: each forward call of the model (the timestep found once, by the model's adapter);
- `on_input(name, module, args, kwargs)`: each forward call of one of its modules;
- `set_position(step_index, batch_start, batch_len)`: where the sampler is (sampling.sample_latents' before_forward).

Statistics (calibration.StatsRecorder), Hessians (rounding.HessianRecorder), the transformer's inputs
(calibration.TransformerInputRecorder) and reconstruction's input cache are subscribers. One forward pre-hook is
registered on the model and one per watched module, whatever the number of subscribers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import nn

from diffusers_ptq.models import ModelAdapter, adapter_for


def _adapter_or_generic(model: nn.Module) -> ModelAdapter:
    """The model's adapter; for a model without one, the generic reader (the timestep by keyword only)."""
    try:
        return adapter_for(model)
    except ValueError:
        return ModelAdapter()


class Observer:
    """Context manager: hooks on `model` (None: only the subscribers' modules, no call hook) dispatching to
    `subscribers` (None entries are skipped)."""

    def __init__(self, model: nn.Module | None, subscribers: Sequence):
        self.model = model
        self.subscribers = [s for s in subscribers if s is not None]
        self._handles: list = []

    def set_position(self, step_index: int, batch_start: int, batch_len: int) -> None:
        for s in self.subscribers:
            if hasattr(s, "set_position"):
                s.set_position(step_index, batch_start, batch_len)

    def __enter__(self) -> Observer:
        callers = [s for s in self.subscribers if hasattr(s, "on_call")]
        if callers and self.model is not None:
            adapter = _adapter_or_generic(self.model)
            hook = functools.partial(self._on_call, adapter, callers)
            self._handles.append(self.model.register_forward_pre_hook(hook, with_kwargs=True))
        watched: dict[str, tuple[nn.Module, list]] = {}
        for s in self.subscribers:
            if hasattr(s, "on_input"):
                for name, module in s.modules.items():
                    watched.setdefault(name, (module, []))[1].append(s)
        for name, (module, subs) in watched.items():
            hook = functools.partial(self._on_input, name, subs)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def _on_call(adapter: ModelAdapter, subscribers: list, _module, args, kwargs) -> None:
        timestep = adapter.timestep(args, kwargs)
        for s in subscribers:
            s.on_call(timestep, args, kwargs)

    @staticmethod
    def _on_input(name: str, subscribers: list, module, args, kwargs) -> None:
        for s in subscribers:
            s.on_input(name, module, args, kwargs)
