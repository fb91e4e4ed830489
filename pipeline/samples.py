"""Synthetic videos made with ffmpeg, whose frames carry their own index, for tests, demo and bench.

Each frame is ffmpeg's moving `testsrc2` pattern (realistic work for the codec) with a 5x5 grid of
black/white cells over its central square: six fixed marker cells pin the orientation, the other 19
encode the frame index in binary. The grid survives codec rounding, chroma subsampling, downscaling
and the default centre crop, so `frame_index` reads back which source frame a decoded frame is, and
fails on a frame shown in the wrong orientation.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import ffmpeg
import numpy as np

from .ffmpeg import ffmpeg_exe

GRID = 5
# (row, col) -> value of the orientation markers, in display orientation. No rotation or flip of
# the square maps this pattern onto itself.
MARKERS = {(0, 0): 1, (0, 1): 1, (1, 0): 0, (0, GRID - 1): 0, (GRID - 1, 0): 0, (GRID - 1, GRID - 1): 0}
DATA_CELLS = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in MARKERS]  # 19 bits

_CODEC_ARGS = {
    "libx264": {"preset": "veryfast", "crf": 20, "pix_fmt": "yuv420p"},
    "libx265": {"preset": "ultrafast", "crf": 22, "pix_fmt": "yuv420p", "x265-params": "log-level=error"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": 8, "crf": 32, "b:v": 0, "pix_fmt": "yuv420p"},
    "libvpx": {"deadline": "realtime", "cpu-used": 8, "crf": 10, "b:v": "2M", "pix_fmt": "yuv420p"},
    "mpeg4": {"q:v": 3, "pix_fmt": "yuv420p"},
}


def code_grid(index: int) -> np.ndarray:
    """The 5x5 0/1 grid for a frame index, display orientation."""
    if not 0 <= index < 2 ** len(DATA_CELLS):
        raise ValueError(f"frame index {index} does not fit in {len(DATA_CELLS)} bits")
    grid = np.zeros((GRID, GRID), np.uint8)
    for (r, c), v in MARKERS.items():
        grid[r, c] = v
    for bit, (r, c) in enumerate(DATA_CELLS):
        grid[r, c] = (index >> bit) & 1
    return grid


def frame_times(seconds: float, fps: float, vfr: bool = False) -> np.ndarray:
    """Presentation times (from the first frame) of the frames `make_video` writes.

    VFR repeats frame intervals of 1, 0.5 and 1.5 nominal periods (same average rate)."""
    n = int(round(seconds * fps))
    k = np.arange(n)
    if not vfr:
        return k / fps
    return (3 * (k // 3) + np.array([0.0, 1.0, 1.5])[k % 3]) / fps


def make_video(path, seconds: float = 2.0, fps: float = 10, size=(128, 96), codec: str = "libx264",
               gop: int | None = None, rotation: int = 0, vfr: bool = False, index_coded: bool = True,
               noise: int = 0, timeout: float = 600.0) -> Path:
    """Write a synthetic video; `size` is (width, height) as DISPLAYED.

    rotation: clockwise display rotation stored as display-matrix metadata (the pixels are stored
    turned the other way, so a player that honours the metadata shows the frame upright).
    vfr: frame intervals follow `frame_times(..., vfr=True)`.
    noise: strength (0-100) of temporal grain, so the codec works about as hard as on camera footage
    (benchmarks); the index code survives moderate noise (<= 20)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rotation not in (0, 90, 180, 270):
        raise ValueError("rotation must be 0, 90, 180 or 270")
    n = int(round(seconds * fps))
    w, h = size
    cw, ch = (h, w) if rotation in (90, 270) else (w, h)  # coded (stored) size
    side = (min(w, h) // GRID) * GRID
    video = ffmpeg.input(f"testsrc2=size={cw}x{ch}:rate={fps}:duration={n / fps}", f="lavfi")
    stdin = None
    if index_coded:
        # The pixels are stored rotated counter-clockwise by `rotation` so they display upright.
        grids = np.stack([np.rot90(code_grid(i), k=rotation // 90) for i in range(n)]) * 255
        stdin = np.ascontiguousarray(grids, dtype=np.uint8).tobytes()
        code = ffmpeg.input("pipe:", f="rawvideo", pix_fmt="gray", s=f"{GRID}x{GRID}", r=fps)
        code = code.filter("scale", side, side, flags="neighbor")
        video = ffmpeg.overlay(video, code, x=(cw - side) // 2, y=(ch - side) // 2, eof_action="endall")
    if noise:
        video = video.filter("noise", alls=noise, allf="t")
    out_opts = dict(_CODEC_ARGS.get(codec, {}))
    out_opts["vcodec"] = codec
    out_opts["frames:v"] = n
    if gop:
        out_opts["g"] = gop
        if codec == "libx264":
            out_opts["keyint_min"] = gop
            out_opts["sc_threshold"] = 0
    if vfr:
        video = video.filter("settb", "1/90000").filter("setpts", f"(3*floor(N/3)+eq(mod(N,3),1)+1.5*eq(mod(N,3),2))/({fps}*TB)")
        out_opts.update(fps_mode="passthrough", enc_time_base="1:90000")
    tmp = path.with_name(path.stem + ".tmp" + path.suffix) if rotation else path
    cmd = video.output(str(tmp), an=None, **out_opts).global_args("-loglevel", "error", "-nostdin").overwrite_output()
    _run(cmd.compile(cmd=ffmpeg_exe()), stdin, timeout)
    if rotation:
        # Display matrix set on the input and stream-copied: -display_rotation counts counter-clockwise.
        remux = ffmpeg.input(str(tmp), display_rotation=-rotation).output(str(path), c="copy")
        _run(remux.global_args("-loglevel", "error", "-nostdin").overwrite_output().compile(cmd=ffmpeg_exe()),
             None, timeout)
        tmp.unlink()
    return path


def _run(cmd: list[str], stdin: bytes | None, timeout: float) -> None:
    if stdin is not None:
        cmd = [c for c in cmd if c != "-nostdin"]
    res = subprocess.run(cmd, input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"ffmpeg failed writing a sample video: {res.stderr.decode(errors='replace')[-2000:]}")


def frame_index(frame: np.ndarray, region: tuple[int, int, int, int] | None = None) -> int:
    """The index coded in a decoded frame ([H, W, 3] uint8, display orientation).

    region: (x0, y0, x1, y1) of the code square in `frame`; default its central square, which is
    where it lands after the default resize (shorter side + centre crop to a square)."""
    h, w = frame.shape[:2]
    if region is None:
        s = min(h, w)
        region = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    x0, y0, x1, y1 = region
    luma = frame[y0:y1, x0:x1].astype(np.float32).mean(axis=2)
    cy, cx = (y1 - y0) / GRID, (x1 - x0) / GRID
    bits = np.zeros((GRID, GRID), np.uint8)
    for r in range(GRID):
        for c in range(GRID):
            # The inner half of each cell: its borders blur under scaling and compression.
            cell = luma[int((r + 0.25) * cy):max(int((r + 0.75) * cy), int((r + 0.25) * cy) + 1),
                        int((c + 0.25) * cx):max(int((c + 0.75) * cx), int((c + 0.25) * cx) + 1)]
            bits[r, c] = cell.mean() > 127
    if any(bits[rc] != v for rc, v in MARKERS.items()):
        raise ValueError("no index code in this frame, or it is shown rotated/flipped")
    return int(sum(int(bits[rc]) << bit for bit, rc in enumerate(DATA_CELLS)))
