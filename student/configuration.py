"""LiteFrame student config: a ViT with temporal convs and strided space-time merges.

The config carries everything needed to turn raw frames into tokens in the teacher's space:
input geometry, the output token grid, and the per-channel target statistics used to
de-standardise predictions, so a saved model directory is self-sufficient at inference.
"""

from __future__ import annotations

import math
from typing import Sequence

from transformers import PretrainedConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GeometryError(ValueError):
    """The student's patch size, strides and clip length cannot produce the requested token grid."""


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class LiteFrameConfig(PretrainedConfig):
    model_type = "liteframe"

    def __init__(
        self,
        image_size: int | Sequence[int] = 448,
        patch_size: int = 14,
        clip_frames: int = 4,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        temporal_kernel: int = 3,
        downsample_after: Sequence[int] = (4, 8),
        downsample_stride: Sequence[Sequence[int]] = ((2, 2, 2), (2, 2, 2)),
        head_hidden_size: int | None = None,
        target_tokens: int = 64,
        target_dim: int = 3584,
        target_grid: Sequence[int] = (1, 8, 8),
        target_mean: Sequence[float] | None = None,
        target_std: Sequence[float] | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        """`downsample_after[i]` = number of blocks before merge i; `downsample_stride[i]` = its (t, h, w).

        `head_hidden_size`: None -> LayerNorm + Linear head, an int -> LayerNorm + MLP with that width.
        `target_mean/std`: per-channel statistics of the teacher targets (from the store), None = identity.
        """
        super().__init__(**kwargs)
        self.image_size = list(_pair(image_size)) if not isinstance(image_size, int) else image_size
        self.patch_size = patch_size
        self.clip_frames = clip_frames
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.temporal_kernel = temporal_kernel
        self.downsample_after = [int(i) for i in downsample_after]
        self.downsample_stride = [[int(s) for s in st] for st in downsample_stride]
        self.head_hidden_size = head_hidden_size
        self.target_tokens = target_tokens
        self.target_dim = target_dim
        self.target_grid = [int(g) for g in target_grid]
        self.target_mean = None if target_mean is None else [float(v) for v in target_mean]
        self.target_std = None if target_std is None else [float(v) for v in target_std]
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.initializer_range = initializer_range

    # Geometry -----------------------------------------------------------------------------

    @property
    def image_hw(self) -> tuple[int, int]:
        return _pair(self.image_size)

    @property
    def patch_grid(self) -> tuple[int, int]:
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def temporal_stride(self) -> int:
        """Frames merged into one output time step: inputs are padded to a multiple of it."""
        return math.prod(s[0] for s in self.downsample_stride)

    def stage_of_block(self) -> list[int]:
        """Index of the resolution stage each block runs at (0 = patch resolution)."""
        return [sum(1 for d in self.downsample_after if d <= i) for i in range(self.num_hidden_layers)]

    def output_grid(self, frames: int | None = None) -> tuple[int, int, int]:
        """(t, h, w) token grid produced from `frames` frames (default: one clip)."""
        t = self.clip_frames if frames is None else frames
        h, w = self.patch_grid
        for st, sh, sw in self.downsample_stride:
            t, h, w = t // st, h // sh, w // sw
        return t, h, w

    def check_geometry(self) -> None:
        """Raise GeometryError with the reason when the geometry cannot produce `target_grid`."""
        problems = []
        ih, iw = self.image_hw
        if ih % self.patch_size or iw % self.patch_size:
            problems.append(f"image size {ih}x{iw} is not a multiple of patch size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.temporal_kernel % 2 != 1:
            problems.append(f"temporal_kernel must be odd, got {self.temporal_kernel}")
        if len(self.downsample_after) != len(self.downsample_stride):
            problems.append("downsample_after and downsample_stride must have the same length")
        if any(not 0 < d < self.num_hidden_layers for d in self.downsample_after) or self.downsample_after != sorted(
            set(self.downsample_after)
        ):
            problems.append(
                f"downsample_after {self.downsample_after} must be increasing block indices in 1..{self.num_hidden_layers - 1}"
            )
        t, h, w = self.clip_frames, *self.patch_grid
        for i, (st, sh, sw) in enumerate(self.downsample_stride):
            if t % st or h % sh or w % sw:
                problems.append(
                    f"merge {i} with stride (t,h,w)=({st},{sh},{sw}) does not divide its input grid {t}x{h}x{w}"
                )
                break
            t, h, w = t // st, h // sh, w // sw
        if not problems and [t, h, w] != list(self.target_grid):
            problems.append(
                f"{self.clip_frames} frames of {ih}x{iw} px, patch {self.patch_size}, strides {self.downsample_stride} "
                f"give a {t}x{h}x{w} token grid per clip, but the target grid is {'x'.join(map(str, self.target_grid))}"
            )
        if math.prod(self.target_grid) != self.target_tokens:
            problems.append(f"target_grid {self.target_grid} does not hold target_tokens={self.target_tokens}")
        for name in ("target_mean", "target_std"):
            stats = getattr(self, name)
            if stats is not None and len(stats) != self.target_dim:
                problems.append(f"{name} has {len(stats)} channels, target_dim is {self.target_dim}")
        if problems:
            raise GeometryError("; ".join(problems))
