"""Quantization memory (issue #22, point 2): once the engine has packed a layer, nothing keeps its float weight, its
rounded copy or its Hessian alive — checked with weak references, not with the process's resident size (which
depends on the allocator; `bench --footprint` measures that)."""

import gc
import weakref

import pytest
import torch
from conftest import make_tiny_transformer

from diffusers_ptq import BaselineConfig, HTGConfig, quantize
from diffusers_ptq.memory import return_freed_memory
from diffusers_ptq.modules import quant_linears

FAST = dict(num_samples=2, num_inference_steps=2)


@pytest.mark.parametrize("config", [BaselineConfig(**FAST), HTGConfig(weight_bits=4, weight_rounding="gptq", **FAST)],
                         ids=["w8a8", "htg-w4a8-gptq"])
def test_float_weights_are_freed_as_each_layer_is_packed(config, monkeypatch):
    """At every point where the engine hands memory back (after each packed layer), the float weight of every layer
    packed so far is gone: packing never holds more than one layer's float and packed forms at once."""
    model = make_tiny_transformer()
    weights = {name: weakref.ref(m.weight) for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    alive_after_packing = []

    def check():
        gc.collect()
        packed = {name for name, _ in quant_linears(model)}
        alive_after_packing.append(sorted(name for name in packed if weights[name]() is not None))

    monkeypatch.setattr("diffusers_ptq.api.return_freed_memory", check)
    quantize(model, config, progress=False)
    packed = {name for name, _ in quant_linears(model)}
    assert len(alive_after_packing) == len(packed) > 0  # one release per packed layer
    assert alive_after_packing == [[]] * len(packed)
    gc.collect()
    kept = {name for name, ref in weights.items() if ref() is not None}
    assert kept == set(weights) - packed  # the layers left float (the embedders) keep theirs
    return_freed_memory()  # safe to call anywhere (a no-op off glibc)
