"""Probe videos and decode exactly the frames asked for, through ffmpeg, with bounded memory and time.

How a decode stays exact and cheap:
1. `probe` demuxes the chosen video stream once without decoding (`-c copy -f framecrc`): every
   packet's presentation time and keyframe flag, i.e. the exact frame times of the video (VFR
   included). Containers without packet pts (AVI) fall back to one decoding pass that records the
   decoder's own timestamps.
2. Each requested time maps to the frame with the nearest presentation time (ties: the earlier).
3. ffmpeg decodes with a `select` filter on those exact times (`-copyts`, so the filter sees the
   container's clock), so unwanted frames are never rotated, scaled, converted or piped; the wanted
   frames are cropped and scaled inside ffmpeg and arrive as raw RGB24 read frame by frame.
   Far-apart frames are reached by input seeking (`-ss` before `-i`) to the keyframe before them,
   one short ffmpeg run per group; a run is stopped as soon as its last frame arrived.
4. Every frame is counted: a run that delivers fewer frames than selected is retried from the start
   of the file, then against decoder timestamps; still short means a corrupt or truncated stream
   (`-xerror` stops at the first decoding error, so concealed garbage is never returned).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import ffmpeg
import numpy as np

from . import remote
from .errors import CorruptVideoError, DecodeTimeoutError, NoVideoStreamError, NotAVideoError, VideoError
from .ffmpeg import TRUNCATION_MARKERS, FFmpeg, check_local, error_lines, open_error

RESIZE_POLICIES = ("shorter_center_crop", "squash", "pad")
SEEK_GAP_S = 1.0  # seek (new ffmpeg run) only when it skips more than this much video: a run costs ~30 ms
_GRAPH_ARG_MAX = 32_000  # longer filter graphs go through a file (Linux caps one argument at 128 KiB)


@dataclass(frozen=True)
class VideoInfo:
    uri: str
    duration: float  # first frame to the end of the last frame, seconds
    avg_fps: float  # frames / time actually spanned (what VFR sources really deliver)
    nominal_fps: float  # the stream's declared (r_frame_rate-like) rate
    num_frames: int | None
    width: int  # display orientation (after rotation)
    height: int
    rotation: int  # clockwise degrees applied for display: 0/90/180/270
    codec: str
    pix_fmt: str
    start_time: float  # container time of the first frame, seconds (non-zero in e.g. MPEG-TS)
    last_time: float | None = None  # presentation time of the last frame, from the first frame
    stream: int = 0  # absolute index of the decoded video stream in the container


@dataclass
class Frames:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB, display orientation
    timestamps: np.ndarray  # float64 [T]: actual presentation times, seconds from the first frame
    crop_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in display-oriented source pixels


@dataclass(frozen=True)
class _FrameTable:
    """Exact presentation times (container clock, seconds, sorted, unique) and keyframe flags."""

    times: np.ndarray
    key: np.ndarray
    seekable: bool  # keyframes known: input seeking may be used
    from_decoder: bool
    format_start: float = 0.0  # container start time: ffmpeg's -ss counts from it


def video_id(uri: str) -> str:
    """Readable and unique: the file stem (sanitised) plus a hash of the full URI."""
    uri = str(uri)
    stem = os.path.basename(uri.rstrip("/")).rsplit(".", 1)[0]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:48] or "video"
    return f"{slug}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------- inputs

def _resolve(uri: str) -> str:
    """A local, seekable path for the input (remote ones are spooled to the cache)."""
    if remote.is_remote(uri):
        return remote.spool(uri)
    path = remote.local_path(uri)
    check_local(uri, path)
    return path


_TABLES: "OrderedDict[tuple, tuple[_FrameTable, VideoInfo]]" = OrderedDict()
_TABLES_MAX = 64


def _cache_key(uri: str, path: str) -> tuple:
    st = os.stat(path)
    return (str(uri), path, st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------- probe

def probe(uri: str, timeout: float = 30.0) -> VideoInfo:
    """Stream facts plus exact frame times, from one demux pass (no decoding)."""
    return _load(str(uri), timeout)[1]


def _load(uri: str, timeout: float, path: str | None = None) -> tuple[_FrameTable, VideoInfo]:
    path = path or _resolve(uri)
    key = _cache_key(uri, path)
    if key in _TABLES:
        _TABLES.move_to_end(key)
        return _TABLES[key]
    deadline = time.monotonic() + timeout
    cmd = (
        ffmpeg.input(path, copyts=None)["V:0"]
        .output("pipe:", c="copy", f="framecrc")
        .compile(cmd="ffmpeg")[1:]
    )
    with FFmpeg(cmd, uri, timeout) as ff:
        out = ff.read_all()
        rc = ff.wait()
        err = ff.stderr
    header = _parse_header(uri, err, path)
    truncated = [m for m in TRUNCATION_MARKERS if m in err.lower()]
    if truncated:
        raise CorruptVideoError(uri, f"truncated file ({truncated[0]}): the container ends before its data does")
    tb, pts, key_flags = _parse_framecrc(out)
    if rc != 0 and not pts:
        raise CorruptVideoError(uri, f"no readable video packet ({error_lines(err)})")
    if not pts or any(p is None for p in pts):
        table = _decoder_table(uri, path, header["stream"], max(1.0, deadline - time.monotonic()))
    else:
        table = _table(np.asarray(pts, dtype=np.int64), tb, np.asarray(key_flags, bool), from_decoder=False)
    table = dataclasses.replace(table, format_start=header["format_start"])
    info = _info(uri, header, table)
    _TABLES[key] = (table, info)
    while len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return table, info


def _decoder_table(uri: str, path: str, stream: int, timeout: float) -> _FrameTable:
    """Frame times as the decoder reports them: one full decode, no pixel conversion.

    Used when packets carry no pts, or when they disagree with the decoder. No `-xerror` here, so a
    corrupt stream still lists its later frames (a request for them then fails as corrupt instead of
    silently getting an earlier frame)."""
    cmd = (
        ffmpeg.input(path, copyts=None)[str(stream)]
        .output("pipe:", fps_mode="passthrough", enc_time_base="demux", **{"c:v": "wrapped_avframe"}, f="framecrc")
        .compile(cmd="ffmpeg")[1:]
    )
    with FFmpeg(cmd, uri, timeout) as ff:
        out = ff.read_all()
        ff.wait()
        err = ff.stderr
    tb, pts, _ = _parse_framecrc(out)
    pts = [p for p in pts if p is not None]
    if not pts:
        raise CorruptVideoError(uri, f"no frame could be decoded ({error_lines(err)})")
    key = np.zeros(len(pts), bool)
    return _table(np.asarray(pts, dtype=np.int64), tb, key, from_decoder=True)


def _table(pts: np.ndarray, tb: Fraction, key: np.ndarray, from_decoder: bool) -> _FrameTable:
    order = np.argsort(pts, kind="stable")
    pts, key = pts[order], key[order]
    uniq, first = np.unique(pts, return_index=True)
    key = np.logical_or.reduceat(key, first) if len(pts) else key
    times = uniq.astype(np.float64) * (tb.numerator / tb.denominator)
    key = key.copy()
    key[0] = True  # decoding always starts somewhere before the first frame
    return _FrameTable(times=times, key=key, seekable=not from_decoder, from_decoder=from_decoder)


_NOPTS = -(2**63)


def _parse_framecrc(out: bytes) -> tuple[Fraction, list[int | None], list[bool]]:
    tb, pts, key = Fraction(1, 1), [], []
    for line in out.decode("ascii", "replace").splitlines():
        if line.startswith("#tb 0:"):
            tb = Fraction(line.split(":", 1)[1].strip())
        elif line and line[0].isdigit():
            f = [x.strip() for x in line.split(",")]
            if len(f) < 6:
                continue
            p = int(f[2])
            pts.append(None if p == _NOPTS else p)
            flags = next((x for x in f[6:] if x.startswith("F=")), None)
            key.append(flags is None or bool(int(flags[2:], 16) & 1))
    return tb, pts, key


_STREAM = re.compile(r"^\s*Stream #0:(\d+)(?:\[0x[0-9a-fA-F]+\])?(?:\([^)]*\))?: (\w+): (.*)$")


def _split_top(s: str) -> list[str]:
    """Split on commas outside parentheses: 'yuv420p(tv, bt709), 320x180' -> 2 fields."""
    parts, depth, cur = [], 0, []
    for ch in s:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def _rate(text: str, unit: str) -> float | None:
    m = re.search(r"([\d.]+)(k?) " + unit + r"\b", text)
    if not m:
        return None
    v = float(m.group(1)) * (1000 if m.group(2) else 1)
    for exact in (24000 / 1001, 30000 / 1001, 60000 / 1001, 120000 / 1001):  # printed as 23.98, 29.97...
        if abs(v - exact) < 0.006:
            return exact
    return v


def _parse_header(uri: str, err: str, path: str) -> dict:
    """The `ffmpeg -i` dump: the first video stream that is not cover art, and its display matrix."""
    fmt = re.search(r"Input #0, (.*), from '", err)
    if not fmt:
        raise open_error(uri, err, path)
    if fmt.group(1) == "image2" or fmt.group(1).endswith("_pipe"):
        raise NotAVideoError(uri, f"a still image ({fmt.group(1)}), not a video")
    lines = err.splitlines()
    start = re.search(r"Duration: [^,]+, start: (-?[\d.]+)", err)
    for i, line in enumerate(lines):
        m = _STREAM.match(line)
        if not m or m.group(2) != "Video" or "(attached pic)" in line:
            continue
        fields = _split_top(m.group(3))
        size = next((z for z in (re.match(r"(\d+)x(\d+)\b", f) for f in fields[1:]) if z), None)
        rotation = 0
        for side in lines[i + 1:]:
            if _STREAM.match(side) or side.startswith(("Output", "Stream mapping", "[")):
                break
            r = re.search(r"rotation of (-?[\d.]+) degrees", side)
            if r:  # ffmpeg's own convention (fftools get_rotation): display = rotate clockwise by -angle
                rotation = int(-round(float(r.group(1)))) % 360
                rotation = min((0, 90, 180, 270), key=lambda a: min(abs(a - rotation), 360 - abs(a - rotation)))
        return {
            "stream": int(m.group(1)),
            "codec": fields[0].split()[0],
            "pix_fmt": fields[1].split("(")[0].strip() if len(fields) > 1 else "",
            "coded_size": (int(size.group(1)), int(size.group(2))) if size else (0, 0),
            "fps": _rate(m.group(3), "fps"),
            "tbr": _rate(m.group(3), "tbr"),
            "rotation": rotation,
            "format_start": float(start.group(1)) if start else 0.0,
        }
    raise NoVideoStreamError(uri, "the container has no video stream")


def _info(uri: str, h: dict, table: _FrameTable) -> VideoInfo:
    rel = table.times - table.times[0]
    n = len(rel)
    nominal = h["tbr"] or h["fps"] or 0.0
    avg = (n - 1) / rel[-1] if n > 1 and rel[-1] > 0 else nominal
    step = float(np.median(np.diff(rel))) if n > 1 else (1.0 / nominal if nominal else 0.0)
    w, hgt = h["coded_size"]
    if h["rotation"] in (90, 270):
        w, hgt = hgt, w
    return VideoInfo(
        uri=uri, duration=float(rel[-1] + step), avg_fps=float(avg), nominal_fps=float(nominal or avg),
        num_frames=n, width=w, height=hgt, rotation=h["rotation"], codec=h["codec"], pix_fmt=h["pix_fmt"],
        start_time=float(table.times[0]), last_time=float(rel[-1]), stream=h["stream"],
    )


# ---------------------------------------------------------------------------------------------- geometry

def _out_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the delivered frames; an int means square."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _geometry(info: VideoInfo, size, resize: str) -> tuple[tuple[int, int, int, int], list[tuple]]:
    """The crop box (display pixels) and the filters after `select`: orient, crop, scale, pad."""
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    H, W = _out_size(size)
    dw, dh = info.width, info.height
    chain: list[tuple] = []
    if info.rotation == 90:
        chain.append(("transpose", {"dir": "clock"}))
    elif info.rotation == 270:
        chain.append(("transpose", {"dir": "cclock"}))
    elif info.rotation == 180:
        chain += [("hflip", {}), ("vflip", {})]
    box = (0, 0, dw, dh)
    if resize == "shorter_center_crop":
        # The largest centred window with the output's aspect ratio, cut before scaling.
        if dw * H > dh * W:
            cw, ch = min(dw, max(1, round(dh * W / H))), dh
        else:
            cw, ch = dw, min(dh, max(1, round(dw * H / W)))
        x0, y0 = (dw - cw) // 2, (dh - ch) // 2
        box = (x0, y0, x0 + cw, y0 + ch)
        if (cw, ch) != (dw, dh):
            chain.append(("crop", {"w": cw, "h": ch, "x": x0, "y": y0, "exact": 1}))
        chain.append(("scale", {"w": W, "h": H, "flags": "bicubic"}))
    elif resize == "squash":
        chain.append(("scale", {"w": W, "h": H, "flags": "bicubic"}))
    else:  # pad: fit inside, black bars
        s = min(W / dw, H / dh)
        sw, sh = max(1, min(W, round(dw * s))), max(1, min(H, round(dh * s)))
        chain.append(("scale", {"w": sw, "h": sh, "flags": "bicubic"}))
        chain.append(("pad", {"w": W, "h": H, "x": (W - sw) // 2, "y": (H - sh) // 2, "color": "black"}))
    return box, chain


# ---------------------------------------------------------------------------------------------- decode

def _nearest(rel: np.ndarray, req: np.ndarray) -> np.ndarray:
    """Index of the frame whose time is nearest each request (ties go to the earlier frame)."""
    hi = np.clip(np.searchsorted(rel, req, side="left"), 1, len(rel) - 1) if len(rel) > 1 else np.zeros(len(req), int)
    if len(rel) == 1:
        return hi
    lo = hi - 1
    return np.where(np.abs(req - rel[lo]) <= np.abs(rel[hi] - req), lo, hi)


def _select_expr(times: np.ndarray, idx: np.ndarray, eps: float) -> str:
    """A select expression true exactly on the frames `idx` (sorted table indices).

    Consecutive frames collapse into one `between`; runs are searched as a balanced `if` tree, so
    each decoded frame costs O(log runs) to test even for thousands of wanted frames."""
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(idx)]]) - 1
    runs = [(float(times[idx[s]] - eps), float(times[idx[e]] + eps)) for s, e in zip(starts, ends)]

    def tree(lo: int, hi: int) -> str:
        if hi - lo == 1:
            a, b = runs[lo]
            return f"between(t,{a!r},{b!r})"
        mid = (lo + hi) // 2
        return f"if(lt(t,{runs[mid][0]!r}),{tree(lo, mid)},{tree(mid, hi)})"

    # A frame repeated with the same time (some AVI streams) is delivered once.
    return f"{tree(0, len(runs))}*not(eq(t,prev_selected_t))"


def _segments(table: _FrameTable, idx: np.ndarray, seek_gap: float) -> list[tuple[np.ndarray, float | None]]:
    """Group wanted frames into ffmpeg runs: a new run (with a seek) when it skips > seek_gap of video."""
    if not table.seekable:
        return [(idx, None)]
    kf = np.maximum.accumulate(np.where(table.key, np.arange(len(table.key)), 0))
    t = table.times
    groups, begin = [], 0
    for j in range(1, len(idx)):
        k = kf[idx[j]]
        if k > idx[j - 1] and t[k] - t[idx[j - 1]] > seek_gap:
            groups.append(idx[begin:j])
            begin = j
    groups.append(idx[begin:])
    return [(g, float(t[kf[g[0]]]) if kf[g[0]] > 0 else None) for g in groups]


def _run(path: str, uri: str, info: VideoInfo, fmt_start: float, times: np.ndarray, idx: np.ndarray,
         seek: float | None, eps: float, chain: list[tuple], out: np.ndarray, threads: int,
         deadline: float) -> tuple[int, str]:
    """One ffmpeg run delivering frames `idx` into `out`; returns (frames delivered, stderr)."""
    in_opts = {"copyts": None, "noautorotate": None, "threads": threads}
    if seek is not None:
        in_opts.update(ss=f"{max(0.0, seek - fmt_start - 5e-4):.6f}", noaccurate_seek=None)
    stream = ffmpeg.input(path, **in_opts)[str(info.stream)].filter("select", _select_expr(times, idx, eps))
    for name, kw in chain:
        stream = stream.filter(name, **kw)
    cmd = stream.output("pipe:", f="rawvideo", pix_fmt="rgb24", fps_mode="passthrough").global_args(
        "-xerror", "-loglevel", "error").compile(cmd="ffmpeg")[1:]
    graph_file = None
    if "-filter_complex" in cmd and len(cmd[cmd.index("-filter_complex") + 1]) > _GRAPH_ARG_MAX:
        i = cmd.index("-filter_complex")
        fd, graph_file = tempfile.mkstemp(suffix=".ffgraph")
        with os.fdopen(fd, "w") as f:
            f.write(cmd[i + 1])
        cmd[i:i + 2] = ["-/filter_complex", graph_file]
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DecodeTimeoutError(uri, "decode time budget spent before all frames were decoded")
    got = 0
    try:
        with FFmpeg(cmd, uri, remaining) as ff:
            for got in range(len(idx)):
                if not ff.read_into(out[got]):
                    break
            else:
                got = len(idx)
            if got == len(idx):
                ff.close()  # every wanted frame arrived: stop decoding the rest of the file
            else:
                ff.wait()
            err = ff.stderr
    finally:
        if graph_file:
            os.unlink(graph_file)
    if got == 0 and ("Error initializing filter" in err or "Error parsing" in err):
        raise RuntimeError(f"{uri}: ffmpeg rejected the decode graph (a bug, not the input): {error_lines(err)}")
    return got, err


def decode_frames(uri: str, timestamps: Sequence[float], size: int | tuple[int, int] = 448,
                  resize: str = "shorter_center_crop", timeout: float | None = None,
                  info: VideoInfo | None = None, threads: int = 0, seek_gap: float = SEEK_GAP_S) -> Frames:
    """The frames nearest `timestamps` (seconds from the first frame), resized, display-oriented.

    timeout: budget for the whole call (probe included); default 60 s + 2 s per second of video.
    threads: ffmpeg decoder threads, 0 = ffmpeg's choice (all cores).
    Raises a `VideoError` subclass for every bad input; the URI is in the message."""
    uri = str(uri)
    req = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(req)):
        raise ValueError(f"{uri}: timestamps must be finite")
    started = time.monotonic()
    path = _resolve(uri)
    table, probed = _load(uri, 30.0 if timeout is None else timeout, path)
    info = info or probed
    budget = timeout if timeout is not None else 60.0 + 2.0 * max(info.duration, 0.0)
    deadline = started + budget
    H, W = _out_size(size)
    box, chain = _geometry(info, size, resize)
    if len(req) == 0:
        return Frames(np.zeros((0, H, W, 3), np.uint8), np.zeros(0), box)
    for attempt in ("packets", "decoder"):
        rel = table.times - table.times[0]
        pick = _nearest(rel, req)
        uniq, inverse = np.unique(pick, return_inverse=True)
        gaps = np.diff(table.times)
        eps = float(min(1e-3, 0.25 * gaps.min())) if len(gaps) else 1e-3
        frames = np.empty((len(uniq), H, W, 3), np.uint8)
        short = None
        for seg, seek in _segments(table, uniq, seek_gap):
            pos = int(np.searchsorted(uniq, seg[0]))
            view = frames[pos:pos + len(seg)]
            got, err = _run(path, uri, info, table.format_start, table.times, seg, seek, eps, chain, view, threads, deadline)
            if got < len(seg) and seek is not None:  # the seek may have landed badly: from the start
                got, err = _run(path, uri, info, table.format_start, table.times, seg, None, eps, chain, view, threads,
                                deadline)
            if got < len(seg):
                short = (seg, got, err)
                break
        if short is None:
            return Frames(frames[inverse], rel[pick].astype(np.float64), box)
        if table.from_decoder or attempt == "decoder":
            break
        # Packet times may disagree with what the decoder outputs: ask the decoder once.
        table = dataclasses.replace(_decoder_table(uri, path, info.stream, max(1.0, deadline - time.monotonic())),
                                    format_start=table.format_start)
    seg, got, err = short
    missing_t = float(table.times[seg[got]] - table.times[0])
    raise CorruptVideoError(
        uri, f"decoding stopped before the frame at {missing_t:.3f} s ({got} of {len(seg)} frames of a run "
        f"delivered): corrupt or truncated stream ({error_lines(err) or 'stream ended early'})")
