"""Frame exactness of decode_frames on generated videos whose frames carry their own index."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from pipeline.ffmpeg import ffmpeg_exe, has_filter
from pipeline.samples import frame_index, frame_times, make_video
from pipeline.video import _resize, chain_text, decode_frames, probe, video_id

FPS = 10


@pytest.fixture(autouse=True)
def skip_unreferenced_even_in_tiny_videos(monkeypatch):
    """Production skips the reference scan for small videos (not worth a process); these tests
    force the full path: reference flags read, unreferenced packets dropped."""
    import pipeline.video as video

    monkeypatch.setattr(video, "REF_SCAN_MIN", 0)


@pytest.fixture(scope="session")
def coded(tmp_path_factory):
    """name -> (path, expected frame times) for every variant the decoder must get exactly right."""
    root = tmp_path_factory.mktemp("coded")
    variants = {
        "cfr.mp4": dict(seconds=3.0),
        "gop.mp4": dict(seconds=8.0, gop=5),  # keyframe every 0.5 s: sparse requests seek
        "vfr.mp4": dict(seconds=3.0, vfr=True),
        "vfr.mkv": dict(seconds=3.0, vfr=True),
        "rot90.mp4": dict(seconds=1.0, rotation=90),
        "rot180.mp4": dict(seconds=1.0, rotation=180),
        "rot270.mp4": dict(seconds=1.0, rotation=270),
        "vp9.webm": dict(seconds=2.0, codec="libvpx-vp9"),
        "mpeg4.avi": dict(seconds=2.0, codec="mpeg4"),
        "hevc.mkv": dict(seconds=2.0, codec="libx265", gop=6),
    }
    out = {}
    for name, kw in variants.items():
        path = make_video(root / name, fps=FPS, size=(128, 96), **kw)
        out[name] = (str(path), frame_times(kw["seconds"], FPS, kw.get("vfr", False)))
    return out


def indices(frames) -> list[int]:
    return [frame_index(f) for f in frames.frames]


def nearest(times: np.ndarray, requests) -> list[int]:
    return [int(np.argmin(np.abs(times - r))) for r in requests]


@pytest.mark.parametrize("name", ["cfr.mp4", "gop.mp4", "vfr.mp4", "vfr.mkv", "rot90.mp4", "rot180.mp4",
                                  "rot270.mp4", "vp9.webm", "mpeg4.avi", "hevc.mkv"])
def test_every_frame_exact(coded, name):
    path, times = coded[name]
    got = decode_frames(path, times, size=48)
    assert got.frames.shape == (len(times), 48, 48, 3) and got.frames.dtype == np.uint8
    assert indices(got) == list(range(len(times)))
    np.testing.assert_allclose(got.timestamps, times, atol=1e-4)


@pytest.mark.parametrize("name", ["gop.mp4", "vfr.mp4", "vfr.mkv", "hevc.mkv", "mpeg4.avi"])
def test_sparse_unsorted_repeated_requests_get_the_nearest_frame(coded, name):
    path, times = coded[name]
    rng = np.random.default_rng(1)
    req = np.concatenate([rng.uniform(-0.2, times[-1] + 0.3, 9), [times[4], times[4], times[2] + 1e-3]])
    got = decode_frames(path, req, size=(40, 56))
    assert got.frames.shape == (len(req), 40, 56, 3)
    want = nearest(times, req)
    assert indices(got) == want
    np.testing.assert_allclose(got.timestamps, times[want], atol=1e-4)


def test_seeking_and_no_seeking_deliver_identical_pixels(coded):
    path, times = coded["gop.mp4"]
    req = [0.1, 2.2, 5.0, 7.9]
    seek = decode_frames(path, req, size=64, seek_gap=0.0)
    plain = decode_frames(path, req, size=64, seek_gap=1e9)
    assert indices(seek) == nearest(times, req)
    np.testing.assert_array_equal(seek.frames, plain.frames)


def test_vfr_probe_reports_actual_rate(coded):
    path, times = coded["vfr.mp4"]
    info = probe(path)
    assert info.num_frames == len(times)
    assert info.last_time == pytest.approx(times[-1], abs=1e-4)
    assert info.avg_fps == pytest.approx((len(times) - 1) / times[-1], rel=1e-3)
    assert info.nominal_fps != pytest.approx(info.avg_fps, rel=1e-3)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_gives_display_orientation(coded, rotation):
    path, _ = coded[f"rot{rotation}.mp4"]
    info = probe(path)
    assert (info.rotation, info.width, info.height) == (rotation, 128, 96)
    got = decode_frames(path, [0.5], size=(60, 80), resize="squash")
    assert got.frames.shape == (1, 60, 80, 3)
    # The code square sits in the centre of the displayed 128x96 frame: 60x60 of it, squashed to 80 wide.
    assert frame_index(got.frames[0], region=(10, 0, 70, 60)) == 5
    with pytest.raises(ValueError):  # the same pixels turned by 90 degrees do not read as a code
        frame_index(np.rot90(got.frames[0][:, 10:70]).copy())


def test_resize_policies_and_crop_box(coded):
    path, _ = coded["cfr.mp4"]  # 128x96
    crop = decode_frames(path, [1.0], size=32)
    assert crop.crop_box == (16, 0, 112, 96) and frame_index(crop.frames[0]) == 10
    wide = decode_frames(path, [1.0], size=(24, 64))
    assert wide.crop_box == (0, 24, 128, 72) and wide.frames.shape == (1, 24, 64, 3)
    squash = decode_frames(path, [1.0], size=(48, 48), resize="squash")
    assert squash.crop_box == (0, 0, 128, 96)
    assert frame_index(squash.frames[0], region=(6, 0, 42, 48)) == 10
    pad = decode_frames(path, [1.0], size=(64, 64), resize="pad")
    assert pad.crop_box == (0, 0, 128, 96)
    assert pad.frames[0, :6].max() < 40 and pad.frames[0, -6:].max() < 40  # black bars top and bottom
    assert frame_index(pad.frames[0], region=(8, 8, 56, 56)) == 10
    with pytest.raises(ValueError):
        decode_frames(path, [1.0], size=32, resize="stretch")


def test_resizer_choice_and_odd_sizes(coded):
    """zimg resizes where its chroma subsampling divides every size; odd sizes fall back to
    swscale. Both give the right frame, close to PIL's antialiased bicubic of the full frame."""
    from PIL import Image

    zimg = has_filter("zscale")
    assert _resize(48, 48, 96, 96, "yuv420p")[0][0] == ("zscale" if zimg else "scale")
    assert _resize(47, 48, 96, 96, "yuv420p")[0][0] == "scale"  # odd output width, 4:2:0
    assert _resize(48, 48, 95, 96, "yuv420p")[0][0] == "scale"  # odd crop width
    assert _resize(48, 47, 96, 96, "yuv422p")[0][0] == ("zscale" if zimg else "scale")  # 4:2:2: rows free
    assert _resize(48, 48, 96, 96, "nv12")[0][0] == "scale"
    path, _ = coded["cfr.mp4"]  # 128x96
    full = decode_frames(path, [1.0], size=(96, 128), resize="squash").frames[0]
    for size in ((48, 64), (47, 63)):
        got = decode_frames(path, [1.0], size=size, resize="squash").frames[0]
        assert got.shape == (*size, 3) and frame_index(got) == 10
        pil = np.asarray(Image.fromarray(full).resize(size[::-1], Image.BICUBIC))
        assert np.abs(got.astype(int) - pil).mean() < 3.0, size


def test_first_video_stream_of_a_multi_stream_file(coded, tmp_path):
    path, times = coded["cfr.mp4"]
    other = make_video(tmp_path / "other.mp4", seconds=1.0, fps=25, size=(64, 64), index_coded=False)
    both = tmp_path / "both.mkv"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", path, "-i", str(other), "-map", "0:v", "-map", "1:v",
                    "-c", "copy", str(both)], check=True, timeout=60)
    info = probe(str(both))
    assert (info.width, info.height, info.num_frames) == (128, 96, len(times))
    assert indices(decode_frames(str(both), times[::7], size=32)) == list(range(0, len(times), 7))


def test_empty_request_and_video_id(coded):
    path, _ = coded["cfr.mp4"]
    assert decode_frames(path, [], size=16).frames.shape == (0, 16, 16, 3)
    ids = {video_id(u) for u in ["/a/b.c.mp4", "/a/b.c.mkv", "s3://x/a/b.c.mp4", "/a/b.c.mp4 "]}
    assert len(ids) == 4 and all(i.replace("-", "").replace("_", "").isalnum() for i in ids)
    assert video_id("/a/b.c.mp4") == video_id("/a/b.c.mp4")


def test_many_runs_and_long_filter_graphs_stay_exact(coded, monkeypatch):
    """Long videos split their packet filter over several ffmpeg runs and pass big select graphs
    through a file: force both on a small video."""
    import pipeline.video as video

    path, times = coded["gop.mp4"]
    monkeypatch.setattr(video, "MAX_KEEP_RANGES", 3)
    monkeypatch.setattr(video, "_GRAPH_ARG_MAX", 200)
    req = times[np.r_[1:80:3]]
    got = decode_frames(path, req, size=32)
    assert indices(got) == list(range(1, 80, 3))


def test_unreferenced_pictures_are_found_and_skipped(coded):
    """x264's B-frames that nothing refers to are read from NAL headers; skipping them keeps every
    requested frame exact, including requested unreferenced ones."""
    import pipeline.video as video

    path, times = coded["gop.mp4"]
    table, info = video._load(path, 30.0)
    table = video._with_refs(path, path, table, info, 30.0)
    ref = table.packets.ref
    assert ref is not None and 0 < (~ref).sum() < len(times) // 2 + 1
    unref = np.sort(table.packets.frame[~ref])[:5]
    got = decode_frames(path, times[unref], size=32)
    assert indices(got) == unref.tolist()
    cached, _ = video._load(path, 30.0)
    assert cached.packets.ref is not None  # decode_frames read and kept the flags


def test_edit_list_starting_inside_a_gop(coded, tmp_path):
    """A stream copy cut at 1.35 s keeps the GOP's earlier packets, marked discarded by the MP4 edit
    list: they are no frames of the video, yet the keyframe among them must still be decoded."""
    path, _ = coded["gop.mp4"]
    cut = tmp_path / "cut.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-ss", "1.35", "-i", path, "-c", "copy", str(cut)], check=True,
                   timeout=60)
    info = probe(str(cut))
    first = 14  # the frame shown at 1.4 s in the source becomes t=0
    assert info.num_frames == 80 - first and info.start_time == pytest.approx(0.0, abs=1e-6)
    for seek_gap in (0.0, 1e9):
        got = decode_frames(str(cut), [0.0, 0.3, 2.0, 6.5], size=32, seek_gap=seek_gap)
        assert indices(got) == [first, first + 3, first + 20, first + 65]


@pytest.mark.parametrize("codec, params", [("libx264", ["-x264-params", "open-gop=1:keyint=12:min-keyint=12:bframes=3"]),
                                           ("libx265", ["-x265-params", "keyint=12:min-keyint=12:bframes=4:log-level=error"])])
def test_open_gop_sparse_decodes_are_pixel_identical(tmp_path, codec, params):
    """Open GOPs: pictures just before a keyframe in display order are decoded after it and refer to
    the previous GOP. Seeking and packet skipping must still give the full decode's exact pixels."""
    path = tmp_path / f"open_{codec}.mkv"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=24:duration=4",
                    "-c:v", codec, "-pix_fmt", "yuv420p", *params, str(path)], check=True, timeout=120)
    full = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-vf",
                           chain_text(_resize(96, 64, 96, 64, "yuv420p")), "-fps_mode", "passthrough",
                           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    ref = np.frombuffer(full, np.uint8).reshape(-1, 64, 96, 3)
    info = probe(str(path))
    assert info.num_frames == len(ref) == 96
    picks = np.array([10, 11, 23, 35, 36, 47, 59, 70, 71, 95])  # around every keyframe
    for seek_gap in (0.0, 1e9):
        got = decode_frames(str(path), picks / 24, size=(64, 96), resize="squash", seek_gap=seek_gap)
        bad = [int(p) for p, f in zip(picks, got.frames) if not np.array_equal(f, ref[p])]
        assert not bad, f"frames {bad} differ from the full decode (seek_gap={seek_gap})"
