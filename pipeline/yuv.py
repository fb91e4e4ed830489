"""Decoded 4:2:0 planes (NV12 / P016, as NVDEC writes them) -> the RGB frames the CPU path delivers.

Same geometry and colour as `pipeline.video.decode_frames`' ffmpeg chain, in torch on whatever
device the planes are on: display rotation, the crop box of `video.geometry`, a bicubic resize of
each plane in YUV (as zimg does there, so the conversion runs at the output size), then YUV -> RGB
with the stream's matrix and range (ffmpeg's `scale` picks them from the frame's tags the same way:
BT.709 / BT.2020 when tagged, BT.601 otherwise; full range for `pc` / yuvj streams).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .video import RESIZE_POLICIES, VideoInfo, _out_size, geometry

# (Kr, Kb) of each colour matrix ffmpeg names; anything else decodes as BT.601, swscale's default.
_MATRICES = {"bt709": (0.2126, 0.0722), "bt2020nc": (0.2627, 0.0593), "bt2020c": (0.2627, 0.0593),
             "fcc": (0.30, 0.11), "smpte240m": (0.212, 0.087)}
_BT601 = (0.299, 0.114)


def yuv_to_rgb_matrix(info: VideoInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """(3x3 matrix, offsets) mapping (Y, Cb, Cr) in 8-bit code values to RGB in [0, 1]."""
    kr, kb = _MATRICES.get(info.color_matrix, _BT601)
    kg = 1 - kr - kb
    m = torch.tensor([[1.0, 0.0, 2 * (1 - kr)],
                      [1.0, -2 * kb * (1 - kb) / kg, -2 * kr * (1 - kr) / kg],
                      [1.0, 2 * (1 - kb), 0.0]], dtype=torch.float64)
    if full_range(info):
        scale = torch.full((3,), 1 / 255, dtype=torch.float64)
        offset = torch.tensor([0.0, 128.0, 128.0], dtype=torch.float64)
    else:   # limited ("tv") range: Y in [16, 235], chroma in [16, 240]
        scale = torch.tensor([1 / 219, 1 / 224, 1 / 224], dtype=torch.float64)
        offset = torch.tensor([16.0, 128.0, 128.0], dtype=torch.float64)
    return (m * scale).float(), offset.float()


def full_range(info: VideoInfo) -> bool:
    return info.color_range == "pc" or info.pix_fmt.startswith("yuvj")


def split_planes(surface: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 3H/2, W] semi-planar surfaces (uint8 NV12, or uint16 P016 whose high bits hold 10/12-bit
    samples) -> (Y [T, 1, H, W], CbCr [T, 2, H/2, W/2]) as float 8-bit code values: a 10-bit 64
    (limited-range black) becomes 16.0, so one set of constants serves every depth."""
    x = surface.float() if surface.dtype == torch.uint8 else surface.to(torch.int32).float().div_(256)
    y = x[:, :height, :width].unsqueeze(1)
    uv = x[:, height:height + height // 2, :width].reshape(x.shape[0], height // 2, width // 2, 2)
    return y, uv.permute(0, 3, 1, 2)


def _rotate(x: torch.Tensor, rotation: int) -> torch.Tensor:
    """Clockwise display rotation of [T, C, H, W] planes (ffmpeg's transpose=clock for 90)."""
    return torch.rot90(x, k={0: 0, 90: -1, 180: 2, 270: 1}[rotation], dims=(2, 3)) if rotation else x


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if x.shape[-2:] == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)


def to_rgb(y: torch.Tensor, uv: torch.Tensor, info: VideoInfo, size, resize: str = "shorter_center_crop"
           ) -> torch.Tensor:
    """Planes of `info`'s coded orientation -> uint8 [T, H, W, 3] RGB at `size`, display-oriented."""
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    H, W = _out_size(size)
    y, uv = _rotate(y, info.rotation), _rotate(uv, info.rotation)
    (x0, y0, x1, y1), _ = geometry(info, size, resize)
    y = y[:, :, y0:y1, x0:x1]
    uv = uv[:, :, y0 // 2:(y1 + 1) // 2, x0 // 2:(x1 + 1) // 2]
    if resize == "pad":
        s = min(W / info.width, H / info.height)
        h, w = max(1, min(H, round(info.height * s))), max(1, min(W, round(info.width * s)))
    else:
        h, w = H, W
    ycc = torch.cat([_resize(y, h, w), _resize(uv, h, w)], dim=1)
    m, offset = yuv_to_rgb_matrix(info)
    m, offset = m.to(ycc.device), offset.to(ycc.device)
    rgb = torch.einsum("rc,tchw->thwr", m, ycc - offset.view(1, 3, 1, 1))
    rgb = rgb.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    if (h, w) != (H, W):
        out = torch.zeros((rgb.shape[0], H, W, 3), dtype=torch.uint8, device=rgb.device)
        top, left = (H - h) // 2, (W - w) // 2
        out[:, top:top + h, left:left + w] = rgb
        rgb = out
    return rgb
