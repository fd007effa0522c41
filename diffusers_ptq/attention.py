"""Quantized attention matmuls: QKᵀ and AV on int8 inputs, softmax in float (the papers' setting).

`QuantAttnProcessor` replaces diffusers' `AttnProcessor2_0` on a self-attention without mask or context. Q, K and V are rounded to
symmetric int8 with static per-tensor scales; the softmax probabilities P ∈ [0, 1] to unsigned 8 bits
(scale 1/255). While `observing`, it runs in float and records the per-channel absmax of Q, K and V, from which
`freeze()` sets the scales (under a distributed launch, from the absmax reduced with MAX over processes).

Once frozen, for inference, the two matmuls multiply the integer codes (`attention_on_codes`): on `torch._int_mm`
where it is exact and faster than float here (`attention_matmul`, measured once per process and shape), else float32
matmuls on the same integers, which give the same results while every sum stays below 2^24. With a gradient wanted
(LoRA training) the straight-through float emulation runs instead (`fake_quantize_symmetric`), equal to the codes'
path up to float rounding.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from diffusers_ptq import distributed, kernels
from diffusers_ptq.kernels import fake_quantize_symmetric, round_clamp
from diffusers_ptq.models import adapter_for


def fake_quantize_probabilities(p: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Round softmax outputs in [0, 1] to the unsigned `bits` grid (scale 1 / (2^bits − 1)); straight-through
    gradient."""
    levels = 2**bits - 1
    return round_clamp(p * levels, 0, levels) / levels  # p·levels lies in [0, levels]: the clamp changes nothing


def symmetric_codes(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """round(x / scale) clamped to the signed `bits` grid: the integers `fake_quantize_symmetric` multiplies by
    `scale` (same ops), as float."""
    return torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


PROBABILITY_OFFSET = 128  # probability codes p ∈ [0, 255] enter the int8 matmul as p − 128


def attention_on_codes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: dict, softmax_scale: float,
                       bits: int = 8, integer: bool = True) -> torch.Tensor:
    """softmax(QKᵀ · softmax_scale) V on quantized inputs, the matmuls on integers. q, k, v: float [B, H, T, D];
    returns float32 [B, H, T, D].

    Q, K, V are rounded to their codes (static scales `scales["q" | "k" | "v"]`); S = codes(Q)·codes(K)ᵀ is an
    integer matrix, P = softmax(s_q·s_k·softmax_scale · S) is rounded to the unsigned grid p = round(P·L),
    L = 2^bits − 1, and the output is (s_v / L) · Σ_t p_t·codes(V)_t, the second product taken as
    Σ_t (p_t − 128)·v_t + 128·Σ_t v_t so that both have int8 operands. `integer`: on `torch._int_mm` (int32
    accumulation) — eagerly one head at a time (its S stays in cache), under torch.compile batched
    (`kernels.int8_bmm`, with the softmax and rounding fused between the two calls); else batched float32 matmuls
    of the same integers, exact while |sums| < 2^24 (D·2^14 for S; T·L·128 for the output: T ≤ 513 tokens at
    8 bits), float-rounded beyond."""
    b, h, t, d = q.shape
    dtype = torch.int8 if integer else torch.float32
    qc = symmetric_codes(q, scales["q"], bits).reshape(b * h, t, d).to(dtype)
    kt = symmetric_codes(k, scales["k"], bits).reshape(b * h, t, d).transpose(1, 2).contiguous().to(dtype)
    vc = symmetric_codes(v, scales["v"], bits).reshape(b * h, t, d).contiguous().to(dtype)
    v_sums = vc.sum(dim=1, keepdim=True, dtype=torch.int32 if integer else torch.float32) * PROBABILITY_OFFSET
    levels = 2**bits - 1
    logit_scale = scales["q"] * scales["k"] * softmax_scale

    def probability_codes(logits: torch.Tensor) -> torch.Tensor:  # p − 128, p = round(P·L) ∈ [0, L]: no clamp needed
        probs = torch.softmax(logits.float() * logit_scale, dim=-1)
        return (torch.round(probs * levels) - PROBABILITY_OFFSET).to(dtype)

    if not integer:
        out = torch.bmm(probability_codes(torch.bmm(qc, kt)), vc) + v_sums
    elif torch.compiler.is_compiling():
        out = (kernels.int8_bmm(probability_codes(kernels.int8_bmm(qc, kt)), vc) + v_sums).float()
    else:
        out = torch.stack([torch._int_mm(probability_codes(torch._int_mm(qc[i], kt[i])), vc[i]) + v_sums[i]
                           for i in range(b * h)]).float()
    return out.view(b, h, t, d) * (scales["v"] / levels)


# (device type, B·H, T, D) -> {"choice": matmul, and where measured, "int_mm" / "float": best seconds}
MEASURED_ATTENTION: dict[tuple, dict] = {}


@functools.cache
def _measured_matmul(device_type: str, heads: int, tokens: int, dim: int) -> str:
    key = (device_type, heads, tokens, dim)
    device = torch.device(device_type)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, dim, generator=gen).to(device) for _ in range(3))
    scales = {name: torch.tensor(4.0 / 127, device=device) for name in "qkv"}
    run = {name: functools.partial(attention_on_codes, q, k, v, scales, dim**-0.5, integer=name == "int_mm")
           for name in ("int_mm", "float")}
    usable = kernels.int_mm_exact(device_type)
    if usable:  # exact where it runs; but a device may refuse some shapes (CUDA's _int_mm wants multiples of 8)
        try:
            with torch.no_grad():
                run["int_mm"]()
        except (RuntimeError, NotImplementedError):
            usable = False
    if not usable or kernels.KERNEL_CHOICE != "measured":
        MEASURED_ATTENTION[key] = {"choice": "int_mm" if usable else "float"}
        return MEASURED_ATTENTION[key]["choice"]
    with torch.no_grad():
        times = {name: kernels.best_seconds(fn, device=device) for name, fn in run.items()}
    MEASURED_ATTENTION[key] = {**times, "choice": min(times, key=times.get)}
    return MEASURED_ATTENTION[key]["choice"]


@torch.compiler.assume_constant_result
def _matmul_for(key: str) -> str:
    device_type, heads, tokens, dim = key.split()
    return _measured_matmul(device_type, int(heads), int(tokens), int(dim))


def attention_matmul(device: torch.device, heads: int, tokens: int, dim: int) -> str:
    """The matmuls of `heads` (batch × heads) attention heads of `tokens` × `dim` on `device`: "int_mm" where
    `torch._int_mm` is exact here (`kernels.int_mm_exact`), accepts this shape, and `attention_on_codes` runs
    faster on it than on float32 at this shape (eager, measured once per process and shape), else "float" (the same
    results while the sums stay below 2^24). A constant to torch.compile."""
    return _matmul_for(f"{torch.device(device).type} {heads} {tokens} {dim}")


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
        head_dim = qkv["q"].shape[-1] // attn.heads
        q, k, v = (x.view(batch, tokens, attn.heads, head_dim).transpose(1, 2) for x in qkv.values())
        if self.observing:
            if self.recording:
                for name, x in qkv.items():
                    self._observe(name, x)
            probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)
            out = probs @ v
        elif torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):  # straight-through emulation
            q, k, v = (fake_quantize_symmetric(x, self.scales[name].to(x), self.bits) for name, x in zip("qkv", (q, k, v)))
            probs = fake_quantize_probabilities(torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1), self.bits)
            out = probs @ v
        else:
            scales = {name: s.to(q.device, torch.float32) for name, s in self.scales.items()}
            integer = self.bits <= 8 and attention_matmul(q.device, batch * attn.heads, tokens, head_dim) == "int_mm"
            out = attention_on_codes(q, k, v, scales, attn.scale, self.bits, integer).to(q.dtype)
        out = out.transpose(1, 2).reshape(batch, tokens, attn.heads * head_dim)
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
