"""Weight rounding that learns from calibration data: GPTQ (second-order error compensation).

Pure functions, tensors in, tensors out (the one project import: distributed.py, for multi-process runs):

- `HessianRecorder`: forward pre-hooks that stream each Linear's input Hessian H = Σ xᵀx (mean over rows,
  optionally weighted per timestep) without storing activations.
- `scale_hessian` / `shift_hessian`: the Hessian of X / s (of X − z) from that of X (and its mean): smoothing
  happens between calibration and rounding.
- `nearest_round` / `gptq_round`: one weight matrix onto quanto's grid (8-bit symmetric per output channel,
  4-bit affine per channel or per group of input channels), returned as a `RoundedWeight` that holds the
  integer codes, the scales (and shifts) in quanto's layout and the float weight they dequantize to.
- `gptq_quantize_weights`: GPTQ for a dict of Linears, the one call the pipeline makes.

The grid (scale, shift) of a row or group comes from the ORIGINAL weight with quanto's own formulas, so a GPTQ
weight is stored in exactly the format round-to-nearest uses; GPTQ only chooses different integers.

Under a distributed launch (distributed.py) `HessianRecorder` sums its accumulators over processes (SUM) the first
time `hessians()` or `means()` is called, and `gptq_quantize_weights` rounds each layer on one process (round robin)
and broadcasts the result, so every process ends with the same codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from diffusers_ptq import distributed
from diffusers_ptq.observe import Observer

__all__ = ["HessianRecorder", "RoundedWeight", "scale_hessian", "shift_hessian", "quant_grid", "nearest_round", "gptq_round",
           "gptq_quantize_weights", "broadcast_rounded", "ZERO_POINTS"]


# --------------------------------------------------------------------------------------------- Hessians

class HessianRecorder:
    """Context manager: per Linear, the mean input Hessian H = Σ w·xᵀx / Σ w over every row of every call.

    `layers`: {name: nn.Linear}. Rows are the input flattened to [-1, in_features] (all tokens of all samples).
    `weight_fn(timestep) -> float | Tensor[B]`: optional per-call or per-sample weight from the transformer's
    timestep (read on each call of `transformer` by the observer, where the model's adapter finds it);
    a per-sample weight must have one entry per leading (batch) index of the Linear's input.
    `dtype`: accumulator dtype (float32 default; float64 for very long calibration runs).
    The accumulators live on the input's device; `hessians()` returns them on CPU in float32.
    Under a distributed launch the first `hessians()` / `means()` call sums sums, firsts and counts over the
    processes (every process must call it; a process whose shard was empty contributes zeros); record nothing after.
    """

    def __init__(self, layers: dict[str, nn.Linear], weight_fn: Callable[[torch.Tensor], float | torch.Tensor] | None = None,
                 transformer: nn.Module | None = None, dtype: torch.dtype = torch.float32):
        if weight_fn is not None and transformer is None:
            raise ValueError("weight_fn needs the transformer (its forward pre-hook reads the timestep)")
        self.layers = layers
        self.weight_fn = weight_fn
        self.transformer = transformer
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}    # Σ w·xᵀx
        self.firsts: dict[str, torch.Tensor] = {}  # Σ w·x (for `means`)
        self.counts: dict[str, float] = {name: 0.0 for name in layers}  # Σ w over rows
        self.modules = layers
        self._weight: float | torch.Tensor = 1.0
        self._observer: Observer | None = None
        self._reduced = False

    def __enter__(self) -> HessianRecorder:
        """Record by itself (without calibration.calibrate, which takes it as one of its subscribers)."""
        self._observer = Observer(self.transformer, [self]).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._observer.__exit__(*exc)

    def on_call(self, timestep, args: tuple, kwargs: dict) -> None:
        """Observer subscriber: the per-call weight from the transformer's timestep (with a weight_fn)."""
        if self.weight_fn is None:
            return
        if timestep is None:
            raise ValueError("HessianRecorder: the transformer was called without a timestep")
        self._weight = self.weight_fn(timestep)

    def on_input(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.add(name, args[0])

    @torch.no_grad()
    def add(self, name: str, x: torch.Tensor, weight: float | torch.Tensor | None = None) -> None:
        """Accumulate the rows of one input x [..., in] (weight: scalar or per leading index; default: current)."""
        weight = self._weight if weight is None else weight
        rows = x.reshape(-1, x.shape[-1]).to(self.dtype)
        weighted = rows
        total = float(rows.shape[0])
        if torch.is_tensor(weight) and weight.numel() > 1:
            w = weight.to(device=x.device, dtype=self.dtype).reshape(-1)
            if x.ndim < 2 or w.numel() != x.shape[0]:
                raise ValueError(f"per-sample weight of {w.numel()} entries for an input of shape {tuple(x.shape)}")
            per_row = w.repeat_interleave(rows.shape[0] // x.shape[0])
            weighted = rows * per_row[:, None]
            total = float(per_row.sum())
        else:
            w = float(weight)
            if w != 1.0:
                weighted = rows * w
            total *= w
        if name not in self.sums:
            self.sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=self.dtype, device=x.device)
            self.firsts[name] = torch.zeros(x.shape[-1], dtype=self.dtype, device=x.device)
        self.sums[name].addmm_(weighted.T, rows)
        self.firsts[name] += weighted.sum(0)
        self.counts[name] += total

    def reduce(self) -> None:
        """Sum the accumulators over processes (once; nothing in a single process). Layers that no process saw stay
        left out."""
        if self._reduced or not distributed.is_distributed():
            return
        self._reduced = True
        for name in distributed.seen_anywhere(list(self.layers), lambda n: n in self.sums):
            if name not in self.sums:
                layer = self.layers[name]
                size, device = layer.weight.shape[1], layer.weight.device
                self.sums[name] = torch.zeros(size, size, dtype=self.dtype, device=device)
                self.firsts[name] = torch.zeros(size, dtype=self.dtype, device=device)
            self.sums[name] = distributed.all_reduce_sum(self.sums[name])
            self.firsts[name] = distributed.all_reduce_sum(self.firsts[name])
            count = torch.tensor([self.counts[name]], dtype=torch.float64)
            self.counts[name] = float(distributed.all_reduce_sum(count))

    def hessians(self) -> dict[str, torch.Tensor]:
        """{name: Σ w·xᵀx / Σ w} on CPU, float32 (layers that saw no input are left out)."""
        self.reduce()
        return {name: (h / self.counts[name]).float().cpu() for name, h in self.sums.items()}

    def means(self) -> dict[str, torch.Tensor]:
        """{name: Σ w·x / Σ w}: the (weighted) mean input, for transforms that also shift the input."""
        self.reduce()
        return {name: (m / self.counts[name]).float().cpu() for name, m in self.firsts.items()}


def scale_hessian(hessian: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Hessian of X / s (per input channel) from the Hessian H of X: H / (s sᵀ)."""
    s = s.to(hessian.dtype).reshape(-1)
    return hessian / (s[:, None] * s[None, :])


def shift_hessian(hessian: torch.Tensor, mean: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The Hessian of X − z from the Hessian H and the mean μ of X: H − z μᵀ − μ zᵀ + z zᵀ.

    For a shift that varies by timestep group (HTG), record one Hessian and mean per group and combine the
    shifted ones weighted by each group's row count."""
    z = z.to(hessian.dtype).reshape(-1, 1)
    mean = mean.to(hessian.dtype).reshape(-1, 1)
    return hessian - z @ mean.T - mean @ z.T + z @ z.T


# --------------------------------------------------------------------------------------------- the grid

@dataclass
class RoundedWeight:
    """A weight on quanto's grid: what a quanto weight tensor holds, plus the float weight it stands for.

    data: integer codes [out, in] in the original column order (int8 in [-128, 127] for 8 bits, uint8 in
    [0, 15] for 4 bits). scale / shift: quanto's layout, [out, 1] per channel or [out * in / group_size, 1]
    per group; shift (4-bit only) is -min, dequantized = scale * data - shift. weight: the dequantized
    weight [out, in] in the original dtype, computed with quanto's operations (bit-identical to it).
    """

    weight: torch.Tensor
    data: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor | None
    bits: int
    group_size: int | None


def _check_format(weight: torch.Tensor, bits: int, group_size: int | None) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if group_size is not None:
        if bits == 8:
            raise ValueError("group_size applies to 4-bit weights only; 8-bit weights are per output channel")
        if group_size <= 0 or weight.shape[1] % group_size:
            raise ValueError(f"group_size {group_size} must divide in_features={weight.shape[1]}")


ZERO_POINTS = ("float", "integer")


def quant_grid(weight: torch.Tensor, bits: int, group_size: int | None = None,
               zero_point: str = "float") -> tuple[torch.Tensor, torch.Tensor | None]:
    """quanto's (scale, shift) for a weight, with its formulas and in its layout and dtype.

    8 bits: scale = max|row| / 127, no shift. 4 bits: over each row (or group of group_size inputs),
    scale = (max - min) / 15 and, with `zero_point` "float" (quanto's own grid), shift = -min. With "integer" the
    range is widened to hold 0 (min' = min(min, 0), max' = max(max, 0)), scale = (max' - min') / 15 and shift =
    scale · z with the integer zero point z = round(-min' / scale) ∈ [0, 15]: w = scale · (code - z), so an int8
    GEMM takes code - z ∈ [-15, 15] as it is, with no float shift term (kernels.integer_zero_points; for a
    float32 weight scale · z is exact, a bfloat16 one may round it, and the kernel then keeps the term). Same
    format either way; the grid moves by at most half a step.
    """
    _check_format(weight, bits, group_size)
    if zero_point not in ZERO_POINTS:
        raise ValueError(f"zero_point must be one of {list(ZERO_POINTS)}, got {zero_point!r}")
    if bits == 8:
        return weight.abs().amax(dim=1, keepdim=True) / 127, None
    rows = weight.reshape(-1, group_size) if group_size else weight
    lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    if zero_point == "float":
        return (hi - lo) / 15, -lo
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo) / 15
    z = torch.where(scale > 0, torch.round(-lo / torch.where(scale > 0, scale, 1)), 0).clamp(0, 15)
    return scale, scale * z


def _per_group(t: torch.Tensor, out_features: int) -> torch.Tensor:
    """quanto-layout scale/shift [out * groups, 1] -> [out, groups]."""
    return t.reshape(out_features, -1)


def _codes(w: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round to the grid as quanto does (float codes): 8 bits round(w/s) in [-128, 127]; 4 bits
    round((w + shift)/s) in [0, 15]. A zero scale (an all-zero row, a constant group) gives code 0."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    if bits == 8:
        q = torch.clamp(torch.round(w / safe), -128, 127)
    else:
        q = torch.clamp(torch.round((w + shift) / safe), 0, 15)
    return torch.where(scale == 0, torch.zeros_like(q), q)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """scale * codes (- shift), elementwise with broadcasting: the value a code stands for."""
    w = scale * codes
    return w if shift is None else w - shift


def _rounded(codes: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, bits: int,
             group_size: int | None) -> RoundedWeight:
    """Package codes [out, in] (float) with quanto-layout scale/shift, dequantizing exactly as quanto does."""
    out_features, in_features = codes.shape
    if bits == 8:
        data = codes.to(torch.int8)
        weight = scale * data
    else:
        data = codes.to(torch.uint8)
        grouped = data.reshape(-1, group_size) if group_size else data
        weight = (scale * grouped - shift).reshape(out_features, in_features)
    return RoundedWeight(weight=weight, data=data, scale=scale, shift=shift, bits=bits, group_size=group_size)


def nearest_round(weight: torch.Tensor, bits: int, group_size: int | None = None,
                  zero_point: str = "float") -> RoundedWeight:
    """Round to nearest on quanto's grid (with zero_point "float": what quanto's own freeze stores)."""
    scale, shift = quant_grid(weight, bits, group_size, zero_point)
    out_features = weight.shape[0]
    cols = _column_groups(weight.shape[1], group_size, weight.device)
    s = _per_group(scale, out_features)[:, cols]
    z = None if shift is None else _per_group(shift, out_features)[:, cols]
    return _rounded(_codes(weight, s, z, bits), scale, shift, bits, group_size)


def _column_groups(in_features: int, group_size: int | None, device: torch.device) -> torch.Tensor:
    """For each input column, the index of its group (all 0 per channel)."""
    cols = torch.arange(in_features, device=device)
    return cols // group_size if group_size else torch.zeros_like(cols)


# --------------------------------------------------------------------------------------------- GPTQ

def _damped_diagonal(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The diagonal GPTQ factorizes, in float64: dead inputs (zero diagonal) get H_jj = 1, then damp · mean(diag)
    is added. A dead column has no off-diagonal entries either, so it is decoupled: it is rounded to nearest and
    its error moves nothing."""
    diag = torch.diagonal(hessian).to(torch.float64)
    diag[diag == 0] = 1.0
    return diag + damp * diag.mean()


def _inverse_cholesky_upper(hessian: torch.Tensor, diag: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """U upper-triangular with H⁻¹ = Uᵀ U for H = the Hessian in the column order `perm`, in float64, with the damped
    diagonal `diag` (unpermuted); if H is not numerically positive definite, damp 10x harder. H is rebuilt from
    `hessian` for each attempt, so that at most two n × n float64 matrices are alive at once (the input and the
    output of one factorization step; 8·n² bytes each: 1.9 GB at FLUX's 15,360-wide proj_out)."""
    diag = diag[perm]
    mean_diag = diag.mean()
    extra = 0.0
    for _ in range(8):
        h = hessian[perm][:, perm].to(torch.float64)  # permuted in the input's dtype first: smaller temporaries
        h.diagonal().copy_(diag if extra == 0 else diag + extra * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        del h
        if info == 0:
            inverse = torch.cholesky_inverse(chol)
            del chol
            chol_inv, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0:
                return chol_inv
        extra = 1e-6 if extra == 0 else extra * 10
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with heavy damping")


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
               damp: float = 0.01, act_order: bool = True, block_size: int = 128,
               dtype: torch.dtype = torch.float32, zero_point: str = "float") -> RoundedWeight:
    """GPTQ rounding of weight [out, in] with the input Hessian [in, in] onto quanto's grid.

    Columns are rounded one at a time (in order of decreasing H_jj with act_order) and each one's error is
    spread over the columns not yet rounded, through the Cholesky factor of the inverse (damped) Hessian,
    lazily in blocks of block_size columns. The grid of each row / group is fixed beforehand from the
    original weight in the original column order (GPTQ's "static groups"), so act_order keeps quanto's format.
    `dtype` is the working precision of the updates (the Hessian is factorized in float64); `zero_point`: the
    4-bit grid's (`quant_grid`).
    """
    _check_format(weight, bits, group_size)
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} for a weight of shape {tuple(weight.shape)}")
    device = weight.device
    scale, shift = quant_grid(weight, bits, group_size, zero_point)
    scale_g = _per_group(scale, out_features).to(dtype)
    shift_g = None if shift is None else _per_group(shift, out_features).to(dtype)
    groups = _column_groups(in_features, group_size, device)

    hessian = hessian.to(device=device)
    diag = _damped_diagonal(hessian, damp)
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(in_features, device=device)
    u = _inverse_cholesky_upper(hessian, diag, perm).to(dtype)  # factorized in float64

    col_group = groups[perm].tolist()
    # transposed: one row per input column, so a column's values are contiguous
    w = weight.to(dtype).T[perm].contiguous()
    scale_t = scale_g.T.contiguous()
    shift_t = None if shift_g is None else shift_g.T.contiguous()
    codes = torch.zeros_like(w)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        w1, u1 = w[i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            g = col_group[i1 + i]
            s = scale_t[g]
            z = None if shift_t is None else shift_t[g]
            q = _codes(w1[i], s, z, bits)
            codes[i1 + i] = q
            err = (w1[i] - _dequantize(q, s, z)) / u1[i, i]
            w1[i:] -= u1[i, i:, None] * err[None, :]
            err1[i] = err
        w[i2:] -= u[i1:i2, i2:].T @ err1
    codes = codes[torch.argsort(perm)].T.contiguous()
    return _rounded(codes, scale, shift, bits, group_size)


def gptq_quantize_weights(linears: dict[str, nn.Linear], hessians: dict[str, torch.Tensor], weight_bits: int,
                          group_size: int | None = None, damp: float = 0.01, act_order: bool = True,
                          progress: bool = True, block_size: int = 128,
                          zero_point: str = "float") -> dict[str, RoundedWeight]:
    """GPTQ for every Linear: {name: RoundedWeight} to hand to `modules.quantize_linear(..., rounded=...)`.

    The Linears must already hold their final (smoothed) float weights, and the Hessians must be those of
    their final inputs (see `scale_hessian`). Weights stay untouched.
    Under a distributed launch layer i is rounded by process i mod world size and broadcast from there.
    """
    from tqdm.auto import tqdm

    missing = sorted(set(linears) - set(hessians))
    if missing:
        raise KeyError(f"no Hessian for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    rank, world = distributed.process_info()
    out = {}
    for i, (name, linear) in enumerate(tqdm(linears.items(), desc="GPTQ", disable=not progress or rank != 0)):
        if i % world == rank:
            out[name] = gptq_round(linear.weight.detach(), hessians[name], weight_bits, group_size, damp=damp,
                                   act_order=act_order, block_size=block_size, zero_point=zero_point)
        else:  # same shapes and grid; the codes come from the owner below
            out[name] = nearest_round(linear.weight.detach(), weight_bits, group_size, zero_point)
    if world > 1:
        for i, name in enumerate(linears):
            out[name] = broadcast_rounded(out[name], src=i % world)
    return out


def broadcast_rounded(rounded: RoundedWeight, src: int = 0) -> RoundedWeight:
    """Process `src`'s RoundedWeight on every process (each passes one of the same shapes and dtypes)."""
    if not distributed.is_distributed():
        return rounded
    def share(t):
        return None if t is None else distributed.broadcast(t, src)

    return RoundedWeight(weight=share(rounded.weight), data=share(rounded.data), scale=share(rounded.scale),
                         shift=share(rounded.shift), bits=rounded.bits, group_size=rounded.group_size)
