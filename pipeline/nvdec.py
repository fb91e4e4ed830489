"""Decode on the GPU's NVDEC engines: the same frames as `pipeline.video.decode_frames`, or a reason not to.

The CPU path stays the reference. A video comes here only when NVDEC can take it exactly
(`unsupported_reason`: codec, chroma format, bit depth, size; a stream whose demuxer saw a broken
packet goes to ffmpeg, whose `-xerror` decode is what tells good frames from concealed garbage).
Frames are located by `video.locate_frames` (nearest presentation time, the same checks and limits,
and the packets each frame needs: from the keyframe before it up to it in decode order, named by
their pts). PyNvVideoCodec's demuxer reads the file; only those packets reach the decoder, and a
frame is taken by its presentation timestamp, so it is the frame the CPU path delivers. A frame that never comes out, another stream
or time base than the probe's, or any decoder failure raises `NvdecFallback` and the caller decodes
that video on the CPU, so a wrong frame is never returned. (SimpleDecoder's frame indices were tried
first and differ from presentation order on Matroska files and on MP4 edit lists.)

The decoded NV12/P016 surfaces never leave the GPU: `pipeline.yuv` rotates, crops, resizes and
converts them there; `device=True` returns the frames as a CUDA tensor for an on-GPU consumer.

Untrusted inputs: PyNvVideoCodec opens the file with its own libavformat, so only a local regular
file that ffmpeg's whitelisted probe already accepted is handed to it (`locate_frames` resolves and
checks it first; remote inputs are in the local cache by then).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Sequence

import numpy as np
import torch

from .errors import DecodeTimeoutError
from .video import DEFAULT_POLICY, Frames, InputPolicy, VideoInfo, _out_size, geometry, locate_frames
from .yuv import split_planes, to_rgb

# What NVDEC decodes on Ampere/Hopper (NVIDIA's decoder support matrix), as ffmpeg names codecs
# and pixel formats: 4:2:0 only (NV12 / P016 surfaces), 8 to 12 bits, with each codec's largest frame.
# A GPU that refuses one anyway (the H200 refused AV1) is remembered per process (_UNSUPPORTED).
NVDEC_CODECS = {"h264": (4096, 4096), "hevc": (8192, 8192), "vp9": (8192, 8192), "av1": (8192, 8192)}
NVDEC_PIX_FMTS = ("yuv420p", "yuvj420p", "yuv420p10le", "yuv420p12le")
MIN_SIZE = (48, 16)     # NVDEC's smallest frame (width, height)


class NvdecUnavailableError(RuntimeError):
    """NVDEC decode was required (--decode-device gpu) where it cannot run."""


class NvdecFallback(RuntimeError):
    """This video cannot be decoded exactly on NVDEC; decode it on the CPU (not an input error)."""


def unsupported_reason(info: VideoInfo) -> str | None:
    """Why NVDEC cannot decode this stream exactly, or None when it can."""
    if info.codec not in NVDEC_CODECS:
        return f"codec {info.codec} is not decoded by NVDEC here ({', '.join(NVDEC_CODECS)} are)"
    if info.pix_fmt not in NVDEC_PIX_FMTS:
        return f"pixel format {info.pix_fmt}: NVDEC outputs 4:2:0 only"
    coded_w, coded_h = (info.height, info.width) if info.rotation in (90, 270) else (info.width, info.height)
    max_w, max_h = NVDEC_CODECS[info.codec]
    if not (MIN_SIZE[0] <= coded_w <= max_w and MIN_SIZE[1] <= coded_h <= max_h):
        return f"{coded_w}x{coded_h} is outside NVDEC's {MIN_SIZE[0]}x{MIN_SIZE[1]}..{max_w}x{max_h} for {info.codec}"
    if coded_w % 2 or coded_h % 2:
        return f"{coded_w}x{coded_h}: odd frame sizes are decoded on the CPU"
    return None


def unavailable_reason(gpu: int = 0) -> str | None:
    """Why this process cannot use NVDEC on CUDA device `gpu`, or None when it can."""
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    if gpu >= torch.cuda.device_count():
        return f"no CUDA device {gpu} (this process sees {torch.cuda.device_count()})"
    try:
        import PyNvVideoCodec  # noqa: F401
    except ImportError as e:
        return f"PyNvVideoCodec is not installed ({e}); pip install PyNvVideoCodec"
    return None


def claim_gpu(count: int, lock_dir: str | None = None) -> tuple[int, IO | None]:
    """One of this node's `count` GPUs that no other live claim holds: the first whose lock file this
    process can lock. The lock lasts until the returned file is closed or the process ends, however
    it ends (the OS drops it). With every GPU claimed: device pid % count, and no file.

    Why: Ray packs fractional GPU shares first-fit, so decode actors that each asked Ray for a share
    all got the node's first GPU (jobs.extract); they see every GPU instead and spread with this."""
    import fcntl
    import os
    import tempfile

    root = Path(lock_dir or tempfile.gettempdir()) / "liteframe-nvdec"
    root.mkdir(exist_ok=True)
    for gpu in range(count):
        try:
            lock = open(root / f"gpu{gpu}.lock", "a")
        except OSError:             # another user's file: theirs
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return gpu, lock
        except OSError:
            lock.close()
    return os.getpid() % count, None


@dataclass(frozen=True)
class NvdecFrames:
    """Frames from NVDEC: `frames` is a CUDA uint8 [T, H, W, 3] tensor when asked for on the device."""

    frames: torch.Tensor
    timestamps: np.ndarray
    crop_box: tuple[int, int, int, int]


def _surface(frame, height: int, width: int) -> torch.Tensor:
    """A decoded frame's semi-planar surface as a [3H/2, W] tensor (uint8 NV12 or uint16 P016) on its GPU."""
    t = torch.from_dlpack(frame)
    if t.dim() != 2 or tuple(t.shape) != (height * 3 // 2, width):
        raise NvdecFallback(f"NVDEC surface {tuple(t.shape)} {t.dtype} is not a {width}x{height} 4:2:0 frame")
    return t


_DECODERS = threading.local()     # per thread: recent decoders; a session is not shared between threads
_KEEP_DECODERS = 2                # per thread: the videos of a dataset mostly share a few geometries
_UNSUPPORTED: set[tuple] = set()  # (gpu, codec, pix_fmt) this GPU's NVDEC refused: not tried again


def _decoder(gpu: int, codec, info: VideoInfo):
    """This thread's NVDEC decoder for videos shaped like `info`, made once: creating one costs about
    as much as decoding a short clip, and a flushed decoder takes the next video of the same codec,
    size and format (one of another size needs its own: PyNvVideoCodec 2.2.4 does not reconfigure)."""
    import PyNvVideoCodec as nvc

    cache = getattr(_DECODERS, "recent", None)
    if cache is None:
        cache = _DECODERS.recent = {}
    key = (gpu, int(codec), info.width, info.height, info.rotation, info.pix_fmt)
    if key in cache:
        cache[key] = cache.pop(key)          # most recent last
    else:
        while len(cache) >= _KEEP_DECODERS:
            cache.pop(next(iter(cache)))
        cache[key] = nvc.CreateDecoder(gpuid=gpu, codec=codec, usedevicememory=True)
    return cache[key]


def _end_of_stream():
    import PyNvVideoCodec as nvc

    packet = nvc.PacketData()
    packet.decode_flag = nvc.VideoPacketFlag.ENDOFSTREAM
    return packet


def decode_frames(uri: str, timestamps: Sequence[float], size: int | tuple[int, int] = 448,
                  resize: str = "shorter_center_crop", timeout: float | None = None,
                  info: VideoInfo | None = None, policy: InputPolicy = DEFAULT_POLICY, gpu: int = 0,
                  device: bool = False, batch: int = 32) -> Frames | NvdecFrames:
    """`pipeline.video.decode_frames` on NVDEC: same arguments, frames, timestamps and VideoErrors.

    Raises NvdecFallback when this video needs the CPU path (see the module docstring).
    device: return the frames as a CUDA tensor (NvdecFrames) instead of host numpy (Frames).
    batch: frames converted at once (bounds GPU memory: `batch` source-size surfaces)."""
    request = locate_frames(uri, timestamps, timeout, info, policy)
    info = request.info
    reason = unsupported_reason(info)
    if reason is None and request.damaged:
        reason = "the demuxer reported a damaged packet"
    if reason is None and request.pts is None:
        reason = "the container has no packet timestamps to check frames against"
    if reason is None and (gpu, info.codec, info.pix_fmt) in _UNSUPPORTED:
        reason = f"this GPU's NVDEC refused {info.codec} {info.pix_fmt} before"
    if reason is not None:
        raise NvdecFallback(reason)
    box, _ = geometry(info, size, resize)
    H, W = _out_size(size)
    with torch.cuda.device(gpu):
        out = torch.empty((len(request.pts), H, W, 3), dtype=torch.uint8, device=f"cuda:{gpu}")
        if len(request.pts):
            try:
                _decode_into(out, request, size, resize, gpu, batch)
            except (NvdecFallback, DecodeTimeoutError):
                raise
            except Exception as e:     # PyNvVideoCodec's own errors (a codec profile this GPU lacks, ...)
                _DECODERS.recent = {}      # a decoder in an unknown state is not reused
                if type(e).__name__ == "PyNvVCExceptionUnsupported":
                    _UNSUPPORTED.add((gpu, info.codec, info.pix_fmt))
                raise NvdecFallback(f"NVDEC: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                                    ) from e
        if len(request.inverse) != len(out) or np.any(request.inverse != np.arange(len(out))):
            out = out[torch.as_tensor(request.inverse, device=out.device)]   # repeated or unsorted requests
    if device:
        return NvdecFrames(out, request.timestamps, box)
    return Frames(out.cpu().numpy(), request.timestamps, box)


def _decode_into(out: torch.Tensor, request, size, resize: str, gpu: int, batch: int) -> None:
    """Feed NVDEC the packets the wanted frames need, in decode order, and convert each wanted frame
    as it comes out (matched by its presentation timestamp)."""
    import PyNvVideoCodec as nvc

    info = request.info
    coded_w, coded_h = (info.height, info.width) if info.rotation in (90, 270) else (info.width, info.height)
    demuxer = nvc.CreateDemuxer(filename=request.path)
    if demuxer.GetVideoStreamId() != info.stream:
        raise NvdecFallback(f"PyNvVideoCodec demuxes stream {demuxer.GetVideoStreamId()}, the video is stream {info.stream}")
    time_base = Fraction(demuxer.GetTimebaseNum(), demuxer.GetTimebaseDen())
    if time_base != request.time_base:
        raise NvdecFallback(f"PyNvVideoCodec's time base {time_base} is not the container's {request.time_base}")
    decoder = _decoder(gpu, demuxer.GetNvCodecId(), info)
    slot_of = {int(p): i for i, p in enumerate(request.pts)}
    needed = request.needed
    unfed = len(needed) if needed is not None else 0    # needed packets not given to the decoder yet
    slots: list[int] = []
    surfaces: list[torch.Tensor] = []

    def convert() -> None:
        y, uv = split_planes(torch.stack(surfaces), coded_h, coded_w)
        out[torch.tensor(slots, device=out.device)] = to_rgb(y, uv, info, size, resize)
        slots.clear()
        surfaces.clear()

    def take(frames) -> None:
        for frame in frames:
            slot = slot_of.pop(frame.getPTS(), None)
            if slot is not None:       # a surface is reused by the next decode: copy it out now
                slots.append(slot)
                surfaces.append(_surface(frame, coded_h, coded_w).clone())
                if len(surfaces) == batch:
                    convert()

    for packet in demuxer:
        if time.monotonic() > request.deadline:
            raise DecodeTimeoutError(request.uri, "decode time budget spent before all frames were decoded")
        if needed is not None:
            i = int(np.searchsorted(needed, packet.pts))
            if i == len(needed) or needed[i] != packet.pts:
                continue
            unfed -= 1
        take(decoder.Decode(packet))
        if not slot_of or (needed is not None and not unfed):
            break
    # End of stream: the reorder queue lets the last wanted frames out, and the decoder is clean for
    # the next call.
    take(decoder.Decode(_end_of_stream()))
    if surfaces:
        convert()
    if slot_of:
        raise NvdecFallback(f"{len(slot_of)} of {len(request.pts)} frames never came out of NVDEC "
                            f"(pts {sorted(slot_of)[:4]}...)")
