"""`quantize_transformer(transformer, config)`: calibrate -> transform (fold) -> ranges -> group sizes -> round ->
rewrite modules. The one pipeline that the CLI, the benchmark and the diffusers quantizer all call.

The orchestrator knows stages, not methods: a config becomes a `scheme.Plan` (scheme + calibration settings +
method plug-ins, methods/base.py) and `QuantRun` runs every stage for every method of the plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from diffusers_ptq.attention import install_quant_attention, paused_observation
from diffusers_ptq.calibration import (
    CalibrationStats,
    LayerStats,
    TransformerInputRecorder,
    calibrate,
    observe_layers,
    select_linears,
)
from diffusers_ptq.groupbias import CONTEXT_ATTRIBUTE, move_group_biases
from diffusers_ptq.memory import return_freed_memory
from diffusers_ptq.methods import Observations, baselines
from diffusers_ptq.models import ModelAdapter, adapter_for
from diffusers_ptq.modules import fuse_feedforwards, quantize_linear
from diffusers_ptq.rounding import HessianRecorder, RoundedWeight, nearest_round
from diffusers_ptq.scheme import Plan, QuantScheme
from diffusers_ptq.sequential import BlockInputRecorder, BlockInputs, onload, replay
from diffusers_ptq.serialization import identical_copies, tie_copies


@dataclass
class QuantizationReport:
    config: dict
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {"input_scale": float | None, ...}
    smoothed_targets: list[str] = field(default_factory=list)
    timestep_groups: dict[str, list[int]] = field(default_factory=dict)  # HTG: first step of each group, per target
    group_sizes: dict[str, int | None] = field(default_factory=dict)  # 4-bit: each layer's group size (None: channel)
    group_search: dict | None = None  # Q-DiT's search: choice, bits per weight, proxy errors (methods/qdit.py)
    embedders: list[str] = field(default_factory=list)  # embedder_bits: the embedder modules stored as 8-bit
    search_seconds: float = 0.0
    calibration_seconds: float = 0.0
    rounding_seconds: float = 0.0
    total_seconds: float = 0.0
    # block-sequential calibration: the sampling run that records the first block's inputs, and per block the
    # seconds spent observing it (its replays, recalibration included), quantizing it (transform, rounding, packing)
    # and replaying it into the next block's inputs, with the number of recorded calls it replayed
    first_run_seconds: float = 0.0
    block_seconds: dict[str, dict[str, float]] = field(default_factory=dict)


def activation_range(stats: LayerStats, scheme: QuantScheme) -> torch.Tensor:
    """The clipping range of one layer's input under the scheme's activation range method."""
    if scheme.act_range == "minmax":
        return baselines.minmax_range(stats.absmax)
    if stats.token_samples is None:
        raise ValueError(f"act_range={scheme.act_range!r} needs token samples: calibrate with tokens_per_call > 0")
    if scheme.act_range == "percentile":
        return baselines.percentile_range(stats.token_samples, scheme.percentile)
    return baselines.mse_range(stats.token_samples, bits=scheme.act_bits)


@dataclass
class QuantRun:
    """The state of one quantization run that the stages share: the model, its adapter, the plan, what calibration
    observed (statistics per quantized Linear, Hessians, recorded transformer inputs, attention ranges) and what
    the stages decided (input scales, group sizes, rounded weights)."""

    transformer: nn.Module
    adapter: ModelAdapter
    plan: Plan
    report: QuantizationReport
    targets: dict[str, nn.Linear]
    observations: Observations
    context: dict = field(default_factory=dict)  # calibration context: id2label, prompts' encoder, resolution, ...
    scheduler_config: dict | None = None
    progress: bool = True
    layers: dict[str, LayerStats] = field(default_factory=dict)
    timesteps: torch.Tensor | None = None
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    transformer_inputs: dict[str, torch.Tensor] | None = None  # recorded rows of the forward's batched inputs
    shared_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # and the inputs all rows share
    attention: dict = field(default_factory=dict)
    input_scales: dict[str, torch.Tensor | None] = field(default_factory=dict)
    group_sizes: dict[str, int | None] = field(default_factory=dict)
    rounded: dict[str, RoundedWeight] = field(default_factory=dict)
    shape: tuple[int, int, bool] = (0, 0, False)  # the calibration run's steps, samples, CFG-doubled batches

    def needs_ranges_or_hessians(self) -> bool:
        """Whether what calibration measured must describe the final inputs (a transform that changes them
        calibrates again)."""
        return self.plan.scheme.static_activations or self.observations.hessians

    def unit(self, targets: dict[str, nn.Linear], cls: type[QuantRun] | None = None, **fields) -> QuantRun:
        """A run over some of this run's Linears (block-sequential calibration: one block, the Linears outside the
        blocks), sharing the model, the plan and the report, with state of its own (`fields`: attention processors,
        none by default; ...)."""
        fields = {"timesteps": self.timesteps, "shape": self.shape, "attention": {}, **fields}
        return (cls or QuantRun)(self.transformer, self.adapter, self.plan, self.report, targets, self.observations,
                                 context=self.context, scheduler_config=self.scheduler_config, progress=self.progress,
                                 **fields)

    def calibrate(self, more_stats: dict[str, nn.Linear] | None = None, subscribers: tuple = ()) -> None:
        """One calibration run recording everything the plan observes: per-layer statistics (of `more_stats` too),
        Hessians (replacing earlier ones), the transformer's inputs (first run only), the attention ranges;
        `subscribers`: more observers of the same run (observe.py)."""
        t0 = time.time()
        obs, cal = self.observations, self.plan.calibration
        inputs = TransformerInputRecorder(self.transformer, self.adapter.batched_inputs,
                                          shared_inputs=self.adapter.shared_inputs) \
            if obs.transformer_inputs and self.transformer_inputs is None else None
        recorder = HessianRecorder(self.targets if obs.hessians else {})
        result = calibrate(
            self.transformer, scheduler=cal.scheduler, scheduler_config=self.scheduler_config,
            num_inference_steps=cal.num_inference_steps, guidance_scale=cal.guidance_scale,
            num_samples=cal.num_samples, context=self.context, seed=cal.seed, batch_size=cal.batch_size,
            include=[*self.targets, *(more_stats or {})], sample_rows=self.sample_rows(),
            tokens_per_call=cal.tokens_per_call if self.plan.scheme.token_samples else 0, progress=self.progress,
            subscribers=[recorder, inputs, *subscribers])
        self.hessians.update(recorder.hessians())
        if inputs is not None:
            self.transformer_inputs, self.shared_inputs = inputs.inputs(), inputs.shared
        self.layers, self.timesteps = dict(result.layers), result.timesteps
        self.shape = (len(result.timesteps), result.num_samples, result.cfg)
        self.report.calibration_seconds += time.time() - t0

    def sample_rows(self) -> list[str]:
        """The layers that keep per-sample rows: the first consumer of each smoothing target (when observed)."""
        if not self.observations.sample_rows:
            return []
        return [t.consumers[0] for t in self.adapter.smoothing_targets(self.transformer)]

    def recalibrate(self) -> None:
        """Calibrate again from scratch (after a transform changed the inputs): attention ranges too."""
        for processor in self.attention.values():
            processor.absmax.clear()
        self.calibrate()

    def choose_input_scales(self) -> None:
        scheme = self.plan.scheme
        for name in self.targets:
            if not scheme.static_activations:  # weight-only, or dynamic per-token scales computed at run time
                self.input_scales[name] = None
            else:
                clip = activation_range(self.layers[name], scheme)
                self.input_scales[name] = baselines.scale_from_range(clip.clamp(min=1e-8), scheme.act_bits)
            scale = self.input_scales[name]
            self.report.layers[name] = {"input_scale": None if scale is None else float(scale)}


@dataclass
class BlockRun(QuantRun):
    """The run of one block in block-sequential calibration: its calibration replays the block on its cached inputs
    (sequential.replay; the calls and batches of the sampler, positions and timesteps included) instead of sampling
    with the whole model. `float_outputs`: filled with the unfolded float block's outputs by the first replay
    (sequential_inputs="float")."""

    block: str = ""
    inputs: BlockInputs | None = None
    float_outputs: BlockInputs | None = None

    def calibrate(self) -> None:  # the methods' own calls (recalibrate) take no arguments
        t0 = time.time()
        cal, module = self.plan.calibration, self.transformer.get_submodule(self.block)
        recorder = HessianRecorder(self.targets if self.observations.hessians else {})
        into = self.float_outputs if self.float_outputs is not None and not len(self.float_outputs) else None
        context = getattr(self.transformer, CONTEXT_ATTRIBUTE, None)

        def drive(observer) -> None:
            replay(module, self.inputs, self.adapter.block_outputs, observer=observer, timestep_context=context,
                   into=into)

        steps, samples, cfg = self.shape
        self.layers = observe_layers(
            module, self.targets, drive, num_steps=steps, num_samples=samples, cfg=cfg, sample_rows=self.sample_rows(),
            tokens_per_call=cal.tokens_per_call if self.plan.scheme.token_samples else 0, seed=cal.seed,
            subscribers=[recorder])
        self.hessians.update(recorder.hessians())
        self.report.calibration_seconds += time.time() - t0


class _FoldOnly(QuantRun):
    """The transform stage of the smoothing targets whose consumers sit in several blocks (PixArt's caption
    projection feeding every cross-attention), from the first run's statistics; the blocks observe the folded
    inputs when they are replayed, so nothing is measured again here."""

    def recalibrate(self) -> None:
        pass


def rewrite_linears(transformer: nn.Module, config: QuantScheme, input_scales: dict[str, torch.Tensor | None],
                    rounded: dict[str, RoundedWeight] | None = None,
                    group_sizes: dict[str, int | None] | None = None, release: bool = False) -> None:
    """Replace each named Linear by a frozen QuantLinear (the only place modules are swapped); `rounded` holds the
    weights that a rounding method rounded, the others are rounded to nearest (on the scheme's 4-bit grid,
    `weight_zero_point`). `group_sizes`: each 4-bit layer's group size (default: `layer_group_sizes(transformer,
    config, input_scales)`).

    release: as soon as a layer's packed form exists, drop its float weight (the replaced Linear keeps `weight =
    None`: any other reference to it sees an empty layer) and its `rounded` entry, so that packing needs one layer's
    extra memory, not the whole model's (the engine's own call; issue #22)."""
    if group_sizes is None:
        group_sizes = layer_group_sizes(transformer, config, list(input_scales))
    for name, scale in input_scales.items():
        linear = transformer.get_submodule(name)
        weight = (rounded or {}).get(name)
        if weight is None and config.weight_bits == 4 and config.weight_zero_point != "float":  # not quanto's grid
            weight = nearest_round(linear.weight.detach(), 4, group_sizes.get(name), config.weight_zero_point)
        quantized = quantize_linear(linear, config.weight_bits, scale, group_sizes.get(name),
                                    rounded=weight, act_dynamic=config.act_dynamic)
        move_group_biases(linear, quantized)
        transformer.set_submodule(name, quantized)
        if release:
            linear.weight = None
            if rounded is not None:
                rounded.pop(name, None)
            return_freed_memory()


def quantize_embedders(transformer: nn.Module, patterns: tuple[str, ...], bits: int = 8) -> list[str]:
    """Store the float Linears and embedding tables inside the modules matching `patterns` (the adapter's
    `embedders`) as 8-bit weights: weight-only per-output-channel int8 QuantLinear, int8-per-row QuantEmbedding.
    A module reachable under several names (tied copies) is replaced once, in place, so the copies stay one.
    Returns the names replaced."""
    from fnmatch import fnmatchcase

    from diffusers_ptq.modules import QuantEmbedding

    if bits != 8:
        raise ValueError(f"embedder_bits must be 8 or None, got {bits!r}")
    roots = [name for name, _ in transformer.named_modules() if any(fnmatchcase(name, p) for p in patterns)]
    done = []
    for name, module in list(transformer.named_modules()):  # each module object once (tied copies: one name)
        if not any(name == r or name.startswith(r + ".") for r in roots):
            continue
        if type(module) is nn.Linear:
            transformer.set_submodule(name, quantize_linear(module, bits, None))
        elif type(module) is nn.Embedding:
            transformer.set_submodule(name, QuantEmbedding.from_embedding(module))
        else:
            continue
        done.append(name)
    return done


def layer_group_sizes(transformer: nn.Module, config: QuantScheme, names: list[str]) -> dict[str, int | None]:
    """The configured group size of each named Linear (`QuantScheme.group_size_for`), checked against its shape."""
    if config.weight_bits != 4:
        return {name: None for name in names}
    sizes = {}
    for name in names:
        size = config.group_size_for(name)
        in_features = transformer.get_submodule(name).in_features
        if size is not None and (size <= 0 or in_features % size):
            source = "weight_group_sizes" if config.weight_group_sizes and size != config.weight_group_size \
                else "weight_group_size"
            raise ValueError(f"{name}: group size {size} (from {source}) does not divide in_features={in_features}; "
                             f"use a divisor of {in_features} or None (per output channel) for this layer")
        sizes[name] = size
    return sizes


def quantize_unit(run: QuantRun) -> None:
    """The stages after observation, for the run's Linears: each method's transform, the input scales, the group
    sizes, the rounding, and the packing (each float weight released once packed)."""
    plan, report = run.plan, run.report
    for method in plan.methods:
        method.transform(run)
    run.choose_input_scales()
    searcher = plan.method("group_sizes")
    if searcher is not None:
        t_search = time.time()
        run.group_sizes = searcher.choose_group_sizes(run)
        report.search_seconds += time.time() - t_search
    else:
        run.group_sizes = layer_group_sizes(run.transformer, plan.scheme, list(run.targets))
    report.group_sizes.update(run.group_sizes)
    rounding = plan.method("rounding")
    unrounded = [n for n in run.targets if n not in run.rounded]
    if rounding is not None and unrounded:
        t_round = time.time()
        run.rounded.update(rounding.round(run, unrounded))
        report.rounding_seconds += time.time() - t_round
    rewrite_linears(run.transformer, plan.scheme, run.input_scales, run.rounded, run.group_sizes, release=True)
    run.hessians.clear()


SEQUENTIAL_INPUTS = ("quantized", "float")


def check_sequential(plan: Plan, stats: CalibrationStats | None) -> None:
    """A ValueError unless the plan can run block by block."""
    if stats is not None:
        raise ValueError("sequential calibration observes each block itself: do not pass precomputed stats")
    for method in plan.methods:
        if not method.per_block:
            raise ValueError(f"{method.name}: {method.per_block_reason} — not available with sequential=True "
                             "(use sequential=False)")
    if plan.calibration.sequential_inputs not in SEQUENTIAL_INPUTS:
        raise ValueError(f"sequential_inputs={plan.calibration.sequential_inputs!r} is not supported; allowed values: "
                         f"{list(SEQUENTIAL_INPUTS)}")


def onload_outside_blocks(model: nn.Module, adapter: ModelAdapter) -> None:
    """`sequential.onload` for what the blocks do not hold, and for the modules the adapter names as identical
    copies (compared before anything else)."""
    from fnmatch import fnmatchcase

    blocks = adapter.blocks(model)
    for name, module in model.named_modules():
        if any(fnmatchcase(name, p) for p in adapter.shared_copies):
            onload(module)
        elif not any(name == b or name.startswith(b + ".") for b in blocks):
            onload(module, recurse=False)


def quantize_sequential(run: QuantRun) -> None:
    """Block-sequential calibration (issue #22, llm-compressor's sequential pipeline): one sampling run of the
    model records the first block's inputs at every call (memory, or files under `sequential_cache`) and observes
    the Linears outside the blocks; then each block in turn is observed by replaying its cached calls, transformed,
    rounded and packed — so Hessians, rounded copies and observed statistics exist for one block at a time — and
    its outputs become the next block's inputs: the quantized block's (sequential_inputs="quantized": each block
    calibrates on what the quantized model feeds it) or the float block's (="float": every observation equals the
    all-in-memory run's, bit for bit, for the methods that do not calibrate again after their fold). The Linears
    outside the blocks are quantized from the first run's observations, before the blocks with float inputs and
    after them with quantized ones (so that a method observing again after its fold, HTG, sees the same model as
    the blocks do). Smoothing targets whose consumers sit in several blocks (PixArt's caption projection) are folded
    first, from one more sampling run's statistics, before the run that records the first block's inputs."""
    from tqdm.auto import tqdm

    model, adapter, cal = run.transformer, run.adapter, run.plan.calibration
    blocks = adapter.blocks(model)
    if not blocks:
        raise ValueError(f"sequential calibration: {type(model).__name__}'s adapter names no blocks")
    owner = {n: next((b for b in blocks if n.startswith(b + ".")), None) for n in run.targets}
    outside = {n: linear for n, linear in run.targets.items() if owner[n] is None}
    spanning = [c for t in adapter.smoothing_targets(model) if set(t.consumers) <= set(run.targets)
                and len({owner[c] for c in t.consumers}) > 1 for c in t.consumers]
    inputs = BlockInputs(cal.sequential_cache)
    try:
        head = run.unit(outside)
        recorder = BlockInputRecorder(blocks[0], model.get_submodule(blocks[0]), inputs)
        with paused_observation(model):  # attention ranges: from each block's replay only
            if spanning:  # folded first; the blocks' inputs are then recorded from the folded model
                for c in spanning:
                    onload(model.get_submodule(c))
                head.calibrate(more_stats={c: run.targets[c] for c in spanning})
                folds = run.unit({c: run.targets[c] for c in spanning}, cls=_FoldOnly, timesteps=head.timesteps)
                folds.layers = {c: head.layers[c] for c in spanning}
                for method in run.plan.methods:
                    method.transform(folds)
            t0 = time.time()
            head.calibrate(subscribers=(recorder,))
            run.report.first_run_seconds = time.time() - t0
        run.timesteps, run.shape = head.timesteps, head.shape
        float_inputs = cal.sequential_inputs == "float"
        if float_inputs:  # a method that observes again after its fold observes the float blocks, as in one pass
            with paused_observation(model):
                quantize_unit(head)
        for b in tqdm(blocks, desc="sequential calibration (blocks)", disable=not run.progress):
            _sequential_block(run, b, {n: lin for n, lin in run.targets.items() if owner[n] == b}, inputs)
        if not float_inputs:  # after the blocks: observing again, a method sees what the quantized blocks feed
            quantize_unit(head)
    finally:
        inputs.close()


def _sequential_block(run: QuantRun, block: str, targets: dict, inputs: BlockInputs) -> None:
    """One block of `quantize_sequential`: observe, quantize, then turn `inputs` into the next block's."""
    cal, module = run.plan.calibration, run.transformer.get_submodule(block)
    onload(module)
    attention = {n: p for n, p in run.attention.items() if n.startswith(block + ".")}
    floats = BlockInputs(cal.sequential_cache) if cal.sequential_inputs == "float" else None
    unit = run.unit(targets, cls=BlockRun, attention=attention, block=block, inputs=inputs, float_outputs=floats)
    report, calls = run.report, len(inputs)
    observed, t0 = report.calibration_seconds, time.time()
    try:
        if targets or attention:
            unit.calibrate()
            quantize_unit(unit)
            for processor in attention.values():
                processor.freeze()
        t1 = time.time()
        if floats is not None and len(floats):
            inputs.calls, floats.calls = floats.calls, inputs.calls  # the float block's outputs, recorded above
            inputs.folder, floats.folder = floats.folder, inputs.folder
        else:  # the quantized block (or a block without targets) on its inputs, call by call
            replay(module, inputs, run.adapter.block_outputs,
                   timestep_context=getattr(run.transformer, CONTEXT_ATTRIBUTE, None), into=inputs)
        calibrate = report.calibration_seconds - observed
        report.block_seconds[block] = {"calibrate": calibrate, "quantize": t1 - t0 - calibrate,
                                       "replay": time.time() - t1, "calls": calls}
    finally:
        if floats is not None:
            floats.close()


@torch.no_grad()
def quantize_transformer(
    transformer: nn.Module,
    config,
    *,
    id2label: dict | None = None,
    scheduler_config: dict | None = None,
    context: dict | None = None,
    stats: CalibrationStats | None = None,
    progress: bool = True,
) -> QuantizationReport:
    """Quantize a transformer (any model with an adapter: diffusers_ptq.models) in place; return what was done.

    `config`: a QuantConfig (or anything with `plan()`), or a scheme.Plan. Calibrates once (unless `stats` is given,
    or nothing needs observing) recording what the plan's methods observe, runs each method's transform (a fold
    that changes the inputs calibrates again), computes each layer's static input scale, chooses group sizes (a
    search method, or the scheme's), rounds (a rounding method, else to nearest), and rewrites the selected
    Linears into QuantLinear. Calibration context (what the adapter's `calibration_conditions` reads): `id2label`,
    `context` (from the pipeline or its folder: `ModelAdapter.pipeline_context` / `folder_context`) and the plan's
    calibration prompts and resolution.
    """
    t0 = time.time()
    plan = config if isinstance(config, Plan) else config.plan()
    adapter = adapter_for(transformer)
    if plan.calibration.sequential:  # offloaded blocks (accelerate) are brought in one at a time
        onload_outside_blocks(transformer, adapter)
    else:
        onload(transformer)
    tie_copies(transformer, identical_copies(transformer))  # identical copies (adapter.shared_copies): one module
    report = QuantizationReport(config=config.to_dict() if hasattr(config, "to_dict") else {})
    scheme = plan.scheme
    include = scheme.include if scheme.include is not None else adapter.default_include
    targets = select_linears(transformer, include, scheme.exclude)
    if not targets:
        raise ValueError(f"no Linear layer matches include={list(include)} exclude={list(scheme.exclude)}")
    observations = Observations(stats=scheme.static_activations)
    for method in plan.methods:
        method.check(plan)
        observations = observations | method.observations(scheme)
    if stats is not None and (scheme.quantize_attention or observations.hessians or observations.transformer_inputs):
        raise ValueError("quantize_attention and methods that record Hessians or transformer inputs (Hessian-based "
                         "rounding, searches) observe the model during calibration: do not pass precomputed stats")
    context = {"id2label": id2label, **(context or {})}
    context.update({k: v for k, v in plan.calibration.context().items() if v is not None})
    run = QuantRun(transformer, adapter, plan, report, targets, observations, context=context,
                   scheduler_config=scheduler_config, progress=progress)
    if scheme.quantize_attention:
        run.attention = install_quant_attention(transformer, scheme.act_bits)
    if plan.calibration.sequential:
        check_sequential(plan, stats)
        quantize_sequential(run)
    else:
        if stats is not None:
            run.layers, run.timesteps = dict(stats.layers), stats.timesteps
        elif observations.any():
            run.calibrate()
        quantize_unit(run)
    if scheme.embedder_bits:
        report.embedders = quantize_embedders(transformer, adapter.embedders, scheme.embedder_bits)
    for processor in run.attention.values():
        if processor.observing:
            processor.freeze()
    fuse_feedforwards(transformer)
    report.total_seconds = time.time() - t0
    return report
