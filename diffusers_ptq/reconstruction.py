"""Block reconstruction: AdaRound-style learned rounding against the full-precision block output (BRECQ).

Every weight of a quantized Linear is rounded down or up on quanto's grid (the same `rounding.quant_grid` as
round-to-nearest and GPTQ); AdaRound (Nagel et al., 2020) learns that choice per weight through a continuous
variable V: the soft code is clamp(⌊x⌋ + h(V), qmin, qmax) with the rectified sigmoid
h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1), ζ = 1.1, γ = −0.1, and a regularizer λ·Σ(1 − |2h − 1|^β), β annealed
from 20 to 2 after a warm-up, pushes every h to 0 or 1. BRECQ (Li et al., 2021) optimizes all the Linears of
one transformer block together against the block's full-precision output. The result is a `RoundedWeight`
per Linear (integer codes + quanto's scales), stored exactly as GPTQ's is.

Design (docs/rounding.md, "Block reconstruction"):
- Units: each block (the adapter's `blocks`) that holds target Linears (inputs: hidden_states plus the timestep and
  conditioning its adaLN embedder reads); a target Linear outside the blocks (the final layer) is its own unit
  (layer-wise AdaRound on its full-precision input).
- Data: one run of the latent sampler caches a seeded random subset of `samples` (timestep, sample) rows of the
  first block's inputs and of each outside Linear's input (bounded memory). Blocks are processed in order;
  block k learns from the QUANTIZED chain's input (the reconstructed blocks 0..k−1 with their hard rounding and
  activation quantization) against the FULL-PRECISION chain's output (BRECQ's asymmetric setting).
- Activations: each Linear's input is fake-quantized with its static per-tensor int8 scale (straight-through
  gradient) while learning, as it will be at inference; attention matmuls stay float while learning.
- Init: from round-to-nearest (AdaRound's: h(V₀) = the fractional part, so the soft weight starts at the float
  weight), or from given codes (e.g. GPTQ's).

Pure pieces (`rectified_sigmoid`, `rounding_regularizer`, `beta_at`, `LearnedRounding`) are tensors in,
tensors out; `reconstruct_unit` runs one optimization; `reconstruct_weights` drives a transformer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffusers_ptq.attention import paused_observation
from diffusers_ptq.groupbias import CONTEXT_ATTRIBUTE, attach_group_biases
from diffusers_ptq.kernels import fake_quantize_symmetric
from diffusers_ptq.models import adapter_for
from diffusers_ptq.observe import Observer
from diffusers_ptq.rounding import RoundedWeight, _column_groups, _per_group, _rounded, broadcast_rounded, quant_grid

__all__ = ["rectified_sigmoid", "rounding_regularizer", "beta_at", "LearnedRounding", "CachedInputs",
           "cache_inputs", "reconstruct_unit", "reconstruct_weights"]

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid


# --------------------------------------------------------------------------------------------- the math

def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1): reaches 0 and 1 exactly for finite V."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """V with h(V) = h (h clamped into (0, 1) so that V stays finite)."""
    p = (h.clamp(eps, 1 - eps) - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1 - p))


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ (1 − |2h − 1|^β): zero when every h is 0 or 1; a large β only penalizes h near 0.5."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def beta_at(iteration: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """AdaRound's annealing: None (no regularizer) during the first `warmup` fraction, then β decays linearly
    from `start` to `end`."""
    first = int(warmup * iters)
    if iteration < first:
        return None
    return end + (start - end) * max(0.0, 1 - (iteration - first) / max(1, iters - first))


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """`fake_quantize_symmetric` forward, identity gradient (straight-through)."""
    return x + (fake_quantize_symmetric(x, scale, bits) - x).detach()


class LearnedRounding(nn.Module):
    """A Linear whose weight is rounded down or up on quanto's grid by a learned V (the only parameter).

    `soft` (training): weight = scale·clamp(⌊x⌋ + h(V), qmin, qmax) − shift. Otherwise the hard codes
    ⌊x⌋ + [h(V) ≥ 0.5], exactly `rounded().weight`. x = w/scale (8-bit) or (w + shift)/scale (4-bit).
    `init`: None = round-to-nearest (h(V₀) = frac(x)), or a RoundedWeight whose codes the hard rounding starts
    from (the floor is moved so that each given code is one of the two choices; h(V₀) = 0.25 or 0.75).
    The input is fake-quantized with `input_scale` (None: float input), straight-through.
    """

    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None = None,
                 input_scale: torch.Tensor | float | None = None, init: RoundedWeight | None = None,
                 zero_point: str = "float"):
        super().__init__()
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        self.bits, self.group_size = bits, group_size
        self.bias = None if linear.bias is None else linear.bias.detach()
        scale, shift = quant_grid(weight, bits, group_size, zero_point)
        self.scale, self.shift = scale, shift  # quanto layout, for `rounded()`
        cols = _column_groups(in_features, group_size, weight.device)
        s = _per_group(scale, out_features)[:, cols]
        z = None if shift is None else _per_group(shift, out_features)[:, cols]
        self.qmin, self.qmax = (-128, 127) if bits == 8 else (0, 15)
        dead = s == 0
        safe = torch.where(dead, torch.ones_like(s), s)
        x = weight / safe if z is None else (weight + z) / safe
        floor = torch.floor(x)
        if init is None:
            h0 = x - floor
        else:
            codes = init.data.to(torch.float32)
            floor = torch.clamp(floor, codes - 1, codes)  # the given code is floor or floor + 1
            h0 = torch.where(codes > floor, 0.75, 0.25)
        self.register_buffer("floor", torch.where(dead, torch.zeros_like(floor), floor))
        self.register_buffer("dead", dead)
        self.register_buffer("s", s)
        self.register_buffer("z", z if z is not None else torch.zeros(0))
        self.v = nn.Parameter(inverse_rectified_sigmoid(h0))
        self.input_scale = None if input_scale is None else torch.as_tensor(input_scale, dtype=torch.float32)
        self.soft = True

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def codes(self) -> torch.Tensor:
        """Hard integer codes (float tensor) [out, in]; 0 where the grid's scale is 0 (as round-to-nearest)."""
        q = torch.clamp(self.floor + (self.h() >= 0.5).to(self.floor.dtype), self.qmin, self.qmax)
        return torch.where(self.dead, torch.zeros_like(q), q).detach()

    def soft_weight(self) -> torch.Tensor:
        q = torch.clamp(self.floor + self.h(), self.qmin, self.qmax)
        w = self.s * q
        return w if self.bits == 8 else w - self.z

    def rounded(self) -> RoundedWeight:
        return _rounded(self.codes(), self.scale, self.shift, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = fake_quantize_ste(x, self.input_scale.to(x), 8)
        weight = self.soft_weight() if self.soft else self.rounded().weight
        return F.linear(x, weight.to(x.dtype), self.bias)


# --------------------------------------------------------------------------------------------- the data

@dataclass
class CachedInputs:
    """Rows of one unit's inputs: per-row tensors (first dim = row), the constant keyword arguments, and the
    timestep of each row (for group-bias layers). Linear units keep their input under "input"."""

    rows: dict[str, torch.Tensor]
    static: dict = field(default_factory=dict)
    timesteps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))

    def take(self, index: torch.Tensor) -> CachedInputs:
        return CachedInputs({k: v[index] for k, v in self.rows.items()}, self.static,
                            None if self.timesteps is None else self.timesteps[index])

    def with_rows(self, **rows: torch.Tensor) -> CachedInputs:
        return CachedInputs({**self.rows, **rows}, self.static, self.timesteps)


class _InputCache:
    """Observer subscriber (observe.py) that keeps the chosen rows (step, conditional/unconditional sample) of each
    unit's input."""

    def __init__(self, transformer: nn.Module, units: dict[str, nn.Module], chosen: torch.Tensor, num_samples: int,
                 cfg: bool):
        self.transformer, self.units = transformer, units
        self.chosen, self.num_samples, self.cfg = chosen, num_samples, cfg
        self.per_step = num_samples * (2 if cfg else 1)
        self.parts: dict[str, list] = {name: [] for name in units}
        self.static: dict[str, dict] = {}
        self._position = (0, 0, 0)
        self._timestep: torch.Tensor | None = None
        self.modules = units

    def set_position(self, step_index: int, batch_start: int, batch_len: int) -> None:
        self._position = (step_index, batch_start, batch_len)

    def _row_ids(self, batch: int) -> torch.Tensor:
        step, start, n = self._position
        i = torch.arange(batch)
        sample = torch.where(i < n, start + i, self.num_samples + start + i - n)
        return step * self.per_step + sample

    def on_call(self, timestep, args, kwargs) -> None:
        self._timestep = timestep

    def on_input(self, name: str, module, args, kwargs) -> None:
        if isinstance(module, nn.Linear):
            tensors, static = {"input": args[0]}, {}
        else:
            if len(args) > 1:
                raise ValueError(f"{name}: only the hidden states may be passed positionally")
            named = dict(kwargs, **({"hidden_states": args[0]} if args else {}))
            batch = named["hidden_states"].shape[0]
            tensors = {k: v for k, v in named.items() if torch.is_tensor(v) and v.ndim and v.shape[0] == batch}
            static = {k: v for k, v in named.items() if k not in tensors}
        batch = next(iter(tensors.values())).shape[0]
        ids = self._row_ids(batch)
        keep = torch.isin(ids, self.chosen)
        if keep.any():
            where = keep.nonzero().reshape(-1)
            t = self._timestep.reshape(-1).expand(batch) if self._timestep is not None else None
            self.parts[name].append((ids[where], {k: v.detach()[where.to(v.device)].cpu() for k, v in tensors.items()},
                                     None if t is None else t[where.to(t.device)].cpu()))
            self.static.setdefault(name, static)

    def result(self) -> dict[str, CachedInputs]:
        out = {}
        for name, parts in self.parts.items():
            ids = torch.cat([p[0] for p in parts])
            order = torch.argsort(ids)  # independent of the batch size
            rows = {k: torch.cat([p[1][k] for p in parts])[order] for k in parts[0][1]}
            times = None if parts[0][2] is None else torch.cat([p[2] for p in parts])[order]
            out[name] = CachedInputs(rows, self.static.get(name, {}), times)
        return out


@torch.no_grad()
def cache_inputs(transformer: nn.Module, units: dict[str, nn.Module], *, samples: int, scheduler: str | None = None,
                 scheduler_config: dict | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, num_samples: int = 32,
                 class_labels: Sequence[int] | None = None, id2label: dict | None = None,
                 context: dict | None = None, seed: int = 0, batch_size: int = 16,
                 progress: bool = True) -> dict[str, CachedInputs]:
    """Run the latent sampler once and keep the inputs of `units` ({name: module}: blocks or Linears) for a seeded
    random subset of `samples` of its (step, sample) rows (every row of the CFG-doubled batch is one). Settings as
    calibration.calibrate."""
    from diffusers_ptq.sampling import prepare_sampling, sample_latents

    run = prepare_sampling(transformer, scheduler=scheduler, scheduler_config=scheduler_config,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           num_samples=num_samples, conditions=class_labels,
                           context={"id2label": id2label, **(context or {})})
    total = len(run.scheduler.timesteps) * len(run.conditions) * (2 if run.cfg else 1)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=gen)[:samples]
    cache = _InputCache(transformer, units, chosen, len(run.conditions), run.cfg)
    with Observer(transformer, [cache]) as observer:
        sample_latents(transformer, run.scheduler, run.conditions, adapter=run.adapter, seed=seed,
                       num_inference_steps=run.num_inference_steps, guidance_scale=run.guidance_scale,
                       batch_size=batch_size, before_forward=observer.set_position, progress=progress,
                       context=run.context)
    return cache.result()


# --------------------------------------------------------------------------------------------- optimization

LINEAR_OUTPUT = ("output",)


def _call(module: nn.Module, inputs: CachedInputs, context, outputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The unit's outputs by name: a Linear's or a block's single tensor is `outputs[0]`; a block returning a tuple
    (MM-DiT: (encoder_hidden_states, hidden_states), `ModelAdapter.block_outputs`) names each entry (None entries,
    e.g. SD3's last block's context, are left out)."""
    if context is not None and inputs.timesteps is not None:
        context.timestep = inputs.timesteps.reshape(-1)
    out = module(inputs.rows["input"]) if "input" in inputs.rows else module(**inputs.rows, **inputs.static)
    if torch.is_tensor(out):
        return {outputs[0]: out}
    return {name: value for name, value in zip(outputs, out, strict=True) if value is not None}


@torch.no_grad()
def run_unit(module: nn.Module, inputs: CachedInputs, batch_size: int, context=None,
             outputs: tuple[str, ...] = LINEAR_OUTPUT) -> dict[str, torch.Tensor]:
    """The unit's outputs on every cached row, in batches (no gradients)."""
    parts = [_call(module, inputs.take(torch.arange(i, min(i + batch_size, len(inputs)))), context, outputs)
             for i in range(0, len(inputs), batch_size)]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def reconstruct_unit(root: nn.Module, unit: str, linears: dict[str, RoundedWeight | None], inputs: CachedInputs,
                     target: dict[str, torch.Tensor], *, bits: int, group_size: int | None, input_scales: dict,
                     iters: int = 500, lr: float = 1e-2, batch_size: int = 32, lam: float = 0.01,
                     warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0), seed: int = 0,
                     context=None, outputs: tuple[str, ...] = LINEAR_OUTPUT, progress: bool = True,
                     zero_point: str = "float") -> tuple[dict[str, RoundedWeight], dict[str, torch.Tensor]]:
    """Learn the rounding of `linears` (names under `root`; values: initial codes or None for nearest) inside
    the submodule `unit` of `root`, so that unit(inputs) matches `target` ({output name: rows}, as run_unit).

    Loss: mean over rows and tokens of the squared error summed over channels (summed over the unit's outputs: both
    streams of an MM-DiT block), plus λ·Σ(1 − |2h − 1|^β) after the warm-up (β from beta[0] to beta[1]); Adam on V,
    minibatches of `batch_size` rows drawn with `seed`. Returns ({name: RoundedWeight}, the unit's outputs with the
    hard rounding on every row). The float Linears are put back afterwards (weights untouched).
    """
    from tqdm.auto import tqdm

    originals = {name: root.get_submodule(name) for name in linears}
    learned = {name: LearnedRounding(lin, bits, group_size, input_scales.get(name), linears[name], zero_point)
               for name, lin in originals.items()}
    flags = {p: p.requires_grad for p in root.get_submodule(unit).parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        for name, module in learned.items():
            attach_group_biases(module, list(getattr(originals[name], "group_biases", None) or []))
            root.set_submodule(name, module)
        module = root.get_submodule(unit)
        params = [m.v for m in learned.values()]
        optimizer = torch.optim.Adam(params, lr=lr, foreach=True)  # fewer small ops per step
        gen = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for it in tqdm(range(iters), desc=f"reconstruct {unit}", disable=not progress, leave=False):
                index = torch.randint(0, len(inputs), (min(batch_size, len(inputs)),), generator=gen)
                out = _call(module, inputs.take(index), context, outputs)
                loss = sum((out[k] - target[k][index]).pow(2).sum(-1).mean() for k in out)
                b = beta_at(it, iters, warmup, *beta)
                if b is not None:
                    loss = loss + lam * sum(rounding_regularizer(m.h(), b) for m in learned.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        for m in learned.values():
            m.soft = False
        output = run_unit(module, inputs, batch_size, context, outputs)
        return {name: m.rounded() for name, m in learned.items()}, output
    finally:
        for name, lin in originals.items():
            root.set_submodule(name, lin)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def reconstruct_weights(transformer: nn.Module, linears: dict[str, nn.Linear], input_scales: dict, *, bits: int,
                        group_size: int | None, iters: int = 500, lr: float = 1e-2, batch: int = 32,
                        samples: int = 256, calibration, scheduler_config: dict | None = None,
                        context: dict | None = None, init: dict[str, RoundedWeight] | None = None,
                        progress: bool = True, zero_point: str = "float") -> dict[str, RoundedWeight]:
    """BRECQ-style reconstruction of every Linear in `linears` ({name: float Linear}, already smoothed): `bits`,
    `group_size`, `iters` Adam steps per unit at learning rate `lr` on minibatches of `batch` rows out of
    `samples` cached rows of one run of the calibration sampler (`calibration`: scheme.CalibrationSettings; its
    seed seeds everything), on the 4-bit grid of `zero_point` (rounding.quant_grid). `input_scales`: {name: static
    int8 scale or None}. `init`: optional starting codes per name (default round-to-nearest). Returns {name: RoundedWeight} for `modules.quantize_linear`.
    Under a distributed launch every process runs the same (unsharded) reconstruction and the main process's
    result is broadcast, so all processes hold the same codes even where GPU training steps are not bit-reproducible.
    """
    from tqdm.auto import tqdm

    adapter = adapter_for(transformer)
    block_names = adapter.blocks(transformer)
    blocks = [transformer.get_submodule(name) for name in block_names]
    in_block = {name: next((b for b in block_names if name.startswith(b + ".")), None) for name in linears}
    outside = [name for name, b in in_block.items() if b is None]
    units = ({block_names[0]: blocks[0]} if len(blocks) and any(b is not None for b in in_block.values()) else {})
    units.update({name: linears[name] for name in outside})
    timestep_context = getattr(transformer, CONTEXT_ATTRIBUTE, None)
    seed = calibration.seed
    common = dict(bits=bits, group_size=group_size, input_scales=input_scales, zero_point=zero_point,
                  iters=iters, lr=lr, batch_size=batch, context=timestep_context, progress=progress)
    init = init or {}
    result: dict[str, RoundedWeight] = {}
    with paused_observation(transformer):  # reconstruction's forwards must not widen the attention ranges
        cached = cache_inputs(transformer, units, samples=samples, scheduler=calibration.scheduler,
                              scheduler_config=scheduler_config, num_inference_steps=calibration.num_inference_steps,
                              guidance_scale=calibration.guidance_scale, num_samples=calibration.num_samples,
                              context=context, seed=seed, batch_size=calibration.batch_size, progress=progress)
        if block_names and block_names[0] in cached:
            fp_in = q_in = cached[block_names[0]]
            for i, name in enumerate(tqdm(block_names, desc="block reconstruction", disable=not progress)):
                block = transformer.get_submodule(name)
                fp_out = run_unit(block, fp_in, batch, timestep_context, adapter.block_outputs)
                names = [n for n, b in in_block.items() if b == name]
                if names:
                    rounded, q_out = reconstruct_unit(transformer, name, {n: init.get(n) for n in names}, q_in, fp_out,
                                                      seed=seed + i, outputs=adapter.block_outputs, **common)
                    result.update(rounded)
                else:
                    q_out = run_unit(block, q_in, batch, timestep_context, adapter.block_outputs)
                fp_in, q_in = fp_in.with_rows(**fp_out), q_in.with_rows(**q_out)  # the next block's inputs
        for j, name in enumerate(outside):
            inputs = cached[name]
            target = run_unit(linears[name], inputs, batch, timestep_context)
            rounded, _ = reconstruct_unit(transformer, name, {name: init.get(name)}, inputs, target,
                                          seed=seed + len(block_names) + j, **common)
            result.update(rounded)
    return {name: broadcast_rounded(rounded, src=0) for name, rounded in result.items()}
