"""Named student sizes, and fitting one to a store's geometry (frame size, clip length, target grid).

A preset fixes the network's shape; the store fixes what goes in and what must come out. When the
preset's merge strides cannot produce the store's token grid they are re-derived (same merge
positions, per-axis factors spread over them); when no strides can, the error says why.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, is_dataclass
from typing import Any, Mapping

from .configuration import GeometryError, LiteFrameConfig

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's student: ViT-B, 4x32x32 patches -> 2x16x16 -> 1x8x8 = 64 tokens per 4-frame clip.
    "vitb": dict(
        image_size=448, patch_size=14, clip_frames=4, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072, downsample_after=[4, 8],
        downsample_stride=[[2, 2, 2], [2, 2, 2]], head_hidden_size=1536, target_dim=3584,
    ),
    # Tests and the CPU demo: 4x8x8 patches -> 2x4x4 -> 1x2x2.
    "tiny": dict(
        image_size=112, patch_size=14, clip_frames=4, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=128, downsample_after=[2, 3],
        downsample_stride=[[2, 2, 2], [2, 2, 2]], head_hidden_size=None, target_dim=32,
    ),
    # InternViT-300M-shaped (24 x 1024, 16 heads, MLP 4096): the teacher's cost with the student's merges.
    "teacher": dict(
        image_size=448, patch_size=14, clip_frames=4, hidden_size=1024, num_hidden_layers=24,
        num_attention_heads=16, intermediate_size=4096, downsample_after=[8, 16],
        downsample_stride=[[2, 2, 2], [2, 2, 2]], head_hidden_size=None, target_dim=3584,
    ),
}


def preset_config(name: str, **overrides: Any) -> LiteFrameConfig:
    """A preset with overrides; the target grid follows the geometry unless given explicitly."""
    if name not in PRESETS:
        raise KeyError(f"unknown student preset {name!r}; known: {sorted(PRESETS)}")
    kwargs = {**PRESETS[name], **overrides}
    config = LiteFrameConfig(**kwargs)
    if "target_grid" not in overrides:
        config.target_grid = list(config.output_grid())
    if "target_tokens" not in overrides:
        config.target_tokens = math.prod(config.target_grid)
    config.check_geometry()
    return config


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _spread(total: int, merges: int) -> list[int]:
    """Split an integer stride over `merges` merges, largest prime factors first, earliest merge on ties."""
    parts = [1] * merges
    n, primes, p = total, [], 2
    while n > 1:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    for prime in sorted(primes, reverse=True):
        i = min(range(merges), key=lambda j: (parts[j], j))
        parts[i] *= prime
    return parts


def fit_strides(config: LiteFrameConfig) -> list[list[int]]:
    """Merge strides that turn one clip's patch grid into `config.target_grid`, or GeometryError."""
    t, h, w = config.clip_frames, *config.patch_grid
    tt, th, tw = config.target_grid
    ih, iw = config.image_hw
    if ih % config.patch_size or iw % config.patch_size:
        raise GeometryError(
            f"frames of {ih}x{iw} px are not a multiple of the student's patch size {config.patch_size}: "
            "override patch_size, or write the store at a frame size that is"
        )
    totals = []
    for axis, have, want in (("time", t, tt), ("height", h, th), ("width", w, tw)):
        if want <= 0 or have % want:
            raise GeometryError(
                f"cannot map the student's {t}x{h}x{w} patch grid per clip ({config.clip_frames} frames of {ih}x{iw} px, "
                f"patch {config.patch_size}) to the store's {tt}x{th}x{tw} target grid: the {axis} axis has {have} "
                f"positions, not a multiple of {want}"
            )
        totals.append(have // want)
    merges = len(config.downsample_after)
    if merges == 0:
        if totals != [1, 1, 1]:
            raise GeometryError(f"the target grid needs strides {totals} but the preset has no merge stage")
        return []
    per_axis = [_spread(total, merges) for total in totals]
    return [[per_axis[0][i], per_axis[1][i], per_axis[2][i]] for i in range(merges)]


def config_for_store(preset: str | LiteFrameConfig, schema: Any, **overrides: Any) -> LiteFrameConfig:
    """Size a preset to a store: frame size, clip length, target tokens/grid/width and target statistics.

    `schema` is the store's store.json as a dict or a dataclass with the same fields. Merge strides are
    re-derived when the preset's own cannot produce the target grid (not when given in `overrides`).
    """
    frames, clip, target = _field(schema, "frames"), _field(schema, "clip"), _field(schema, "target")
    stats = _field(schema, "target_stats")
    if frames is None or clip is None or target is None:
        raise GeometryError("store schema lacks one of 'frames', 'clip', 'target': not a LiteFrame store.json")
    from_store = dict(
        image_size=[int(s) for s in _field(frames, "size")],
        clip_frames=int(_field(clip, "frames")),
        target_tokens=int(_field(target, "tokens")),
        target_grid=[int(g) for g in _field(target, "grid")],
        target_dim=int(_field(target, "dim")),
    )
    if stats is not None:
        from_store.update(target_mean=_field(stats, "mean"), target_std=_field(stats, "std"))
    if isinstance(preset, LiteFrameConfig):
        own = inspect.signature(LiteFrameConfig.__init__).parameters
        base = {k: v for k, v in preset.to_dict().items() if k in own}
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise KeyError(f"unknown student preset {preset!r}; known: {sorted(PRESETS)}")
    kwargs = {**base, **from_store, **overrides}
    config = LiteFrameConfig(**kwargs)
    if math.prod(config.target_grid) != config.target_tokens:
        raise GeometryError(f"store target grid {config.target_grid} does not hold its {config.target_tokens} tokens")
    if "downsample_stride" not in overrides and list(config.output_grid()) != config.target_grid:
        config.downsample_stride = fit_strides(config)
    config.check_geometry()
    return config
