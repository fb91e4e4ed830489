"""Spatio-temporal token compression: what turns a clip's teacher tokens into the student's targets.

Tokens [B, T, h, w, D] are cut into non-overlapping windows of `factors = (t, hh, ww)` tokens
(frames x rows x columns) and each window becomes one token, so N = (T/t)(h/hh)(w/ww) tokens
remain, ordered (t', h', w') row-major. Two poolings:

- "avg": the window mean.
- "wap" (weighted average pooling, LiteFrame): a softmax-weighted mean that favours the window's
  high-activation tokens. For the n = t*hh*ww tokens x_1..x_n of a window,

      r_i = ||x_i||_2 / mean_j ||x_j||_2          (activation relative to the window)
      w_i = softmax_i(r_i / temperature)
      y   = sum_i w_i x_i

  Normalising by the window's mean norm makes the weights independent of the feature scale
  (a teacher whose features are 10x larger gets the same weights), and with temperature 1 a token
  at twice the mean norm weighs e ≈ 2.7x an average one. When all norms are equal every r_i
  is 1, the weights are exactly 1/n and WAP is the average.

Pure tensor ops (reshape, norm, softmax, sum): deterministic, batched, on whatever device the
tokens are on, with no Python loop over windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("wap", "avg")


@dataclass(frozen=True)
class Compression:
    method: str = "wap"
    factors: tuple[int, int, int] = (4, 2, 2)
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"compression method must be one of {METHODS}, got {self.method!r}")
        if len(self.factors) != 3 or any(int(f) < 1 for f in self.factors):
            raise ValueError(f"compression factors must be three positive ints (t, h, w), got {self.factors}")
        if not self.temperature > 0:
            raise ValueError(f"WAP temperature must be > 0, got {self.temperature}")
        object.__setattr__(self, "factors", tuple(int(f) for f in self.factors))

    def output_grid(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """(T, h, w) token grid -> (T/t, h/hh, w/ww); a clear error when a factor does not divide."""
        for name, size, factor in zip(("frames", "rows", "columns"), grid, self.factors):
            if size % factor:
                raise ValueError(f"{self.method} compression by {self.factors}: {size} {name} is not a multiple "
                                 f"of {factor}")
        return tuple(size // factor for size, factor in zip(grid, self.factors))  # type: ignore[return-value]

    def tokens(self, grid: tuple[int, int, int]) -> int:
        """Number of compressed tokens per clip for a (T, h, w) grid."""
        t, h, w = self.output_grid(grid)
        return t * h * w


def compress_tokens(tokens: torch.Tensor, spec: Compression) -> torch.Tensor:
    """[B, T, h, w, D] -> [B, N, D] with N = (T/t)(h/hh)(w/ww), in the dtype of `tokens`."""
    if tokens.ndim != 5:
        raise ValueError(f"expected tokens [B, T, h, w, D], got shape {tuple(tokens.shape)}")
    b, T, h, w, d = tokens.shape
    nt, nh, nw = spec.output_grid((T, h, w))
    ft, fh, fw = spec.factors
    windows = (tokens.reshape(b, nt, ft, nh, fh, nw, fw, d)
               .permute(0, 1, 3, 5, 2, 4, 6, 7)
               .reshape(b, nt * nh * nw, ft * fh * fw, d))
    if spec.method == "avg":
        return windows.mean(dim=2)
    x = windows.float()
    norms = torch.linalg.vector_norm(x, dim=-1)                               # [B, N, n]
    relative = norms / norms.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    weights = torch.softmax(relative / spec.temperature, dim=-1)
    return torch.einsum("bkn,bknd->bkd", weights, x).to(tokens.dtype)
