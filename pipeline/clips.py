"""Clip sampling: which timestamps of a video become training clips, and decoding them.

A plan is a pure function of (video_id, info, spec, seed), so a re-run, another worker or a later
audit reproduces exactly the same clips. Each view v draws its own fps ~ U(fps_range) and a start
offset within one clip period from a generator seeded by (video_id, seed, v): adding views never
changes the earlier ones. Clips of T frames then tile the video back to back.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import TooShortError
from .video import Frames, VideoInfo, decode_frames

DEFAULT_MAX_CLIPS_PER_VIEW = 10_000  # ~2.8 h of 1 s clips: no input's plan is unbounded


@dataclass(frozen=True)
class ClipSpec:
    frames: int = 4
    views: int = 1
    fps_range: tuple[float, float] = (1.0, 4.0)
    max_clips_per_view: int | None = None  # None: DEFAULT_MAX_CLIPS_PER_VIEW; larger only when asked
    pad_short: bool = True

    def __post_init__(self) -> None:
        lo, hi = self.fps_range
        if self.frames < 1 or self.views < 1 or not 0 < lo <= hi or (
                self.max_clips_per_view is not None and self.max_clips_per_view < 1):
            raise ValueError(f"bad clip spec {self}: frames, views and max_clips_per_view must be >= 1, "
                             "fps_range 0 < low <= high")


@dataclass(frozen=True)
class ClipPlan:
    clip_id: str  # f"{video_id}-v{view}-c{index:05d}", no dots (a webdataset key)
    video_id: str
    view: int
    index: int  # position in the view's tiling (kept when a cap drops clips, so ids stay stable)
    fps: float
    start: float
    timestamps: tuple[float, ...]  # requested, seconds from the first frame
    padded: int  # trailing frames that repeat the last real frame


def _rng(video_id: str, seed: int, view: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{video_id}\0{seed}\0{view}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _last_time(info: VideoInfo) -> float:
    if info.last_time is not None:
        return max(0.0, info.last_time)
    step = 1.0 / info.avg_fps if info.avg_fps > 0 else 0.0
    return max(0.0, info.duration - step)


def plan_clips(video_id: str, info: VideoInfo, spec: ClipSpec, seed: int) -> list[ClipPlan]:
    """All clips of all views of one video. Timestamps never pass the last frame.

    A view too short for one clip yields one clip padded with the last frame (`pad_short`), or
    nothing; if no view yields a clip, TooShortError (recorded by jobs, not a file error). A view
    longer than `max_clips_per_view` clips (DEFAULT_MAX_CLIPS_PER_VIEW when None) keeps that many,
    spread evenly: whatever an input claims, a plan stays small."""
    T = int(spec.frames)
    lo, hi = (float(x) for x in spec.fps_range)
    last = _last_time(info)
    plans: list[ClipPlan] = []
    for view in range(spec.views):
        rng = _rng(video_id, seed, view)
        fps = float(rng.uniform(lo, hi)) if hi > lo else lo
        u_offset, u_cap = rng.uniform(), rng.uniform()
        period = T / fps
        span = (T - 1) / fps  # first to last frame of a clip
        offset = u_offset * period
        count = math.floor((last - span - offset) / period + 1e-9) + 1 if last >= span + offset else 0
        if count == 0 and last >= span:  # the drawn offset pushed the only clip out: keep it inside
            offset, count = u_offset * (last - span), 1
        if count == 0:
            if spec.pad_short:
                times = np.arange(T) / fps
                padded = int(np.sum(times > last))
                plans.append(_plan(video_id, view, 0, fps, np.minimum(times, last), padded))
            continue
        k = int(spec.max_clips_per_view or DEFAULT_MAX_CLIPS_PER_VIEW)
        if count > k:
            # Evenly spread over the video, with a seeded phase so different seeds pick different clips.
            indices = np.unique(np.floor((np.arange(k) + u_cap) * count / k).astype(int))
        else:
            indices = np.arange(count)
        for i in indices:
            start = offset + i * period
            times = np.minimum(start + np.arange(T) / fps, last)
            plans.append(_plan(video_id, view, int(i), fps, times, 0))
    if not plans:
        raise TooShortError(info.uri, f"{last:.3f} s of frames is shorter than one clip of {T} frames "
                                      f"at {lo:g}-{hi:g} fps and padding is off")
    return plans


def _plan(video_id: str, view: int, index: int, fps: float, times: np.ndarray, padded: int) -> ClipPlan:
    ts = tuple(round(float(t), 6) for t in times)
    return ClipPlan(clip_id=f"{video_id}-v{view}-c{index:05d}", video_id=video_id, view=view, index=index,
                    fps=round(fps, 6), start=ts[0], timestamps=ts, padded=padded)


def decode_clips(uri: str, plans: Sequence[ClipPlan], size=448, resize: str = "shorter_center_crop",
                 timeout: float | None = None, info: VideoInfo | None = None, decoder: str = "ffmpeg",
                 **decode_kw) -> list[tuple[ClipPlan, Frames]]:
    """All clips of one video from a single decode (all views together, so shared frames decode
    once), in plan order. Callers bound memory by passing fewer plans at a time.

    decoder: "ffmpeg" (the CPU path) or "nvdec" (pipeline.nvdec, which raises NvdecFallback for a
    video it cannot decode exactly); `decode_kw` go to that decoder."""
    times = [t for p in plans for t in p.timestamps]
    if decoder == "nvdec":
        from . import nvdec

        frames = nvdec.decode_frames(uri, times, size=size, resize=resize, timeout=timeout, info=info, **decode_kw)
    elif decoder == "ffmpeg":
        frames = decode_frames(uri, times, size=size, resize=resize, timeout=timeout, info=info, **decode_kw)
    else:
        raise ValueError(f"decoder must be 'ffmpeg' or 'nvdec', got {decoder!r}")
    out, pos = [], 0
    for p in plans:
        k = len(p.timestamps)
        out.append((p, Frames(frames.frames[pos:pos + k], frames.timestamps[pos:pos + k], frames.crop_box)))
        pos += k
    return out
