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
Which of the two regimes the CPU is in is *measured* once per process (`onednn_full_range_exact`: an
adversarial GEMM that saturates int16 pair sums), not guessed from flags; the flags are reported beside it.

Dynamic per-token activations (`module.act_dynamic`, Q-DiT): each token (row) gets its own symmetric scale
s_t = max|x_t| / 127 at run time (`per_token_scale`), q = round(x / s_t) ∈ [−127, 127]. `"emulated"` fake-quantizes
with those scales; `"onednn"` feeds the same integers (u = q + zp, input scale 1) to the same exact GEMM and
multiplies the output rows by s_t before adding the bias (the split path and the 4-bit epilogue unchanged);
`"quanto"` has no per-token path (on CUDA such layers run `"emulated"`).

`register_kernel` adds one; `QuantLinear.kernel` (a plain attribute, never saved) picks one; `choose_kernel`
is the automatic choice (made when a module is frozen, loaded or moved); `set_kernel(model, name)` forces one
on every quantized layer and raises `KernelError` for a kernel that cannot run a layer exactly.
"""

from __future__ import annotations

import functools
import platform
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

KERNELS: dict[str, Callable] = {}
_CHECKS: dict[str, Callable] = {}


class KernelError(ValueError):
    """A kernel was asked to run a layer it cannot run exactly (or at all) here."""


def register_kernel(name: str, check: Callable | None = None):
    """Register `fn(module, x) -> y` under `name`; `check(module) -> str | None` says why it cannot run a module."""
    def wrap(fn: Callable) -> Callable:
        KERNELS[name] = fn
        _CHECKS[name] = check or (lambda module: None)
        return fn

    return wrap


def fake_quantize_symmetric(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Round x/scale to the signed `bits` grid and back (quanto's rounding and clamp: [-2^(b-1), 2^(b-1)-1])."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


def per_token_scale(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric scale of each token (last dim): max|x| / (2^(b-1) − 1), shape [..., 1]; an all-zero token
    gets scale 1 (its codes are 0 either way)."""
    absmax = x.detach().abs().amax(dim=-1, keepdim=True)
    scale = absmax / (2 ** (bits - 1) - 1)
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


def fake_quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x rounded per token to its own symmetric `bits` grid (`per_token_scale`) and back."""
    return fake_quantize_symmetric(x, per_token_scale(x, bits), bits)


# ------------------------------------------------------------------------------------------------ CPU features


@functools.lru_cache(maxsize=None)
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


def _qlinear(u: torch.Tensor, x_scale: float, zero_point: int, packed, w_scales, w_zeros, bias) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(u, x_scale, zero_point, packed, w_scales, w_zeros, bias, 1.0, 0,
                                              torch.float32, "none", [], "")


@functools.lru_cache(maxsize=None)
def onednn_full_range_exact() -> bool:
    """Measured: does oneDNN's u8×s8 GEMM stay exact for full-range uint8 inputs (255) times ±127/−128 weights?

    True on VNNI/AMX CPUs (int32 accumulation); False where pairs of products are summed in int16 with
    saturation (AVX2). False too where oneDNN is not available."""
    if not onednn_available():
        return False
    k, n = 64, 16
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[n // 2:] = -128
    u = torch.full((4, k), 255, dtype=torch.uint8)
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    y = _qlinear(u, 1.0, 0, packed, torch.ones(n), torch.zeros(n, dtype=torch.int64), None)
    ref = (u.double() @ w.double().T)
    return bool(torch.equal(y.double(), ref))


def machine_kernel_info() -> dict:
    """What the kernel choice rests on, for benchmark records."""
    return {"onednn_available": onednn_available(), "vnni_flags": sorted(f for f in VNNI_FLAGS if f in cpu_flags()),
            "onednn_full_range_exact": onednn_full_range_exact(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


# ------------------------------------------------------------------------------------------------ kernels


def _quanto_check(module) -> str | None:
    if getattr(module, "act_dynamic", False):
        return "dynamic per-token activations: quanto's path takes one static input scale; use 'emulated'"
    return None


@register_kernel("quanto", _quanto_check)
def quanto_linear(module, x: torch.Tensor) -> torch.Tensor:
    from optimum.quanto import quantize_activation

    if module.activation_qtype is not None:
        x = quantize_activation(x, qtype=module.activation_qtype, scale=module.input_scale)
    return F.linear(x, module.qweight, bias=module.bias)


@register_kernel("emulated")
def emulated_linear(module, x: torch.Tensor) -> torch.Tensor:
    if module.activation_qtype is not None:
        if getattr(module, "act_dynamic", False):
            x = fake_quantize_per_token(x, module.activation_qtype.bits)
        else:
            x = fake_quantize_symmetric(x, module.input_scale.to(x.dtype), module.activation_qtype.bits)
    return F.linear(x, module.dequantized_weight(), bias=module.bias)


def _onednn_check(module) -> str | None:
    if not onednn_available():
        return ("oneDNN int8 linear is not available here (needs an x86 CPU and a torch build with "
                "torch.ops.onednn.qlinear_pointwise)")
    if module.weight.device.type != "cpu":
        return f"the oneDNN kernel runs on CPU; this layer is on {module.weight.device}"
    if module.activation_qtype is None:
        return "weight-only layer (A16): there is no integer input to multiply; use 'emulated'"
    if module.activation_qtype.bits != 8:
        return f"{module.activation_qtype.bits}-bit activations: the oneDNN kernel takes 8-bit ones"
    bits = module.weight_qtype.bits
    if bits == 4 and getattr(module, "weight_group_size", None) is not None:
        return (f"4-bit weights in groups of {module.weight_group_size}: an int8 GEMM applies one scale per "
                "output channel; grouped weights run on 'emulated'")
    if bits not in (4, 8):
        return f"{bits}-bit weights are not supported by the oneDNN kernel"
    return None


class _OneDNNWeight:
    """The weight as oneDNN wants it: int8 codes prepacked once, per-channel scales, the 4-bit shift term."""

    def __init__(self, module):
        problem = _onednn_check(module)
        if problem is not None:
            raise KernelError(f"kernel 'onednn': {problem}")
        w = module.weight
        if module.weight_qtype.bits == 8:
            codes = w._data.to(torch.int8)
            self.shift = None
        else:  # quanto affine qint4, per output channel: w = scale * code - shift, code in 0..15
            codes = w._data.unpack().to(torch.int8)
            self.shift = (-w._shift.reshape(1, -1)).to(torch.float32).contiguous()  # [1, N] for the rank-1 epilogue
        self.in_features = codes.shape[1]
        # one full-range GEMM is exact when int16 pair sums cannot saturate: int32 accumulation (VNNI/AMX,
        # measured), or weight codes within [-64, 63] (2·255·64 <= 32768: all 4-bit codes, 7-bit 8-bit codes)
        self.full_range = bool(onednn_full_range_exact() or (int(codes.min()) >= -64 and int(codes.max()) <= 63))
        self.scales = w._scale.reshape(-1).to(torch.float32).contiguous()
        self.zeros = torch.zeros_like(self.scales, dtype=torch.int64)
        self.packed = torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)
        self.source = w  # a strong reference, as QuantLinear's dequantized cache (a weakref blocks module.to())


def onednn_weight(module) -> _OneDNNWeight:
    """The module's prepared oneDNN weight, prepacked on first use and cached in memory (follows the weight object)."""
    cache = module.__dict__.get("_onednn_weight")
    if cache is None or cache.source is not module.weight:
        cache = _OneDNNWeight(module)
        module.__dict__["_onednn_weight"] = cache
    return cache


class _InputCache:
    """The last quantized input (q/k/v and other layers reading one activation with one scale share it)."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, x: torch.Tensor, scale: float):
        key = self.key
        if key is not None and key[0]() is x and key[1] == x._version and key[2] == scale:
            return self.value
        return None

    def put(self, x: torch.Tensor, scale: float, value) -> None:
        self.key = (weakref.ref(x), x._version, scale)
        self.value = value


_INPUT_CACHE = _InputCache()
SPLIT = 64  # without int32 accumulation: |q| <= 64 goes in one exact GEMM (u = q + 64 <= 128)
# a float multiply-add costs about this many int8 ones (measured ~2.5x on AVX2 for the same shapes): the residual
# of the split path goes by input channels (float, on the few channels holding large activations) when that is
# cheaper than by tokens (a second int8 GEMM over the rows holding them)
FLOAT_COST = 2.5
# counters for the benchmark: kernel calls, inputs quantized (fewer than calls when q/k/v share one), their rows
# and channels, and how many of those the split path's residual had to cover
ONEDNN_STATS = {"calls": 0, "quantized_inputs": 0, "rows": 0, "residual_rows": 0, "channels": 0,
                "residual_channels": 0}


def _u8(t: torch.Tensor) -> torch.Tensor:
    """Float integers in [0, 255] as uint8, through int16: the same values, ~2x faster than one cast on CPU."""
    return t.to(torch.int16).to(torch.uint8)


class _QuantizedInput:
    """An input quantized for the oneDNN kernel: q = clamp(round(x / scale)) exactly as `fake_quantize_symmetric`
    (same ops, same float32 division), the uint8 GEMM input u = c + zp, and the split path's residual."""

    __slots__ = ("q", "u", "zp", "rows", "row_resid", "cols", "col_resid", "full_range", "_row_sums", "token_scale")

    def __init__(self, x2: torch.Tensor, scale: torch.Tensor, full_range: bool):
        q = torch.div(x2, scale)
        q.round_().clamp_(-128, 127)
        self.q, self.full_range, self._row_sums, self.token_scale = q, full_range, None, None
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

    def row_sums(self) -> torch.Tensor:
        if self._row_sums is None:
            self._row_sums = self.q.sum(dim=-1, keepdim=True)  # integers, exact in float32 below 2^24
        return self._row_sums


@register_kernel("onednn", _onednn_check)
def onednn_linear(module, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":
        raise KernelError(f"the oneDNN kernel runs on CPU tensors, got an input on {x.device}")
    weight = onednn_weight(module)
    dynamic = bool(getattr(module, "act_dynamic", False))
    if dynamic:  # per-token scales: the GEMM runs with input scale 1, the rows are scaled afterwards
        scale_t, scale, key = None, 1.0, "dynamic"
    else:
        scale_t = module.input_scale.to(torch.float32)
        scale = key = float(scale_t)
    full_range = weight.full_range
    out_shape = (*x.shape[:-1], module.out_features)
    qx = _INPUT_CACHE.get(x, key)
    if qx is None or qx.full_range != full_range:
        x2 = x.reshape(-1, weight.in_features)
        x2 = x2 if x2.dtype == torch.float32 else x2.float()
        token_scale = per_token_scale(x2) if dynamic else None
        qx = _QuantizedInput(x2, token_scale if dynamic else scale_t, full_range)
        qx.token_scale = token_scale
        _INPUT_CACHE.put(x, key, qx)
        ONEDNN_STATS["quantized_inputs"] += 1
        ONEDNN_STATS["rows"] += qx.q.shape[0]
        ONEDNN_STATS["channels"] += qx.q.shape[1]
        ONEDNN_STATS["residual_rows"] += (0 if qx.row_resid is None else
                                          qx.q.shape[0] if qx.rows is None else qx.rows.numel())
        ONEDNN_STATS["residual_channels"] += 0 if qx.cols is None else qx.cols.numel()
    ONEDNN_STATS["calls"] += 1
    bias = module.bias
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    y = _qlinear(qx.u, scale, qx.zp, weight.packed, weight.scales, weight.zeros, None if dynamic else bias)
    if qx.row_resid is not None:  # tokens with activations beyond ±64 steps: the remainder in a second exact GEMM
        resid = _qlinear(qx.row_resid, scale, qx.zp, weight.packed, weight.scales, weight.zeros, None)
        if qx.rows is None:
            y.add_(resid)
        else:
            y.index_add_(0, qx.rows, resid)
    if qx.cols is not None:  # input channels with activations beyond ±64 steps: their remainder in float
        w_cols = module.weight._data.index_select(1, qx.cols).float().mul_(weight.scales.unsqueeze(1))
        y.addmm_(qx.col_resid, w_cols.T, alpha=scale)
    if weight.shift is not None:  # affine 4-bit: − s_x · (Σ_i q_i) · shift_o
        y.addmm_(qx.row_sums(), weight.shift, alpha=scale)
    if dynamic:  # y_t = s_t · (integer GEMM)_t + bias
        y.mul_(qx.token_scale)
        if bias is not None:
            y.add_(bias)
    return y.reshape(out_shape).to(x.dtype)


# ------------------------------------------------------------------------------------------------ choice


def default_kernel(device: torch.device) -> str:
    """The kernel of a QuantLinear before its weight is frozen: quanto's on CUDA, the float emulation elsewhere."""
    return "quanto" if torch.device(device).type == "cuda" else "emulated"


def kernel_problem(module, name: str) -> str | None:
    """Why `name` cannot run `module` exactly here, or None when it can."""
    if name not in KERNELS:
        return f"unknown kernel {name!r}; registered: {sorted(KERNELS)}"
    return _CHECKS[name](module)


def available_kernels(module) -> list[str]:
    """The registered kernels that run `module` exactly on its device and this CPU."""
    return [name for name in KERNELS if kernel_problem(module, name) is None]


def choose_kernel(module) -> str:
    """The fastest exact kernel for a frozen QuantLinear on its device.

    CUDA: quanto (torch._int_mm / its Marlin-style kernels; dynamic per-token activations: emulated). x86 CPU, W8A8 and per-channel W4A8: oneDNN (exact
    on every x86 CPU, see the module docstring). Everything else (weight-only, grouped 4-bit, non-x86 CPUs):
    the float emulation, which is as fast as the float model, whereas quanto's CPU path is not."""
    device = module.weight.device
    if device.type == "cuda":
        return "quanto" if kernel_problem(module, "quanto") is None else "emulated"
    if device.type == "meta" or not getattr(module, "frozen", False):
        return default_kernel(device)
    if kernel_problem(module, "onednn") is None:
        return "onednn"
    return "emulated"


def quant_linears(model: torch.nn.Module):
    from diffusers_ptq.modules import QuantLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]


def set_kernel(model: torch.nn.Module, name: str) -> dict[str, str]:
    """Force kernel `name` on every QuantLinear of `model` (or on `model` itself); "auto" restores the automatic
    choice. Raises KernelError, changing nothing, if the kernel cannot run one of the layers exactly here.
    Returns {layer name: kernel}."""
    layers = quant_linears(model)
    if name != "auto":
        problems = [(n, kernel_problem(m, name)) for n, m in layers]
        problems = [(n, p) for n, p in problems if p is not None]
        if problems:
            shown = "; ".join(f"{n or '<module>'}: {p}" for n, p in problems[:3])
            more = f" (and {len(problems) - 3} more layers)" if len(problems) > 3 else ""
            raise KernelError(f"kernel {name!r} cannot run {len(problems)} of {len(layers)} quantized layers "
                              f"exactly here — {shown}{more}")
    for _, m in layers:
        m.kernel = choose_kernel(m) if name == "auto" else name
        m._kernel_forced = name != "auto"
    return {n: m.kernel for n, m in layers}


def kernel_summary(model: torch.nn.Module) -> dict[str, int]:
    """How many quantized layers run on each kernel."""
    counts: dict[str, int] = {}
    for _, m in quant_linears(model):
        counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return counts
