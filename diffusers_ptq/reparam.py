"""Offline re-parameterization: divide a Linear group's input by s per channel and multiply its weight columns
by s, folding the division into the module that produces the input, so that no operation is added.

Smoothing targets of a DiT block (`BasicTransformerBlock` with adaLN-Zero), and of the final layer:

| target | consumers (read the input) | producer (folded into) |
|---|---|---|
| `qkv`   | attn1.to_q, to_k, to_v | norm1.linear rows shift_msa (0), scale_msa (1) |
| `out`   | attn1.to_out.0         | attn1.to_v rows (attention output channel c is a convex combination of V[:, c]) |
| `fc1`   | ff.net.0.proj          | norm1.linear rows shift_mlp (3), scale_mlp (4) |
| `final` | proj_out_2             | proj_out_1 rows shift (0), scale (1) |

adaLN computes `LN(h)·(1 + scale) + shift`; dividing the result by s means `shift/s` and `(1 + scale)/s − 1`:
the shift rows (weight and bias) are divided by s, the scale rows' weight is divided by s and their bias
becomes `(b + 1)/s − 1`. `ff.net.2` has no target: its input follows GELU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffusers_ptq.groupbias import add_group_bias, divide_group_bias_rows


@dataclass(frozen=True)
class SmoothingTarget:
    name: str  # e.g. "transformer_blocks.3.qkv"
    consumers: tuple[str, ...]  # Linear module names that read the smoothed input
    producer: str  # module whose output is that input
    kind: str  # "modulation" (adaLN shift/scale rows) or "value" (to_v rows)
    shift_chunk: int = -1  # modulation rows: chunk indices of shift and scale
    scale_chunk: int = -1
    num_chunks: int = 0


def dit_smoothing_targets(transformer: nn.Module) -> list[SmoothingTarget]:
    """All smoothing targets of a DiTTransformer2DModel, in block order."""
    targets = []
    for i, _ in enumerate(transformer.transformer_blocks):
        b = f"transformer_blocks.{i}"
        targets += [
            SmoothingTarget(f"{b}.qkv", (f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v"),
                            f"{b}.norm1.linear", "modulation", 0, 1, 6),
            SmoothingTarget(f"{b}.out", (f"{b}.attn1.to_out.0",), f"{b}.attn1.to_v", "value"),
            SmoothingTarget(f"{b}.fc1", (f"{b}.ff.net.0.proj",), f"{b}.norm1.linear", "modulation", 3, 4, 6),
        ]
    if hasattr(transformer, "proj_out_1"):
        targets.append(SmoothingTarget("final", ("proj_out_2",), "proj_out_1", "modulation", 0, 1, 2))
    return targets


@torch.no_grad()
def scale_input_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    """W ← W·diag(s): the layer now expects its input divided by s."""
    linear.weight.mul_(s.to(linear.weight))


@torch.no_grad()
def divide_output_rows(linear: nn.Linear, s: torch.Tensor, rows: slice = slice(None)) -> None:
    """Divide output rows (weight and bias) by s."""
    s = s.to(linear.weight)
    linear.weight[rows] /= s[:, None]
    if linear.bias is not None:
        linear.bias[rows] /= s
    divide_group_bias_rows(linear, s, rows)


@torch.no_grad()
def divide_modulation(linear: nn.Linear, s: torch.Tensor, shift_chunk: int, scale_chunk: int, num_chunks: int) -> None:
    """Make `LN(h)·(1 + scale) + shift` come out divided by s, for modulation `linear` (rows in num_chunks chunks)."""
    dim = linear.out_features // num_chunks
    if s.numel() != dim:
        raise ValueError(f"smoothing vector has {s.numel()} entries, the modulated width is {dim}")
    shift = slice(shift_chunk * dim, (shift_chunk + 1) * dim)
    scale = slice(scale_chunk * dim, (scale_chunk + 1) * dim)
    divide_output_rows(linear, s, shift)
    s = s.to(linear.weight)
    linear.weight[scale] /= s[:, None]
    linear.bias[scale] = (linear.bias[scale] + 1) / s - 1
    divide_group_bias_rows(linear, s, scale)  # (b + d + 1)/s − 1 = ((b + 1)/s − 1) + d/s


def apply_smoothing(model: nn.Module, target: SmoothingTarget, s: torch.Tensor) -> None:
    """Fold X → X/s into the producer and W → W·diag(s) into every consumer (exact in real arithmetic)."""
    modules = dict(model.named_modules())
    producer = modules[target.producer]
    if target.kind == "modulation":
        divide_modulation(producer, s, target.shift_chunk, target.scale_chunk, target.num_chunks)
    elif target.kind == "value":
        divide_output_rows(producer, s)
    else:
        raise ValueError(f"unknown smoothing target kind {target.kind!r}")
    for name in target.consumers:
        scale_input_columns(modules[name], s)


@torch.no_grad()
def shift_input(model: nn.Module, target: SmoothingTarget, offset: torch.Tensor) -> None:
    """Add `offset` per channel to the target's input, compensated in the consumers' biases (b ← b − W·offset).

    Modulation targets add it to the shift rows' bias; the value target to `to_v`'s bias (softmax rows sum to
    1, so the attention output moves by exactly the offset). Exact in real arithmetic.
    """
    modules = dict(model.named_modules())
    producer = modules[target.producer]
    if target.kind == "modulation":
        dim = producer.out_features // target.num_chunks
        producer.bias[target.shift_chunk * dim : (target.shift_chunk + 1) * dim] += offset.to(producer.bias)
    elif target.kind == "value":
        producer.bias += offset.to(producer.bias)
    else:
        raise ValueError(f"unknown smoothing target kind {target.kind!r}")
    for name in target.consumers:
        consumer = modules[name]
        consumer.bias -= consumer.weight @ offset.to(consumer.weight)


@torch.no_grad()
def shift_input_per_group(model: nn.Module, target: SmoothingTarget, edges: torch.Tensor, offsets: torch.Tensor) -> None:
    """`shift_input` with one offset per timestep group ([G, C]; groups by `edges`, see `groupbias`).

    The producer gains per-group biases on the rows that make the input (adaLN shift rows, or `to_v`), every
    consumer the per-group bias −W·offset_g. Exact in real arithmetic at every timestep.
    """
    modules = dict(model.named_modules())
    producer = modules[target.producer]
    width = offsets.shape[1]
    if target.kind == "modulation":
        rows = (target.shift_chunk * width, (target.shift_chunk + 1) * width)
    elif target.kind == "value":
        rows = (0, width)
    else:
        raise ValueError(f"unknown smoothing target kind {target.kind!r}")
    add_group_bias(model, producer, edges, offsets, rows)
    for name in target.consumers:
        consumer = modules[name]
        add_group_bias(model, consumer, edges, -offsets.to(consumer.weight) @ consumer.weight.T)
