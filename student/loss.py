"""Distillation losses on standardised targets (per-channel zero mean, unit std, from the store's stats).

`mse_clip` is the paper's CTD loss: "MSE with target-minus-prediction differences clipped beyond 3
standard deviations". Our reading: the difference d = prediction - target is clamped to
[-k, k] with k = `clip_sigma` (3) in standardised units, i.e. 3 of the target channel's standard
deviations, and the loss is mean(clamp(d)^2). A clamped element contributes k^2 to the loss and no
gradient, so tokens the student cannot yet fit (teacher outliers, e.g. high-norm register-like
tokens) stop dominating the update. `clip_sigma <= 0` gives plain MSE.

`cos_smoothl1` is the RADIO/Theia-style alternative: (1 - per-token cosine similarity) + smooth-L1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("mse_clip", "cos_smoothl1")


def mse_clip(pred: torch.Tensor, target: torch.Tensor, clip_sigma: float = 3.0) -> torch.Tensor:
    d = pred.float() - target.float()
    if clip_sigma > 0:
        d = d.clamp(-clip_sigma, clip_sigma)
    return d.square().mean()


def cos_smoothl1(pred: torch.Tensor, target: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    cos = F.cosine_similarity(pred, target, dim=-1)
    return (1 - cos).mean() + F.smooth_l1_loss(pred, target, beta=beta)


def distill_loss(name: str, pred: torch.Tensor, target: torch.Tensor, clip_sigma: float = 3.0,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """The loss over the clips (first axis) that `valid` (bool [B], on any device) marks, all by
    default: the rows of bad clips the loader filled with zeros take no part. With no valid clip the
    loss is an exact zero still connected to the graph, so a DDP rank whose whole batch was bad
    takes its step with the others and contributes a zero gradient."""
    if valid is not None and not bool(valid.all()):
        if not bool(valid.any()):
            return pred.float().sum() * 0.0
        keep = valid.nonzero().squeeze(1).to(pred.device)
        pred, target = pred.index_select(0, keep), target.index_select(0, keep)
    if name == "mse_clip":
        return mse_clip(pred, target, clip_sigma)
    if name == "cos_smoothl1":
        return cos_smoothl1(pred, target)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
