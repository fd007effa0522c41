"""Per-timestep-group biases (HTG): a Linear whose bias depends on which group the current timestep falls in.

- `install_timestep_context(transformer)`: a forward pre-hook on the transformer publishes the forward's
  `timestep` ([B] or a scalar) to a `TimestepContext` shared by the transformer's group-bias layers.
- `add_group_bias(linear, edges, values, rows)`: gives a Linear (float or quantized) one more
  `GroupBias` entry — G bias vectors for output rows `rows`, chosen per sample by the timestep: group
  g(t) = number of `edges` (decreasing timestep thresholds) above t. The entries live in
  `linear.group_biases` (a ModuleList, so they are in the state dict) and a forward hook adds the selected
  vectors to the output (a per-sample bias add; the matmul is untouched).

A layer may hold several entries with different groupings (e.g. a block's adaLN modulation carries the shift-row
biases of the q/k/v target and of the MLP target; `to_v` is a consumer of one target and the producer of another).
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.models import adapter_for

CONTEXT_ATTRIBUTE = "_ptq_timestep_context"


class TimestepContext:
    """The timesteps of the transformer forward in progress ([B] or a 0-d tensor), and where the forward takes them
    (`argument`: keyword name and positional index, from the model's adapter)."""

    def __init__(self, argument: tuple[str, int] = ("timestep", 1)) -> None:
        self.timestep: torch.Tensor | None = None
        self.argument = argument

    def current(self) -> torch.Tensor:
        if self.timestep is None:
            raise RuntimeError("a group-bias layer ran outside a transformer forward: call the transformer with "
                               "`timestep=` (install_timestep_context publishes it)")
        return self.timestep


def install_timestep_context(transformer: nn.Module) -> TimestepContext:
    """The transformer's TimestepContext, created and hooked on first use (idempotent)."""
    context = getattr(transformer, CONTEXT_ATTRIBUTE, None)
    if context is not None:
        return context
    adapter = adapter_for(transformer)
    context = TimestepContext((adapter.timestep_argument, adapter.forward_arguments.index(adapter.timestep_argument)))
    transformer.register_forward_pre_hook(_publish_timestep, with_kwargs=True)
    setattr(transformer, CONTEXT_ATTRIBUTE, context)
    return context


def _publish_timestep(transformer: nn.Module, args, kwargs) -> None:
    """Forward pre-hook: the forward's `timestep` into the transformer's own context (looked up on the module it
    runs for, so a deep copy publishes into the copy's context)."""
    context = getattr(transformer, CONTEXT_ATTRIBUTE)
    name, index = context.argument
    timestep = kwargs.get(name, args[index] if len(args) > index else None)
    context.timestep = None if timestep is None else torch.as_tensor(timestep).reshape(-1)


class GroupBias(nn.Module):
    """G bias vectors for output rows [rows_start, rows_stop) of a Linear, one per timestep group."""

    def __init__(self, edges: torch.Tensor, values: torch.Tensor, rows: tuple[int, int],
                 context: TimestepContext | None = None):
        super().__init__()
        if values.ndim != 2 or len(values) != len(edges) + 1 or values.shape[1] != rows[1] - rows[0]:
            raise ValueError(f"GroupBias needs values [len(edges) + 1, rows]: got edges {tuple(edges.shape)}, "
                             f"values {tuple(values.shape)}, rows {rows}")
        if len(edges) > 1 and not bool((edges[1:] < edges[:-1]).all()):
            raise ValueError("GroupBias edges must be strictly decreasing timestep thresholds")
        self.register_buffer("edges", edges.detach().float().clone())
        self.register_buffer("values", values.detach().float().clone())
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long))
        self.row_range = (int(rows[0]), int(rows[1]))  # the same as Python ints: no tensor read in forward
        self.context = context

    def groups(self, timestep: torch.Tensor) -> torch.Tensor:
        """Group index of each timestep ([B])."""
        return (timestep.reshape(-1, 1).to(self.edges) < self.edges.reshape(1, -1)).sum(dim=1)

    def full_width(self, out_features: int) -> torch.Tensor:
        """The G bias vectors padded with zeros to the layer's width ([G, out_features])."""
        start, stop = self.row_range
        full = self.values.new_zeros(len(self.values), out_features)
        full[:, start:stop] = self.values
        return full

    def extra_repr(self) -> str:
        return f"groups={len(self.values)}, rows={self.row_range}"


def _add_group_biases(module: nn.Module, _args, output: torch.Tensor) -> torch.Tensor:
    timestep = module.group_biases[0].context.current()
    delta = sum(entry.full_width(output.shape[-1])[entry.groups(timestep)] for entry in module.group_biases)
    if delta.shape[0] != output.shape[0] and delta.shape[0] != 1:
        raise RuntimeError(f"{delta.shape[0]} timesteps for a batch of {output.shape[0]}: pass one timestep per "
                           "sample or a single one")
    return output + delta.reshape(delta.shape[0], *([1] * (output.ndim - 2)), -1).to(output.dtype)


def attach_group_biases(module: nn.Module, entries: list[GroupBias]) -> None:
    """Put `entries` on `module` (a Linear or a quantized Linear) and hook them into its forward."""
    if not entries:
        return
    if getattr(module, "group_biases", None) is None:
        module.group_biases = nn.ModuleList()
        module.register_forward_hook(_add_group_biases)
    for entry in entries:
        module.group_biases.append(entry)


def add_group_bias(transformer: nn.Module, linear: nn.Module, edges: torch.Tensor, values: torch.Tensor,
                   rows: tuple[int, int] | None = None) -> GroupBias:
    """Give `linear` (a submodule of `transformer`) G more bias vectors, selected by the transformer's timestep."""
    rows = rows or (0, values.shape[1])
    entry = GroupBias(edges, values, rows, install_timestep_context(transformer))
    attach_group_biases(linear, [entry])
    return entry


@torch.no_grad()
def divide_group_bias_rows(module: nn.Module, s: torch.Tensor, rows: slice) -> None:
    """Divide the group biases of output rows `rows` by s (when the layer's rows are divided by s)."""
    entries = getattr(module, "group_biases", None) or []
    if not entries:
        return
    divisor = torch.ones(module.out_features, dtype=torch.float32, device=s.device)
    divisor[rows] = s.float()
    for entry in entries:
        start, stop = (int(v) for v in entry.rows)
        entry.values /= divisor[start:stop].to(entry.values)


def move_group_biases(source: nn.Module, target: nn.Module) -> None:
    """Carry a Linear's group biases over to the module that replaces it (e.g. its quantized version)."""
    attach_group_biases(target, list(getattr(source, "group_biases", None) or []))


def group_bias_layout(module: nn.Module) -> list[dict]:
    """JSON-safe shapes of a module's group-bias entries (for checkpoint metadata)."""
    return [{"groups": len(e.values), "rows": [int(v) for v in e.rows]} for e in getattr(module, "group_biases", None) or []]


def build_group_biases(transformer: nn.Module, module: nn.Module, layout: list[dict],
                       tensors: dict[str, torch.Tensor]) -> None:
    """Re-create a module's group-bias entries from a checkpoint: `tensors` maps "<i>.edges" / "<i>.values" /
    "<i>.rows" to tensors, `layout` is `group_bias_layout`'s output. Shapes are checked by the caller."""
    context = install_timestep_context(transformer)
    entries = [GroupBias(tensors[f"{i}.edges"], tensors[f"{i}.values"], tuple(int(v) for v in tensors[f"{i}.rows"]),
                         context) for i in range(len(layout))]
    if getattr(module, "group_biases", None):
        raise ValueError("the module already has group biases")
    attach_group_biases(module, entries)


def group_bias_bytes(module: nn.Module) -> int:
    """Bytes of every GroupBias buffer under `module` (the storage overhead of timestep grouping)."""
    return sum(b.numel() * b.element_size() for m in module.modules() if isinstance(m, GroupBias)
               for b in m.buffers())
