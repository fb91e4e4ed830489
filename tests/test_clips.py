"""Clip plans: deterministic, tiling, capped, padded; decoded clips equal per-clip decodes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.clips import ClipSpec, decode_clips, plan_clips
from pipeline.errors import TooShortError
from pipeline.samples import frame_index, make_video
from pipeline.video import VideoInfo, decode_frames, probe, video_id


def info(seconds: float, fps: float = 30.0) -> VideoInfo:
    n = int(round(seconds * fps))
    return VideoInfo(uri=f"/v/{seconds}.mp4", duration=n / fps, avg_fps=fps, nominal_fps=fps, num_frames=n,
                     width=640, height=360, rotation=0, codec="h264", pix_fmt="yuv420p", start_time=0.0,
                     last_time=(n - 1) / fps)


def test_plan_is_deterministic_and_seed_dependent():
    spec = ClipSpec(frames=4, views=3, fps_range=(1.0, 4.0))
    a = plan_clips("vid", info(60), spec, seed=7)
    assert a == plan_clips("vid", info(60), spec, seed=7)
    assert a != plan_clips("vid", info(60), spec, seed=8)
    assert a != plan_clips("other", info(60), spec, seed=7)
    # Adding views never changes the earlier ones.
    more = plan_clips("vid", info(60), ClipSpec(frames=4, views=5, fps_range=(1.0, 4.0)), seed=7)
    assert [p for p in more if p.view < 3] == a


def test_views_tile_the_video():
    vi = info(60)
    spec = ClipSpec(frames=4, views=4, fps_range=(1.0, 4.0))
    plans = plan_clips("vid", vi, spec, seed=0)
    assert len({p.clip_id for p in plans}) == len(plans)
    assert all("." not in p.clip_id and p.clip_id.startswith("vid-v") for p in plans)
    for view in range(4):
        clips = [p for p in plans if p.view == view]
        fps = clips[0].fps
        assert 1.0 <= fps <= 4.0 and all(p.fps == fps for p in clips)
        period = 4 / fps
        assert [p.index for p in clips] == list(range(len(clips)))
        assert 0 <= clips[0].start < period
        starts = np.array([p.start for p in clips])
        np.testing.assert_allclose(np.diff(starts), period, atol=1e-5)
        for p in clips:
            assert len(p.timestamps) == 4 and p.padded == 0
            np.testing.assert_allclose(np.diff(p.timestamps), 1 / fps, atol=1e-5)
            assert p.timestamps[-1] <= vi.last_time
        # tiling: no room for one more clip after the last
        assert clips[-1].start + period + 3 / fps > vi.last_time
    assert len({p.fps for p in plans}) == 4


def test_cap_picks_a_spread_deterministic_subset():
    vi = info(600)
    full = plan_clips("vid", vi, ClipSpec(frames=4, fps_range=(2.0, 2.0)), seed=3)
    capped = plan_clips("vid", vi, ClipSpec(frames=4, fps_range=(2.0, 2.0), max_clips_per_view=10), seed=3)
    assert 299 <= len(full) <= 300  # 2 s clips over 600 s, minus at most one for the start offset
    assert len(capped) == 10 and capped == plan_clips("vid", vi, ClipSpec(frames=4, fps_range=(2.0, 2.0),
                                                                          max_clips_per_view=10), seed=3)
    by_index = {p.index: p for p in full}
    assert all(by_index[p.index] == p for p in capped)  # a subset of the tiling, same ids
    idx = np.array([p.index for p in capped])
    gap = len(full) / 10
    assert idx[0] < gap and idx[-1] >= len(full) - gap - 1 and np.all(np.diff(idx) >= gap - 1)
    with pytest.raises(ValueError, match="bad clip spec"):   # a cap of 0 is a config error, not "too short"
        ClipSpec(frames=4, max_clips_per_view=0)


def test_short_video_padded_or_refused():
    vi = info(0.5, fps=10)  # 5 frames, last at 0.4 s
    spec = ClipSpec(frames=4, views=2, fps_range=(1.0, 1.0))
    plans = plan_clips("short", vi, spec, seed=0)
    assert len(plans) == 2
    for p in plans:
        assert p.index == 0 and p.padded == 3 and p.timestamps == (0.0, 0.4, 0.4, 0.4)
    with pytest.raises(TooShortError) as e:
        plan_clips("short", vi, ClipSpec(frames=4, views=2, fps_range=(1.0, 1.0), pad_short=False), seed=0)
    assert e.value.uri == vi.uri and e.value.stage == "plan"
    # fast enough views still fit without padding
    fits = plan_clips("short", vi, ClipSpec(frames=4, fps_range=(10.0, 10.0), pad_short=False), seed=0)
    assert len(fits) == 1 and fits[0].padded == 0 and fits[0].timestamps[-1] <= 0.4


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("clips") / "c.mp4", seconds=6.0, fps=10, size=(96, 64), gop=10))


def test_decode_clips_equals_decode_frames_per_clip(coded):
    vi = probe(coded)
    plans = plan_clips(video_id(coded), vi, ClipSpec(frames=4, views=3, fps_range=(1.0, 4.0)), seed=5)
    clips = decode_clips(coded, plans, size=32, info=vi)
    assert [p for p, _ in clips] == plans
    for plan, frames in clips:
        one = decode_frames(coded, plan.timestamps, size=32)
        np.testing.assert_array_equal(frames.frames, one.frames)
        np.testing.assert_array_equal(frames.timestamps, one.timestamps)
        want = [int(round(t * 10)) for t in plan.timestamps]
        assert [frame_index(f) for f in frames.frames] == want


def test_padded_clip_repeats_the_last_frame(tmp_path):
    path = str(make_video(tmp_path / "s.mp4", seconds=0.3, fps=10, size=(64, 64)))
    vi = probe(path)
    (plan,) = plan_clips(video_id(path), vi, ClipSpec(frames=4, fps_range=(2.0, 2.0)), seed=0)
    assert plan.padded == 3
    ((_, frames),) = decode_clips(path, [plan], size=16)
    assert [frame_index(f) for f in frames.frames] == [0, 2, 2, 2]
