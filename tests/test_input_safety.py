"""Inputs nobody checked: a video input reads nothing but its own bytes, only enabled URI schemes are
opened, and no input makes a probe, plan or decode unbounded. Real ffmpeg; every input built here."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from pipeline.clips import DEFAULT_MAX_CLIPS_PER_VIEW, ClipSpec, plan_clips
from pipeline.errors import (DecodeTimeoutError, InputNotAllowedError, InputNotFoundError, LimitExceededError,
                             NotAVideoError, VideoError)
from pipeline.ffmpeg import ffmpeg_exe
from pipeline.remote import check_uri
from pipeline.samples import frame_index, make_video
from pipeline.video import InputPolicy, VideoInfo, decode_frames, decode_memory, probe, video_id
from tests.support import free_port

REPO = Path(__file__).resolve().parents[1]
HTTP = InputPolicy(allow_schemes=("http",))


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args], check=True, timeout=60)


def calls(uri: str, policy: InputPolicy = InputPolicy(), timeout: float = 20):
    """The two public entry points that touch an input."""
    return (lambda: probe(uri, timeout=timeout, policy=policy),
            lambda: decode_frames(uri, [0.0], size=16, timeout=timeout, policy=policy))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """inputs/ holds what the job is pointed at; elsewhere/ a real video no input may reach."""
    root = tmp_path_factory.mktemp("safety")
    make_video(root / "elsewhere" / "secret.mp4", seconds=1.0, fps=10, size=(64, 48))
    make_video(root / "inputs" / "sibling.mp4", seconds=1.0, fps=10, size=(64, 48))
    return root


@contextmanager
def fifo_sentinel(path: Path):
    """A FIFO that tells whether anything opened it: its writer's open returns only once a reader has."""
    os.mkfifo(path)
    opened = threading.Event()

    def writer():
        with open(path, "wb"):
            opened.set()

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    try:
        yield opened
    finally:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # release the writer
        th.join(5)
        os.close(fd)
        path.unlink()


# ---- 1. a video input reads nothing but its own bytes ------------------------------------------------

HLS = "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXT-X-VERSION:3\n#EXTINF:1.0,\n{target}\n#EXT-X-ENDLIST\n"
FFCONCAT = "ffconcat version 1.0\nfile '{target}'\n"
DASH = ('<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" '
        'mediaPresentationDuration="PT1S" minBufferTime="PT1S" profiles="urn:mpeg:dash:profile:isoff-on-demand:2011">'
        '<Period><AdaptationSet mimeType="video/mp4"><Representation id="1" bandwidth="1000" codecs="avc1.64000a" '
        'width="64" height="48"><BaseURL>{target}</BaseURL><SegmentBase/></Representation></AdaptationSet>'
        '</Period></MPD>\n')
MANIFESTS = [  # (file name, content, where the entry points: outside the folder, or a sibling)
    ("playlist.m3u8", HLS, "outside"),
    ("playlist.mp4", HLS, "outside"),
    ("list.mp4", FFCONCAT, "sibling"),
    ("list.ffconcat", FFCONCAT, "outside"),
    ("manifest.mp4", DASH, "outside"),
]


@pytest.mark.parametrize("name, template, where", MANIFESTS)
@pytest.mark.parametrize("target", ["video", "fifo"])
def test_manifest_is_not_a_video_and_never_opens_its_entries(root, name, template, where, target):
    """A playlist or concat list, whatever its name, is NotAVideoError: it neither decodes the real
    video it points at, nor even opens the file (a FIFO sentinel there sees no reader)."""
    folder = root / "inputs"
    if target == "video":
        entry = root / "elsewhere" / "secret.mp4" if where == "outside" else folder / "sibling.mp4"
    else:
        entry = (root / "elsewhere" if where == "outside" else folder) / f"sentinel-{name}.mp4"
    text = template.format(target=entry.name if where == "sibling" else entry)
    uri = str(folder / name)
    Path(uri).write_text(text)
    if target == "video":
        for call in calls(uri):
            with pytest.raises(NotAVideoError) as e:
                call()
            assert e.value.uri == uri
        return
    with fifo_sentinel(entry) as opened:
        for call in calls(uri):
            with pytest.raises(NotAVideoError):
                call()
        assert not opened.wait(0.3), f"{name} made something open {entry}"


def test_sdp_description_never_listens_on_the_network(root):
    """An SDP file named .mp4 would make ffmpeg receive RTP on a UDP port: refused before that."""
    uri = str(root / "inputs" / "stream.mp4")
    Path(uri).write_text("v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n"
                         f"m=video {free_port()} RTP/AVP 96\na=rtpmap:96 H264/90000\n")
    for call in calls(uri, timeout=20):
        t = time.monotonic()
        with pytest.raises(NotAVideoError):
            call()
        assert time.monotonic() - t < 5


def test_protocol_and_pattern_names_are_just_file_names(root, monkeypatch):
    """Files literally named like ffmpeg protocols or image-sequence patterns are those files: each
    decodes its own frames, never the files its name mentions."""
    folder = root / "names"
    make_video(folder / "one.mp4", seconds=1.0, fps=10, size=(64, 48))
    make_video(folder / "two.mp4", seconds=2.0, fps=10, size=(64, 48))
    make_video(folder / "clip1.mp4", seconds=2.0, fps=10, size=(64, 48))
    names = {"concat:one.mp4|two.mp4": 5, "subfile,,start,0,end,0,,:two.mp4": 3, "clip%d.mp4": 4}
    for name, frames in names.items():
        make_video(folder / "tmp.mp4", seconds=frames / 10, fps=10, size=(64, 48))
        os.rename(folder / "tmp.mp4", folder / name)  # ffmpeg itself cannot write such a name
    monkeypatch.chdir(folder)
    for name, frames in names.items():
        for uri in (name, str(folder / name), f"file://{folder / name}"):
            assert probe(uri).num_frames == frames, uri
            got = decode_frames(uri, np.arange(frames) / 10, size=32)
            assert [frame_index(f) for f in got.frames] == list(range(frames))


def test_image_sequences_are_not_videos(root):
    folder = root / "images"
    folder.mkdir()
    for i in (1, 2, 3):
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1", str(folder / f"img{i:03d}.png"))
    for name in ("img%03d.png", "img%03d.mp4", "img*.png"):
        (folder / name).write_bytes((folder / "img001.png").read_bytes())
        for call in calls(str(folder / name)):
            with pytest.raises(NotAVideoError):
                call()


@pytest.mark.parametrize("path, kind", [("/dev/zero", "character device"), ("/dev/null", "character device"),
                                        ("/dev/stdin", None), (".", "directory")])
def test_devices_and_directories_are_refused_at_once(path, kind):
    for uri in (path, f"file://{os.path.abspath(path)}"):
        for call in calls(uri):
            t = time.monotonic()
            with pytest.raises(VideoError, match=kind):
                call()
            assert time.monotonic() - t < 1


def test_fifo_whose_writer_opens_and_closes_is_refused_unopened(tmp_path):
    """(A FIFO nobody ever writes to: tests/test_video_errors.py.)"""
    fifo = tmp_path / "gone.mp4"
    with fifo_sentinel(fifo) as opened:  # its writer closes as soon as a reader comes
        for call in calls(str(fifo)):
            t = time.monotonic()
            with pytest.raises(NotAVideoError, match="FIFO"):
                call()
            assert time.monotonic() - t < 1
        assert not opened.wait(0.3)


# ---- URI schemes -----------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _head(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Content-Type", "video/mp4")
        self.end_headers()

    def do_HEAD(self):
        self._head(len(self.server.files.get(self.path, b"x" * 100_000)))

    def do_GET(self):
        body = self.server.files.get(self.path)
        if body is not None:
            self._head(len(body))
            self.wfile.write(body)
            return
        self._head(100_000)  # a stalled server: headers, a few bytes, then nothing until released
        self.wfile.write(b"\0" * 10)
        self.wfile.flush()
        self.server.release.wait(30)


@pytest.fixture
def server(root):
    """An HTTP server on 127.0.0.1 counting every connection; /v.mp4 is a real video, any other path
    stalls after its headers."""
    class Server(ThreadingHTTPServer):
        daemon_threads = True
        connections = 0

        def process_request(self, request, client_address):
            self.connections += 1
            super().process_request(request, client_address)

    srv = Server(("127.0.0.1", 0), _Handler)
    srv.files = {"/v.mp4": (root / "inputs" / "sibling.mp4").read_bytes()}
    srv.release = threading.Event()
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        th.join(5)


def test_check_uri_defaults_and_widening():
    assert [check_uri(u) for u in ("/a.mp4", "rel/a.mp4", "file:///a.mp4", "s3://b/a.mp4")] == ["file"] * 3 + ["s3"]
    assert check_uri("GS://b/a.mp4", ("gs",)) == "gs" and check_uri("https://h/a", ["https://"]) == "https"
    for uri, allow in (("gs://b/a.mp4", ()), ("http://h/a.mp4", ("https",)), ("s3://b/a::http://h/a", ()),
                       ("../a://b", ())):
        with pytest.raises(InputNotAllowedError) as e:
            check_uri(uri, allow)
        assert e.value.uri == uri and uri in str(e.value)


def test_refused_schemes_are_typed_errors_and_make_no_request(root, server):
    host = f"127.0.0.1:{server.server_address[1]}"
    video = root / "inputs" / "sibling.mp4"
    refused = [f"ftp://{host}/v.mp4", f"http://{host}/v.mp4", f"https://{host}/v.mp4", f"sftp://{host}/v.mp4",
               f"local://{video}", "memory://v.mp4", "reference://v.mp4", "gs://bucket/v.mp4",
               f"s3://bucket/v.mp4::http://{host}/v.mp4", f"simplecache::http://{host}/v.mp4"]
    for uri in refused:
        for call in calls(uri):
            with pytest.raises(InputNotAllowedError) as e:
                call()
            assert e.value.uri == uri and uri in str(e.value) and e.value.stage == "open"
    assert server.connections == 0


def test_enabled_http_reads_and_every_remote_failure_is_typed(root, server, tmp_path, monkeypatch):
    monkeypatch.setenv("LITEFRAME_VIDEO_CACHE", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{server.server_address[1]}/v.mp4"
    local = decode_frames(str(root / "inputs" / "sibling.mp4"), [0.0, 0.5], size=16)
    np.testing.assert_array_equal(decode_frames(url, [0.0, 0.5], size=16, policy=HTTP).frames, local.frames)

    dead = f"http://127.0.0.1:{free_port()}/v.mp4"  # nothing listens there
    for call in calls(dead, HTTP):
        t = time.monotonic()
        with pytest.raises(InputNotFoundError, match="Connect") as e:
            call()
        assert e.value.uri == dead and time.monotonic() - t < 5

    monkeypatch.setenv("LITEFRAME_VIDEO_CACHE_BYTES", "1000")  # the video is larger than the whole cache
    with pytest.raises(LimitExceededError, match="larger than the whole video cache"):
        probe(url.replace("v.mp4", "v.mp4?again"), policy=HTTP)


def test_stalled_remote_read_stops_at_its_deadline(server, tmp_path, monkeypatch):
    monkeypatch.setenv("LITEFRAME_VIDEO_CACHE", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{server.server_address[1]}/stall.mp4"
    for call in calls(url, HTTP, timeout=1.0):
        t = time.monotonic()
        with pytest.raises(DecodeTimeoutError) as e:
            call()
        assert e.value.uri == url and time.monotonic() - t < 3
    assert server.connections >= 1


def test_dead_s3_endpoint_is_a_typed_error_within_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setenv("LITEFRAME_VIDEO_CACHE", str(tmp_path / "cache"))
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x",
                 "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    t = time.monotonic()
    with pytest.raises(VideoError) as e:
        probe("s3://bucket/dead.mp4", timeout=2.0)
    assert e.value.uri == "s3://bucket/dead.mp4" and time.monotonic() - t < 4


# ---- 2. bounded work for any input ------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(root) -> Path:
    return make_video(root / "source.mp4", seconds=2.0, fps=10, size=(64, 48))


def _retime(src: Path, out: Path, expr: str) -> Path:
    """Re-encode with frame times rewritten by a setpts expression (the index code survives)."""
    ffmpeg("-i", str(src), "-vf", f"setpts='{expr}'", "-fps_mode", "passthrough", "-c:v", "libx264", "-crf", "10",
           "-preset", "veryfast", str(out))
    return out


def test_timestamp_bomb_plans_and_decodes_only_the_bulk_of_the_stream(root, source):
    """Frames 10-19 of a 2 s video moved 10^9 s later: without bounds a plan would tile 31 years."""
    bomb = _retime(source, root / "bomb.mkv", "if(gte(N,10),PTS+1e9/TB,PTS)")
    t = time.monotonic()
    info = probe(str(bomb))
    assert info.num_frames == 10 and info.duration == pytest.approx(1.0) and time.monotonic() - t < 5
    plans = plan_clips(video_id(str(bomb)), info, ClipSpec(frames=4, views=3, fps_range=(1.0, 4.0)), seed=0)
    assert len(plans) <= 3 * 3 and all(t <= info.last_time for p in plans for t in p.timestamps)
    got = decode_frames(str(bomb), [0.0, 0.5, 1e9], size=32)
    assert [frame_index(f) for f in got.frames] == [0, 5, 9]

    lead = _retime(source, root / "lead.mkv", "if(gte(N,1),PTS+1e6/TB,PTS)")  # one stray frame before the rest
    info = probe(str(lead))
    assert info.num_frames == 19 and info.duration == pytest.approx(1.9)
    got = decode_frames(str(lead), [0.0, 0.5, 1.8], size=32)
    assert [frame_index(f) for f in got.frames] == [1, 6, 19]


def test_absurd_declared_duration_is_not_believed(root, source):
    mkv = root / "declared.mkv"
    ffmpeg("-i", str(source), "-c", "copy", str(mkv))
    data = bytearray(mkv.read_bytes())
    at = data.find(b"\x44\x89\x88")  # Segment Info Duration: an 8-byte float, in milliseconds
    data[at + 3:at + 11] = struct.pack(">d", 1e15)  # 31,700 years
    mkv.write_bytes(data)
    info = probe(str(mkv))
    assert info.duration == pytest.approx(2.0) and info.num_frames == 20
    assert len(plan_clips("v", info, ClipSpec(frames=4, fps_range=(4.0, 4.0)), seed=0)) <= 2  # 1 s clips


def test_duration_and_frame_limits_bound_what_is_considered(source):
    uri = str(source)
    info = probe(uri, policy=InputPolicy(max_duration=1.0))
    assert info.last_time == pytest.approx(1.0) and info.num_frames == 11
    got = decode_frames(uri, [0.5, 1.9], size=32, policy=InputPolicy(max_duration=1.0))
    assert [frame_index(f) for f in got.frames] == [5, 10]
    few = InputPolicy(max_frames=7)  # the probe stops reading there: memory bounded by frames, not by the file
    info = probe(uri, policy=few)
    assert 1 <= info.num_frames <= 7
    got = decode_frames(uri, np.arange(info.num_frames) / 10, size=32, policy=few)
    assert [frame_index(f) for f in got.frames] == list(range(info.num_frames))


def test_default_clip_cap_bounds_any_plan():
    ten_hours = VideoInfo(uri="/v.mp4", duration=36000.0, avg_fps=30.0, nominal_fps=30.0, num_frames=1_080_000,
                          width=640, height=360, rotation=0, codec="h264", pix_fmt="yuv420p", start_time=0.0,
                          last_time=35999.9)
    plans = plan_clips("v", ten_hours, ClipSpec(frames=4, views=2, fps_range=(4.0, 4.0)), seed=0)
    assert len(plans) == 2 * DEFAULT_MAX_CLIPS_PER_VIEW
    more = plan_clips("v", ten_hours, ClipSpec(frames=4, fps_range=(4.0, 4.0), max_clips_per_view=20_000), seed=0)
    assert len(more) == 20_000


def test_frames_over_the_pixel_limit_are_refused(root, source):
    small = InputPolicy(max_pixels=64 * 48 - 1)
    assert probe(str(source), policy=small).width == 64  # probing reads no picture
    with pytest.raises(LimitExceededError, match="64x48"):
        decode_frames(str(source), [0.0], size=16, policy=small)
    # A stream that grows mid-way (headers say 64x48): the decoder refuses the big pictures itself.
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=1", "-c:v", "libx264", "-preset", "veryfast",
           str(root / "s1.ts"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=256x192:rate=10:duration=1", "-c:v", "libx264", "-preset", "veryfast",
           "-output_ts_offset", "3", str(root / "s2.ts"))
    grow = root / "grow.ts"
    grow.write_bytes((root / "s1.ts").read_bytes() + (root / "s2.ts").read_bytes())
    info = probe(str(grow), policy=InputPolicy(max_pixels=64 * 48))
    assert (info.width, info.height) == (64, 48)
    assert decode_frames(str(grow), [0.0], size=16, policy=InputPolicy(max_pixels=64 * 48)).frames.shape[0] == 1
    with pytest.raises(LimitExceededError, match="more than 3072 pixels"):
        decode_frames(str(grow), [info.last_time], size=16, policy=InputPolicy(max_pixels=64 * 48))


_MEASURE = """
import re, resource, sys
from pathlib import Path
from pipeline.video import InputPolicy, decode_frames
decode_frames(sys.argv[1], [i / 10 for i in range(0, 10, 2)], size=448, threads=int(sys.argv[2]), seek_gap=0.0,
              policy=InputPolicy(max_pixels=1920 * 1080))
# This process's own peak (ru_maxrss would count the parent it was forked from), then the largest
# ffmpeg child's (at least this process's size when it was spawned: an over-estimate, never under).
print(int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


@pytest.mark.parametrize("threads", [1, 4])
def test_decode_memory_covers_a_measured_decode(root, threads):
    """The reservation jobs get from decode_memory is above what a 1080p decode really peaks at."""
    video = root / "1080p.mp4"
    if not video.exists():
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=1920x1080:rate=10:duration=1", "-c:v", "libx264", "-preset",
               "veryfast", "-x264-params", "ref=4:bframes=3", "-pix_fmt", "yuv420p", str(video))
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(video), str(threads)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    python_peak, ffmpeg_peak = map(int, done.stdout.split())
    need = decode_memory(448, frames=5, threads=threads, policy=InputPolicy(max_pixels=1920 * 1080),
                         bytes_per_pixel=1.5)
    assert python_peak + ffmpeg_peak < need
    assert decode_memory(448, 10, threads=4) > decode_memory(448, 10, threads=1) > 1 << 30  # 8K frames allowed
