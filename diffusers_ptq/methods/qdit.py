"""Q-DiT's group-size search (Chen et al., CVPR 2025), made cheap: pure functions, tensors in, dicts out.

Q-DiT quantizes 4-bit weights in groups of input channels and chooses the group size per layer. Its official
search is evolutionary and scored by the FID of generated images (hours of GPU). Here each layer's candidates are
scored by a proxy computed from the weight and the layer's input Hessian H = E[xᵀx] (recorded over every timestep
of the calibration run), and the per-layer choice under an average-bits budget is a multiple-choice knapsack:

- `candidate_sizes`: the candidates that divide a layer's in_features (None = per output channel).
- `weight_bits_of`: what a 4-bit layer costs in bits, counting what quanto stores: 4-bit codes plus one float32
  scale and one float32 shift per group (per output channel: per row).
- `proxy_errors`: per candidate, the output error of the rounded weight on the calibration inputs,
  E‖x ΔWᵀ‖² = trace(ΔW H ΔWᵀ) ("output"), the same relative to trace(W H Wᵀ) ("relative"), or ‖ΔW‖² ("weight").
- `model_output_errors`: per layer and candidate, the error of the *transformer's output* when only that layer's
  weight is rounded, on transformer inputs recorded along the calibration trajectory (every timestep range):
  sensitivity-aware, the errors of layers whose output matters more weigh more ("model"; the knapsack assumes
  they add up).
- `search_group_sizes`: minimize the summed proxy error subject to total bits ≤ budget × total weights: greedy
  over each layer's lower convex hull of (bits, error) by decreasing error saved per bit (the classic
  multiple-choice knapsack greedy), then single upgrades into the leftover budget. Deterministic (ties by name).
- `evolutionary_search`: Q-DiT's own search shape (population, mutation, crossover, budget-repair) for any score,
  seeded; the FID-scored comparison (scripts/qdit_fid_search.py) uses it.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from diffusers_ptq.methods.base import Method, Observations, register_method_plugin

# quanto stores the 4-bit scale and shift in the weight's dtype; this project keeps them float32
# (serialization.state_dict_and_metadata refuses anything else): 32 + 32 bits per group
SCALE_BITS = 32
SHIFT_BITS = 32
CODE_BITS = 4

GroupSize = int | None


def candidate_sizes(in_features: int, candidates: Iterable[GroupSize]) -> list[GroupSize]:
    """The candidates usable for a layer with `in_features` inputs, in the given order: a group size must divide
    in_features (a group of in_features *is* per output channel: mapped to None); None is always usable."""
    usable: list[GroupSize] = []
    for g in candidates:
        g = None if g is not None and g == in_features else g
        if g is not None and (g <= 0 or in_features % g):
            continue
        if g not in usable:
            usable.append(g)
    return usable


def weight_bits_of(out_features: int, in_features: int, group_size: GroupSize) -> int:
    """Bits a 4-bit quanto weight of this shape stores: codes plus a float32 scale and shift per group."""
    groups = out_features * (in_features // group_size if group_size else 1)
    return out_features * in_features * CODE_BITS + groups * (SCALE_BITS + SHIFT_BITS)


def bits_per_weight(out_features: int, in_features: int, group_size: GroupSize) -> float:
    return weight_bits_of(out_features, in_features, group_size) / (out_features * in_features)


def average_bits(shapes: dict[str, tuple[int, int]], choice: dict[str, GroupSize]) -> float:
    """Average bits per quantized weight (weighted by numel) of a per-layer choice; shapes are (out, in)."""
    total = sum(weight_bits_of(*shapes[n], choice[n]) for n in shapes)
    return total / sum(o * i for o, i in shapes.values())


@torch.no_grad()
def proxy_errors(weight: torch.Tensor, hessian: torch.Tensor | None, candidates: Iterable[GroupSize],
                 proxy: str = "output", rounding: str = "nearest", *, damp: float = 0.01, act_order: bool = True,
                 keep_rounded: bool = False, zero_point: str = "float") -> tuple[dict[GroupSize, float], dict]:
    """({group size: proxy error}, {group size: RoundedWeight} when keep_rounded) for one weight [out, in].

    rounding: "nearest" or "gptq" (ΔW is then GPTQ's, from the same Hessian: the search sees what will be stored),
    on the 4-bit grid of `zero_point` (rounding.quant_grid).
    """
    from diffusers_ptq.rounding import gptq_round, nearest_round

    if proxy not in ("output", "relative", "weight"):
        raise ValueError(f"proxy={proxy!r}; allowed values: ['output', 'relative', 'weight']")
    if proxy != "weight" and hessian is None:
        raise ValueError(f"proxy={proxy!r} needs the layer's input Hessian")
    if rounding == "gptq" and hessian is None:
        raise ValueError("rounding='gptq' needs the layer's input Hessian")
    w = weight.detach().float()
    h = None if hessian is None else hessian.to(w.device, torch.float64)
    reference = None
    if proxy == "relative":
        reference = float(((w.double() @ h) * w.double()).sum()) or 1.0
    errors, kept = {}, {}
    for g in candidate_sizes(w.shape[1], candidates):
        if rounding == "gptq":
            rounded = gptq_round(w, hessian, 4, g, damp=damp, act_order=act_order, zero_point=zero_point)
        else:
            rounded = nearest_round(w, 4, g, zero_point)
        delta = (rounded.weight.float() - w).double()
        if proxy == "weight":
            err = float(delta.pow(2).sum())
        else:
            err = float(((delta @ h) * delta).sum())
            if reference is not None:
                err /= reference
        errors[g] = err
        if keep_rounded:
            kept[g] = rounded
    return errors, kept


@torch.no_grad()
def model_output_errors(transformer: torch.nn.Module, names: list[str], inputs: dict[str, torch.Tensor],
                        candidates: Iterable[GroupSize], rounded_fn: Callable[[str, torch.Tensor, GroupSize], object],
                        batch_size: int = 64, shared: dict[str, torch.Tensor] | None = None,
                        ) -> dict[str, dict[GroupSize, float]]:
    """{layer: {group size: mean squared error of the transformer output}} with only that layer's weight replaced by
    `rounded_fn(name, weight, g).weight` (the others float), on `inputs` (the forward's batched keyword inputs, as
    TransformerInputRecorder keeps them) and `shared` (the keyword inputs every row shares, passed whole)."""
    device = next(transformer.parameters()).device

    def forward() -> torch.Tensor:
        n = next(iter(inputs.values())).shape[0]
        outs = []
        for i in range(0, n, batch_size):
            kw = {k: v[i:i + batch_size].to(device) for k, v in inputs.items()}
            outs.append(transformer(**kw, **{k: v.to(device) for k, v in (shared or {}).items()}).sample.float())
        return torch.cat(outs)

    reference = forward()
    errors: dict[str, dict[GroupSize, float]] = {}
    for name in names:
        linear = transformer.get_submodule(name)
        original = linear.weight.detach().clone()
        errors[name] = {}
        try:
            for g in candidate_sizes(linear.in_features, candidates):
                linear.weight.copy_(rounded_fn(name, original, g).weight.to(original))
                errors[name][g] = float((forward() - reference).pow(2).mean())
        finally:
            linear.weight.copy_(original)
    return errors


@dataclass
class GroupSearchResult:
    """The search's choice: per-layer group size, the bits it costs, its summed proxy error, and the trace."""

    group_sizes: dict[str, GroupSize]
    bits_per_weight: float
    budget: float
    proxy_error: float
    errors: dict[str, dict[GroupSize, float]] = field(default_factory=dict)
    steps: int = 0

    def to_dict(self) -> dict:
        return {"group_sizes": self.group_sizes, "bits_per_weight": self.bits_per_weight, "budget": self.budget,
                "proxy_error": self.proxy_error, "steps": self.steps,
                "errors": {n: {str(g): e for g, e in errs.items()} for n, errs in self.errors.items()}}


def _lower_hull(points: list[tuple[int, float, GroupSize]]) -> list[tuple[int, float, GroupSize]]:
    """The lower convex hull of (bits, error) points sorted by bits, dropping dominated points (more bits, no less
    error): the only options the greedy moves through."""
    pts = []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if pts and p[1] >= pts[-1][1]:
            continue  # dominated
        while len(pts) >= 2:
            (b1, e1, _), (b2, e2, _) = pts[-2], pts[-1]
            # drop the middle point if it lies on or above the segment from pts[-2] to p
            if (e1 - e2) * (p[0] - b1) <= (e1 - p[1]) * (b2 - b1):
                pts.pop()
            else:
                break
        pts.append(p)
    return pts


def search_group_sizes(errors: dict[str, dict[GroupSize, float]], shapes: dict[str, tuple[int, int]],
                       budget_bits: float) -> GroupSearchResult:
    """The per-layer group sizes minimizing Σ error under average bits per weight ≤ budget_bits.

    errors: {layer: {group size: proxy error}} (the usable candidates of each layer); shapes: {layer: (out, in)}.
    Every layer starts at its cheapest option; upgrades along each layer's lower convex hull are taken in order of
    error saved per extra bit while they fit; the leftover budget then takes the single option change that saves
    the most error, repeatedly. Raises ValueError if even the cheapest options exceed the budget.
    """
    names = sorted(errors)
    if set(names) != set(shapes):
        raise ValueError("errors and shapes must name the same layers")
    total_weights = sum(o * i for o, i in shapes.values())
    capacity = int(budget_bits * total_weights + 1e-9)  # integer bits: exact comparisons
    cost = {n: {g: weight_bits_of(*shapes[n], g) for g in errors[n]} for n in names}
    choice = {n: min(errors[n], key=lambda g: (cost[n][g], errors[n][g])) for n in names}
    used = sum(cost[n][choice[n]] for n in names)
    if used > capacity:
        raise ValueError(f"budget of {budget_bits:g} bits per weight is below the cheapest choice "
                         f"({used / total_weights:.4f} bits per weight with every layer at its largest group)")
    hulls = {n: _lower_hull([(cost[n][g], errors[n][g], g) for g in errors[n]]) for n in names}
    position = {n: 0 for n in names}
    for n in names:  # the hull starts at the cheapest point (the least error among the cheapest)
        assert hulls[n][0][2] == choice[n]
    heap = []

    def push(n: str) -> None:
        i = position[n]
        if i + 1 < len(hulls[n]):
            (b0, e0, _), (b1, e1, _) = hulls[n][i], hulls[n][i + 1]
            heapq.heappush(heap, (-(e0 - e1) / (b1 - b0), n, i))

    for n in names:
        push(n)
    steps = 0
    while heap:
        _, n, i = heapq.heappop(heap)
        if position[n] != i:
            continue
        extra = hulls[n][i + 1][0] - hulls[n][i][0]
        if used + extra > capacity:
            continue  # this layer's next upgrade does not fit; others (cheaper steps) may
        used += extra
        position[n] = i + 1
        choice[n] = hulls[n][i + 1][2]
        steps += 1
        push(n)
    while True:  # spend what is left on the single change that saves the most error
        best = None
        for n in names:
            for g in errors[n]:
                extra = cost[n][g] - cost[n][choice[n]]
                saved = errors[n][choice[n]] - errors[n][g]
                if saved > 0 and used + extra <= capacity and (best is None or saved > best[0]):
                    best = (saved, n, g, extra)
        if best is None:
            break
        _, n, g, extra = best
        choice[n], used, steps = g, used + extra, steps + 1
    return GroupSearchResult(group_sizes={n: choice[n] for n in names}, bits_per_weight=used / total_weights,
                             budget=budget_bits, proxy_error=sum(errors[n][choice[n]] for n in names),
                             errors={n: dict(errors[n]) for n in names}, steps=steps)


# ------------------------------------------------------------------------------------------- evolutionary search


def _repair(choice: dict[str, GroupSize], options: dict[str, list[GroupSize]], shapes: dict[str, tuple[int, int]],
            capacity: int, rng: random.Random) -> dict[str, GroupSize]:
    """Coarsen random layers (one step towards their cheapest option) until the choice fits the budget."""
    choice = dict(choice)
    cost = lambda n, g: weight_bits_of(*shapes[n], g)  # noqa: E731
    used = sum(cost(n, choice[n]) for n in choice)
    names = sorted(choice)
    while used > capacity:
        coarsenable = [n for n in names if any(cost(n, g) < cost(n, choice[n]) for g in options[n])]
        if not coarsenable:
            raise ValueError("the budget is below the cheapest choice")
        n = rng.choice(coarsenable)
        cheaper = sorted((g for g in options[n] if cost(n, g) < cost(n, choice[n])), key=lambda g: -cost(n, g))
        used += cost(n, cheaper[0]) - cost(n, choice[n])
        choice[n] = cheaper[0]
    return choice


def evolutionary_search(score: Callable[[dict[str, GroupSize]], float], options: dict[str, list[GroupSize]],
                        shapes: dict[str, tuple[int, int]], budget_bits: float, *, population: int = 8,
                        generations: int = 3, mutation: float = 0.1, seed: int = 0,
                        initial: list[dict[str, GroupSize]] | None = None,
                        log: Callable[[dict], None] | None = None) -> tuple[dict[str, GroupSize], float, list[dict]]:
    """Q-DiT's search shape: a population of per-layer choices under the budget, lower `score` is better.

    Generation 0: `initial` choices, filled up with random ones (repaired into the budget). Each next generation
    keeps the best half and adds children from uniform crossover of two parents plus per-layer mutation with
    probability `mutation`, repaired into the budget. Scores are cached by choice. Deterministic given `seed`
    (and a deterministic score). Returns (best choice, its score, history of every evaluation).
    """
    rng = random.Random(seed)
    names = sorted(options)
    total_weights = sum(o * i for o, i in shapes.values())
    capacity = int(budget_bits * total_weights + 1e-9)
    cache: dict[tuple, float] = {}
    history: list[dict] = []

    def key(choice):
        return tuple((n, -1 if choice[n] is None else choice[n]) for n in names)

    def evaluate(choice, generation):
        k = key(choice)
        if k not in cache:
            cache[k] = float(score(choice))
            entry = {"generation": generation, "score": cache[k], "bits_per_weight": average_bits(shapes, choice),
                     "group_sizes": dict(choice)}
            history.append(entry)
            if log is not None:
                log(entry)
        return cache[k]

    pop = [_repair(c, options, shapes, capacity, rng) for c in (initial or [])][:population]
    while len(pop) < population:
        pop.append(_repair({n: rng.choice(options[n]) for n in names}, options, shapes, capacity, rng))
    scored = sorted(((evaluate(c, 0), i, c) for i, c in enumerate(pop)), key=lambda t: (t[0], t[1]))
    for generation in range(1, generations + 1):
        parents = [c for _, _, c in scored[:max(2, population // 2)]]
        children = []
        while len(parents) + len(children) < population:
            a, b = rng.sample(parents, 2)
            child = {n: (a[n] if rng.random() < 0.5 else b[n]) for n in names}
            child = {n: (rng.choice(options[n]) if rng.random() < mutation else g) for n, g in child.items()}
            children.append(_repair(child, options, shapes, capacity, rng))
        pop = parents + children
        scored = sorted(((evaluate(c, generation), i, c) for i, c in enumerate(pop)), key=lambda t: (t[0], t[1]))
    best_score, _, best = scored[0]
    return dict(best), best_score, history


# --- the method plug-in ---------------------------------------------------------------------------------------------

PROXIES = ("model", "output", "relative", "weight")
CANDIDATES = (32, 64, 128, 256, None)


@register_method_plugin
@dataclass
class GroupSearch(Method):
    """Q-DiT's group-size search: every 4-bit layer takes one of the candidate `group_sizes` (those dividing its
    in_features; None = per output channel) so that the summed `search_proxy` error is least under
    `bits_per_weight` average bits per weight (scales included). search_proxy: "model" | "output" | "relative" |
    "weight" (see `proxy_errors`, `model_output_errors`). The names are QDiTConfig's. With a rounding method that
    can round single candidates (GPTQ), candidates are rounded by it and the chosen ones kept."""

    name = "group_search"
    kind = "group_sizes"
    bits_per_weight: float = 4.5
    group_sizes: list = field(default_factory=lambda: list(CANDIDATES))
    search_proxy: str = "model"

    def __post_init__(self) -> None:
        bits = self.bits_per_weight
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 4 < bits < float("inf"):
            raise ValueError(f"bits_per_weight must be a number of bits per weight above 4 (scales included), got "
                             f"{bits!r}")
        if isinstance(self.group_sizes, (str, bytes)) or not hasattr(self.group_sizes, "__iter__"):
            raise ValueError(f"group_sizes (the candidates) must be a list of positive ints or None, got "
                             f"{self.group_sizes!r}")
        self.group_sizes = list(self.group_sizes)
        valid = all(g is None or (isinstance(g, int) and not isinstance(g, bool) and g > 0) for g in self.group_sizes)
        if not self.group_sizes or not valid or len(set(self.group_sizes)) != len(self.group_sizes):
            raise ValueError(f"group_sizes (the candidates) must be distinct positive ints or None (per output "
                             f"channel), got {self.group_sizes!r}")
        if self.search_proxy not in PROXIES:
            raise ValueError(f"search_proxy={self.search_proxy!r} is not supported; allowed values: {list(PROXIES)}")

    per_block = False
    per_block_reason = "the group-size search shares one bit budget among all the model's Linears"

    def observations(self, scheme) -> Observations:
        return Observations(hessians=self.search_proxy in ("output", "relative"),
                            transformer_inputs=self.search_proxy == "model")

    def choose_group_sizes(self, run) -> dict[str, GroupSize]:
        from diffusers_ptq.attention import paused_observation
        from diffusers_ptq.rounding import nearest_round

        names, model = list(run.targets), run.transformer
        zero_point = run.plan.scheme.weight_zero_point
        rounding = run.plan.method("rounding")
        keep = rounding is not None and rounding.rounds_candidates
        shapes = {n: (run.targets[n].out_features, run.targets[n].in_features) for n in names}
        kept: dict[str, dict] = {}
        if self.search_proxy == "model":
            def rounded_fn(name, weight, g):
                if not keep:
                    return nearest_round(weight, 4, g, zero_point)
                kept.setdefault(name, {})[g] = rounding.round_candidate(run, name, weight, g)
                return kept[name][g]

            with paused_observation(model):  # the search's forwards must not widen the attention ranges
                errors = model_output_errors(model, names, run.transformer_inputs, self.group_sizes, rounded_fn,
                                             batch_size=run.plan.calibration.batch_size * 4,
                                             shared=run.shared_inputs)
        else:
            kind, options = rounding.proxy_rounding() if keep else ("nearest", {})
            errors = {}
            for name in names:
                errors[name], kept[name] = proxy_errors(run.targets[name].weight, run.hessians.get(name),
                                                        self.group_sizes, self.search_proxy, kind, keep_rounded=keep,
                                                        zero_point=zero_point, **options)
        result = search_group_sizes(errors, shapes, self.bits_per_weight)
        if keep:
            run.rounded.update({n: kept[n][g] for n, g in result.group_sizes.items()})
        run.report.group_search = result.to_dict()
        return result.group_sizes
