"""How a quantized Linear multiplies: small functions `kernel(module, x) -> y`, chosen per module by name.

The module (`modules.QuantLinear`) stores the quantized weight and the scales; a kernel only reads them.
Kernels here:

- `"quanto"`: optimum-quanto's own path (`F.linear` on quanto tensors; `torch._int_mm` for W8A8 — on CPUs
  without AVX512-VNNI that is a slow reference loop, see docs/engine.md).
- `"emulated"`: the same integer arithmetic in float: the input is rounded to the int8 grid of `input_scale`
  and the weight is dequantized once (cached). Equal to the integer result up to float rounding of the
  accumulation, and fast everywhere. The default on CPU until the integer-kernel issue adds oneDNN.

`register_kernel` adds one; `QuantLinear.kernel` (a plain attribute, never saved) picks one.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

KERNELS: dict[str, Callable] = {}


def register_kernel(name: str):
    def wrap(fn: Callable) -> Callable:
        KERNELS[name] = fn
        return fn

    return wrap


def fake_quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Round x/scale to the signed `bits` grid and back (quanto's rounding and clamp: [-2^(b-1), 2^(b-1)-1])."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


@register_kernel("quanto")
def quanto_linear(module, x: torch.Tensor) -> torch.Tensor:
    from optimum.quanto import quantize_activation

    if module.activation_qtype is not None:
        x = quantize_activation(x, qtype=module.activation_qtype, scale=module.input_scale)
    return F.linear(x, module.qweight, bias=module.bias)


@register_kernel("emulated")
def emulated_linear(module, x: torch.Tensor) -> torch.Tensor:
    if module.activation_qtype is not None:
        x = fake_quantize_symmetric(x, module.input_scale.to(x.dtype), module.activation_qtype.bits)
    return F.linear(x, module.dequantized_weight(), bias=module.bias)


def default_kernel(device: torch.device) -> str:
    """The kernel a new QuantLinear uses: quanto's on CUDA, the float emulation elsewhere."""
    return "quanto" if device.type == "cuda" else "emulated"
