"""Image preprocessing for vision backbones, in torch, without transformers' image processors.

transformers' image processors need torchvision, which we cannot rely on, so the values a
model was trained with (input size, mean, std, rescale factor, resampling filter) are read
from its `preprocessor_config.json` and applied here. Teachers, students and the video LLM
all share these two steps: `Preprocessing.from_pretrained(dir)` and `to_pixel_values(...)`.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# PIL resampling codes, as stored in HF image-processor configs.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "bicubic", 4: "bicubic", 5: "bicubic"}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What turns uint8 RGB frames into a model's `pixel_values`.

    `size` is the model's input (height, width): the crop size when the processor centre-crops,
    else its resize size, because our decoders already deliver frames at that final size.
    """

    size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"

    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, default_size: int | Sequence[int] | None = None) -> "Preprocessing":
        """From the dict of a preprocessor_config.json (any HF image-processor flavour)."""
        size = _read_size(cfg.get("crop_size")) if cfg.get("do_center_crop", "crop_size" in cfg) else None
        size = size or _read_size(cfg.get("size")) or _read_size(default_size) or cls.size
        kw: dict[str, Any] = {"size": size}
        if cfg.get("do_normalize", True):
            if cfg.get("image_mean") is not None:
                kw["image_mean"] = _triple(cfg["image_mean"])
            if cfg.get("image_std") is not None:
                kw["image_std"] = _triple(cfg["image_std"])
        else:
            kw["image_mean"], kw["image_std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        kw["rescale_factor"] = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        if "resample" in cfg and cfg["resample"] is not None:
            kw["resample"] = _RESAMPLE.get(int(cfg["resample"]), "bicubic")
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None, *, default_size: int | Sequence[int] | None = None,
                        **overrides: Any) -> "Preprocessing":
        """Read `preprocessor_config.json` from a model dir when present; explicit overrides win.

        Overrides set to None are ignored, so callers can pass their flags through unchanged.
        """
        cfg = read_preprocessor_config(model_dir) if model_dir is not None else {}
        pre = cls.from_config(cfg, default_size=default_size)
        return pre.replace(**overrides)

    def replace(self, *, size: int | Sequence[int] | None = None, image_mean: Sequence[float] | None = None,
                image_std: Sequence[float] | None = None, rescale_factor: float | None = None,
                resample: str | None = None) -> "Preprocessing":
        changes: dict[str, Any] = {}
        if size is not None:
            changes["size"] = _read_size(size)
        if image_mean is not None:
            changes["image_mean"] = _triple(image_mean)
        if image_std is not None:
            changes["image_std"] = _triple(image_std)
        if rescale_factor is not None:
            changes["rescale_factor"] = float(rescale_factor)
        if resample is not None:
            changes["resample"] = resample
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "rescale_factor": self.rescale_factor, "resample": self.resample}

    def to_pixel_values(self, frames: np.ndarray | torch.Tensor, *, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [..., H, W, 3] (channels last, as decoded) -> normalised [..., 3, h, w] in `dtype`.

        Frames are moved to `device` as uint8 (4x fewer bytes than float), resized there only when
        their size differs from `self.size`, and normalised with one fused multiply-add.
        """
        x = as_tensor(frames)
        if x.shape[-1] != 3:
            raise ValueError(f"expected channels-last RGB frames [..., H, W, 3], got shape {tuple(x.shape)}")
        x = x.to(device, non_blocking=True) if device is not None else x
        lead = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2)
        # Resizing in float32 even for bf16 output: bicubic in bf16 visibly bands.
        work = torch.float32
        x = x.to(work)
        if tuple(x.shape[-2:]) != tuple(self.size):
            # Bicubic overshoots at edges; clamp back to the uint8 range as PIL does.
            x = resize(x, self.size, self.resample).clamp_(0, 255)
        scale = torch.tensor([self.rescale_factor / s for s in self.image_std], device=x.device, dtype=work)
        bias = torch.tensor([-m / s for m, s in zip(self.image_mean, self.image_std)], device=x.device, dtype=work)
        x = torch.addcmul(bias.view(1, 3, 1, 1), x, scale.view(1, 3, 1, 1))
        return x.to(dtype).reshape(*lead, 3, *self.size)


def as_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A zero-copy tensor view of frames; read-only arrays (PIL's, Ray's object store) are only read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(frames)


def resize(images: torch.Tensor, size: Sequence[int], resample: str = "bicubic") -> torch.Tensor:
    """Float [N, C, H, W] -> [N, C, h, w], antialiased when shrinking, as PIL does."""
    mode = resample if resample in ("bilinear", "bicubic", "nearest") else "bicubic"
    if mode == "nearest":
        return F.interpolate(images, size=tuple(size), mode=mode)
    return F.interpolate(images, size=tuple(size), mode=mode, antialias=True, align_corners=False)


def read_preprocessor_config(model_dir: str | Path) -> dict[str, Any]:
    """The model dir's preprocessor_config.json as a dict, {} when it has none."""
    path = Path(model_dir) / PREPROCESSOR_CONFIG
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return cfg


def _read_size(size: Any) -> tuple[int, int] | None:
    """HF size formats: int, [h, w], {"height", "width"}, {"shortest_edge"} (square after our crop)."""
    if size is None:
        return None
    if isinstance(size, (int, float)):
        return int(size), int(size)
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        for key in ("shortest_edge", "longest_edge"):
            if size.get(key):
                return int(size[key]), int(size[key])
        return None
    size = list(size)
    if len(size) == 1:
        return int(size[0]), int(size[0])
    if len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"cannot read an image size from {size!r}")


def _triple(values: Any) -> tuple[float, float, float]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"expected 1 or 3 channel values, got {values}")
    return tuple(values)  # type: ignore[return-value]
