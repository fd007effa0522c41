"""Model adapters, found by model class: `adapter_for(model)`. One file per family; `register_adapter` adds one."""

from __future__ import annotations

from torch import nn

from diffusers_ptq.models.base import ModelAdapter, ModulationRows, OutputRows, SharedModulationRows, SmoothingTarget
from diffusers_ptq.models.dit import DiTAdapter
from diffusers_ptq.models.flux import FluxAdapter
from diffusers_ptq.models.pixart import PixArtAdapter
from diffusers_ptq.models.sd3 import SD3Adapter

ADAPTERS: dict[str, ModelAdapter] = {}  # model class name -> adapter


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Add a model family (an instance of a ModelAdapter subclass); one adapter per model class."""
    if not adapter.model_class:
        raise ValueError(f"{type(adapter).__name__}.model_class must name a diffusers model class")
    if adapter.model_class in ADAPTERS and type(ADAPTERS[adapter.model_class]) is not type(adapter):
        taken = type(ADAPTERS[adapter.model_class]).__name__
        raise ValueError(f"{adapter.model_class} already has an adapter: {taken}")
    ADAPTERS[adapter.model_class] = adapter
    return adapter


def supported_models() -> str:
    return "; ".join(a.description or a.model_class for a in ADAPTERS.values())


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of `model`'s class (or of its nearest registered base class), after checking the instance; a
    ValueError naming the supported models otherwise."""
    for cls in type(model).__mro__:
        adapter = ADAPTERS.get(cls.__name__)
        if adapter is not None:
            adapter.check(model)
            return adapter
    raise ValueError(f"diffusers_ptq quantizes: {supported_models()}; got {type(model).__name__}. In a pipeline, "
                     "quantize the transformer only: <Pipeline>.from_pretrained(path, quantization_config=cfg), "
                     "PipelineQuantizationConfig(quant_mapping={'transformer': cfg}), or "
                     "PipelineQuantizationConfig(quant_backend=..., components_to_quantize=['transformer']).")


register_adapter(DiTAdapter())
register_adapter(SD3Adapter())
register_adapter(FluxAdapter())
register_adapter(PixArtAdapter())

__all__ = ["ADAPTERS", "ModelAdapter", "ModulationRows", "OutputRows", "SharedModulationRows", "SmoothingTarget",
           "adapter_for", "register_adapter", "supported_models"]
