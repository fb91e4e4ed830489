"""Every bad-input class gets its typed error, naming the input, within its timeout."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import numpy as np
import pytest

from pipeline.errors import (
    CorruptVideoError,
    DecodeTimeoutError,
    InputNotFoundError,
    NotAVideoError,
    NoVideoStreamError,
    VideoError,
)
from pipeline.ffmpeg import ffmpeg_exe
from pipeline.samples import make_video
from pipeline.video import decode_frames, probe


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = make_video(root / "good.mp4", seconds=3.0, fps=10, size=(128, 96))
    data = good.read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) // 2])  # moov at the end: no index survives
    ff = make_video(root / "faststart.mp4", seconds=3.0, fps=10, size=(128, 96))
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(ff), "-c", "copy", "-movflags", "+faststart",
                    str(root / "fs.mp4")], check=True, timeout=60)
    fs = (root / "fs.mp4").read_bytes()
    (root / "cut_faststart.mp4").write_bytes(fs[: len(fs) // 2])  # index intact, data cut
    mkv = make_video(root / "good.mkv", seconds=3.0, fps=10, size=(128, 96)).read_bytes()
    (root / "cut.mkv").write_bytes(mkv[: len(mkv) // 2])
    (root / "text.mp4").write_text("this is not a video\n" * 20)
    (root / "empty.mp4").write_bytes(b"")
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=duration=1", str(root / "audio.m4a")],
                   check=True, timeout=60)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1",
                    str(root / "still.png")], check=True, timeout=60)
    os.mkfifo(root / "fifo.mp4")
    return root


@pytest.mark.parametrize("name, error", [
    ("missing.mp4", InputNotFoundError),
    ("text.mp4", NotAVideoError),
    ("empty.mp4", NotAVideoError),
    ("still.png", NotAVideoError),
    ("audio.m4a", NoVideoStreamError),
    ("cut.mp4", CorruptVideoError),
    ("cut_faststart.mp4", CorruptVideoError),
    ("cut.mkv", CorruptVideoError),
])
def test_bad_input_typed_error(inputs, name, error):
    uri = str(inputs / name)
    for call in (lambda: probe(uri, timeout=20), lambda: decode_frames(uri, [0.0], size=16, timeout=20)):
        with pytest.raises(error) as e:
            call()
        assert e.value.uri == uri and uri in str(e.value)


def test_unreadable_file(inputs, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of permissions")
    p = tmp_path / "locked.mp4"
    p.write_bytes((inputs / "good.mp4").read_bytes())
    p.chmod(0)
    with pytest.raises(InputNotFoundError):
        probe(str(p))


def test_fifo_nobody_writes_is_refused_at_once(inputs):
    """A FIFO nobody writes to would block its reader's open forever: it is no regular file, so it
    is refused before anything opens it (no timeout to wait for)."""
    uri = str(inputs / "fifo.mp4")
    t = time.monotonic()
    with pytest.raises(NotAVideoError, match="FIFO") as e:
        probe(uri, timeout=30)
    assert time.monotonic() - t < 1 and uri in str(e.value)


def test_trickling_fifo_is_refused_without_being_read(inputs, tmp_path):
    """A FIFO whose writer would send the header and then stall: refused, and never opened (the
    writer's own open never finds a reader)."""
    fifo = tmp_path / "trickle.mkv"
    os.mkfifo(fifo)
    data = (inputs / "good.mkv").read_bytes()
    opened = threading.Event()

    def writer():
        with open(fifo, "wb") as f:  # returns only once a reader opens the FIFO
            opened.set()
            f.write(data[:2000])

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    for call in (lambda: probe(str(fifo), timeout=30), lambda: decode_frames(str(fifo), [0.0], size=16, timeout=30)):
        with pytest.raises(NotAVideoError):
            call()
    assert not opened.wait(0.5)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # release the writer
    th.join(5)
    os.close(fd)


def test_long_decode_times_out(inputs):
    uri = str(inputs / "good.mp4")
    probe(uri)
    t = time.monotonic()
    with pytest.raises(DecodeTimeoutError):
        decode_frames(uri, np.arange(0, 3, 0.1), size=64, timeout=0.001)
    assert time.monotonic() - t < 10


def test_errors_pickle_with_their_type(inputs):
    import pickle

    with pytest.raises(VideoError) as e:
        probe(str(inputs / "text.mp4"))
    back = pickle.loads(pickle.dumps(e.value))
    assert type(back) is NotAVideoError and back.uri == e.value.uri and back.stage == "probe"


def test_a_broken_decode_command_is_a_bug_not_a_bad_video(inputs, monkeypatch):
    """If we ever build a graph ffmpeg rejects, that must fail loudly, never be recorded as a
    corrupt video."""
    import pipeline.video as video

    monkeypatch.setattr(video, "_resize", lambda w, h, *src: [("scale", {"w": "no-such-size", "h": h})])
    with pytest.raises(RuntimeError, match="rejected the decode graph"):
        decode_frames(str(inputs / "good.mp4"), [0.0], size=16)
