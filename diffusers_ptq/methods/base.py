"""The method plug-in interface: a method is a config dataclass (its own options) with handlers for the stages it
takes part in. The orchestrator (api.quantize_transformer) runs every stage for every method of a plan, in order:

1. observe   — `observations()`: what the calibration run must record for it (one run, one hook set);
2. transform — `transform(run)`: fold into the float model (smoothing, shifts); may ask for `run.recalibrate()`;
3. ranges    — the scheme's activation ranges (no method hook: QuantScheme.act_range);
4. group sizes — `choose_group_sizes(run)`: a method that chooses per-layer group sizes returns them (Q-DiT);
5. round     — `round(run, names)`: a rounding method returns RoundedWeights (GPTQ, block reconstruction);
6. pack      — the quanto modules (no method hook: modules.quantize_linear).

A method registers itself with `register_method_plugin`; the engine never names one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

PLUGINS: dict[str, type[Method]] = {}


def register_method_plugin(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to plans by `cls.name`."""
    if not cls.name or (cls.name in PLUGINS and PLUGINS[cls.name] is not cls):
        raise ValueError(f"{cls.__name__}: method name {cls.name!r} is empty or taken")
    PLUGINS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Observations:
    """What a calibration run records. `stats`: per-step per-channel max/min/absmax of every quantized Linear's input;
    `sample_rows`: also per-sample rows for the first consumer of each smoothing target; `hessians`: each quantized
    Linear's input Hessian; `transformer_inputs`: rows of the transformer's own inputs, to replay."""

    stats: bool = False
    sample_rows: bool = False
    hessians: bool = False
    transformer_inputs: bool = False

    def __or__(self, other: Observations) -> Observations:
        return Observations(**{k: v or getattr(other, k) for k, v in asdict(self).items()})

    def any(self) -> bool:
        return any(asdict(self).values())


@dataclass
class Method:
    """Base of the method plug-ins (subclasses are dataclasses of the method's options, validated in
    __post_init__). `kind`: "transform" (folds into the model; at most one per plan), "group_sizes" or "rounding"
    (at most one each)."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    rounds_candidates: ClassVar[bool] = False  # a rounding method that can round one layer at one group size
    per_block: ClassVar[bool] = True  # its stages can run on one block's Linears at a time (sequential calibration)
    per_block_reason: ClassVar[str] = ""  # why not, when per_block is False

    def check(self, plan) -> None:
        """Raise ValueError if this method cannot run with the rest of `plan`."""

    def observations(self, scheme) -> Observations:
        return Observations()

    def transform(self, run) -> None:
        """Fold into the float model; update run.layers / run.hessians to what the folded model's inputs are."""

    def choose_group_sizes(self, run) -> dict[str, int | None] | None:
        return None

    def round(self, run, names: list[str]) -> dict:
        """{name: RoundedWeight} for `names` (the layers not rounded yet), with run.group_sizes."""
        return {}

    def proxy_rounding(self) -> tuple[str, dict]:
        """How a search's error proxy rounds candidates for this method (methods/qdit.proxy_errors' rounding)."""
        return "nearest", {}

    def round_candidate(self, run, name: str, weight: torch.Tensor, group_size: int | None):
        """One layer's weight rounded at one group size, as this rounding method would store it (for searches)."""
        raise NotImplementedError(f"{self.name} cannot round a single candidate")

    def options(self) -> dict[str, Any]:
        return asdict(self)


def check_fraction(name: str, value, low_open: bool = False, high_open: bool = False, allow_none: bool = False):
    """A ValueError unless `value` is a number in [0, 1] (open ends as asked), or None when allowed."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}{' or None' if allow_none else ''}, got {value!r}")


def target_input(target, layers: dict, model) -> tuple:
    """(statistics, consumer weights) of a smoothing target's input: its first consumer's input statistics and every
    consumer's weight, restricted to the target's columns (SmoothingTarget.columns)."""
    stats = layers[target.consumers[0]]
    weights = [model.get_submodule(c).weight[:, target.column_slice] for c in target.consumers]
    return (stats if target.columns is None else stats.columns(*target.columns)), weights


def smooth(model, layers: dict, vector, quantized, adapter=None) -> dict:
    """For each of the model's smoothing targets whose consumers are all in `quantized`: s = vector(statistics of
    the target's input, its consumers' weights), folded as X → X/s (reparam.apply_smoothing); `layers` (name ->
    LayerStats) become those of the smoothed inputs. Returns {target: s}."""
    from diffusers_ptq.models import adapter_for
    from diffusers_ptq.reparam import apply_smoothing

    done = {}
    for target in (adapter or adapter_for(model)).smoothing_targets(model):
        if not set(target.consumers) <= set(quantized):
            continue
        s = vector(*target_input(target, layers, model))
        apply_smoothing(model, target, s)
        for c in target.consumers:
            layers[c] = layers[c].divided(target.widen(s, model.get_submodule(c).in_features))
        done[target] = s
    return done


def fold_smoothing(run, vector) -> None:
    """The transform of every smoothing method (`smooth` on the run's model and statistics); the run's Hessians and
    attention V ranges become those of the smoothed inputs."""
    from diffusers_ptq.rounding import scale_hessian

    done = smooth(run.transformer, run.layers, vector, run.targets, run.adapter)
    run.report.smoothed_targets += [t.name for t in done]
    for target, s in done.items():
        for c in target.consumers:
            if c in run.hessians:  # the Hessian of X / s
                run.hessians[c] = scale_hessian(run.hessians[c], target.widen(s, len(run.hessians[c])))
        for producer in target.producers:
            processor = run.attention.get(getattr(producer, "attention", None))
            if processor is not None:  # V itself was divided by s
                processor.absmax["v"] = processor.absmax["v"] / s
