"""Calibration statistics: forward pre-hooks on the transformer's Linear layers while sampling in latent space.

For every recorded Linear and every sampling step t, over tokens and samples, per input channel:
`max`, `min` and `absmax` ([T, C] each); optionally the per-sample absmax rows ([T, S, C]), where the S rows
are the conditional samples 0..N-1 followed, with classifier-free guidance, by their unconditional twins.
Statistics are small (T × C floats per layer); raw activations are never kept.

Under `accelerate launch` / `torchrun` every process calibrates its shard of the samples and the statistics are
reduced across processes before `calibrate` returns (distributed.py, docs/distributed.md).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from diffusers_ptq.distributed import process_info, reduce_layer_stats, shard
from diffusers_ptq.observe import Observer
from diffusers_ptq.sampling import prepare_sampling, sample_latents


@dataclass
class LayerStats:
    """Per-timestep, per-input-channel statistics of one Linear layer's input."""

    max: torch.Tensor  # [T, C]
    min: torch.Tensor  # [T, C]
    absmax: torch.Tensor  # [T, C]
    sample_absmax: torch.Tensor | None = None  # [T, S, C]
    token_samples: torch.Tensor | None = None  # [M, C]: randomly sampled input rows (tokens) over all steps

    def columns(self, start: int, stop: int) -> LayerStats:
        """The statistics of input channels start..stop-1."""
        return LayerStats(*(None if v is None else v[..., start:stop] for v in (
            self.max, self.min, self.absmax, self.sample_absmax, self.token_samples)))

    def divided(self, s: torch.Tensor) -> LayerStats:
        """The statistics of the input divided by s > 0 per channel (what a smoothed layer sees)."""
        return LayerStats(*(None if v is None else v / s for v in (self.max, self.min, self.absmax,
                                                                   self.sample_absmax, self.token_samples)))


@dataclass
class CalibrationStats:
    timesteps: torch.Tensor  # [T] timestep values in sampling order (first = noisiest)
    class_labels: list[int]
    layers: dict[str, LayerStats] = field(default_factory=dict)
    guidance_scale: float = 1.5
    seed: int = 0
    scheduler: str = "ddim"
    num_samples: int = 0  # the calibration set's samples (every process's)
    cfg: bool = False  # each call's batch held the unconditional rows too


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_linears(model: nn.Module, include: Sequence[str] | None = None,
                   exclude: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """Linear submodules by qualified name, filtered by fnmatch patterns (include None = all)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (include is None or _matches(name, include)) and not _matches(name, exclude)
    }


class StatsRecorder:
    """Observer subscriber (observe.py) that reduces each Linear's input into per-timestep, per-channel statistics.

    The sampler tells it where it is with `set_position(step_index, batch_start, batch_len)`; the rows of a
    forward batch are [cond samples, uncond samples] when `cfg` is true.
    """

    def __init__(self, layers: dict[str, nn.Linear], num_steps: int, num_samples: int, cfg: bool,
                 sample_rows: bool | Sequence[str] = False, tokens_per_call: int = 0, seed: int = 0):
        self.layers = layers
        self.num_steps, self.num_samples, self.cfg = num_steps, num_samples, cfg
        self.sample_rows = sample_rows
        self.tokens_per_call = tokens_per_call
        self._token_generator = torch.Generator().manual_seed(seed)
        self._tokens: dict[str, list[torch.Tensor]] = {}
        self.stats: dict[str, LayerStats] = {}
        self.modules = layers
        self._position = (0, 0, 0)

    def _wants_rows(self, name: str) -> bool:
        if isinstance(self.sample_rows, bool):
            return self.sample_rows
        return _matches(name, self.sample_rows)

    def set_position(self, step_index: int, batch_start: int, batch_len: int) -> None:
        self._position = (step_index, batch_start, batch_len)

    def empty_stats(self, name: str) -> LayerStats:
        """Statistics of a layer that saw no input here (another process's shard did): −inf, +inf, zeros."""
        return self._init_stats(name, self.layers[name].in_features, torch.device("cpu"), torch.float32)

    def _init_stats(self, name: str, channels: int, device, dtype) -> LayerStats:
        shape = (self.num_steps, channels)
        rows_count = self.num_samples * (2 if self.cfg else 1)
        return LayerStats(
            max=torch.full(shape, -torch.inf, device=device, dtype=dtype),
            min=torch.full(shape, torch.inf, device=device, dtype=dtype),
            absmax=torch.zeros(shape, device=device, dtype=dtype),
            sample_absmax=torch.zeros((self.num_steps, rows_count, channels), device=device, dtype=dtype)
            if self._wants_rows(name) else None,
        )

    def on_input(self, name: str, _module, args, kwargs) -> None:
        x = args[0].detach()
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).float()  # [B, tokens, C]
        stats = self.stats.get(name)
        if stats is None:
            stats = self.stats[name] = self._init_stats(name, flat.shape[-1], flat.device, torch.float32)
        t, start, n = self._position
        torch.maximum(stats.max[t], flat.amax(dim=(0, 1)), out=stats.max[t])
        torch.minimum(stats.min[t], flat.amin(dim=(0, 1)), out=stats.min[t])
        per_sample = flat.abs().amax(dim=1)  # [B, C]
        torch.maximum(stats.absmax[t], per_sample.amax(dim=0), out=stats.absmax[t])
        if stats.sample_absmax is not None:
            stats.sample_absmax[t, start : start + n] = per_sample[:n]
            if self.cfg:
                offset = self.num_samples + start
                stats.sample_absmax[t, offset : offset + n] = per_sample[n : 2 * n]
        if self.tokens_per_call:
            rows = flat.reshape(-1, flat.shape[-1])
            pick = torch.randint(0, len(rows), (self.tokens_per_call,), generator=self._token_generator)
            self._tokens.setdefault(name, []).append(rows[pick.to(rows.device)].cpu())

    def finish(self) -> dict[str, LayerStats]:
        """The statistics on the CPU, token samples concatenated."""
        out = {}
        for name, s in self.stats.items():
            tokens = torch.cat(self._tokens[name]) if name in self._tokens else None
            out[name] = LayerStats(s.max.cpu(), s.min.cpu(), s.absmax.cpu(),
                                   None if s.sample_absmax is None else s.sample_absmax.cpu(), tokens)
        return out


def observe_layers(model: nn.Module, layers: dict[str, nn.Linear], drive: Callable[[Observer], None], *,
                   num_steps: int, num_samples: int, cfg: bool, sample_rows: bool | Sequence[str] = False,
                   tokens_per_call: int = 0, seed: int = 0, distributed: bool = True, subscribers: Sequence = (),
                   call_hook: bool = False) -> dict[str, LayerStats]:
    """The statistics of `layers`' inputs over the forwards `drive(observer)` runs (a sampler, or the replay of one
    block's cached inputs: sequential.py), which tells the observer where it is (`set_position`). One Observer hook
    set for the statistics and `subscribers`; `call_hook`: also the model-level hook (the timestep of each call).
    Under a distributed launch the statistics, and the ranges of the quantized attention observing under `model`,
    are reduced across processes (see `calibrate`)."""
    rank, world = process_info() if distributed else (0, 1)
    recorder = StatsRecorder(layers, num_steps, num_samples, cfg=cfg, sample_rows=sample_rows,
                             tokens_per_call=tokens_per_call, seed=seed + 7919 * rank)
    with Observer(model if call_hook else None, [recorder, *subscribers]) as observer:
        drive(observer)
    recorded = recorder.finish()
    if world > 1:
        recorded = reduce_layer_stats(recorded, list(layers), recorder.empty_stats)
        from diffusers_ptq.attention import QuantAttnProcessor

        for module in model.modules():  # quantized attention observing this run: its absmax too (MAX)
            processor = getattr(module, "processor", None)
            if isinstance(processor, QuantAttnProcessor) and processor.observing:
                processor.reduce()
    return recorded


def calibrate(
    transformer,
    *,
    scheduler: str | None = None,
    scheduler_config: dict | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    num_samples: int = 32,
    class_labels: Sequence[int] | None = None,
    id2label: dict | None = None,
    context: dict | None = None,
    seed: int = 0,
    batch_size: int = 16,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    sample_rows: bool | Sequence[str] = False,
    tokens_per_call: int = 0,
    progress: bool = True,
    distributed: bool = True,
    subscribers: Sequence = (),
) -> CalibrationStats:
    """Sample `num_samples` latents with the transformer alone and record its Linear inputs' statistics.

    scheduler / num_inference_steps / guidance_scale: None = the model family's pipeline defaults
    (`ModelAdapter.calibration_defaults`; DiT: "ddim", 50, 1.5). Conditions: `class_labels` if given, else the
    adapter's `calibration_conditions` from `context` (DiT: labels balanced over id2label's keys, else over every
    class the transformer embeds; text-to-image families: context["prompts"] encoded by context["encode_prompts"]).
    `include`/`exclude` are fnmatch patterns on module names (default: every Linear). `sample_rows` (bool or
    patterns) selects layers that also keep per-sample rows. `tokens_per_call` > 0 keeps that many randomly chosen
    input rows per layer and forward call (seeded), for range searches that need activation samples. `subscribers`:
    more observers of the same pass (observe.py: Hessians, the transformer's inputs, ...), on the same hook set.

    Under a distributed launch (and `distributed=True`), each process samples `distributed.shard` of the conditions
    (each sample with its global index's noise seed) and the statistics are reduced across processes before
    returning: max/absmax/rows by MAX, min by MIN (bit-exact), token samples gathered in rank order (process r > 0
    draws its picks from seed + 7919·r, so they are not the single-process picks). Every process gets the same
    result. In a single process (or `distributed=False`) nothing changes.
    """
    context = {"id2label": id2label, **(context or {})}
    run = prepare_sampling(transformer, scheduler=scheduler, scheduler_config=scheduler_config,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           num_samples=num_samples, conditions=class_labels, context=context)
    layers = select_linears(transformer, include, exclude)
    if not layers and not subscribers:
        raise ValueError(f"no Linear layer matches include={include!r} exclude={exclude!r}")
    rank, world = process_info() if distributed else (0, 1)
    conditions = run.conditions
    part = shard(len(conditions), rank, world)

    def drive(observer: Observer) -> None:
        sample_latents(transformer, run.scheduler, conditions[part.start : part.stop], adapter=run.adapter, seed=seed,
                       num_inference_steps=run.num_inference_steps, guidance_scale=run.guidance_scale,
                       batch_size=batch_size, before_forward=observer.set_position, progress=progress and rank == 0,
                       sample_offset=part.start, context=run.context)

    recorded = observe_layers(transformer, layers, drive, num_steps=len(run.scheduler.timesteps),
                              num_samples=len(conditions), cfg=run.cfg, sample_rows=sample_rows,
                              tokens_per_call=tokens_per_call, seed=seed, distributed=distributed,
                              subscribers=subscribers, call_hook=True)
    labels = conditions if all(isinstance(c, int) for c in conditions) else []
    return CalibrationStats(timesteps=run.model_timesteps, class_labels=labels, layers=recorded,
                            guidance_scale=run.guidance_scale, seed=seed, scheduler=run.kind,
                            num_samples=len(conditions), cfg=run.cfg)


class TransformerInputRecorder:
    """Observer subscriber (observe.py) that keeps `rows_per_call` evenly spaced rows of every call's batched inputs
    (hidden states, timestep, conditioning: `batched_inputs(args, kwargs) -> {name: tensor with the batch first}`,
    the adapter's `ModelAdapter.batched_inputs`), e.g. during the calibration run, and the inputs every row shares
    (`shared_inputs(args, kwargs)`, e.g. FLUX's position ids: `ModelAdapter.shared_inputs`) as `shared`, from the
    first call. Also a context manager on `transformer` by itself."""

    def __init__(self, transformer: torch.nn.Module, batched_inputs: Callable[[tuple, dict], dict],
                 rows_per_call: int = 4, shared_inputs: Callable[[tuple, dict], dict] | None = None):
        self.transformer, self.batched_inputs, self.rows_per_call = transformer, batched_inputs, rows_per_call
        self.shared_inputs = shared_inputs
        self.calls: list[dict[str, torch.Tensor]] = []
        self.shared: dict[str, torch.Tensor] = {}
        self._observer: Observer | None = None

    def __enter__(self) -> TransformerInputRecorder:
        self._observer = Observer(self.transformer, [self]).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._observer.__exit__(*exc)

    def on_call(self, _timestep, args, kwargs) -> None:
        inputs = self.batched_inputs(args, kwargs)
        n = next(iter(inputs.values())).shape[0]
        idx = torch.linspace(0, n - 1, min(n, self.rows_per_call)).round().long().unique()
        self.calls.append({k: v.detach()[idx.to(v.device)].cpu() for k, v in inputs.items()})
        if self.shared_inputs is not None and len(self.calls) == 1:
            self.shared = {k: v.detach().cpu() for k, v in self.shared_inputs(args, kwargs).items()}

    def inputs(self, max_rows: int = 64) -> dict[str, torch.Tensor]:
        """At most `max_rows` recorded rows, evenly spaced over the calls (so over the timesteps)."""
        if not self.calls:
            raise ValueError("no transformer call was recorded")
        rows = {k: torch.cat([c[k] for c in self.calls]) for k in self.calls[0]}
        total = next(iter(rows.values())).shape[0]
        idx = torch.linspace(0, total - 1, min(total, max_rows)).round().long().unique()
        return {k: v[idx] for k, v in rows.items()}
