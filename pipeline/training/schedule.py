"""The learning-rate schedule: linear warm-up to the peak, then a half cosine down to a floor.

A LambdaLR over `lr_factor`, so its state is the step count alone and a resumed run continues the
same curve exactly. Not transformers' get_cosine_with_min_lr_schedule_with_warmup: that one gives
the first step an LR of 0 (a step that changes nothing) and, past `total`, rises again; this one's
first step already learns (1/warmup of the peak) and stays at the floor past `total`.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to the peak over `warmup` steps, then cosine down to `min_ratio` of it at
    `total` (a warm-up longer than `total`: warm-up only)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                  min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, min_ratio))
