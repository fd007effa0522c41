"""Multi-process calibration (`accelerate launch`, `torchrun`): who samples what, and exact reductions.

Calibration splits its samples (class labels × noise seeds) across processes: `shard(n, rank, world)` gives each
process a contiguous range of GLOBAL sample indices, and a sample keeps the noise seed of its global index, so the
union of the shards is exactly the single-process calibration set. Every statistic is then reduced so that all
processes hold the same values: maxima (and absmax, and per-sample rows written at their global positions into a
zero-initialised tensor) with MAX, minima with MIN (bit-exact: max/min do not round), sums (GPTQ's Hessians) with
SUM (equal up to float summation order), random token samples gathered in rank order.

Single process (no launcher, WORLD_SIZE unset or 1, no process group): nothing is initialised and every helper
is the identity. Under a launcher, `process_info()` initialises the process group through
`accelerate.PartialState` (NCCL on GPUs, gloo on CPU) unless one is already initialised. Collectives run on the
process group's device (CUDA for NCCL, CPU for gloo) and results come back on the tensor's own device.

Every process must make the same collective calls in the same order: a process with no samples still joins them.
See docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["process_info", "is_distributed", "is_main_process", "wait_for_everyone", "shard", "comm_device",
           "all_reduce_max", "all_reduce_min", "all_reduce_sum", "gather_rows", "broadcast", "seen_anywhere",
           "reduce_layer_stats"]


def _launched() -> bool:
    """A distributed launch is on: a process group exists, or the launcher's environment asks for > 1 process."""
    if dist.is_available() and dist.is_initialized():
        return True
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def process_info() -> tuple[int, int]:
    """(rank, world size): (0, 1) in a single process, where nothing is initialised."""
    if not _launched():
        return 0, 1
    if not dist.is_initialized():
        from accelerate import PartialState

        # on a machine without CUDA accelerate only sets up a CPU (gloo) group when asked for the CPU
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        PartialState(cpu=cpu)
    if not dist.is_initialized():
        raise RuntimeError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but no process group could be initialised")
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return process_info()[1] > 1


def is_main_process() -> bool:
    return process_info()[0] == 0


def wait_for_everyone() -> None:
    """A barrier across processes (nothing in a single process)."""
    if is_distributed():
        dist.barrier()


def shard(n: int, rank: int, world: int) -> range:
    """The contiguous range of global sample indices that process `rank` of `world` handles.

    The ranges of ranks 0..world-1 are disjoint, in order, cover range(n), and differ in size by at most one (the
    first n % world ranks get one more). With n < world the last ranks get an empty range (they still join every
    collective).
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world size {world}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def comm_device() -> torch.device:
    """Where the process group's collectives take tensors: the current CUDA device for NCCL, else the CPU (needs an
    initialised process group)."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    if not is_distributed():
        return tensor
    work = tensor.detach().to(comm_device(), copy=True).contiguous()
    dist.all_reduce(work, op=getattr(dist.ReduceOp, op))
    return work.to(tensor.device)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over processes (a new tensor on `tensor`'s device; `tensor` itself in one process)."""
    return _all_reduce(tensor, "MAX")


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum over processes."""
    return _all_reduce(tensor, "MIN")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over processes (float: equal to a single-process sum up to summation order)."""
    return _all_reduce(tensor, "SUM")


def gather_rows(rows: torch.Tensor | None, columns: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Concatenate every process's rows [M_rank, columns] in rank order (None or 0 rows: contributes nothing).

    Returns None when no process has a row. The result is on `rows`' device (CPU when this process has none).
    """
    if not is_distributed():
        return rows
    device = rows.device if rows is not None else torch.device("cpu")
    local = rows if rows is not None else torch.zeros(0, columns, dtype=dtype)
    comm = comm_device()
    world = dist.get_world_size()
    count = torch.tensor([local.shape[0]], dtype=torch.int64, device=comm)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    longest = max(counts)
    if longest == 0:
        return None
    padded = torch.zeros(longest, columns, dtype=local.dtype, device=comm)
    padded[: local.shape[0]] = local.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(device)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Process `src`'s values of `tensor` (same shape and dtype on every process), on `tensor`'s device."""
    if not is_distributed():
        return tensor
    work = tensor.detach().to(comm_device(), copy=True).contiguous()
    dist.broadcast(work, src=src)
    return work.to(tensor.device)


def seen_anywhere(names: Sequence[str], seen: Callable[[str], bool]) -> list[str]:
    """The names (same list, same order on every process) for which `seen(name)` holds on at least one process."""
    if not is_distributed() or not names:
        return [n for n in names if seen(n)]
    flags = all_reduce_max(torch.tensor([1 if seen(n) else 0 for n in names], dtype=torch.int32))
    return [n for n, flag in zip(names, flags.tolist()) if flag]


def reduce_layer_stats(stats: dict, names: Sequence[str], empty: Callable[[str], object]) -> dict:
    """Reduce per-process `calibration.LayerStats` into the global ones, identical on every process.

    `stats`: {name: LayerStats} this process recorded (per-sample rows written at their global positions, zeros
    elsewhere); `names`: every layer that may have been recorded, in the same order on every process; `empty(name)`:
    fresh statistics (max −inf, min +inf, absmax and rows 0) for a layer this process never saw but another did.
    max, absmax and the sample rows: MAX; min: MIN (all bit-exact). token_samples: gathered in rank order.
    """
    if not is_distributed():
        return stats
    out = {}
    for name in seen_anywhere(list(names), lambda n: n in stats):
        s = stats[name] if name in stats else empty(name)
        out[name] = dataclasses.replace(
            s,
            max=all_reduce_max(s.max),
            min=all_reduce_min(s.min),
            absmax=all_reduce_max(s.absmax),
            sample_absmax=None if s.sample_absmax is None else all_reduce_max(s.sample_absmax),
            token_samples=gather_rows(s.token_samples, s.max.shape[-1], s.max.dtype),
        )
    return out
