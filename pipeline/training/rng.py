"""Every rank's RNG state in a checkpoint, so a resumed run draws the same dropout masks and
augmentations as an uninterrupted one (on the same world size; on another, rank r takes the state
of old rank r mod old world size: deterministic, but a different run)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.training.distributed import Dist


def capture(env: Dist) -> dict[str, torch.Tensor]:
    """Every rank's torch (and this rank's CUDA) RNG state, stacked by rank, on every rank (rank 0
    writes the checkpoint). A collective: every rank calls it."""
    def gather(t: torch.Tensor) -> torch.Tensor:
        if env.world_size == 1:
            return t[None]
        t = t.to(env.device)
        out = [torch.empty_like(t) for _ in range(env.world_size)]
        dist.all_gather(out, t)
        return torch.stack(out).cpu()

    states = {"torch": gather(torch.get_rng_state())}
    if env.device.type == "cuda":
        states["cuda"] = gather(torch.cuda.get_rng_state(env.device))
    return states


def restore(states: dict[str, torch.Tensor], env: Dist) -> None:
    """Rank r takes the state of old rank r mod (old world size)."""
    # LMA checkpoints written before lma.finetune ran data-parallel hold one unstacked CPU state
    saved = states["torch"] if states["torch"].ndim == 2 else states["torch"][None]
    # .clone(): torch 2.13 segfaults on a state tensor that is a view with a storage offset
    torch.set_rng_state(saved[env.rank % saved.shape[0]].clone())
    if "cuda" in states and env.device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"][env.rank % states["cuda"].shape[0]].clone(), env.device)
