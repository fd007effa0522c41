"""HTG (Hierarchical Timestep Grouping): timestep-grouped channel shifting and EMA channel scaling.

Pure functions on per-timestep statistics and weights (tensors in, tensors out). Rows of the [T, C] inputs are
sampling steps in sampling order (row 0 = the noisiest step, timestep T). For one target (a group of Linears
reading the same input):

1. shift per step: z_t = (max_t + min_t) / 2 — centres every channel's range at step t;
2. constrained (adjacent-only) agglomerative clustering of z_T … z_1 into G contiguous groups (Algorithm 1 of
   the paper; linkage "ward", "centroid" or "average"), or the exact minimizer of Σ_t ‖z_t − μ_g(t)‖² over
   contiguous partitions (`linkage="optimal"`, dynamic programming); group shift z̄_g = mean of its z_t;
3. scale: m = EMA over the steps, from the first sampling step to the last (α = 0.99), of the per-channel max
   |X_t − z̄_g(t)|; s = m / max|W_j| as the paper prints it, or SmoothQuant's m^a / max|W_j|^(1−a).

The model then reads X̃ = (X − z̄_g(t)) / s, folded into adaLN / `to_v` and per-group biases by `reparam`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusers_ptq.methods.base import Method, Observations, check_fraction, register_method_plugin, target_input

LINKAGES = ("ward", "centroid", "average", "optimal")
SCALINGS = ("printed", "migration")
EPS = 1e-5


def channel_shifts(step_max: torch.Tensor, step_min: torch.Tensor) -> torch.Tensor:
    """z_t = (max_t + min_t) / 2 per step and channel ([T, C])."""
    return (step_max.float() + step_min.float()) / 2


def _linkage_distance(a: torch.Tensor, b: torch.Tensor, linkage: str) -> float:
    """Distance between two clusters of row vectors ([n_a, C], [n_b, C])."""
    mean_a, mean_b = a.mean(0), b.mean(0)
    if linkage == "centroid":
        return float((mean_a - mean_b).norm())
    if linkage == "ward":  # the increase of the within-group sum of squares when merging
        return float(len(a) * len(b) / (len(a) + len(b)) * (mean_a - mean_b).pow(2).sum())
    if linkage == "average":
        return float(torch.cdist(a, b).mean())
    raise ValueError(f"linkage={linkage!r} is not supported; allowed values: {list(LINKAGES)}")


def _greedy_clustering(z: torch.Tensor, num_groups: int, linkage: str) -> list[int]:
    starts = list(range(len(z)))  # group g = rows starts[g] .. starts[g+1]-1
    while len(starts) > num_groups:
        ends = starts[1:] + [len(z)]
        distances = [_linkage_distance(z[starts[g]:ends[g]], z[starts[g + 1]:ends[g + 1]], linkage)
                     for g in range(len(starts) - 1)]
        merge = min(range(len(distances)), key=distances.__getitem__)  # first of the closest adjacent pair
        del starts[merge + 1]
    return starts


def _optimal_segmentation(z: torch.Tensor, num_groups: int) -> list[int]:
    """Contiguous partition minimizing the within-group sum of squares (dynamic programming, O(G·T²))."""
    z = z.double()
    steps = len(z)
    prefix = torch.cat([torch.zeros(1, z.shape[1], dtype=z.dtype), z.cumsum(0)])
    prefix_sq = torch.cat([torch.zeros(1, dtype=z.dtype), z.pow(2).sum(1).cumsum(0)])

    def sse(i: int, j: int) -> float:  # rows i .. j-1
        total = prefix[j] - prefix[i]
        return float(prefix_sq[j] - prefix_sq[i] - total.pow(2).sum() / (j - i))

    inf = float("inf")
    cost = [[inf] * (steps + 1) for _ in range(num_groups + 1)]
    split = [[0] * (steps + 1) for _ in range(num_groups + 1)]
    cost[0][0] = 0.0
    for g in range(1, num_groups + 1):
        for j in range(g, steps - (num_groups - g) + 1):
            for i in range(g - 1, j):
                c = cost[g - 1][i] + sse(i, j)
                if c < cost[g][j] - 1e-12:
                    cost[g][j], split[g][j] = c, i
    starts, j = [], steps
    for g in range(num_groups, 0, -1):
        j = split[g][j]
        starts.append(j)
    return starts[::-1]


def cluster_timesteps(z: torch.Tensor, num_groups: int, linkage: str = "ward") -> list[int]:
    """Split the T steps (rows of z, in sampling order) into `num_groups` contiguous groups.

    Returns the first step index of each group (starts with 0, increasing).
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage={linkage!r} is not supported; allowed values: {list(LINKAGES)}")
    if not 1 <= num_groups <= len(z):
        raise ValueError(f"num_groups must be in [1, {len(z)}] (the number of steps), got {num_groups}")
    z = z.float()
    if linkage == "optimal":
        return _optimal_segmentation(z, num_groups)
    return _greedy_clustering(z, num_groups, linkage)


def group_index(starts: list[int], num_steps: int) -> torch.Tensor:
    """The group of every step ([T], int64)."""
    index = torch.zeros(num_steps, dtype=torch.long)
    for start in starts[1:]:
        index[start:] += 1
    return index


def within_group_sse(z: torch.Tensor, starts: list[int]) -> float:
    """Σ_t ‖z_t − μ_g(t)‖² for a partition (the objective of the paper's Eq. 3)."""
    ends = starts[1:] + [len(z)]
    return float(sum((z[a:b] - z[a:b].mean(0)).pow(2).sum() for a, b in zip(starts, ends)))


def group_shifts(z: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """z̄_g: the mean shift of each group ([G, C])."""
    ends = starts[1:] + [len(z)]
    return torch.stack([z[a:b].mean(0) for a, b in zip(starts, ends)])


def group_edges(timesteps: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """Timestep thresholds between groups ([G−1], decreasing): the midpoint between the last timestep of a group
    and the first of the next, so that any timestep — also from a schedule with another number of steps — maps
    to the group whose calibrated timesteps are nearest."""
    t = timesteps.double()
    return torch.stack([(t[s - 1] + t[s]) / 2 for s in starts[1:]]).float() if len(starts) > 1 else torch.zeros(0)


def timestep_groups(timestep: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The group of each timestep value ([B] -> [B]): the number of edges above it (edges decreasing)."""
    return (timestep.reshape(-1, 1).to(edges.dtype) < edges.reshape(1, -1)).sum(dim=1)


def shifted_absmax(step_max: torch.Tensor, step_min: torch.Tensor, shift_per_step: torch.Tensor) -> torch.Tensor:
    """max |X_t − shift_t| per step and channel, from the per-step range ([T, C])."""
    return torch.maximum((step_max - shift_per_step).abs(), (step_min - shift_per_step).abs())


def ema_over_steps(values: torch.Tensor, alpha: float = 0.99) -> torch.Tensor:
    """m after the last step of m_0 = v_0, m_t = α m_{t−1} + (1 − α) v_t, over rows in sampling order ([C])."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"ema_alpha must be in [0, 1], got {alpha}")
    m = values[0].double()
    for v in values[1:]:
        m = alpha * m + (1 - alpha) * v.double()
    return m.float()


def scaling_vector(act_max: torch.Tensor, weight_sal: torch.Tensor, scaling: str = "migration",
                   alpha: float = 0.5) -> torch.Tensor:
    """s per channel: "printed" m / max|W_j| (the paper's formula as printed), or "migration"
    m^α / max|W_j|^(1−α) (SmoothQuant's form; α = 1 gives the printed numerator alone)."""
    m, w = act_max.float().clamp(min=EPS), weight_sal.float().clamp(min=EPS)
    if scaling == "printed":
        return m / w
    if scaling == "migration":
        if not 0 <= alpha <= 1:
            raise ValueError(f"htg_alpha must be in [0, 1], got {alpha}")
        return m.pow(alpha) / w.pow(1 - alpha)
    raise ValueError(f"scaling={scaling!r} is not supported; allowed values: {list(SCALINGS)}")


# --- the method plug-in ---------------------------------------------------------------------------------------------


@dataclass
class HTGTransform:
    """What HTG folded into one target: group starts (step indices), timestep edges, shifts z̄_g, scale s."""

    starts: list[int]
    edges: torch.Tensor  # [G-1] decreasing timestep thresholds
    shifts: torch.Tensor  # [G, C]
    scale: torch.Tensor  # [C]


@register_method_plugin
@dataclass
class HTG(Method):
    """num_groups: timestep groups G (None: ⌊T/10⌋, at least 1); linkage: "ward" | "centroid" | "average" (greedy
    adjacent merging) | "optimal" (exact minimizer of the within-group sum of squares); ema_alpha: the EMA
    coefficient of the channel max, in (0, 1); migration_alpha: s = m^a / max|W|^(1−a) with a = migration_alpha,
    or None for the paper's printed s = m / max|W|; shift / scale: the two parts (the paper's ablations)."""

    name = "htg"
    kind = "transform"
    num_groups: int | None = None
    linkage: str = "ward"
    ema_alpha: float = 0.99
    migration_alpha: float | None = 0.5
    shift: bool = True
    scale: bool = True

    def __post_init__(self) -> None:
        if self.linkage not in LINKAGES:
            raise ValueError(f"linkage={self.linkage!r} is not supported; allowed values: {list(LINKAGES)}")
        if self.num_groups is not None and (isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int)
                                            or self.num_groups <= 0):
            raise ValueError(f"num_groups must be a positive int or None (⌊T/10⌋), got {self.num_groups!r}")
        check_fraction("ema_alpha", self.ema_alpha, low_open=True, high_open=True)
        check_fraction("migration_alpha", self.migration_alpha, allow_none=True)
        if not isinstance(self.shift, bool) or not isinstance(self.scale, bool):
            raise ValueError(f"shift and scale must be True or False, got {self.shift!r}, {self.scale!r}")
        if not (self.shift or self.scale):
            raise ValueError("shift and scale are both False: HTG needs at least one of them")

    def observations(self, scheme) -> Observations:
        return Observations(stats=True)

    def vectors(self, stats, weights: list[torch.Tensor], timesteps: torch.Tensor) -> HTGTransform:
        """HTG's group shifts and scale of one target's input, from its per-step max/min."""
        from diffusers_ptq.methods.ptq4dit import weight_salience

        steps, channels = stats.max.shape
        if self.shift:
            z = channel_shifts(stats.max, stats.min)
            starts = cluster_timesteps(z, min(steps, self.num_groups or max(1, steps // 10)), self.linkage)
            shifts = group_shifts(z, starts)
        else:
            starts, shifts = [0], torch.zeros(1, channels)
        if self.scale:
            per_step = shifts[group_index(starts, steps)]
            m = ema_over_steps(shifted_absmax(stats.max, stats.min, per_step), self.ema_alpha)
            printed = self.migration_alpha is None
            scale = scaling_vector(m, weight_salience(*weights), "printed" if printed else "migration",
                                   0.5 if printed else self.migration_alpha)
        else:
            scale = torch.ones(channels)
        return HTGTransform(starts, group_edges(timesteps, starts), shifts, scale)

    def fold(self, model, adapter, layers: dict, timesteps: torch.Tensor, quantized) -> dict:
        """Fold HTG into every target whose consumers are all quantized: X̃ = (X − z̄_g(t)) / s, the scale into the
        producer rows and consumer columns, the group shifts into per-group biases. {target: HTGTransform}."""
        from diffusers_ptq.reparam import apply_smoothing, shift_input_per_group

        done = {}
        for target in adapter.smoothing_targets(model):
            if not set(target.consumers) <= set(quantized):
                continue
            transform = self.vectors(*target_input(target, layers, model), timesteps)
            apply_smoothing(model, target, transform.scale)
            if self.shift:
                shift_input_per_group(model, target, transform.edges, -transform.shifts / transform.scale)
            done[target] = transform
        return done

    def transform(self, run) -> None:
        folded = self.fold(run.transformer, run.adapter, run.layers, run.timesteps, run.targets)
        run.report.smoothed_targets += [t.name for t in folded]
        run.report.timestep_groups.update({t.name: f.starts for t, f in folded.items()})
        if folded and run.needs_ranges_or_hessians():  # of the shifted, scaled inputs: measured again
            run.recalibrate()
