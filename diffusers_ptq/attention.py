"""Quantized attention matmuls: QKᵀ and AV on int8 inputs, softmax in float (the papers' setting).

`QuantAttnProcessor` replaces diffusers' `AttnProcessor2_0` on a self-attention without mask or context. Q, K and V are rounded to
symmetric int8 with static per-tensor scales; the softmax probabilities P ∈ [0, 1] to unsigned 8 bits
(scale 1/255). While `observing`, it runs in float and records the per-channel absmax of Q, K and V, from which
`freeze()` sets the scales (under a distributed launch, from the absmax reduced with MAX over processes).
"""

from __future__ import annotations

import contextlib

import torch

from diffusers_ptq import distributed
from diffusers_ptq.kernels import fake_quantize_symmetric, round_clamp
from diffusers_ptq.models import adapter_for


def fake_quantize_probabilities(p: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Round softmax outputs in [0, 1] to the unsigned `bits` grid (scale 1 / (2^bits − 1)); straight-through
    gradient."""
    levels = 2**bits - 1
    return round_clamp(p * levels, 0, levels) / levels  # p·levels lies in [0, levels]: the clamp changes nothing


class QuantAttnProcessor:
    """Self-attention with int8-rounded Q, K, V and 8-bit probabilities; float softmax. No mask, no context."""

    def __init__(self, bits: int = 8):
        self.bits = bits
        self.observing = True
        self.recording = True  # while observing: add what is seen to absmax (paused_observation turns it off)
        self.absmax: dict[str, torch.Tensor] = {}  # "q", "k", "v" -> [C] per-channel absmax seen while observing
        self.scales: dict[str, torch.Tensor] = {}

    def freeze(self) -> None:
        """Stop observing; per-tensor scales from the observed absmax (first reduced with MAX over processes under a
        distributed launch: every process must call freeze() on its processors in the same order)."""
        self.reduce()
        if set(self.absmax) != {"q", "k", "v"}:
            raise RuntimeError("QuantAttnProcessor has observed nothing: run calibration before freeze()")
        qmax = 2 ** (self.bits - 1) - 1
        self.scales = {k: (v.max() / qmax).clamp(min=1e-8) for k, v in self.absmax.items()}
        self.observing = False

    def reduce(self) -> None:
        """Replace the observed absmax by its maximum over processes (exact; nothing in a single process). A process
        that observed nothing (an empty calibration shard) contributes zeros."""
        if not distributed.is_distributed():
            return
        names = ("q", "k", "v")
        sizes = distributed.all_reduce_max(torch.tensor([self.absmax[k].numel() if k in self.absmax else 0
                                                         for k in names]))
        for k, size in zip(names, sizes.tolist()):
            if size:
                local = self.absmax.get(k, torch.zeros(size, device=distributed.comm_device()))
                self.absmax[k] = distributed.all_reduce_max(local.float())

    def _observe(self, name: str, x: torch.Tensor) -> None:
        cur = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        self.absmax[name] = cur if name not in self.absmax else torch.maximum(self.absmax[name], cur)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise NotImplementedError("QuantAttnProcessor handles plain self-attention only (no mask, no context)")
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None \
                or attn.norm_k is not None or attn.residual_connection or attn.rescale_output_factor != 1:
            raise NotImplementedError("QuantAttnProcessor does not support this Attention configuration")
        batch, tokens, _ = hidden_states.shape
        qkv = {"q": attn.to_q(hidden_states), "k": attn.to_k(hidden_states), "v": attn.to_v(hidden_states)}
        for name, x in qkv.items():
            if self.observing:
                if self.recording:
                    self._observe(name, x)
            else:
                qkv[name] = fake_quantize_symmetric(x, self.scales[name].to(x), self.bits)
        head_dim = qkv["q"].shape[-1] // attn.heads
        q, k, v = (x.view(batch, tokens, attn.heads, head_dim).transpose(1, 2) for x in qkv.values())
        probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)
        if not self.observing:
            probs = fake_quantize_probabilities(probs, self.bits)
        out = (probs @ v).transpose(1, 2).reshape(batch, tokens, attn.heads * head_dim)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def install_quant_attention(transformer: torch.nn.Module, bits: int = 8) -> dict[str, QuantAttnProcessor]:
    """Give every attention module the model's adapter names (`attention_modules`) its own QuantAttnProcessor
    (observing). Returns them by module name."""
    processors = {}
    for name in adapter_for(transformer).attention_modules(transformer):
        processors[name] = QuantAttnProcessor(bits)
        transformer.get_submodule(name).set_processor(processors[name])
    if not processors:
        raise ValueError(f"quantize_attention is not available for {type(transformer).__name__}: its adapter names no "
                         "attention module whose matmuls can be quantized (built for DiT's self-attention; SD3/FLUX "
                         "joint attention: not yet); set quantize_attention=False")
    return processors


@contextlib.contextmanager
def paused_observation(model: torch.nn.Module):
    """Forwards inside this block (a search, a reconstruction) run the observing attention processors in float
    without adding to their ranges: only calibration runs define them."""
    processors = [m.processor for m in model.modules() if isinstance(getattr(m, "processor", None), QuantAttnProcessor)]
    recording = [p.recording for p in processors]
    for p in processors:
        p.recording = False
    try:
        yield
    finally:
        for p, flag in zip(processors, recording):
            p.recording = flag
