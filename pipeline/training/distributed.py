"""Who this process is in a data-parallel run, and the few collectives the trainers need.

One code path for a single process, `torchrun` (env:// rendezvous) and a process group someone
else made (Ray Train's TorchTrainer). Every helper is a no-op collective on one process, so the
loops read the same on 1 or N ranks. Values cross ranks as integer or float tensors, never pickles.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Join (or make, under torchrun) the process group; NCCL on CUDA, gloo on CPU.

    device: "auto" (this rank's GPU when there is one), "cpu", "cuda" (GPU LOCAL_RANK) or "cuda:N"
    (one process only: with several, each rank takes the GPU of its LOCAL_RANK)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device.startswith("cuda:") and (world > 1 or dist.is_initialized()):
        raise ValueError(f"--device {device}: with several ranks each takes the GPU of its LOCAL_RANK; "
                         "use --device cuda")
    if not cuda:
        where = torch.device("cpu")
    elif device.startswith("cuda:"):
        where = torch.device(device)
    else:
        where = torch.device("cuda", local % torch.cuda.device_count())
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if not dist.is_initialized() and world > 1:
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), where)
    return Dist(0, 1, where)


def barrier(env: Dist) -> None:
    if env.world_size > 1:
        dist.barrier()


def mean_over_ranks(x: torch.Tensor, env: Dist) -> float:
    if env.world_size > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= env.world_size
    return x.item()


def sum_over_ranks(values: Iterable[float], env: Dist, dtype: torch.dtype = torch.float64) -> list[float]:
    """Element-wise sums of a few numbers over ranks, in one all-reduce."""
    t = torch.tensor(list(values), dtype=dtype, device=env.device)
    if env.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def max_over_ranks(value: float, env: Dist) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    if env.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gather_ints(value: int, env: Dist) -> list[int]:
    """One integer of every rank, by rank, on every rank."""
    return [v[0] for v in gather_int_lists([value], env)]


def gather_int_lists(values: list[int], env: Dist) -> list[list[int]]:
    """Every rank's list of integers (lengths may differ), by rank, on every rank."""
    return [t.tolist() for t in _gather_1d(torch.tensor(values, dtype=torch.int64), env)]


def gather_json(rows: list[dict[str, Any]], env: Dist) -> list[dict[str, Any]]:
    """Every rank's JSON rows, rank by rank, on every rank (as UTF-8 bytes: nothing is unpickled)."""
    if env.world_size == 1:
        return list(rows)
    data = torch.frombuffer(bytearray(json.dumps(rows).encode()), dtype=torch.uint8)
    return [row for part in _gather_1d(data, env) for row in json.loads(part.numpy().tobytes())]


def _gather_1d(t: torch.Tensor, env: Dist) -> list[torch.Tensor]:
    """All ranks' 1-D tensors of one dtype and any lengths (on the CPU): two all-gathers."""
    if env.world_size == 1:
        return [t]
    lengths = [torch.zeros(1, dtype=torch.int64, device=env.device) for _ in range(env.world_size)]
    dist.all_gather(lengths, torch.tensor([len(t)], dtype=torch.int64, device=env.device))
    sizes = [int(n.item()) for n in lengths]
    if not any(sizes):          # the usual case for skip rows: one small all-gather only
        return [t[:0] for _ in sizes]
    padded = torch.zeros(max(sizes), dtype=t.dtype, device=env.device)
    padded[:len(t)] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [o[:n].cpu() for o, n in zip(out, sizes)]


def broadcast_from_main(tensors: Iterable[torch.Tensor], env: Dist) -> None:
    """Make these tensors rank 0's, in place (the trained weights; a frozen LLM is not sent)."""
    if env.world_size > 1:
        for t in tensors:
            dist.broadcast(t.data, src=0)
