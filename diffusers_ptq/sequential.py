"""Block-sequential calibration's data (issue #22; the stages: api.quantize_sequential): the inputs of one transformer
block for every call of the calibration run, kept in memory or in safetensors files, and their replay through a block.

One calibration run of the whole model records the first block's inputs (`BlockInputRecorder`, an Observer
subscriber); from then on each block is observed by replaying its cached calls (`replay`), in the same calls and
batches as the sampler made them, and its outputs become the next block's inputs (in place: one cache for the whole
chain). A call's inputs are the block's keyword arguments (hidden states positional or not): the tensors whose first
dimension is the batch are its rows, stored per call; the others (FLUX's rotary embedding, None, dicts) are kept as
given. The timestep of each call is kept too, for the group-bias layers HTG installs (groupbias.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BlockCall", "BlockInputs", "BlockInputRecorder", "block_arguments", "onload", "replay"]


@dataclass
class BlockCall:
    """One call's inputs at a block: where the sampler was (step index, first sample, samples in the batch: see
    Observer.set_position), the call's timestep ([B] or [1]), the per-row tensors (or None while they sit in a file)
    and the other arguments."""

    position: tuple[int, int, int]
    timestep: torch.Tensor | None
    rows: dict[str, torch.Tensor] | None
    static: dict
    device: str = "cpu"


class BlockInputs:
    """The cached calls of the block being processed. `directory`: None keeps the rows in memory; a path keeps each
    call's rows in a safetensors file under a fresh folder inside it (removed by `close`), so that only one call's
    rows are in memory at a time."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.calls: list[BlockCall] = []
        self.folder = None if directory is None else tempfile.mkdtemp(prefix="ptq-blocks-", dir=directory)

    def __len__(self) -> int:
        return len(self.calls)

    def _path(self, index: int) -> str:
        return os.path.join(self.folder, f"call-{index:06d}.safetensors")

    def append(self, position, timestep, rows: dict[str, torch.Tensor], static: dict) -> None:
        device = str(next(iter(rows.values())).device)
        self.calls.append(BlockCall(tuple(position), timestep, None, static, device))
        self.set_rows(len(self.calls) - 1, rows)

    def rows(self, index: int) -> dict[str, torch.Tensor]:
        call = self.calls[index]
        if call.rows is not None:
            return call.rows
        from safetensors.torch import load_file

        return load_file(self._path(index), device=call.device)

    def set_rows(self, index: int, rows: dict[str, torch.Tensor]) -> None:
        """Replace one call's rows (the block's outputs become the next block's inputs)."""
        rows = {k: v.detach() for k, v in rows.items()}
        if self.folder is None:
            self.calls[index].rows = rows
            return
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in rows.items()}, self._path(index))

    def close(self) -> None:
        self.calls = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def block_arguments(args: tuple, kwargs: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A block call's (rows, static) arguments: the tensors whose first dimension is the hidden states' batch, and
    the rest. The hidden states may be positional, nothing else may."""
    if len(args) > 1:
        raise ValueError("block-sequential calibration: only the hidden states may be passed to a block positionally")
    named = dict(kwargs, **({"hidden_states": args[0]} if args else {}))
    batch = named["hidden_states"].shape[0]
    rows = {k: v for k, v in named.items() if torch.is_tensor(v) and v.ndim and v.shape[0] == batch}
    return rows, {k: v for k, v in named.items() if k not in rows}


class BlockInputRecorder:
    """Observer subscriber (observe.py): every call's inputs of one block, into `inputs` (a BlockInputs), with the
    sampler's position and the call's timestep."""

    def __init__(self, name: str, block: nn.Module, inputs: BlockInputs):
        self.modules = {name: block}
        self.inputs = inputs
        self._position = (0, 0, 0)
        self._timestep: torch.Tensor | None = None

    def set_position(self, step_index: int, batch_start: int, batch_len: int) -> None:
        self._position = (step_index, batch_start, batch_len)

    def on_call(self, timestep, args, kwargs) -> None:
        self._timestep = None if timestep is None else torch.as_tensor(timestep).reshape(-1).detach()

    def on_input(self, _name: str, _module, args, kwargs) -> None:
        rows, static = block_arguments(args, kwargs)
        self.inputs.append(self._position, self._timestep, rows, static)


def _named_outputs(out, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A block's output by the next block's argument names (ModelAdapter.block_outputs); None entries left out."""
    if torch.is_tensor(out):
        return {names[0]: out}
    return {name: value for name, value in zip(names, out, strict=True) if value is not None}


@torch.no_grad()
def replay(block: nn.Module, inputs: BlockInputs, outputs: tuple[str, ...] = ("hidden_states",), *,
           observer=None, timestep_context=None, into: BlockInputs | None = None) -> None:
    """Run `block` on every cached call, in order. `observer`: told each call's position first (Observer.set_position);
    `timestep_context`: the transformer's groupbias.TimestepContext, set to each call's timestep; `into`: a
    BlockInputs to receive the next block's inputs (the call's rows with the outputs in place of the arguments they
    feed; `into is inputs` overwrites the cache call by call)."""
    for i, call in enumerate(list(inputs.calls)):
        rows = inputs.rows(i)
        if observer is not None:
            observer.set_position(*call.position)
        if timestep_context is not None:
            timestep_context.timestep = call.timestep
        out = block(**rows, **call.static)
        if into is None:
            continue
        following = {**rows, **_named_outputs(out, outputs)}
        if into is inputs:
            inputs.set_rows(i, following)
        else:
            into.calls.append(BlockCall(call.position, call.timestep, None, call.static, call.device))
            into.set_rows(len(into.calls) - 1, following)


@torch.no_grad()
def onload(module: nn.Module, recurse: bool = True) -> None:
    """Give `module` its weights back from accelerate's offload hooks (`cpu_offload`, `disk_offload`, a `device_map`
    with offloaded parts keep them on the meta device between forwards) and drop those hooks: the module becomes a
    plain one holding its own copy of its tensors (so that folds may write into them) where they were loaded.
    Nothing happens to a module without hooks."""
    modules = list(module.modules()) if recurse else [module]
    hooked = [m for m in modules if hasattr(m, "_hf_hook")]
    if not hooked:
        return
    from accelerate.hooks import remove_hook_from_module

    for m in hooked:
        remove_hook_from_module(m)
        for name, tensor in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if tensor is not None and tensor.device.type != "meta":
                copy = tensor.detach().clone()
                if isinstance(tensor, nn.Parameter):
                    setattr(m, name, nn.Parameter(copy, requires_grad=tensor.requires_grad))
                else:
                    m._buffers[name] = copy
