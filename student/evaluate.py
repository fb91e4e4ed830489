"""Held-out evaluation: how much of the teacher's tokens the student reproduces.

- `cosine`: mean per-token cosine similarity between prediction and target in the teacher's
  space (de-standardised), the space the language model consumes.
- `r2`: explained variance, 1 - SSE / SST over all tokens and channels in standardised space (every
  channel weighted alike), SST taken around the evaluation set's own per-channel mean.
- `trivial_*`: the same numbers for the predictor that always outputs the store's mean target, the
  floor a useful student must clear.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict[str, Any]], *, to_pixels: Callable[[dict], torch.Tensor],
             target_mean: torch.Tensor, target_std: torch.Tensor, device: torch.device,
             autocast: Callable[[], Any] = nullcontext, max_batches: int | None = None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    mean, std = target_mean.to(device), target_std.to(device)
    clips = tokens = 0
    cos = trivial_cos = sse = trivial_sse = 0.0
    s1 = s2 = None
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if len(batch["target"]) == 0:      # every clip of the batch was bad (and dropped by the loader)
            continue
        target = batch["target"].to(device, non_blocking=True).float()
        pixels = to_pixels(batch)
        with autocast():
            z_pred = model(pixels)
        z_pred = z_pred.float()
        z = (target - mean) / std
        pred = z_pred * std + mean
        cos += F.cosine_similarity(pred, target, dim=-1).sum().item()
        trivial_cos += F.cosine_similarity(mean.expand_as(target), target, dim=-1).sum().item()
        sse += (z_pred - z).double().square().sum().item()
        trivial_sse += z.double().square().sum().item()
        flat = z.double().reshape(-1, z.shape[-1])
        s1 = flat.sum(0) if s1 is None else s1 + flat.sum(0)
        s2 = flat.square().sum(0) if s2 is None else s2 + flat.square().sum(0)
        clips += target.shape[0]
        tokens += target.shape[0] * target.shape[1]
    model.train(was_training)
    if tokens == 0:
        return {"clips": 0}
    sst = (s2 - s1.square() / tokens).sum().item()
    n = tokens * z.shape[-1]
    return {
        "clips": clips,
        "cosine": cos / tokens, "trivial_cosine": trivial_cos / tokens,
        "r2": 1 - sse / sst, "trivial_r2": 1 - trivial_sse / sst,
        "mse": sse / n, "trivial_mse": trivial_sse / n,
    }
