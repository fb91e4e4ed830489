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
             autocast: Callable[[], Any] = nullcontext, max_batches: int | None = None,
             all_reduce: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
    """The metrics over `batches`; with `all_reduce` (an in-place sum over ranks, each rank passing its
    share of the clips), over all ranks' batches: every metric is a function of sums, so one float64
    all-reduce of them gives what one process evaluating every clip would."""
    was_training = model.training
    model.eval()
    mean, std = target_mean.to(device), target_std.to(device)
    dim = mean.shape[-1]
    # clips, tokens, cosine, trivial cosine, SSE, trivial SSE, then per-channel sums of z and z^2
    sums = torch.zeros(6 + 2 * dim, dtype=torch.float64, device=device)
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
        flat = z.double().reshape(-1, dim)
        sums += torch.cat([
            torch.tensor([target.shape[0], target.shape[0] * target.shape[1]], dtype=torch.float64, device=device),
            F.cosine_similarity(pred, target, dim=-1).double().sum().reshape(1),
            F.cosine_similarity(mean.expand_as(target), target, dim=-1).double().sum().reshape(1),
            (z_pred - z).double().square().sum().reshape(1), z.double().square().sum().reshape(1),
            flat.sum(0), flat.square().sum(0)])
    model.train(was_training)
    if all_reduce is not None:
        all_reduce(sums)
    clips, tokens, cos, trivial_cos, sse, trivial_sse = sums[:6].tolist()
    if tokens == 0:
        return {"clips": 0}
    s1, s2 = sums[6:6 + dim], sums[6 + dim:]
    sst = (s2 - s1.square() / tokens).sum().item()
    n = tokens * dim
    return {
        "clips": int(clips),
        "cosine": cos / tokens, "trivial_cosine": trivial_cos / tokens,
        "r2": 1 - sse / sst, "trivial_r2": 1 - trivial_sse / sst,
        "mse": sse / n, "trivial_mse": trivial_sse / n,
    }
