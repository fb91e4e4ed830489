"""Remote inputs: s3:// through s3fs against moto's real S3 server, spooled to a bounded cache."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from pipeline.errors import InputNotFoundError
from pipeline.samples import frame_index, make_video
from pipeline.video import decode_frames, probe


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tmp_path_factory):
    """Two generated videos in s3://videos/clips/ (and their local originals)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing")
    fs.mkdir("videos")
    root = tmp_path_factory.mktemp("s3src")
    for name, seconds in (("a.mp4", 2.0), ("b.mp4", 3.0)):
        make_video(root / name, seconds=seconds, fps=10, size=(128, 96))
        fs.put(str(root / name), f"videos/clips/{name}")
    fs.put(str(root / "b.mp4"), "videos/clips/c.mp4")
    return root


@pytest.fixture
def env(bucket, s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("LITEFRAME_VIDEO_CACHE", str(tmp_path / "cache"))
    return bucket


def test_s3_decode_equals_local(env, tmp_path):
    uri = "s3://videos/clips/a.mp4"
    info = probe(uri)
    assert info.uri == uri and info.num_frames == 20
    remote = decode_frames(uri, [0.0, 0.7, 1.9], size=32)
    local = decode_frames(str(env / "a.mp4"), [0.0, 0.7, 1.9], size=32)
    np.testing.assert_array_equal(remote.frames, local.frames)
    assert [frame_index(f) for f in remote.frames] == [0, 7, 19]
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    before = cached[0].stat().st_ino
    decode_frames(uri, [1.0], size=32)  # served from the cache, not downloaded again
    assert [p.stat().st_ino for p in (tmp_path / "cache").iterdir()] == [before]


def test_cache_is_size_capped_but_keeps_videos_in_use(env, tmp_path, monkeypatch):
    from pipeline import remote

    a, b = (env / "a.mp4").stat().st_size, (env / "b.mp4").stat().st_size
    monkeypatch.setenv("LITEFRAME_VIDEO_CACHE_BYTES", str(max(a, b) + min(a, b) // 2))
    cache = tmp_path / "cache"
    probe("s3://videos/clips/a.mp4")
    probe("s3://videos/clips/c.mp4")   # b's bytes under another key: over the cap, but a was just used
    assert sorted(p.stat().st_size for p in cache.iterdir()) == sorted([a, b])

    old = time.time() - remote.IN_USE_S - 1
    for p in cache.iterdir():          # a is no longer in use; a killed download left a stale part
        os.utime(p, (old, old))
    stale = cache / ".part-stale"
    stale.write_bytes(b"x")
    os.utime(stale, (old - remote.STALE_PART_S, old - remote.STALE_PART_S))
    probe("s3://videos/clips/b.mp4")   # must evict: the least recently used go first
    left = sorted(p.stat().st_size for p in cache.iterdir())
    assert left == [b] and not stale.exists()


def test_missing_remote_object(env):
    with pytest.raises(InputNotFoundError) as e:
        probe("s3://videos/clips/nope.mp4")
    assert "s3://videos/clips/nope.mp4" in str(e.value)
    with pytest.raises(InputNotFoundError):
        decode_frames("s3://no-such-bucket/x.mp4", [0.0], size=16)


def test_file_url(env):
    got = decode_frames(f"file://{env / 'b.mp4'}", [2.5], size=32)
    assert frame_index(got.frames[0]) == 25
