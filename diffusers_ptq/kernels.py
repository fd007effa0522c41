"""How a quantized Linear multiplies: small functions `kernel(module, x) -> y`, chosen per module by name.

The module (`modules.QuantLinear`) stores the quantized weight and the scales; a kernel only reads them (and may
keep a prepared copy of the weight in memory, never in the checkpoint). Kernels here:

- `"onednn"` (x86 CPU, W8A8 and W4A8 with per-output-channel weights): oneDNN's u8×s8 int8 GEMM through
  `torch.ops.onednn.qlinear_prepack` (once per weight, cached on the module) and `qlinear_pointwise`. Exact
  integer arithmetic on every x86 CPU, see "Exactness" below.
- `"quanto"`: optimum-quanto's own path (`F.linear` on quanto tensors; `torch._int_mm` for W8A8 — on CPUs
  without AVX512-VNNI that is a slow reference loop, see docs/kernels.md).
- `"emulated"`: the same integer arithmetic in float: the input is rounded to the int8 grid of `input_scale`
  and the weight is dequantized once (cached). Equal to the integer result up to float rounding of the
  accumulation; the only choice for weight-only (A16) and grouped 4-bit layers on CPU.

Exactness of `"onednn"`. The symmetric int8 activation q ∈ [-128, 127] is fed as uint8 u = q + zp. On CPUs
with VNNI/AMX the u8×s8 products accumulate in int32: exact for any u8 (zp 128, one GEMM). Without VNNI
(AVX2 `vpmaddubsw`) each pair of adjacent products is summed in int16 *with saturation*; |u·w₁ + u·w₂| ≤
2·128·128 = 32768 fits int16 when u ≤ 128, whatever the int8 weights. So:
- 4-bit weights (codes 0..15), and 8-bit weights whose codes all lie in [−64, 63] (e.g. quantized to a 7-bit
  range, ±63, and stored as qint8 as usual): 2·255·64 ≤ 32768, the full-range input (zp 128) is exact: one
  GEMM (checked on the codes when the weight is prepared). quanto's
  4-bit weight is affine, w = scale·code − shift with a float shift, so
  y = s_x·scale·Σ q·code − s_x·shift·Σ q + bias: the integer GEMM plus a rank-1 float epilogue with the
  activation row sums (exact integers).
- other 8-bit weights: q is split into c = clamp(q, −64, 64) (u = c + 64 ∈ [0, 128]: exact) and the residual
  d = q − c ∈ [−64, 63], non-zero only where an activation lies beyond ±64 steps. The residual is added either
  by tokens (rows holding such an activation get a second exact int8 GEMM, u = d + 64 ∈ [0, 127]) or by input
  channels (the few channels holding them: d[:, cols] times those weight columns in float, integer-valued
  operands, so equal to the integer product to float rounding), whichever costs less for this input (DiT
  activations put their outliers in a few channels). Same integers as q·w, never saturated; the cost is one
  int8 GEMM plus the residual's share.
Which of the two regimes the CPU is in is *measured*, once per process and input width K
(`onednn_probe(K)`: adversarial GEMMs that would saturate int16 pair sums, with M = 1 and M = 256 rows), not
guessed from flags; the flags are reported beside it. The same probe checks that the op runs at all: if it fails
here, `choose_kernel` warns once and falls back to the next exact kernel.

Dynamic per-token activations (`module.act_dynamic`, Q-DiT): each token (row) gets its own symmetric scale
s_t = max|x_t| / 127 at run time (`per_token_scale`), q = round(x / s_t) ∈ [−127, 127]. `"emulated"` fake-quantizes
with those scales; `"onednn"` feeds the same integers (u = q + zp, input scale 1) to the same exact GEMM and
multiplies the output rows by s_t before adding the bias (the split path and the 4-bit epilogue unchanged);
`"quanto"` has no per-token path (on CUDA such layers run `"emulated"`).

Kernels are a registry of `Kernel` objects (name, priority, the devices the automatic choice may use it on,
`check(module) -> reason | None`, `prepare(module) -> state`, `run(module, state, x)`); `choose_kernel` takes the
highest-priority one that can run a layer exactly on its device, by those fields alone. A kernel's prepared state
(oneDNN's packed weight, the dequantized weight) lives in memory on the module, never in a checkpoint, and is
rebuilt when the weight object changes (load, move).

How they behave as torch modules: `"onednn"` is one custom op (`torch.ops.diffusers_ptq.onednn_linear`) with a
fake (shape) implementation, so `torch.compile` (Inductor, `fullgraph=True` too) traces through it as one opaque
call (for inference with a static scale and one full-range GEMM, the compiled model instead traces the input
quantization as torch ops around the bare GEMM, `onednn_u8_linear_op`, so Inductor fuses it with the ops producing
the input: `_onednn_linear_traced`; with Inductor's freezing, 8-bit and per-channel 4-bit layers as PyTorch 2 export's quantize /
dequantize pattern that Inductor lowers itself: `_onednn_linear_frozen`), and an autograd formula: the gradient to
the input is that of the dequantized weight, grad_x = grad_y · W (the activation rounding is a straight-through
estimator, as in quanto), the weights get none (frozen). The
`"emulated"` kernel is plain torch ops with the same straight-through rounding. Nothing reads tensor version
counters or keeps per-call caches, so `torch.inference_mode()`, `no_grad` and grad mode give identical outputs.
"""

from __future__ import annotations

import functools
import itertools
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class KernelError(ValueError):
    """A kernel was asked to run a layer it cannot run exactly (or at all) here."""


@dataclass(frozen=True)
class Kernel:
    """One way to run a quantized Linear.

    run(module, state, x) -> y, with state = prepare(module) (built once per weight, kept in memory, never saved);
    check(module) -> why it cannot run the module exactly here, or None; priority: the automatic choice takes the
    highest-priority kernel that can run a layer; devices: the device types on which the automatic choice may take
    it (None: any) — a kernel may run elsewhere when forced (`set_kernel`); state_bytes(module): the memory its
    prepared state holds beside the stored weight, weight-sized state only (what KERNEL_CHOICE "memory" minimizes;
    a vector of one value per channel, 1/K of the weight, is not counted); automatic: False for a
    kernel that only the "memory" choice or `set_kernel` takes."""

    name: str
    run: Callable
    prepare: Callable = lambda module: None
    check: Callable = lambda module: None
    priority: int = 0
    devices: tuple[str, ...] | None = None
    state_bytes: Callable = lambda module: 0
    automatic: bool = True


KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> Kernel:
    """Add (or replace) a kernel in the registry."""
    KERNELS[kernel.name] = kernel
    return kernel


class _RoundClampSTE(torch.autograd.Function):
    """clamp(round(t), lo, hi) in value; the identity in the gradient (a straight-through estimator, unclipped:
    quanto's activation quantizer passes the gradient through unchanged too)."""

    @staticmethod
    def forward(ctx, t, lo, hi):
        return torch.clamp(torch.round(t), lo, hi)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def round_clamp(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(round(t), lo, hi), with a straight-through gradient when t requires grad (the same values either way)."""
    if t.requires_grad:
        return _RoundClampSTE.apply(t, lo, hi)
    return torch.round(t).clamp_(lo, hi)  # in place on round's fresh result: one input-sized temporary fewer


def fake_quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Round x/scale to the signed `bits` grid and back (quanto's rounding and clamp: [-2^(b-1), 2^(b-1)-1]).
    Differentiable with a straight-through estimator (`round_clamp`)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = round_clamp(x / scale, qmin, qmax)
    return q * scale if q.requires_grad else q.mul_(scale)  # in place where no gradient needs q (same values)


def per_token_scale(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric scale of each token (last dim): max|x| / (2^(b-1) − 1), shape [..., 1]; an all-zero token
    gets scale 1 (its codes are 0 either way)."""
    absmax = x.detach().abs().amax(dim=-1, keepdim=True)
    scale = absmax / (2 ** (bits - 1) - 1)
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


def fake_quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x rounded per token to its own symmetric `bits` grid (`per_token_scale`) and back."""
    return fake_quantize_symmetric(x, per_token_scale(x, bits), bits)


# ------------------------------------------------------------------------------------------------ weights


def unpack_bits(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """quanto's packed layout in torch ops (the low bits first, along dim 0), cut to `rows` rows. This package
    reads 4-bit codes with this function only: quanto's own `unpack` op (a C++ extension it JIT-compiles on first
    use on CPU) is never called by diffusers_ptq and is left as quanto registers it."""
    parts = [(packed >> (bits * i)) & (2**bits - 1) for i in range(8 // bits)]
    return torch.cat(parts).to(torch.uint8)[:rows]


def stored_data(weight) -> torch.Tensor:
    """The plain tensor holding a quanto weight's codes as stored: int8 [out, in] (8-bit) or the uint8 of its
    PackedTensor, two 4-bit codes a byte."""
    return weight._data if weight._data.dtype == torch.int8 else weight._data._data


def weight_codes(weight) -> torch.Tensor:
    """The integer codes of a quanto weight as stored: int8 [out, in] (8-bit), uint8 [out, in] (4-bit per channel)
    or uint8 [out·in/group, group] (4-bit in groups)."""
    data = weight._data
    if data.dtype == torch.int8:
        return data
    return unpack_bits(data._data, data.bits, data.shape[0])


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, neg_shift: torch.Tensor | None = None) -> torch.Tensor:
    """scale · code, plus neg_shift (= −shift) for quanto's affine 4-bit weights; scale and neg_shift hold one value
    per row of codes. The same float operations as quanto's dequantize (x + (−s) is the same float as x − s)."""
    w = scale * codes
    if neg_shift is None:
        return w
    # in place on the fresh product where that is the same float sum (same dtype; the shift, one value a row,
    # broadcasts over it): one temporary fewer
    return w.add_(neg_shift) if neg_shift.dtype == w.dtype and neg_shift.dim() <= w.dim() else w + neg_shift


def integer_zero_points(scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor | None:
    """The integer zero points z [rows, 1] (int8) of an affine 4-bit weight whose every shift is exactly scale · z
    with an integer z ∈ [0, 15] (in float32, where such a product is exact: the grid of `rounding.quant_grid` with
    zero_point "integer"), or None when one is not. Then w = scale·code − shift = scale·(code − z) exactly, and an
    int8 GEMM on code − z needs no float shift term."""
    s, t = scale.reshape(-1, 1).to(torch.float32), shift.reshape(-1, 1).to(torch.float32)
    z = torch.round(t / torch.where(s == 0, torch.ones_like(s), s))
    z = torch.where(s == 0, torch.zeros_like(z), z)
    if not (bool(((z >= 0) & (z <= 15)).all()) and torch.equal(s * z, t)):
        return None
    return z.to(torch.int8)


def dequantize_weight(weight) -> torch.Tensor:
    """The float weight [out, in] a quanto weight stands for: scale · code (8-bit) or scale · code − shift (4-bit)."""
    codes = weight_codes(weight)
    neg_shift = -weight._shift if codes.dtype == torch.uint8 else None
    return dequantize_codes(codes, weight._scale, neg_shift).reshape(weight.shape)


def code_slices(weight, out_features: int, rows: int):
    """A quanto weight's stored codes as consecutive slices of at most `rows` output channels: (first channel, codes,
    scale, neg_shift) with the codes as stored (int8 [r, in] for 8-bit, uint8 in [0, 15] for 4-bit, [r·groups,
    group] in groups), that slice's scales and −shift (None for 8-bit). A generator: one slice exists at a time.
    4-bit codes are read from the packed bytes directly: code rows [0, h) sit in a byte's low bits and [h, R) in its
    high bits (`unpack_bits`), so the slices run through the low half, then the high half."""
    data = weight._data
    if data.dtype == torch.int8:
        for a in range(0, out_features, rows):
            yield a, data[a:a + rows], weight._scale[a:a + rows], None
        return
    packed, bits, total = data._data, data.bits, data.shape[0]
    per_channel, half = total // out_features, packed.shape[0]  # code rows per output channel (groups), rows a half
    if half % per_channel:  # an odd channel count in groups: one channel's groups straddle the two halves
        yield 0, weight_codes(weight), weight._scale, -weight._shift
        return
    for part, (start, stop) in enumerate(((0, half), (half, total))):
        for a in range(start, stop, rows * per_channel):
            b = min(a + rows * per_channel, stop)
            byte = packed[a - start:b - start]  # one pass over the bytes: the low bits masked, the high ones shifted
            codes = byte & (2**bits - 1) if part == 0 else byte >> bits  # (a logical shift: uint8)
            yield a // per_channel, codes, weight._scale[a:b], -weight._shift[a:b]


def dequantized_slices(weight, out_features: int, in_features: int, rows: int):
    """The float weight [out, in] a quanto weight stands for (`dequantize_weight`), as consecutive slices of at most
    `rows` output channels, each computed from that slice's codes, scales and shifts alone (`code_slices`)."""
    for _, codes, scale, neg_shift in code_slices(weight, out_features, rows):
        yield dequantize_codes(codes, scale, neg_shift).reshape(-1, in_features)


def _prepared(module, kernel: Kernel):
    """The kernel's state for this module's current weight, built on first use (the cache follows the weight object
    and the kernel; a move or load replaces the weight and so the state)."""
    cache = module.__dict__.get("_kernel_state")
    if cache is None or cache[0] != kernel.name or cache[1] is not module.weight:
        cache = (kernel.name, module.weight, kernel.prepare(module))
        module.__dict__["_kernel_state"] = cache
    return cache[2]


def prepare_kernel(module) -> None:
    """Build the module's kernel state now, outside any forward: a `torch.compile`d forward then only reads it."""
    _prepared(module, KERNELS[module.kernel])


def run_kernel(module, x: torch.Tensor) -> torch.Tensor:
    """y = module(x) on the module's kernel."""
    kernel = KERNELS[module.kernel]
    return kernel.run(module, _prepared(module, kernel), x)


# ------------------------------------------------------------------------------------------------ CPU features


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's ISA flags (/proc/cpuinfo, else lscpu); empty where neither exists."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Flags:"):
                return frozenset(line.split(":", 1)[1].split())
    except (OSError, subprocess.SubprocessError):
        pass
    return frozenset()


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_vnni() -> bool:
    """Whether the CPU advertises an int8 dot product that accumulates in int32 (VNNI or AMX)."""
    return any(f in cpu_flags() for f in VNNI_FLAGS)


def onednn_available() -> bool:
    """x86 CPU and a torch build with `torch.ops.onednn.qlinear_pointwise` (and qlinear_prepack)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        torch.ops.onednn.qlinear_pointwise  # noqa: B018
        torch.ops.onednn.qlinear_prepack  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


def _qlinear(u: torch.Tensor, x_scale: float, zero_point: int, packed, w_scales, w_zeros, bias,
             gelu_to_codes: tuple[float, str] | None = None) -> torch.Tensor:
    """oneDNN's u8×s8 linear: float32 out, or with `gelu_to_codes` = (scale, approximate) its GELU post-op and the
    result quantized at that scale to uint8 codes with zero point 128."""
    if gelu_to_codes is None:
        return torch.ops.onednn.qlinear_pointwise(u, x_scale, zero_point, packed, w_scales, w_zeros, bias, 1.0, 0,
                                                  torch.float32, "none", [], "")
    out_scale, approximate = gelu_to_codes
    return torch.ops.onednn.qlinear_pointwise(u, x_scale, zero_point, packed, w_scales, w_zeros, bias, out_scale, 128,
                                              torch.uint8, "gelu", [], approximate)


@dataclass(frozen=True)
class ProbeResult:
    """What the oneDNN probe found for one input width K: `problem` (None: the op runs and the split path is
    exact) and whether one full-range GEMM is exact (int32 accumulation)."""

    problem: str | None
    full_range_exact: bool


PROBE_ROWS = (1, 256)  # the GEMM shapes served: one token (M = 1) and a batch of tokens (M >= 256)


def _probe_gemm(k: int, rows: int, u_value: int) -> bool:
    """One adversarial GEMM: rows × K inputs all `u_value` times weight rows of +127 and of −128 (the largest int16
    pair sums), against the exact integer result rounded once to float32 (oneDNN's single int32 -> float rounding)."""
    n = 16
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[n // 2:] = -128
    u = torch.full((rows, k), u_value, dtype=torch.uint8)
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    y = _qlinear(u, 1.0, 0, packed, torch.ones(n), torch.zeros(n, dtype=torch.int64), None)
    reference = (u.long() @ w.long().T).to(torch.float32)
    return bool(torch.equal(y, reference))


@functools.cache
def onednn_probe(k: int) -> ProbeResult:
    """Run oneDNN's u8×s8 GEMM here for input width K (once per process and K) with M = 1 and M = 256 rows: does it
    run, is the split path's input range (u <= 128) exact, is the full range (u = 255) exact? A failure is a
    `problem`, and warns once (the layers of that width fall back to the next exact kernel)."""
    if not onednn_available():
        return ProbeResult("oneDNN int8 linear is not available here (needs an x86 CPU and a torch build with "
                           "torch.ops.onednn.qlinear_pointwise)", False)
    try:
        split_exact = all(_probe_gemm(k, rows, 128) for rows in PROBE_ROWS)
        full_exact = all(_probe_gemm(k, rows, 255) for rows in PROBE_ROWS)
    except RuntimeError as error:
        problem = f"oneDNN int8 linear failed to run here for K={k}: {error}"
    else:
        problem = None if split_exact else (f"oneDNN int8 linear is not exact here for K={k} even with inputs "
                                             "in [0, 128]")
    if problem is not None:
        warnings.warn(f"kernel 'onednn': {problem}; those layers fall back to the next exact kernel",
                      RuntimeWarning, stacklevel=2)
        return ProbeResult(problem, False)
    return ProbeResult(None, full_exact)


def onednn_full_range_exact(k: int = 64) -> bool:
    """Measured: does oneDNN's u8×s8 GEMM stay exact for full-range uint8 inputs (255) times +127/−128 weights over
    K terms? True on VNNI/AMX CPUs (int32 accumulation); False where pairs of products are summed in int16 with
    saturation (AVX2), or where oneDNN is not available."""
    return onednn_probe(k).full_range_exact


def machine_kernel_info() -> dict:
    """What the kernel choice rests on, for benchmark records."""
    return {"onednn_available": onednn_available(), "vnni_flags": sorted(f for f in VNNI_FLAGS if f in cpu_flags()),
            "onednn_full_range_exact": {k: onednn_full_range_exact(k) for k in (64, 1152, 4608)},
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "int_mm_exact": int_mm_exact("cpu")}


# ------------------------------------------------------------------------------------------------ quanto, emulated


def _quanto_check(module) -> str | None:
    if getattr(module, "act_dynamic", False):
        return "dynamic per-token activations: quanto's path takes one static input scale; use 'emulated'"
    return None


def _quanto_linear(module, _state, x: torch.Tensor) -> torch.Tensor:
    from optimum.quanto import quantize_activation

    if module.activation_qtype is not None:
        x = quantize_activation(x, qtype=module.activation_qtype, scale=module.input_scale)
    return F.linear(x, module.qweight, bias=module.bias)


def _emulated_input(module, x: torch.Tensor) -> torch.Tensor:
    if module.activation_qtype is None:
        return x
    if module.act_dynamic:
        return fake_quantize_per_token(x, module.activation_qtype.bits)
    return fake_quantize_symmetric(x, module.input_scale.to(x.dtype), module.activation_qtype.bits)


def _emulated_linear(module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(_emulated_input(module, x), weight, bias=module.bias)


# The per-call kernel dequantizes a weight in slices of output channels of at most this many float32 bytes, one
# F.linear each, so that what a call allocates stays a few MB whatever the layer's size (issue #22: large transient
# blocks are what fragments the heap; a whole FLUX-width weight is 189 MB).
PER_CALL_SLICE_BYTES = 4 << 20


def _emulated_per_call(module, _state, x: torch.Tensor) -> torch.Tensor:
    """`_emulated_linear` with nothing kept: the weight dequantized at every call from the stored codes (which a
    loaded checkpoint keeps in its file map), slice by slice of output channels (`dequantized_slices`), so a layer
    costs its stored size; slower by the dequantization."""
    x = _emulated_input(module, x)
    rows = max(1, PER_CALL_SLICE_BYTES // (4 * module.in_features))
    slices = dequantized_slices(module.weight, module.out_features, module.in_features, rows)
    first = next(slices)
    if first.shape[0] == module.out_features:  # the whole weight in one slice: its product is the output
        return F.linear(x, first, bias=module.bias)
    # each slice's product written into the output as it comes: one slice's product alive at a time, no concatenation
    out, start = x.new_empty(*x.shape[:-1], module.out_features), 0
    for weight in itertools.chain((first,), slices):
        bias = None if module.bias is None else module.bias[start:start + weight.shape[0]]
        out[..., start:start + weight.shape[0]] = F.linear(x, weight, bias=bias)
        start += weight.shape[0]
    return out


def _float_weight_bytes(module) -> int:
    return module.in_features * module.out_features * 4  # the dequantized float32 weight


register_kernel(Kernel("quanto", _quanto_linear, check=_quanto_check, priority=20, devices=("cuda",)))
register_kernel(Kernel("emulated", _emulated_linear, prepare=lambda module: dequantize_weight(module.weight).detach(),
                       priority=0, state_bytes=_float_weight_bytes))
register_kernel(Kernel("emulated-per-call", _emulated_per_call, priority=-10, automatic=False))  # issue #22


# ------------------------------------------------------------------------------------------------ oneDNN


def _int8_layer_problem(module, name: str, fallback: str) -> str | None:
    """Why an int8 GEMM with one scale per output channel, on the CPU, cannot run `module` (the kernel `name`d in the
    reason, and the `fallback` kernel to use), or None: the checks the oneDNN and int8 per-call kernels share."""
    if module.weight.device.type != "cpu":
        return f"the {name} kernel runs on CPU; this layer is on {module.weight.device}"
    if module.activation_qtype is None:
        return f"weight-only layer (A16): there is no integer input to multiply; use '{fallback}'"
    if module.activation_qtype.bits != 8:
        return f"{module.activation_qtype.bits}-bit activations: the {name} kernel takes 8-bit ones"
    bits = module.weight_qtype.bits
    if bits == 4 and getattr(module, "weight_group_size", None) is not None:
        return (f"4-bit weights in groups of {module.weight_group_size}: an int8 GEMM applies one scale per "
                f"output channel; grouped weights run on '{fallback}'")
    if bits not in (4, 8):
        return f"{bits}-bit weights are not supported by the {name} kernel"
    return None


def _onednn_check(module) -> str | None:
    return _int8_layer_problem(module, "oneDNN", "emulated") or onednn_probe(module.in_features).problem


@dataclass
class OneDNNWeight:
    """The weight as oneDNN wants it: int8 codes prepacked once, per-channel scales, the 4-bit shift, and
    whether one full-range GEMM is exact for it here. An affine 4-bit weight with integer zero points
    (`integer_zero_points`) is prepacked as code − z and needs no shift term; otherwise `shift` is added after the
    GEMM as a rank-1 epilogue (`epilogue`)."""

    packed: torch.Tensor  # opaque oneDNN tensor (in memory only)
    scales: torch.Tensor  # [N] float32
    zeros: torch.Tensor  # [N] int64
    shift: torch.Tensor | None  # [1, N] float32: −shift of affine 4-bit weights (the epilogue's, the gradient's)
    full_range: bool
    input_scale: float | None = None  # the static input scale as a number: a constant to a compiled graph
    zero: torch.Tensor | None = None  # [N, 1] int8: integer zero points folded into the packed codes (code − z)

    @property
    def epilogue(self) -> bool:
        """Whether the shift is added after the GEMM (affine 4-bit weights without integer zero points)."""
        return self.shift is not None and self.zero is None


def prepare_onednn(module) -> OneDNNWeight:
    problem = _onednn_check(module)
    if problem is not None:
        raise KernelError(f"kernel 'onednn': {problem}")
    w = module.weight
    codes = weight_codes(w).to(torch.int8)  # 4-bit: codes 0..15 (per output channel: [out, in])
    shift = None if module.weight_qtype.bits == 8 else (-w._shift.reshape(1, -1)).to(torch.float32).contiguous()
    zero = None if shift is None else integer_zero_points(w._scale, w._shift)
    if zero is not None:
        codes = codes - zero  # in [-15, 15]
    # one full-range GEMM is exact when int16 pair sums cannot saturate: int32 accumulation (VNNI/AMX, measured),
    # or weight codes within [-64, 63] (2·255·64 <= 32768: all 4-bit codes, 7-bit 8-bit codes)
    full_range = bool(onednn_full_range_exact(module.in_features) or (int(codes.min()) >= -64 and int(codes.max()) <= 63))
    scales = w._scale.reshape(-1).to(torch.float32).contiguous()
    return OneDNNWeight(torch.ops.onednn.qlinear_prepack(codes.contiguous(), None), scales,
                        torch.zeros_like(scales, dtype=torch.int64), shift, full_range,
                        None if module.act_dynamic else float(module.input_scale), zero)


SPLIT = 64  # without int32 accumulation: |q| <= 64 goes in one exact GEMM (u = q + 64 <= 128)
# a float multiply-add costs about this many int8 ones (measured ~2.5x on AVX2 for the same shapes): the residual
# of the split path goes by input channels (float, on the few channels holding large activations) when that is
# cheaper than by tokens (a second int8 GEMM over the rows holding them)
FLOAT_COST = 2.5
# counters for the benchmark: kernel calls, their rows and channels, and how many of those the split path's
# residual had to cover
ONEDNN_STATS = {"calls": 0, "rows": 0, "residual_rows": 0, "channels": 0, "residual_channels": 0, "gelu_fused_calls": 0}


def _u8(t: torch.Tensor) -> torch.Tensor:
    """Float integers in [0, 255] as uint8, through int16: the same values, ~2x faster than one cast on CPU."""
    return t.to(torch.int16).to(torch.uint8)


class QuantizedInput:
    """An input quantized for the oneDNN kernel: q = clamp(round(x / scale)) exactly as `fake_quantize_symmetric`
    (same ops, same float32 division), the uint8 GEMM input u = c + zp, and the split path's residual."""

    __slots__ = ("q", "u", "zp", "rows", "row_resid", "cols", "col_resid")

    def __init__(self, x2: torch.Tensor, scale: torch.Tensor, full_range: bool):
        q = torch.div(x2, scale)
        q.round_().clamp_(-128, 127)
        self.q = q
        self.rows = self.row_resid = self.cols = self.col_resid = None
        if full_range:
            self.u, self.zp = _u8(q + 128), 128
            return
        self.zp = SPLIT
        c = q.clamp(-SPLIT, SPLIT)
        a = q.abs()
        col_max = a.amax(dim=0)  # per input channel
        if float(col_max.max()) > SPLIT:
            cols = (col_max > SPLIT).nonzero().squeeze(1)
            rows = (a.amax(dim=1) > SPLIT).nonzero().squeeze(1)  # per token
            m, k = q.shape
            if cols.numel() / k * FLOAT_COST <= rows.numel() / m:
                qc = q.index_select(1, cols)
                self.cols, self.col_resid = cols, qc - qc.clamp(-SPLIT, SPLIT)  # integers in [-64, 63]
            elif rows.numel() > m // 2:  # most tokens: the whole remainder, no gather
                self.row_resid = _u8((q - c).add_(SPLIT))  # in [0, 127]
            else:
                qr = q.index_select(0, rows)
                self.rows = rows
                self.row_resid = _u8((qr - qr.clamp(-SPLIT, SPLIT)).add_(SPLIT))  # in [0, 127]
        self.u = _u8(c.add_(SPLIT))


@torch.library.custom_op("diffusers_ptq::onednn_linear", mutates_args=())
def onednn_linear_op(x: torch.Tensor, packed: torch.Tensor, w_data: torch.Tensor, w_scales: torch.Tensor,
                     w_zeros: torch.Tensor, w_shift: torch.Tensor | None, bias: torch.Tensor | None,
                     input_scale: torch.Tensor | None, full_range: bool, bits: int,
                     shift_folded: bool = False) -> torch.Tensor:
    """y = x·Wᵀ + b on oneDNN's exact u8×s8 GEMM. x float [..., K]; packed: the prepacked int8 codes; w_data: the
    stored codes (int8 [N, K], or quanto's packed 4-bit [⌈N/2⌉, K]); w_scales [N]; w_shift: [1, N] −shift of affine
    4-bit weights, or None; shift_folded: the shift is in the packed codes (code − z, integer zero points), so there
    is no epilogue; input_scale: the static per-tensor scale, or None for dynamic per-token scales."""
    if x.device.type != "cpu":
        raise KernelError(f"the oneDNN kernel runs on CPU tensors, got an input on {x.device}")
    n, k = w_scales.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.dtype == torch.float32 else x2.float()
    dynamic = input_scale is None
    token_scale = per_token_scale(x2) if dynamic else None
    scale_t = token_scale if dynamic else input_scale.to(torch.float32)
    scale = 1.0 if dynamic else float(scale_t)
    qx = QuantizedInput(x2, scale_t, full_range)
    ONEDNN_STATS["calls"] += 1
    ONEDNN_STATS["rows"] += qx.q.shape[0]
    ONEDNN_STATS["channels"] += k
    ONEDNN_STATS["residual_rows"] += (0 if qx.row_resid is None else qx.q.shape[0] if qx.rows is None
                                      else qx.rows.numel())
    ONEDNN_STATS["residual_channels"] += 0 if qx.cols is None else qx.cols.numel()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    y = _qlinear(qx.u, scale, qx.zp, packed, w_scales, w_zeros, None if dynamic else bias)
    if qx.row_resid is not None:  # tokens with activations beyond ±64 steps: the remainder in a second exact GEMM
        resid = _qlinear(qx.row_resid, scale, qx.zp, packed, w_scales, w_zeros, None)
        if qx.rows is None:
            y.add_(resid)
        else:
            y.index_add_(0, qx.rows, resid)
    if qx.cols is not None:  # input channels with activations beyond ±64 steps: their remainder in float
        w_cols = w_data.index_select(1, qx.cols).float().mul_(w_scales.unsqueeze(1))
        y.addmm_(qx.col_resid, w_cols.T, alpha=scale)
    if w_shift is not None and not shift_folded:  # affine 4-bit: − s_x · (Σ_i q_i) · shift_o
        y.addmm_(qx.q.sum(dim=-1, keepdim=True), w_shift, alpha=scale)  # row sums: integers, exact below 2^24
    if dynamic:  # y_t = s_t · (integer GEMM)_t + bias
        y.mul_(token_scale)
        if bias is not None:
            y.add_(bias)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


@onednn_linear_op.register_fake
def _(x, packed, w_data, w_scales, w_zeros, w_shift, bias, input_scale, full_range, bits, shift_folded=False):
    return x.new_empty((*x.shape[:-1], w_scales.shape[0]))


def _onednn_setup_context(ctx, inputs, output):
    _, _, w_data, w_scales, _, w_shift, _, _, _, bits = inputs[:10]
    ctx.save_for_backward(w_data, w_scales, w_shift)
    ctx.bits = bits


def _onednn_backward(ctx, grad):
    """grad_x = grad_y · W (dequantized weight; straight-through for the activation rounding); none to the rest."""
    w_data, w_scales, w_shift = ctx.saved_tensors  # w_shift holds −shift, [1, N]
    n = w_scales.shape[0]
    codes = w_data if ctx.bits == 8 else unpack_bits(w_data, ctx.bits, n)
    weight = dequantize_codes(codes, w_scales.reshape(n, 1), None if w_shift is None else w_shift.reshape(n, 1))
    return grad @ weight.to(grad.dtype), None, None, None, None, None, None, None, None, None, None


onednn_linear_op.register_autograd(_onednn_backward, setup_context=_onednn_setup_context)


def _count_u8_call(u: torch.Tensor) -> None:
    """ONEDNN_STATS for one call of the compiled path's u8 GEMM on an already quantized input [M, K]."""
    ONEDNN_STATS["calls"] += 1
    ONEDNN_STATS["rows"] += u.shape[0]
    ONEDNN_STATS["channels"] += u.shape[1]


@torch.library.custom_op("diffusers_ptq::onednn_u8_linear", mutates_args=())
def onednn_u8_linear_op(u: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, w_scales: torch.Tensor,
                        w_zeros: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's u8×s8 GEMM alone, on an input already quantized: u = q + 128 (uint8 [M, K]); returns
    x_scale · w_scales · Σ q·w + bias (float32 [M, N]). The compiled path's opaque call (`_onednn_linear_traced`)."""
    _count_u8_call(u)
    return _qlinear(u, float(x_scale), 128, packed, w_scales, w_zeros, bias)


@onednn_u8_linear_op.register_fake
def _(u, x_scale, packed, w_scales, w_zeros, bias):
    return u.new_empty((u.shape[0], w_scales.shape[0]), dtype=torch.float32)


@torch.library.custom_op("diffusers_ptq::onednn_u8_linear_gelu", mutates_args=())
def onednn_u8_linear_gelu_op(u: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, w_scales: torch.Tensor,
                             w_zeros: torch.Tensor, bias: torch.Tensor | None, out_scale: torch.Tensor,
                             approximate: str) -> torch.Tensor:
    """fc1 → GELU → fc2's input quantization in one oneDNN call (its GELU post-op and a uint8 output): on an input
    already quantized (u = q + 128), clamp(round(gelu(x_scale · w_scales · Σ q·w + bias) / out_scale), −128, 127)
    + 128 as uint8 [M, N] — the next layer's input codes, zero point 128 (`onednn_gelu_codes`)."""
    _count_u8_call(u)
    ONEDNN_STATS["gelu_fused_calls"] += 1
    return _qlinear(u, float(x_scale), 128, packed, w_scales, w_zeros, bias, (float(out_scale), approximate))


@onednn_u8_linear_gelu_op.register_fake
def _(u, x_scale, packed, w_scales, w_zeros, bias, out_scale, approximate):
    return u.new_empty((u.shape[0], w_scales.shape[0]), dtype=torch.uint8)


def traced_path(module, weight: OneDNNWeight, x: torch.Tensor) -> bool:
    """Whether a oneDNN layer takes the traced path: under `torch.compile`, for inference (no gradient to the
    input), with a static input scale and one full-range GEMM (int32 accumulation, or codes within ±64)."""
    return (torch.compiler.is_compiling() and weight.full_range and not module.act_dynamic
            and not (torch.is_grad_enabled() and x.requires_grad))


def _traced_input(module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q, s, bias): the input's codes q = clamp(round(x / s), −128, 127) as float32 [M, K] in plain torch ops (the
    same ops as `QuantizedInput`), its static scale s, and the layer's bias in float32 (or None)."""
    scale = module.input_scale.to(torch.float32)
    q = torch.clamp(torch.round(x.reshape(-1, x.shape[-1]).to(torch.float32) / scale), -128, 127)
    return q, scale, None if module.bias is None else module.bias.to(torch.float32)


def _onednn_linear_traced(module, weight: OneDNNWeight, x: torch.Tensor) -> torch.Tensor:
    """The oneDNN layer as torch.compile sees it (issue #21): the input quantization and the 4-bit epilogue are
    plain torch ops — the same ones as `QuantizedInput` and `onednn_linear_op` — so Inductor fuses them into the
    ops around them (the LayerNorm and modulation producing q/k/v's input, the GELU producing fc2's, the row sums
    into the same pass); only the integer GEMM is an opaque call (`onednn_u8_linear_op`)."""
    q, scale, bias = _traced_input(module, x)
    y = onednn_u8_linear_op((q + 128).to(torch.uint8), scale, weight.packed, weight.scales, weight.zeros, bias)
    if weight.epilogue:  # affine 4-bit: − s_x · (Σ_i q_i) · shift_o
        y = y + (q.sum(dim=-1, keepdim=True) * scale) * weight.shift
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def _onednn_linear_frozen(module, weight: OneDNNWeight, x: torch.Tensor) -> torch.Tensor:
    """The oneDNN layer as torch.compile sees it with `torch._inductor.config.freezing = True`: PyTorch 2 export's
    decomposed pattern (quantize the input per tensor to uint8, zero point 128; dequantize it and the per-channel
    int8 weight; a float linear), which Inductor's x86 quantization passes lower to oneDNN's u8×s8
    `qlinear_pointwise` on a weight it prepacks at freeze time, fusing the input quantization into the producing
    ops and, for 8-bit layers, the consumers' into the GEMM as post-ops (fc1's GELU and a uint8 output for fc2). The
    same integer GEMM as eager; the input rounding is x · (1/s) there, not x / s (a code may differ by one at a tie).

    Affine 4-bit weights (w = c·scale − shift, c ∈ [0, 15]): the codes enter as int8 with zero point 0 (unpacked
    in the graph from the stored bytes: a constant Inductor folds at freeze time) and the shift as eager's rank-1
    epilogue − s·(Σ_i q_i)·shift_o, the row sums taken over the uint8 input (Σu − 128·K: integers, exact in float32
    below 2^24) so that the dequantized input keeps the linear as its only user — Inductor's pattern then still
    matches where q/k/v share one input (a sum over the dequantized input left those three as float GEMMs on a
    weight dequantized at every call, measured 0.74 s against 0.44 s for DiT-XL/2)."""
    from torch.ao.quantization.fx import _decomposed  # noqa: F401 (registers the quantized_decomposed ops)

    ops = torch.ops.quantized_decomposed
    s = weight.input_scale
    u = ops.quantize_per_tensor.default(x.to(torch.float32), s, 128, 0, 255, torch.uint8)
    xd = ops.dequantize_per_tensor.default(u, s, 128, 0, 255, torch.uint8)
    codes = stored_data(module.weight)
    if weight.shift is not None:
        codes = unpack_bits(codes, module.weight_qtype.bits, module.out_features).to(torch.int8)
        if weight.zero is not None:  # integer zero points: code − z, no epilogue
            codes = codes - weight.zero
    wd = ops.dequantize_per_channel.default(codes, weight.scales, weight.zeros, 0, -128, 127, torch.int8)
    bias = None if module.bias is None else module.bias.to(torch.float32)
    y = F.linear(xd, wd, bias)
    if weight.epilogue:  # w_shift holds −shift, [1, N]
        q_sums = u.to(torch.float32).sum(dim=-1, keepdim=True) - 128 * x.shape[-1]
        y = y + (q_sums * s) * weight.shift
    return y.to(x.dtype)


def onednn_gelu_codes(module, x: torch.Tensor, out_scale: torch.Tensor, approximate: str) -> torch.Tensor | None:
    """fc1 (`module`), then GELU, then the next layer's static input quantization (scale `out_scale`), as one oneDNN
    call under `torch.compile` without freezing (issue #21, point 1; with freezing Inductor's own passes fuse them):
    the next layer's input codes + 128 as uint8 [..., N]. None where `module` does not take the traced path (another
    kernel, freezing, a gradient wanted, a dynamic or split input, an affine 4-bit epilogue before the GELU). The
    GELU and the rounding run in oneDNN: a code may differ by one from eager's where gelu(y) / out_scale lies within
    float rounding of a half-integer."""
    if module.kernel != "onednn" or torch._inductor.config.freezing:
        return None
    weight = _prepared(module, KERNELS["onednn"])
    if not traced_path(module, weight, x) or weight.epilogue:
        return None
    q, scale, bias = _traced_input(module, x)
    u = onednn_u8_linear_gelu_op((q + 128).to(torch.uint8), scale, weight.packed, weight.scales, weight.zeros, bias,
                                 out_scale.to(torch.float32), approximate)
    return u.reshape(*x.shape[:-1], u.shape[-1])


def _onednn_linear(module, weight: OneDNNWeight, x: torch.Tensor) -> torch.Tensor:
    if traced_path(module, weight, x):
        if torch._inductor.config.freezing:
            return _onednn_linear_frozen(module, weight, x)
        return _onednn_linear_traced(module, weight, x)
    return onednn_linear_op(x, weight.packed, stored_data(module.weight), weight.scales, weight.zeros, weight.shift,
                            module.bias, None if module.act_dynamic else module.input_scale, weight.full_range,
                            module.weight_qtype.bits, weight.zero is not None)


register_kernel(Kernel("onednn", _onednn_linear, prepare=prepare_onednn, check=_onednn_check, priority=30,
                       devices=("cpu",), state_bytes=lambda module: module.in_features * module.out_features))


# ------------------------------------------------------------------------------------------------ int8 per call
# Issue #22: an integer GEMM that keeps nothing beside the stored codes. `torch._int_mm` (int8 × int8 -> int32)
# takes a plain int8 matrix, no prepacked copy: each call unpacks a slice of the stored codes to int8 (4-bit: the
# packed bytes masked or shifted, `code_slices`; 8-bit: the stored codes themselves) and multiplies it, so a W4A8 layer
# costs its stored size in memory, at integer speed (measured: docs/kernels.md, "What runs where").

INT8_SLICE_BYTES = 4 << 20  # int8 codes unpacked per slice: what a call allocates beside its input and output
INT32_EXACT_TERMS = (2**31 - 1) // 2**14  # K products of codes within ±2^7 sum below 2^31


def _int8_per_call_check(module) -> str | None:
    # on the CPU only: untested elsewhere, and on CUDA quanto's path keeps nothing beside the codes either
    problem = _int8_layer_problem(module, "int8 per-call", "emulated-per-call")
    if problem is None and module.in_features > INT32_EXACT_TERMS:
        problem = f"K = {module.in_features} products of ±2^7 codes can overflow int32 (at most {INT32_EXACT_TERMS})"
    if problem is None and not int_mm_exact("cpu"):
        problem = "torch._int_mm is not exact on this CPU (measured: it does not run, or it does not accumulate in int32)"
    return problem


def _int8_per_call_prepare(module) -> torch.Tensor | None:
    """The integer zero points z [N, 1] of an affine 4-bit weight that has them (then no float shift term: z comes
    off in int32, `_int8_per_call`), else None: one int8 a channel, built once."""
    w = module.weight
    return None if module.weight_qtype.bits == 8 else integer_zero_points(w._scale, w._shift)


def _int8_per_call(module, zero: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """y = x·Wᵀ + b with the input quantized as the emulation does (`QuantizedInput`'s rounding; per token for
    dynamic scales) and each slice of the stored codes multiplied on `torch._int_mm`, int32 sums exact: y = s_x ·
    s_w · Σ q·c (− s_x · Σ_i q_i · shift for an affine 4-bit weight without integer zero points) + b. With a
    gradient wanted for the input it runs `emulated-per-call` (the same values to float rounding, and autograd's
    straight-through rounding)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _emulated_per_call(module, None, x)
    k, n = module.in_features, module.out_features
    x2 = x.reshape(-1, k).to(torch.float32)
    scale = per_token_scale(x2) if module.act_dynamic else module.input_scale.to(torch.float32)
    q = torch.div(x2, scale)
    q.round_().clamp_(-128, 127)
    qi = q.to(torch.int8)
    shift = module.weight_qtype.bits == 4 and zero is None  # the rank-1 epilogue of affine 4-bit weights
    q_sums = q.sum(dim=-1, keepdim=True) * scale if shift else None  # integers (exact below 2^24), then scaled
    bias = None if module.bias is None else module.bias.to(torch.float32)
    del q, x2
    # integer zero points: Σ q·(c − z) = Σ q·c − z·Σq, exact in int32 either way; subtracted from the M × r sums when
    # that is less work than from the r × K codes (fewer rows than inputs: DiT-XL/2's batch, the adaLN's M = 2)
    on_sums = zero is not None and qi.shape[0] < k
    q_int_sums = qi.sum(dim=-1, keepdim=True, dtype=torch.int32) if on_sums else None
    out = qi.new_empty(qi.shape[0], n, dtype=torch.float32)
    for start, codes, w_scale, neg_shift in code_slices(module.weight, n, max(1, INT8_SLICE_BYTES // k)):
        stop = start + codes.shape[0]
        codes = codes.view(torch.int8)  # 4-bit: uint8 codes in [0, 15], the same values as int8
        if zero is not None and not on_sums:
            codes = codes - zero[start:stop]  # in [-15, 15]
        sums = torch._int_mm(qi, codes.T)
        if on_sums:
            sums.sub_(q_int_sums * zero[start:stop].reshape(1, -1))
        y = out[:, start:stop]  # the sums converted to float32 (one rounding) in the output, then scaled in place
        y.copy_(sums).mul_(scale * w_scale.reshape(1, -1).to(torch.float32))
        if shift:
            y.addmm_(q_sums, neg_shift.reshape(1, -1).to(torch.float32))
        if bias is not None:
            y.add_(bias[start:stop])
    return out.reshape(*x.shape[:-1], n).to(x.dtype)


register_kernel(Kernel("int8-per-call", _int8_per_call, prepare=_int8_per_call_prepare, check=_int8_per_call_check,
                       priority=-5, devices=("cpu",), automatic=False))


# ------------------------------------------------------------------------------------------------ choice


def default_kernel(device: torch.device) -> str:
    """The kernel of a QuantLinear before its weight is frozen: quanto's on CUDA, the float emulation elsewhere."""
    return "quanto" if torch.device(device).type == "cuda" else "emulated"


def kernel_problem(module, name: str) -> str | None:
    """Why `name` cannot run `module` exactly here, or None when it can."""
    if name not in KERNELS:
        return f"unknown kernel {name!r}; registered: {sorted(KERNELS)}"
    return KERNELS[name].check(module)


def available_kernels(module) -> list[str]:
    """The registered kernels that run `module` exactly on its device and this CPU."""
    return [name for name in KERNELS if kernel_problem(module, name) is None]


# How the automatic choice picks among the exact kernels a layer may use on the CPU (issue #21, point 5):
# "measured" times each on the layer (once per process and layer shape) and takes the fastest, so that a small
# layer, where the integer GEMM's fixed costs outweigh its speed, runs the float emulation (exact too) and no
# quantized model is slower than the kernels allow; "priority" takes the registry's highest priority (oneDNN);
# "memory" (any device) the kernels whose prepared state is smallest (`Kernel.state_bytes`), and among them the
# faster on the CPU (measured as above; elsewhere the highest priority): on the CPU the codes multiplied per call on
# `torch._int_mm` where it is exact (8-bit inputs, per-channel weights: "int8-per-call") or the weight dequantized
# per call ("emulated-per-call"), so that a loaded checkpoint runs in about its files' memory (issue #22). Measured,
# not assumed: without VNNI `torch._int_mm` may be exact but slow.
KERNEL_CHOICES = ("measured", "priority", "memory")
KERNEL_CHOICE = os.environ.get("DIFFUSERS_PTQ_KERNEL_CHOICE", "measured")
MEASURE_ROWS = 256  # input rows of the timed calls (DiT-XL/2's batch of 2 × 256 tokens is 512; the bundled model's 320)
MEASURED: dict[tuple, dict[str, float]] = {}  # layer shape key -> {kernel: best seconds}, per process


def _shape_key(module, names: tuple[str, ...]) -> tuple:
    """What a kernel's speed on a layer depends on: the candidates, the shape, the bit widths and scale kinds."""
    return (names, module.in_features, module.out_features, module.bias is not None, module.weight_qtype.bits,
            getattr(module.activation_qtype, "bits", None), bool(getattr(module, "act_dynamic", False)),
            getattr(module, "weight_group_size", None))


def best_seconds(fn, repeats: int = 3, device: torch.device | None = None) -> float:
    """Best of `repeats` timed calls of `fn` after one warm-up call (synchronizing a CUDA `device` around each)."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda *_: None)
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def time_kernel(kernel: Kernel, module, x: torch.Tensor, repeats: int = 3) -> float:
    """Best of `repeats` timed calls of `kernel` on `module` (prepared once, one warm-up call first)."""
    state = kernel.prepare(module)
    with torch.no_grad():
        return best_seconds(lambda: kernel.run(module, state, x), repeats)


def measured_kernel(module, candidates: list[Kernel]) -> str:
    """The fastest of `candidates` (all exact for the layer) on MEASURE_ROWS random rows, measured once per process
    and layer shape (`MEASURED`); ties go to the earlier (higher-priority) candidate."""
    key = _shape_key(module, tuple(k.name for k in candidates))
    if key not in MEASURED:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(MEASURE_ROWS, module.in_features, generator=gen).to(module.weight.device)
        stats = dict(ONEDNN_STATS)
        MEASURED[key] = {k.name: time_kernel(k, module, x) for k in candidates}
        ONEDNN_STATS.update(stats)  # the timing calls are not the model's
    times = MEASURED[key]
    return min(candidates, key=lambda k: times[k.name]).name


def choose_kernel(module) -> str:
    """The fastest exact kernel for a frozen quantized Linear on its device, among the registered kernels whose
    `devices` include the layer's device type and whose check passes: on the CPU the faster of them on this layer
    (`measured_kernel`, with KERNEL_CHOICE = "measured", the default), else the highest priority (on CUDA: quanto;
    on an x86 CPU, W8A8 and per-channel W4A8: oneDNN; elsewhere the float emulation); with KERNEL_CHOICE = "memory"
    the faster of those holding the least beside the stored weight (on the CPU: "int8-per-call" or
    "emulated-per-call")."""
    if KERNEL_CHOICE not in KERNEL_CHOICES:
        raise ValueError(f"kernel choice {KERNEL_CHOICE!r} (DIFFUSERS_PTQ_KERNEL_CHOICE) is not one of "
                         f"{list(KERNEL_CHOICES)}")
    device = module.weight.device
    if device.type == "meta" or not getattr(module, "frozen", False):
        return default_kernel(device)
    candidates = [k for k in sorted(KERNELS.values(), key=lambda k: -k.priority)
                  if (k.devices is None or device.type in k.devices) and (k.automatic or KERNEL_CHOICE == "memory")
                  and k.check(module) is None]
    if not candidates:
        raise KernelError(f"no registered kernel can run {module!r} on {device}")
    if KERNEL_CHOICE == "memory":  # the least state; among those, the faster on the CPU (else the higher priority)
        least = min(k.state_bytes(module) for k in candidates)
        candidates = [k for k in candidates if k.state_bytes(module) == least]
    if KERNEL_CHOICE != "priority" and device.type == "cpu" and len(candidates) > 1:
        return measured_kernel(module, candidates)
    return candidates[0].name


# ------------------------------------------------------------------------------------------------ attention matmuls
# Quantized attention's QKᵀ and PV (attention.py) multiply integer codes: on `torch._int_mm` (int8 × int8 -> int32)
# where it accumulates in int32 here (measured, not assumed), else in float32 on the same integers (issue #21,
# point 2).

INT_MM_PROBE_SHAPES = ((256, 72, 256), (256, 256, 72), (32, 1024, 32))  # DiT-XL/2's QKᵀ and PV of one head; long K


@functools.cache
def int_mm_exact(device_type: str) -> bool:
    """Whether `torch._int_mm` runs on this device type and equals the int64 product on the largest codes (all
    −128; +127 against −128: sums of K·2^14, pair sums that saturate int16 without int32 accumulation) and on
    random ones. Once per process."""
    gen = torch.Generator().manual_seed(0)
    for m, k, n in INT_MM_PROBE_SHAPES:
        cases = [(torch.full((m, k), -128), torch.full((k, n), -128)),
                 (torch.full((m, k), 127), torch.full((k, n), -128)),
                 (torch.randint(-128, 128, (m, k), generator=gen), torch.randint(-128, 128, (k, n), generator=gen))]
        for a, b in cases:
            try:
                got = torch._int_mm(a.to(device_type, torch.int8), b.to(device_type, torch.int8))
            except (RuntimeError, NotImplementedError):
                return False
            if not torch.equal(got.cpu().long(), a.long() @ b.long()):
                return False
    return True


@torch.library.custom_op("diffusers_ptq::int8_bmm", mutates_args=())
def int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched int8 matmul, int32 result: `torch._int_mm` on each of the batch's matrices (a [B, M, K], b [B, K, N]).
    One opaque call to torch.compile (unrolling the loop into the graph costs minutes of compile time)."""
    out = a.new_empty((a.shape[0], a.shape[1], b.shape[2]), dtype=torch.int32)
    for i in range(a.shape[0]):
        torch._int_mm(a[i], b[i], out=out[i])
    return out


@int8_bmm.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]), dtype=torch.int32)
