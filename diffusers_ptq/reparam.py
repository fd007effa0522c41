"""Offline re-parameterization: divide a Linear group's input by s per channel and multiply its weight columns
by s, folding the division into the modules that produce the input, so that no operation is added.

A smoothing target (models/base.py: producers → consumers) comes from the model's adapter. A producer is the
shift/scale chunks of an adaLN modulation Linear, every output row of a Linear (attention's to_v), or the
shift/scale chunks of an adaLN-single block (its table plus the shared modulation vector, PixArt).
adaLN computes `LN(h)·(1 + scale) + shift`; dividing the result by s means `shift/s` and `(1 + scale)/s − 1`:
the shift rows (weight and bias) are divided by s, the scale rows' weight is divided by s and their bias
becomes `(b + 1)/s − 1`. adaLN-single: the table rows likewise (shift/s, (1 + scale)/s − 1) and the shared
vector's shift and scale chunks are multiplied by 1/s in the block (modulation.py: the one added operation, per
sample, not per token).
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.groupbias import add_group_bias, divide_group_bias_rows
from diffusers_ptq.models.base import ModulationRows, OutputRows, Producer, SharedModulationRows, SmoothingTarget
from diffusers_ptq.modulation import ModulationScale, scale_block_modulation


@torch.no_grad()
def scale_input_columns(linear: nn.Linear, s: torch.Tensor, columns: slice = slice(None)) -> None:
    """W ← W·diag(s) on input columns `columns`: the layer now expects that part of its input divided by s."""
    linear.weight[:, columns] *= s.to(linear.weight)


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


def block_modulation_scale(model: nn.Module, producer: SharedModulationRows) -> ModulationScale:
    """The producer block's ModulationScale (created as ones on first use)."""
    table = model.get_parameter(producer.table)
    return scale_block_modulation(model.get_submodule(producer.block), table.numel(), producer.argument,
                                  producer.index)


@torch.no_grad()
def divide_shared_modulation(model: nn.Module, producer: SharedModulationRows, s: torch.Tensor) -> None:
    """Make an adaLN-single block's `LN(h)·(1 + table_scale + m_scale) + table_shift + m_shift` come out divided by
    s: table shift row /s, table scale row (1 + row)/s − 1, and the block's multiplier of m (and its group biases)
    /s on both chunks."""
    table = model.get_parameter(producer.table)
    if s.numel() != table.shape[-1]:
        raise ValueError(f"smoothing vector has {s.numel()} entries, the modulated width is {table.shape[-1]}")
    s = s.to(table)
    table[producer.shift_chunk] /= s
    table[producer.scale_chunk] = (table[producer.scale_chunk] + 1) / s - 1
    scaler = block_modulation_scale(model, producer)
    width = table.shape[-1]
    for chunk in (producer.shift_chunk, producer.scale_chunk):
        rows = slice(chunk * width, (chunk + 1) * width)
        scaler.scale[rows] /= s.to(scaler.scale)
        divide_group_bias_rows(scaler, s, rows)


def _producer_rows(producer: Producer, linear: nn.Module, width: int) -> tuple[int, int]:
    """The output rows of `linear` that make the smoothed input: a modulation's shift chunk, or all rows."""
    if isinstance(producer, (ModulationRows, SharedModulationRows)):
        return producer.shift_chunk * width, (producer.shift_chunk + 1) * width
    if isinstance(producer, OutputRows):
        return 0, width
    raise ValueError(f"unknown smoothing producer {producer!r}")


def apply_smoothing(model: nn.Module, target: SmoothingTarget, s: torch.Tensor) -> None:
    """Fold X → X/s into every producer and W → W·diag(s) into every consumer (exact in real arithmetic)."""
    modules = dict(model.named_modules())
    for producer in target.producers:
        if isinstance(producer, SharedModulationRows):
            divide_shared_modulation(model, producer, s)
        elif isinstance(producer, ModulationRows):
            divide_modulation(modules[producer.linear], s, producer.shift_chunk, producer.scale_chunk,
                              producer.num_chunks)
        elif isinstance(producer, OutputRows):
            divide_output_rows(modules[producer.linear], s)
        else:
            raise ValueError(f"unknown smoothing producer {producer!r}")
    for name in target.consumers:
        scale_input_columns(modules[name], s, target.column_slice)


@torch.no_grad()
def shift_input(model: nn.Module, target: SmoothingTarget, offset: torch.Tensor) -> None:
    """Add `offset` per channel to the target's input, compensated in the consumers' biases (b ← b − W·offset).

    A modulation producer adds it to its shift rows' bias (adaLN-single: to the block's table shift row); an
    output-rows producer (to_v) to its bias (softmax rows sum to 1, so the attention output moves by exactly the
    offset; with several value producers — joint attention over two streams' V — every one gets it, as the softmax
    runs over all their rows). Exact in real arithmetic.
    """
    modules = dict(model.named_modules())
    for producer in target.producers:
        if isinstance(producer, SharedModulationRows):
            model.get_parameter(producer.table)[producer.shift_chunk] += offset.to(model.get_parameter(producer.table))
            continue
        linear = modules[producer.linear]
        start, stop = _producer_rows(producer, linear, offset.numel())
        linear.bias[start:stop] += offset.to(linear.bias)
    for name in target.consumers:
        consumer = modules[name]
        consumer.bias -= consumer.weight[:, target.column_slice] @ offset.to(consumer.weight)


@torch.no_grad()
def shift_input_per_group(model: nn.Module, target: SmoothingTarget, edges: torch.Tensor, offsets: torch.Tensor) -> None:
    """`shift_input` with one offset per timestep group ([G, C]; groups by `edges`, see `groupbias`).

    Every producer gains per-group biases on the rows that make the input (adaLN shift rows, `to_v`, or an
    adaLN-single block's multiplier of the shared vector), every consumer the per-group bias −W·offset_g. Exact in
    real arithmetic at every timestep.
    """
    modules = dict(model.named_modules())
    for producer in target.producers:
        linear = block_modulation_scale(model, producer) if isinstance(producer, SharedModulationRows) \
            else modules[producer.linear]
        add_group_bias(model, linear, edges, offsets, _producer_rows(producer, linear, offsets.shape[1]))
    for name in target.consumers:
        consumer = modules[name]
        add_group_bias(model, consumer, edges, -offsets.to(consumer.weight) @ consumer.weight[:, target.column_slice].T)
