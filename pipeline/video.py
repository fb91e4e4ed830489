"""Probe videos and decode exactly the frames asked for, through ffmpeg, with bounded memory and time.

How a decode stays exact and cheap:
1. `probe` demuxes the chosen video stream once without decoding (`-c copy -f framecrc`): every
   packet's presentation and decode time and keyframe flag, i.e. the exact frame times of the video
   (VFR included). Containers without packet pts (AVI) fall back to one decoding pass that records
   the decoder's own timestamps.
2. Each requested time maps to the frame with the nearest presentation time (ties: the earlier).
3. Only the packets those frames need are decoded: from the keyframe before each frame up to the
   frame in decode order, minus pictures nothing refers to (H.264 nal_ref_idc 0, HEVC sub-layer
   non-reference, read from NAL headers by a stream copy) unless requested. An input-side
   `noise=drop=...` bitstream filter on packet dts does the skipping; gaps of more than `seek_gap`
   seconds are jumped with input seeking (`-ss` before `-i`, a new ffmpeg run). A run stops as soon
   as its last frame arrived.
4. A `select` filter on the exact times (`-copyts`, so it sees the container's clock) lets only the
   wanted frames through to rotation, crop and scale (inside ffmpeg); they arrive as raw RGB24,
   read frame by frame into a preallocated array: memory is the requested frames, nothing more.
5. Every frame is counted: a run that delivers fewer frames than selected is retried as a plain
   decode from the start, then against decoder timestamps; still short means a corrupt or truncated
   stream. `-xerror` stops at the first decoding error, so concealed garbage is never returned:
   a request succeeds exactly when no packet its frames depend on is damaged.

Inputs are untrusted: an `InputPolicy` bounds what one of them can make a call do (which URIs are
opened, how much of the stream is considered, how large a frame may be decoded), and ffmpeg reads
nothing but the input's own bytes (`pipeline.ffmpeg.input_options`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
import threading
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import ffmpeg
import numpy as np

from . import remote
from .errors import CorruptVideoError, DecodeTimeoutError, LimitExceededError, NoVideoStreamError
from .ffmpeg import TRUNCATION_MARKERS, FFmpeg, check_local, error_lines, has_filter, input_options, open_error

RESIZE_POLICIES = ("shorter_center_crop", "squash", "pad")
SEEK_GAP_S = 10.0  # seek (a new ffmpeg run, ~40 ms) only past this much video that needs no packet
_GRAPH_ARG_MAX = 32_000  # longer filter graphs go through a file (Linux caps one argument at 128 KiB)


@dataclass(frozen=True)
class InputPolicy:
    """What one input may make a probe or decode do. Inputs come from folders and lists nobody
    checked, so each bound either refuses the input with a typed error or ignores the excess.

    allow_schemes: URI schemes accepted besides local paths, file:// and s3:// (`remote.check_uri`),
        e.g. ("gs", "https").
    max_duration: seconds of video considered from the first frame; a longer video is planned and
        decoded as if it ended there (and its default time budget stays bounded).
    max_gap: a gap between consecutive frames longer than this splits the stream and only the part
        with the most frames is considered: a frame with an absurd timestamp cannot stretch a 2 s
        video over days (nor make a plan of millions of clips).
    max_frames: packets the probe reads (its memory and time); later frames are not considered.
    max_pixels: pixels of a decoded (source) frame; a larger video, or a stream that grows larger
        mid-way, is a LimitExceededError before the decoder allocates it.
    """

    allow_schemes: tuple[str, ...] = ()
    max_duration: float = 4 * 3600.0
    max_gap: float = 300.0
    max_frames: int = 1_000_000
    max_pixels: int = 7680 * 4320

    def plan_limits(self) -> dict:
        """The limits that change which clips a video gets: part of a store's clip-spec identity."""
        return {"max_duration": self.max_duration, "max_gap": self.max_gap, "max_frames": self.max_frames}

    def __post_init__(self) -> None:
        if not (self.max_duration > 0 and self.max_gap > 0 and self.max_frames >= 1 and self.max_pixels >= 1):
            raise ValueError(f"bad input policy {self}: every limit must be positive")
        object.__setattr__(self, "allow_schemes", tuple(self.allow_schemes))


DEFAULT_POLICY = InputPolicy()
_MAX_PIXELS_MARKER = "exceeds specified max pixel count"  # libavutil's words when a frame is over max_pixels


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
    color_range: str = ""  # "tv" (limited), "pc" (full) or "" (untagged: limited)
    color_matrix: str = ""  # YUV->RGB matrix tag, e.g. "bt709"; "" (untagged: BT.601, as swscale does)


@dataclass
class Frames:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB, display orientation
    timestamps: np.ndarray  # float64 [T]: actual presentation times, seconds from the first frame
    crop_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in display-oriented source pixels


@dataclass(frozen=True)
class _Packets:
    """The stream's packets in decode (file) order, as the packet filter and seeks address them.
    Packets the container marks as discarded (edit lists cutting into a GOP) are not shown as
    frames but may still be needed as references."""

    dts: np.ndarray  # int64, strictly increasing
    time: np.ndarray  # float64 presentation time, container seconds
    key: np.ndarray  # bool: decoding may start here
    frame: np.ndarray  # int64 index of the frame it shows, -1 if discarded
    ref: np.ndarray | None = None  # bool: may other pictures reference it; None: unknown (assume so)


@dataclass(frozen=True)
class _FrameTable:
    """The frames of the video stream in presentation order: container-clock times (unique)."""

    times: np.ndarray  # float64 seconds, sorted
    packets: _Packets | None  # None: packets unusable for seeking and skipping (plain decodes only)
    from_decoder: bool
    format_start: float = 0.0  # container start time: ffmpeg's -ss counts from it
    codec: str = ""
    damaged: bool = False  # the codec's parser complained while demuxing: some packet is broken
    time_base: Fraction | None = None  # of the packets' pts (times = pts * time_base); None: from a decoder


def video_id(uri: str) -> str:
    """Readable and unique: the file stem (sanitised) plus 64 bits of a hash of the full URI (no
    collision to expect below billions of videos)."""
    uri = str(uri)
    stem = os.path.basename(uri.rstrip("/")).rsplit(".", 1)[0]
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:48] or "video"
    return f"{slug}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


# Peak memory of one decode, in units of the decoder's frame size F (measured, see decode_memory).
_FFMPEG_BASE = 40 << 20
_FRAMES_HELD = 8            # reference pictures, the frame in the filter graph, demuxer buffers
_FRAMES_PER_THREAD = 2      # frame threading: each decoding thread holds pictures in flight
_TABLE_BYTES_PER_FRAME = 96  # the probe's packet columns while parsing, then the frame table
_WORKER_BASE = 256 << 20    # a (Ray) worker's Python with numpy, pyarrow and this package imported


def decode_memory(size: int | tuple[int, int], frames: int, threads: int, policy: InputPolicy = DEFAULT_POLICY,
                  bytes_per_pixel: float = 3.0) -> int:
    """Bytes one decode task may use at most, to size its memory reservation: its Python worker,
    the frame table of the longest stream `policy` lets the probe read, ffmpeg decoding the largest
    frame `policy` allows with `threads` threads (0 = ffmpeg's choice: cores + 1, at most 16), and
    `frames` output frames of `size` held three times (decode buffer, clip batch, serialised block).

    ffmpeg's part is `40 MiB + F x (8 + 2 x threads)`, F = max_pixels x bytes_per_pixel (3 covers
    10-bit 4:2:0; 1.5 is 8-bit 4:2:0). Peak RSS measured for this decode path (imageio-ffmpeg 9.0,
    x264/x265, 1/2/4/8/16 threads): 1080p 67-163 MiB, 4K 145-480, 4K 10-bit 256-751, 8K 456-1333;
    the formula is above each (8K at 16 threads by 45%). Threads multiply the cost: decode with the
    cores the task reserves, not ffmpeg's default of all of them."""
    if threads <= 0:
        threads = min((os.cpu_count() or 1) + 1, 16)
    h, w = _out_size(size)
    frame = policy.max_pixels * bytes_per_pixel
    ffmpeg_peak = _FFMPEG_BASE + frame * (_FRAMES_HELD + _FRAMES_PER_THREAD * threads)
    return int(_WORKER_BASE + policy.max_frames * _TABLE_BYTES_PER_FRAME + ffmpeg_peak + 3 * frames * h * w * 3)


# ---------------------------------------------------------------------------------------------- inputs

def _resolve(uri: str, timeout: float, policy: InputPolicy) -> str:
    """A local, seekable regular file for an accepted input (remote ones are spooled to the cache)."""
    remote.check_uri(uri, policy.allow_schemes)
    if remote.is_remote(uri):
        return remote.spool(uri, timeout, policy.allow_schemes)
    path = remote.local_path(uri)
    check_local(uri, path)
    return path


_TABLES: "OrderedDict[tuple, tuple[_FrameTable, VideoInfo]]" = OrderedDict()
_TABLES_MAX = 64
_TABLES_LOCK = threading.Lock()  # decode threads of one worker share the cache


def clear_probe_cache() -> None:
    """Forget cached frame tables (benchmarks measuring cold probes; long-lived workers)."""
    with _TABLES_LOCK:
        _TABLES.clear()


def _cache_key(uri: str, path: str, policy: InputPolicy) -> tuple:
    st = os.stat(path)
    return (str(uri), path, st.st_size, st.st_mtime_ns, policy.max_duration, policy.max_gap, policy.max_frames)


def _input(path: str, **options):
    """ffmpeg-python input node for `path`: the file alone, as a video container (`input_options`)."""
    url, safe = input_options(path)
    return ffmpeg.input(url, **safe, **options)


# ---------------------------------------------------------------------------------------------- probe

def probe(uri: str, timeout: float = 30.0, policy: InputPolicy = DEFAULT_POLICY) -> VideoInfo:
    """Stream facts plus exact frame times, from one demux pass (no decoding), within `policy`."""
    return _load(str(uri), timeout, policy=policy)[1]


def _load(uri: str, timeout: float, path: str | None = None,
          policy: InputPolicy = DEFAULT_POLICY) -> tuple[_FrameTable, VideoInfo]:
    path = path or _resolve(uri, timeout, policy)
    key = _cache_key(uri, path, policy)
    with _TABLES_LOCK:
        if key in _TABLES:
            _TABLES.move_to_end(key)
            return _TABLES[key]
    deadline = time.monotonic() + timeout
    cmd = (
        _input(path, copyts=None)["V:0"]
        .output("pipe:", c="copy", copyinkf=None, f="framecrc")
        .compile(cmd="ffmpeg")[1:]
    )
    with FFmpeg(cmd, uri, timeout) as ff:
        tb, dts, pts, flags, complete = _read_framecrc(ff, policy.max_frames)
        if complete:
            rc = ff.wait()
        else:  # enough packets: stop demuxing here
            ff.close()
            rc = 0
        err = ff.stderr
    header = _parse_header(uri, err, path)
    truncated = [m for m in TRUNCATION_MARKERS if m in err.lower()]
    if truncated:
        raise CorruptVideoError(uri, f"truncated file ({truncated[0]}): the container ends before its data does")
    if rc != 0 and not len(pts):
        raise CorruptVideoError(uri, f"no readable video packet ({error_lines(err)})")
    shown = (flags & _DISCARD) == 0
    if not shown.any() or np.any(pts[shown] == _NOPTS):
        table = _decoder_table(uri, path, header["stream"], max(1.0, deadline - time.monotonic()), policy)
    else:
        until = None if complete else int(np.max(np.where(dts != _NOPTS, dts, pts)))
        table = dataclasses.replace(_table(pts, dts, flags, tb, policy, until), time_base=tb)
    damaged = any(line.startswith(f"[{header['codec']} @ ") for line in err.splitlines())
    table = dataclasses.replace(table, format_start=header["format_start"], codec=header["codec"], damaged=damaged)
    info = _info(uri, header, table)
    _remember(key, table, info)
    return table, info


def _remember(key: tuple, table: _FrameTable, info: VideoInfo) -> None:
    with _TABLES_LOCK:
        _TABLES[key] = (table, info)
        _TABLES.move_to_end(key)
        while len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)


def _decoder_table(uri: str, path: str, stream: int, timeout: float, policy: InputPolicy) -> _FrameTable:
    """Frame times as the decoder reports them: one full decode, no pixel conversion.

    Used when packets carry no pts, or when they disagree with the decoder. No `-xerror` here, so a
    corrupt stream still lists its later frames (a request for them then fails as corrupt instead of
    silently getting an earlier frame)."""
    cmd = (
        _input(path, copyts=None, max_pixels=policy.max_pixels)[str(stream)]
        .output("pipe:", fps_mode="passthrough", enc_time_base="demux", **{"c:v": "wrapped_avframe"}, f="framecrc")
        .compile(cmd="ffmpeg")[1:]
    )
    with FFmpeg(cmd, uri, timeout) as ff:
        tb, _, pts, _, complete = _read_framecrc(ff, policy.max_frames)
        if complete:
            ff.wait()
        else:
            ff.close()
        err = ff.stderr
    _check_pixels(uri, err, policy)
    ticks = np.unique(pts[pts != _NOPTS])
    if not len(ticks):
        raise CorruptVideoError(uri, f"no frame could be decoded ({error_lines(err)})")
    ticks = ticks[_span(ticks, tb, policy, None)]  # decoded frames arrive in presentation order: no holes
    return _FrameTable(times=_seconds(ticks, tb), packets=None, from_decoder=True)


def _check_pixels(uri: str, stderr: str, policy: InputPolicy) -> None:
    """The decoder refused a frame over `max_pixels` (a stream that grew mid-way): the limit's error."""
    if _MAX_PIXELS_MARKER in stderr:
        raise LimitExceededError(uri, f"a frame has more than {policy.max_pixels} pixels (InputPolicy.max_pixels)")


def _span(ticks: np.ndarray, tb: Fraction, policy: InputPolicy, until: int | None) -> np.ndarray:
    """Which of the sorted frame times a plan may use (a mask): the run of frames without a gap over
    `max_gap` that holds the most frames, up to `max_duration` after its first frame. When the probe
    stopped early, only frames up to `until` (the last decode time read) are known to have no unread
    frame between them (pts >= dts); the first frame was read either way."""
    sec = float(tb)
    keep = np.zeros(len(ticks), bool)
    n = len(ticks) if until is None else max(1, int(np.searchsorted(ticks, until, side="right")))
    breaks = np.flatnonzero(np.diff(ticks[:n]) * sec > policy.max_gap) + 1
    starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [n]])
    best = int(np.argmax(ends - starts))  # the first of equally large runs
    lo, hi = int(starts[best]), int(ends[best])
    hi = lo + int(np.searchsorted((ticks[lo:hi] - ticks[lo]) * sec, policy.max_duration, side="right"))
    keep[lo:hi] = True
    return keep


def _seconds(ticks: np.ndarray, tb: Fraction) -> np.ndarray:
    return ticks.astype(np.float64) * (tb.numerator / tb.denominator)


def _table(pts: np.ndarray, dts: np.ndarray, flags: np.ndarray, tb: Fraction, policy: InputPolicy,
           until: int | None) -> _FrameTable:
    """Frames = packets not marked discarded, sorted by pts, within `_span`; packets of frames outside
    it stay (as possible references) but show nothing. The packet facts are kept only when they
    identify packets exactly (every dts and pts present, dts strictly increasing, one shown packet
    per pts): the packet filter and the seeks rely on that."""
    shown = (flags & _DISCARD) == 0
    ticks = np.unique(pts[shown])
    times = ticks[_span(ticks, tb, policy, until)]
    usable = (len(ticks) == int(shown.sum()) and not np.any(dts == _NOPTS) and not np.any(pts == _NOPTS)
              and bool(np.all(np.diff(dts) > 0)))
    packets = None
    if usable:
        at = np.minimum(np.searchsorted(times, pts), len(times) - 1)
        frame = np.where(shown & (times[at] == pts), at, -1).astype(np.int64)
        packets = _Packets(dts=dts, time=_seconds(pts, tb), key=(flags & 1) > 0, frame=frame)
    return _FrameTable(times=_seconds(times, tb), packets=packets, from_decoder=False)


_DISCARD = 4  # AV_PKT_FLAG_DISCARD, "F=0x4" in framecrc
_NOPTS = -(2**63)  # AV_NOPTS_VALUE: the packet has no such time


def _read_framecrc(ff: FFmpeg, max_packets: int) -> tuple[Fraction, np.ndarray, np.ndarray, np.ndarray, bool]:
    """(time base, dts, pts, AV_PKT_FLAG_* bits, complete) per packet in file (decode) order, parsed
    from ffmpeg's framecrc output as it streams. Reading stops after `max_packets` packets
    (complete=False), so memory is bounded whatever the input holds."""
    tb, cols, rest = Fraction(1, 1), (array("q"), array("q"), array("q")), b""
    for chunk in ff.chunks(1 << 20):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            tb = _framecrc_line(line, tb, cols)
            if len(cols[0]) >= max_packets:
                return tb, *(np.frombuffer(c, np.int64) for c in cols), False
    tb = _framecrc_line(rest, tb, cols)
    return tb, *(np.frombuffer(c, np.int64) for c in cols), True


def _framecrc_line(line: bytes, tb: Fraction, cols: tuple[array, array, array]) -> Fraction:
    """Append one packet line's dts, pts and flags to `cols`; a time-base line returns the new base."""
    if line.startswith(b"#tb 0:"):
        return Fraction(line.split(b":", 1)[1].strip().decode("ascii"))
    if line[:1].isdigit():
        f = line.split(b",")
        if len(f) >= 6:
            flags = next((x.strip() for x in f[6:] if x.strip().startswith(b"F=")), None)
            cols[0].append(int(f[1]))
            cols[1].append(int(f[2]))
            cols[2].append(1 if flags is None else int(flags[2:], 16))  # framecrc omits F= for plain keyframes
    return tb


# ---------------------------------------------------------------------------------------------- references

# Annex B access-unit delimiter types and how to tell a picture nothing refers to.
_AUD = {"h264": 9, "hevc": 35}


def _with_refs(uri: str, path: str, table: _FrameTable, info: VideoInfo, timeout: float) -> _FrameTable:
    """Add per-frame reference flags for H.264/HEVC, read from NAL headers (no decoding).

    One stream copy to Annex B with an access-unit delimiter per packet; a picture is unreferenced
    when every slice has nal_ref_idc 0 (H.264), or is a sub-layer non-reference slice in the highest
    temporal layer (HEVC). Such frames are dropped before decoding unless requested: exact, and
    typically 30-50% of an H.264 stream with B-frames. On any doubt the flags stay unknown."""
    pk = table.packets
    if pk is None or pk.ref is not None or table.codec not in _AUD:
        return table
    codec = table.codec
    bsf = "h264_metadata=aud=insert" if codec == "h264" else "hevc_metadata=aud=insert"
    cmd = (
        _input(path, copyts=None)[str(info.stream)]
        .output("pipe:", c="copy", copyinkf=None, f=codec, **{"bsf:v": bsf})
        .compile(cmd="ffmpeg")[1:]
    )
    units: list[tuple[bool, int]] = []  # per packet: (unreferenced candidate, temporal id)
    with FFmpeg(cmd, uri, timeout) as ff:
        scan = _NalScan(codec, units)
        for chunk in ff.chunks():
            scan.feed(chunk)
        scan.close()
        rc = ff.wait()
    if rc != 0 or len(units) != len(pk.dts):
        ref = np.ones(len(pk.dts), bool)
    else:
        cand = np.array([u[0] for u in units])
        tid = np.array([u[1] for u in units])
        ref = ~(cand & (tid == tid.max())) if codec == "hevc" else ~cand
    return dataclasses.replace(table, packets=dataclasses.replace(pk, ref=ref))


class _NalScan:
    """Streaming Annex B scan: for each access unit, whether no slice is referenced, and its
    temporal id. Start codes cannot occur inside NAL payloads (emulation prevention)."""

    def __init__(self, codec: str, units: list):
        self.hevc = codec == "hevc"
        self.units = units
        self.tail = b""
        self.cur: list | None = None

    def feed(self, chunk: bytes) -> None:
        data = self.tail + chunk
        arr = np.frombuffer(data, np.uint8)
        if len(arr) < 6:
            self.tail = data
            return
        hits = np.flatnonzero((arr[:-5] == 0) & (arr[1:-4] == 0) & (arr[2:-3] == 1)) + 3
        for h in hits:
            self._nal(data[h], data[h + 1])
        self.tail = data[len(arr) - 5:]

    def close(self) -> None:
        if self.cur is not None:
            self.units.append(tuple(self.cur))

    def _nal(self, b0: int, b1: int) -> None:
        if self.hevc:
            kind, tid = (b0 >> 1) & 0x3F, (b1 & 7) - 1
            if kind == 35:
                self.close()
                self.cur = [True, 0]
            elif kind < 32 and self.cur is not None:  # a slice
                self.cur[0] &= kind < 16 and kind % 2 == 0
                self.cur[1] = max(self.cur[1], tid)
        else:
            kind, ref_idc = b0 & 0x1F, (b0 >> 5) & 3
            if kind == 9:
                self.close()
                self.cur = [True, 0]
            elif kind in (1, 5) and self.cur is not None:
                self.cur[0] &= ref_idc == 0


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
    if not re.search(r"Input #0, (.*), from '", err):
        raise open_error(uri, err, path)
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
            **_color(fields[1] if len(fields) > 1 else ""),
            "format_start": float(start.group(1)) if start else 0.0,
        }
    raise NoVideoStreamError(uri, "the container has no video stream")


_SCAN_ORDERS = ("progressive", "top first", "bottom first", "top coded first (swapped)", "bottom coded first (swapped)")


def _color(pix_fmt_field: str) -> dict:
    """'yuv420p(tv, bt709/bt709/iec61966-2-1, progressive)' -> range 'tv', matrix 'bt709'."""
    inside = pix_fmt_field.partition("(")[2].rstrip(")")
    tags = [t.strip() for t in inside.split(",") if t.strip() and t.strip() not in _SCAN_ORDERS]
    color_range = tags.pop(0) if tags and tags[0] in ("tv", "pc") else ""
    return {"color_range": color_range, "color_matrix": tags[0].split("/")[0] if tags else ""}


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
        color_range=h["color_range"], color_matrix=h["color_matrix"],
    )


# ---------------------------------------------------------------------------------------------- geometry

def _out_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the delivered frames; an int means square."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


# Planar YUV layouts zimg resizes natively: (horizontal, vertical) chroma subsampling.
_ZIMG_LAYOUTS = {f"yuv{j}{k}p{d}": sub for k, sub in (("420", (2, 2)), ("422", (2, 1)), ("444", (1, 1)))
                 for j in ("", "j") for d in ("", "10le", "12le") if not (j and d)}


def _resize(w: int, h: int, src_w: int, src_h: int, pix_fmt: str) -> list[tuple]:
    """Resize in the source's own pixel format, then convert to RGB at the output size: swscale's
    plain YUV->RGB converter is SIMD, its combined scale+RGB path is not (about 2x the CPU).

    The resize itself is zimg's bicubic (Catmull-Rom, the kernel of PIL's BICUBIC that vision
    preprocessing uses) where zimg can take the frames: about 5x less CPU than swscale's bicubic at
    1080p -> 448 px and as close to PIL's antialiased bicubic (bench/RESULTS.md). zimg refuses
    sizes its chroma subsampling does not divide, and not every ffmpeg build has it: swscale then."""
    sub = _ZIMG_LAYOUTS.get(pix_fmt)
    if sub and (w % sub[0], src_w % sub[0], h % sub[1], src_h % sub[1]) == (0, 0, 0, 0) and has_filter("zscale"):
        return [("zscale", {"w": w, "h": h, "filter": "bicubic"}), ("scale", {"flags": "bicubic"})]
    return [("scale", {"w": w, "h": h, "flags": "bicubic"}), ("scale", {"flags": "bicubic"})]


def chain_text(chain: list[tuple]) -> str:
    """A filter chain as ffmpeg's `-vf` text: to run the same pixels through a plain ffmpeg
    (exactness tests, the benchmark's same-work baseline)."""
    return ",".join(name + ("=" + ":".join(f"{k}={v}" for k, v in kw.items()) if kw else "") for name, kw in chain)


def geometry(info: VideoInfo, size, resize: str) -> tuple[tuple[int, int, int, int], list[tuple]]:
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
        chain += _resize(W, H, cw, ch, info.pix_fmt)
    elif resize == "squash":
        chain += _resize(W, H, dw, dh, info.pix_fmt)
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


def _in_ranges(var: str, ranges: Sequence[tuple]) -> str:
    """An ffmpeg expression true when `var` lies in one of the sorted, disjoint [a, b] ranges: a
    balanced `if` tree, so each test costs O(log ranges) even for thousands of ranges."""

    def tree(lo: int, hi: int) -> str:
        if hi - lo == 1:
            a, b = ranges[lo]
            return f"between({var},{a!r},{b!r})"
        mid = (lo + hi) // 2
        return f"if(lt({var},{ranges[mid][0]!r}),{tree(lo, mid)},{tree(mid, hi)})"

    return tree(0, len(ranges))


def _runs_of(values: np.ndarray, keys: np.ndarray) -> list[tuple]:
    """[(values[first], values[last])] for each run of consecutive integers in sorted `keys`."""
    breaks = np.flatnonzero(np.diff(keys) != 1) + 1
    starts = np.concatenate([[0], breaks]).astype(int)
    ends = np.concatenate([breaks, [len(keys)]]).astype(int) - 1
    return [(values[s], values[e]) for s, e in zip(starts, ends)]


def _select_expr(times: np.ndarray, idx: np.ndarray, eps: float) -> str:
    """True exactly on the frames `idx` (sorted table indices); consecutive frames share one range.
    A frame repeated with the same time (some AVI streams) is delivered once."""
    ranges = [(float(a - eps), float(b + eps)) for a, b in _runs_of(times[idx], idx)]
    return f"{_in_ranges('t', ranges)}*not(eq(t,prev_selected_t))"


@dataclass
class _Run:
    """One ffmpeg process: the frames it delivers, where it seeks, which packets it decodes."""

    frames: np.ndarray  # table indices, presentation order
    seek: float | None = None  # container time of the keyframe to seek to
    keep: list[tuple[int, int]] | None = None  # dts ranges of the packets to decode; None: all


# Reading reference flags costs one more stream copy (~30 ms): worth it only when skipping
# unreferenced pictures saves more, i.e. from about 0.2 s of decoding (frames x pixels).
REF_SCAN_MIN = 150e6
MAX_KEEP_RANGES = 1000  # the packet filter is one command-line argument (Linux caps those at 128 KiB)


def _plan(table: _FrameTable, wanted: np.ndarray, seek_gap: float) -> list[_Run]:
    """Which packets to decode for the wanted frames, grouped into ffmpeg runs.

    A wanted frame needs the packets from the keyframe before it (in presentation order, which
    also covers open-GOP leading pictures) up to itself in decode order; of those, unreferenced
    ones other than wanted frames are skipped. Runs are split where more than `seek_gap` seconds
    of video need nothing (the next run seeks there) or where the filter would grow too long."""
    pk = table.packets
    if pk is None:
        return [_Run(wanted)]
    n = len(pk.dts)
    by_time = np.argsort(pk.time, kind="stable")
    key_before = np.empty(n, np.int64)  # packet -> last keyframe packet at or before it in presentation
    key_before[by_time] = np.maximum.accumulate(np.where(pk.key[by_time], by_time, -1))
    pkt_of = np.empty(len(table.times), np.int64)
    pkt_of[pk.frame[pk.frame >= 0]] = np.flatnonzero(pk.frame >= 0)
    targets = pkt_of[wanted]
    lo = np.where(key_before[targets] >= 0, np.minimum(key_before[targets], targets), 0)
    hi = targets
    needed = np.ones(n, bool) if pk.ref is None else pk.ref.copy()
    needed[targets] = True
    spans: list[list] = []  # merged [lo, hi, [frames]] in decode positions
    for i in np.argsort(lo, kind="stable"):
        if spans and lo[i] <= spans[-1][1] + 1:
            spans[-1][1] = max(spans[-1][1], hi[i])
            spans[-1][2].append(wanted[i])
        else:
            spans.append([lo[i], hi[i], [wanted[i]]])
    runs: list[_Run] = []
    frames: list = []
    keep: list = []
    prev_hi = seek = None
    for a, b, fr in spans:
        positions = np.arange(a, b + 1)[needed[a:b + 1]]
        ranges = [(int(x), int(y)) for x, y in _runs_of(pk.dts[positions], positions)]
        gap = prev_hi is not None and pk.time[a] - pk.time[prev_hi] > seek_gap
        if frames and (gap or len(keep) + len(ranges) > MAX_KEEP_RANGES):
            runs.append(_Run(np.sort(np.array(frames)), seek, keep))
            frames, keep = [], []
        if not frames:
            seek = float(pk.time[a]) if a > 0 else None
        frames += fr
        keep += ranges
        prev_hi = b
    runs.append(_Run(np.sort(np.array(frames)), seek, keep))
    return runs


# ffmpeg's words for a command it could not set up: our bug, never the input's (a damaged stream
# says e.g. "Error parsing NAL unit", so the generic "Error parsing" does not qualify).
_GRAPH_BUGS = ("Error initializing filter", "Error parsing filterchain", "Error parsing a filter description",
               "Error applying option", "Error applying decoder options", "Error initializing bitstream filter")


def _run(path: str, uri: str, info: VideoInfo, table: _FrameTable, run: _Run, slots: np.ndarray,
         eps: float, chain: list[tuple], out: np.ndarray, threads: int, deadline: float,
         policy: InputPolicy) -> tuple[int, str]:
    """One ffmpeg process delivering `run.frames` into `out[slots]`; returns (frames delivered, stderr)."""
    # Frame-threaded decoding flags corrupt frames unreliably (a race); on a damaged stream decode
    # single-threaded so `-xerror` refuses every frame the decoder knows to be concealed.
    in_opts = {"copyts": None, "noautorotate": None, "threads": 1 if table.damaged else threads,
               "max_pixels": policy.max_pixels}
    if run.seek is not None:
        in_opts.update(ss=f"{max(0.0, run.seek - table.format_start - 5e-4):.6f}", noaccurate_seek=None)
    if run.keep is not None:
        in_opts["bsf:v"] = f"noise=drop='not({_in_ranges('dts', run.keep)})'"
    stream = _input(path, **in_opts)[str(info.stream)].filter(
        "select", _select_expr(table.times, run.frames, eps))
    for name, kw in chain:
        stream = stream.filter(name, **kw)
    # ffmpeg gives the filter graph one slice thread per core whatever the decoder's threads: with
    # one worker per core (threads=1) that oversubscribes the node, and slicing costs CPU too.
    graph_threads = ["-filter_complex_threads", str(threads)] if threads > 0 else []
    cmd = stream.output("pipe:", f="rawvideo", pix_fmt="rgb24", fps_mode="passthrough").global_args(
        "-xerror", "-loglevel", "error", *graph_threads).compile(cmd="ffmpeg")[1:]
    graph_file = None
    i = cmd.index("-filter_complex")
    if len(cmd[i + 1]) > _GRAPH_ARG_MAX:
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
            while got < len(slots) and ff.read_into(out[slots[got]]):
                got += 1
            if got == len(slots):
                ff.close()  # every wanted frame arrived: stop decoding the rest of the file
            else:
                ff.wait()
            err = ff.stderr
    finally:
        if graph_file:
            os.unlink(graph_file)
    _check_pixels(uri, err, policy)
    if got == 0 and any(m in err for m in _GRAPH_BUGS):
        raise RuntimeError(f"{uri}: ffmpeg rejected the decode graph (a bug, not the input): {error_lines(err)}")
    return got, err


@dataclass(frozen=True)
class _Opened:
    uri: str
    req: np.ndarray  # requested seconds from the first frame
    path: str  # the local file ffmpeg reads
    table: _FrameTable
    probed: VideoInfo
    info: VideoInfo
    deadline: float  # time.monotonic() by which the whole call must be done


def _open(uri: str, timestamps: Sequence[float], timeout: float | None, info: VideoInfo | None,
          policy: InputPolicy) -> _Opened:
    """Checks, resolution and the frame table shared by every decoder of a request."""
    uri = str(uri)
    req = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(req)):
        raise ValueError(f"{uri}: timestamps must be finite")
    started = time.monotonic()
    path = _resolve(uri, 600.0 if timeout is None else timeout, policy)
    table, probed = _load(uri, 30.0 if timeout is None else max(0.1, timeout - (time.monotonic() - started)), path,
                          policy)
    info = info or probed
    if info.width * info.height > policy.max_pixels:
        raise LimitExceededError(uri, f"{info.width}x{info.height} frames: more than {policy.max_pixels} pixels "
                                      "(InputPolicy.max_pixels)")
    budget = timeout if timeout is not None else 60.0 + 2.0 * max(info.duration, 0.0)
    return _Opened(uri, req, path, table, probed, info, started + budget)


@dataclass(frozen=True)
class FrameRequest:
    """The frames nearest some timestamps, located for a decoder other than ffmpeg (pipeline.nvdec):
    the same frames `decode_frames` would deliver, named by their presentation times."""

    uri: str
    path: str  # the local file (a remote input is already in the cache)
    info: VideoInfo
    pts: np.ndarray | None  # int64 [F] the frames to decode, sorted unique, in `time_base` ticks; None: no packet pts
    time_base: Fraction | None
    needed: np.ndarray | None  # int64 sorted pts (ticks) of the packets those frames need; None: all packets
    inverse: np.ndarray  # request i is frame `inverse[i]` of those
    timestamps: np.ndarray  # float64 seconds from the first frame, per request (Frames.timestamps)
    damaged: bool  # the demuxer saw a broken packet: only ffmpeg's -xerror decode can say which frames are good
    deadline: float  # time.monotonic() by which the call must be done


def locate_frames(uri: str, timestamps: Sequence[float], timeout: float | None = None,
                  info: VideoInfo | None = None, policy: InputPolicy = DEFAULT_POLICY) -> FrameRequest:
    """What `decode_frames` would decode, without decoding: same checks, limits and errors."""
    o = _open(uri, timestamps, timeout, info, policy)
    rel = o.table.times - o.table.times[0]
    pick = _nearest(rel, o.req) if len(o.req) else np.zeros(0, np.int64)
    uniq, inverse = np.unique(pick, return_inverse=True)
    tb = o.table.time_base
    pts = None if tb is None else np.round(o.table.times[uniq] / float(tb)).astype(np.int64)
    needed = None
    pk = o.table.packets
    if len(uniq) and pk is not None and tb is not None:
        # The CPU path's packet plan, named by pts: containers such as Matroska store no dts, and
        # another demuxer may infer them differently, but every packet carries its own pts.
        ranges = [r for run in _plan(o.table, uniq, float("inf")) for r in (run.keep or [])]
        positions = np.concatenate([np.arange(np.searchsorted(pk.dts, a), np.searchsorted(pk.dts, b, side="right"))
                                    for a, b in ranges]) if ranges else np.zeros(0, np.int64)
        needed = np.unique(np.round(pk.time[positions] / float(tb)).astype(np.int64))
    return FrameRequest(o.uri, o.path, o.info, pts, tb, needed, inverse.reshape(-1), rel[pick].astype(np.float64),
                        o.table.damaged, o.deadline)


def decode_frames(uri: str, timestamps: Sequence[float], size: int | tuple[int, int] = 448,
                  resize: str = "shorter_center_crop", timeout: float | None = None,
                  info: VideoInfo | None = None, threads: int = 0, seek_gap: float = SEEK_GAP_S,
                  policy: InputPolicy = DEFAULT_POLICY) -> Frames:
    """The frames nearest `timestamps` (seconds from the first frame), resized, display-oriented.

    timeout: budget for the whole call (probe included); default 60 s + 2 s per second of video
    (of the video `policy` considers).
    threads: ffmpeg decoder and filter-graph threads, 0 = ffmpeg's choice (all cores); 1 when the
    caller runs one decode per core.
    seek_gap: seconds of video needing no packet beyond which a new ffmpeg run seeks ahead.
    policy: which inputs are accepted and the limits of one (frames over `max_pixels` are refused).
    Raises a `VideoError` subclass for every bad input; the URI is in the message."""
    opened = _open(uri, timestamps, timeout, info, policy)
    uri, req, path, table, probed, info, deadline = (opened.uri, opened.req, opened.path, opened.table, opened.probed,
                                                    opened.info, opened.deadline)
    H, W = _out_size(size)
    box, chain = geometry(info, size, resize)
    if len(req) == 0:
        return Frames(np.zeros((0, H, W, 3), np.uint8), np.zeros(0), box)
    for attempt in ("packets", "decoder"):
        rel = table.times - table.times[0]
        pick = _nearest(rel, req)
        uniq, inverse = np.unique(pick, return_inverse=True)
        if attempt == "packets" and len(uniq) < len(rel) and len(rel) * info.width * info.height > REF_SCAN_MIN:
            table = _with_refs(uri, path, table, info, max(1.0, deadline - time.monotonic()))
            _remember(_cache_key(uri, path, policy), table, probed)
        gaps = np.diff(table.times)
        eps = float(min(1e-3, 0.25 * gaps.min())) if len(gaps) else 1e-3
        frames = np.empty((len(uniq), H, W, 3), np.uint8)
        short = None
        for run in _plan(table, uniq, seek_gap):
            slots = np.searchsorted(uniq, run.frames)
            got, err = _run(path, uri, info, table, run, slots, eps, chain, frames, threads, deadline, policy)
            if got < len(slots) and (run.seek is not None or run.keep is not None):
                # A seek that landed badly, or a decoder unhappy with skipped packets: plain decode.
                got, err = _run(path, uri, info, table, _Run(run.frames), slots, eps, chain, frames, threads,
                                deadline, policy)
            if got < len(slots):
                short = (run.frames, got, err)
                break
        if short is None:
            if len(inverse) != len(uniq) or np.any(inverse != np.arange(len(uniq))):
                frames = frames[inverse]  # repeated or unsorted requests (no copy when not needed)
            return Frames(frames, rel[pick].astype(np.float64), box)
        if table.from_decoder or attempt == "decoder":
            break
        # Packet times may disagree with what the decoder outputs: ask the decoder once.
        table = dataclasses.replace(
            _decoder_table(uri, path, info.stream, max(1.0, deadline - time.monotonic()), policy),
            format_start=table.format_start, codec=table.codec, damaged=table.damaged)
    wanted, got, err = short
    missing_t = float(table.times[wanted[got]] - table.times[0])
    raise CorruptVideoError(
        uri, f"decoding stopped before the frame at {missing_t:.3f} s ({got} of {len(wanted)} frames of a run "
        f"delivered): corrupt or truncated stream ({error_lines(err) or 'stream ended early'})")
