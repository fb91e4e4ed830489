"""The real clips in ../shared/videos: every one probes and decodes; corrupted.mp4 as documented."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from pipeline.errors import CorruptVideoError
from pipeline.ffmpeg import ffmpeg_exe
from pipeline.video import _resize, chain_text, decode_frames, probe

pytestmark = pytest.mark.shared_videos

# name: (display width, height, rotation, frames decoded by libavcodec, codec) from SOURCES.md
EXPECTED = {
    "again.mkv": (640, 480, 0, 77, "h264"),
    "bear-vp9.webm": (320, 240, 0, 82, "vp9"),
    "big_buck_bunny_0_30.webm": (1280, 720, 0, 720, "vp8"),
    "bottle-detection.mp4": (640, 360, 0, 1189, "h264"),
    "car-detection.mp4": (768, 432, 0, 377, "h264"),
    "cockatoo.mp4": (1280, 720, 0, 280, "h264"),
    "flipping_a_pancake.mkv": (426, 240, 0, 310, "h264"),
    "hevc.ts": (1920, 1080, 0, 120, "hevc"),
    "nasa_13013.mp4": (320, 180, 0, 325, "h264"),  # first of two video streams
    "sample_with_increasing_timestamps_320w_240h.mp4": (320, 240, 0, 932, "h264"),
    "test.avi": (320, 240, 0, 164, "mpeg4"),
    "video_90.mov": (320, 568, 90, 3, "h264"),  # display matrix -90: shown as portrait
}


def reference_frames(path, info, width, height) -> np.ndarray:
    """Every frame as plain ffmpeg (autorotate on, no seeking, no select) delivers it, resized by
    the same filters."""
    resize = chain_text(_resize(width, height, info.width, info.height, info.pix_fmt))
    out = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", f"0:{info.stream}", "-vf",
                          resize, "-fps_mode", "passthrough", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True, timeout=120).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, height, width, 3)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_video_probes_and_decodes_every_frame(shared_videos, name):
    path = shared_videos / name
    if not path.exists():
        pytest.skip(f"{name} not in {shared_videos}")
    w, h, rot, n, codec = EXPECTED[name]
    info = probe(str(path))
    assert (info.width, info.height, info.rotation, info.num_frames, info.codec) == (w, h, rot, n, codec)
    assert info.last_time == pytest.approx((n - 1) / info.avg_fps, rel=1e-3)
    # Every frame, requested at its own time, is the k-th frame plain ffmpeg decodes (compared at a
    # reduced size for the big ones, so the test stays within its time budget).
    k = max(1, int(np.ceil(np.sqrt(n * w * h / 15e6))))
    sw, sh = 2 * max(1, round(w / k / 2)), 2 * max(1, round(h / k / 2))
    got = decode_frames(str(path), np.arange(n) / info.avg_fps, size=(sh, sw), resize="squash")
    assert got.frames.shape == (n, sh, sw, 3)
    assert np.all(np.diff(got.timestamps) > 0), "each request must map to a distinct frame"
    ref = reference_frames(path, info, sw, sh)
    assert len(ref) == n
    diff = np.abs(got.frames.astype(np.int16) - ref.astype(np.int16)).mean(axis=(1, 2, 3))
    assert diff.max() == 0, f"frame {int(diff.argmax())} differs from plain ffmpeg's ({diff.max():.2f})"


def test_hevc_ts_start_time_and_relative_timestamps(shared_videos):
    path = shared_videos / "hevc.ts"
    if not path.exists():
        pytest.skip("hevc.ts absent")
    info = probe(str(path))
    assert info.start_time == pytest.approx(1.4833, abs=1e-3)
    got = decode_frames(str(path), [0.0, 2.0, 99.0], size=64)
    np.testing.assert_allclose(got.timestamps, [0.0, 2.0, info.last_time], atol=1e-3)


def test_corrupted_mp4_documented_behaviour(shared_videos):
    """corrupted.mp4 (decord's broken file): its header lists 50 frames; one packet is damaged
    ('Invalid NAL unit size'). Frames 0-2.8 s come back bit-exact; any request for a later frame
    raises CorruptVideoError naming the file: the decoder (single-threaded on streams whose packets
    failed to parse, with -xerror) reports them damaged or concealed. Never concealed garbage."""
    path = shared_videos / "corrupted.mp4"
    if not path.exists():
        pytest.skip("corrupted.mp4 absent")
    info = probe(str(path))
    assert info.num_frames == 50 and (info.width, info.height) == (1280, 720)
    good = decode_frames(str(path), np.arange(29) / 10, size=(36, 64), resize="squash")
    np.testing.assert_allclose(good.timestamps, np.arange(29) / 10, atol=1e-6)
    np.testing.assert_array_equal(good.frames, reference_frames(path, info, 64, 36)[:29])
    for req in ([2.9], [3.2], [4.5], [0.0, 4.5]):
        with pytest.raises(CorruptVideoError) as e:
            decode_frames(str(path), req, size=32)
        assert str(path) in str(e.value)


@pytest.mark.parametrize("name", ["bottle-detection.mp4", "hevc.ts", "again.mkv", "big_buck_bunny_0_30.webm"])
def test_sparse_requests_are_pixel_identical_to_a_full_decode(shared_videos, name, monkeypatch):
    """Sparse decodes skip unreferenced packets, packets past the last wanted frame and (with a
    small seek gap) seek between keyframes: none of it may change a single pixel."""
    import pipeline.video as video

    monkeypatch.setattr(video, "REF_SCAN_MIN", 0)  # small clips too
    path = shared_videos / name
    if not path.exists():
        pytest.skip(f"{name} absent")
    info = probe(str(path))
    rng = np.random.default_rng(0)
    picks = np.unique(np.concatenate([np.arange(3, info.num_frames, 11), rng.integers(0, info.num_frames, 9)]))
    ref = reference_frames(path, info, 96, 54)
    for seek_gap in (0.0, 1e9):
        got = decode_frames(str(path), picks / info.avg_fps, size=(54, 96), resize="squash", seek_gap=seek_gap)
        bad = [int(p) for p, f in zip(picks, got.frames) if not np.array_equal(f, ref[p])]
        assert not bad, f"frames {bad} differ from a full decode (seek_gap={seek_gap})"
