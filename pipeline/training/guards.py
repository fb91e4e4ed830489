"""Non-finite steps: a step whose loss or gradient norm is not finite on any rank is applied on no
rank (a NaN in AdamW's moments would poison every later step), and too many in a row stop the run
with a typed error while the last checkpoint still holds finite weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.training.distributed import Dist


class NonFiniteTrainingError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm: the run diverged (or its data
    is bad in a way the loader cannot see); the last checkpoint holds finite weights."""


def all_finite(env: Dist, *values: torch.Tensor) -> bool:
    """Whether every value is finite on every rank: the same answer everywhere (one MIN all-reduce,
    one host sync). Under DDP the gradient norm is already the same on all ranks, but each rank's
    loss is its own (a clamped or masked NaN can leave finite gradients)."""
    flag = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().float()
    flag = flag.reshape(1).to(env.device)
    if env.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@dataclass
class NonFiniteGuard:
    """Counts skipped steps, in all and in a row; `stop_at` in a row end the run. `setting` says how
    the limit was set, for the error ("more than --max-bad-steps 5")."""

    stop_at: int
    setting: str
    total: int = 0
    in_row: int = 0

    def record(self, applied: bool) -> None:
        self.total += not applied
        self.in_row = 0 if applied else self.in_row + 1

    @property
    def diverged(self) -> bool:
        return self.in_row >= self.stop_at

    def check(self, step: int, checkpoints: str) -> None:
        """Raise NonFiniteTrainingError when the run diverged (call after logging the step)."""
        if self.diverged:
            raise NonFiniteTrainingError(
                f"step {step}: {self.in_row} steps in a row with a non-finite loss or gradient norm, {self.setting}: "
                f"the run diverged (lower the LR, lengthen the warm-up, or check the data); the last checkpoint "
                f"in {checkpoints} holds finite weights")
