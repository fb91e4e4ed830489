"""The ffmpeg binary and the one way we run it: a subprocess with a hard deadline, reading one file.

Every ffmpeg call in the pipeline goes through `FFmpeg`, so no decode can hang a job: on expiry the
process is killed and `DecodeTimeoutError` is raised. stderr is drained on a thread (a full pipe
would otherwise block ffmpeg) and classified into the typed errors of `pipeline.errors`.

Every input is opened through `input_options`: the `file` protocol only, on an absolute `file:` URL
(a file named `concat:a|b` or `subfile,,...` is that file), and only demuxers of real video
containers, whatever the file is called. Playlists, manifests and image sequences (HLS, DASH,
ffconcat, SDP, image2...) would make ffmpeg open other files or hosts: they never get a demuxer.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
from functools import lru_cache
from typing import Sequence

from .errors import (
    CorruptVideoError,
    DecodeTimeoutError,
    InputNotFoundError,
    NotAVideoError,
    VideoError,
)

_STDERR_KEEP = 256 * 1024  # bytes kept from each end of stderr: headers at the start, the error at the end

# Demuxers of self-contained video files (`ffmpeg -demuxers` names; "mov" is MP4/MOV/3GP, "matroska"
# MKV/WebM, "mpeg" MPEG-PS/VOB, "asf" WMV, "rm" RealMedia, then raw elementary streams). None of them
# opens another file or URL (MOV's external data references stay off: `enable_drefs` defaults to 0).
VIDEO_FORMATS = ("mov", "matroska", "avi", "mpegts", "mpeg", "flv", "asf", "ogg", "mxf", "nut", "ivf", "obu",
                 "h264", "hevc", "vvc", "m4v", "mpegvideo", "dv", "rm", "yuv4mpegpipe")
_NOT_ON_WHITELIST = "format not on whitelist"


def input_options(path: str) -> tuple[str, dict]:
    """(URL, options) for reading the local file `path` with ffmpeg and nothing else."""
    return "file:" + os.path.abspath(path), {"protocol_whitelist": "file", "format_whitelist": ",".join(VIDEO_FORMATS)}


@lru_cache(maxsize=None)
def ffmpeg_exe() -> str:
    """System ffmpeg if on PATH (usually the best-optimised build), else imageio-ffmpeg's static binary."""
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@lru_cache(maxsize=None)
def has_filter(name: str) -> bool:
    """Whether this ffmpeg build has the filter (optional libraries such as zimg differ by build)."""
    res = subprocess.run([ffmpeg_exe(), "-hide_banner", "-h", f"filter={name}"], capture_output=True, text=True,
                         timeout=30)
    return res.returncode == 0 and f"Filter {name}" in res.stdout


def _widen_pipe(stream) -> None:
    """A 1 MiB pipe instead of Linux's 64 KiB: a 448 px RGB frame (602 KB) then passes in one or two
    writes instead of ten writer/reader hand-offs (full-rate decodes stream over 1 GB/s). Best effort:
    other systems, or a lower /proc/sys/fs/pipe-max-size, keep the default."""
    try:
        import fcntl

        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):
        pass


class FFmpeg:
    """One ffmpeg subprocess: stdout read in exact-size chunks, stderr kept (head and tail), a deadline.

    Use as a context manager; leaving the block always reaps the process.
    """

    def __init__(self, args: Sequence[str], uri: str, timeout: float):
        self.uri = uri
        self.timeout = float(timeout)
        self.timed_out = False
        self._head = bytearray()
        self._tail = bytearray()
        self.proc = subprocess.Popen(
            [ffmpeg_exe(), "-nostdin", "-hide_banner", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        _widen_pipe(self.proc.stdout)
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self._timer = threading.Timer(self.timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _read_stderr(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read(65536), b""):
            room = _STDERR_KEEP - len(self._head)
            if room > 0:
                self._head += chunk[:room]
                chunk = chunk[room:]
            if chunk:
                self._tail += chunk
                if len(self._tail) > _STDERR_KEEP:
                    del self._tail[: len(self._tail) - _STDERR_KEEP]

    def _expire(self) -> None:
        if self.proc.poll() is None:
            self.timed_out = True
            self.proc.kill()

    def read_into(self, arr) -> bool:
        """Fill a (contiguous) numpy array from stdout without an extra copy; False at end of stream."""
        view = memoryview(arr).cast("B")
        n = 0
        while n < len(view):
            k = self.proc.stdout.readinto(view[n:])
            if not k:
                return False
            n += k
        return True

    def chunks(self, size: int = 1 << 22):
        """stdout in pieces of at most `size` bytes, for streams too big to hold."""
        return iter(lambda: self.proc.stdout.read(size), b"")

    def wait(self) -> int:
        """Reap the process; raise DecodeTimeoutError if the deadline killed it."""
        rc = self.proc.wait()
        self._timer.cancel()
        self._drain.join(timeout=5)
        if self.timed_out:
            raise DecodeTimeoutError(self.uri, f"ffmpeg exceeded its {self.timeout:.1f} s timeout and was killed")
        return rc

    @property
    def stderr(self) -> str:
        gap = "\n[...]\n" if self._tail and len(self._head) >= _STDERR_KEEP else ""
        return (bytes(self._head) + gap.encode() + bytes(self._tail)).decode("utf-8", "replace")

    def close(self) -> None:
        self._timer.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self._drain.join(timeout=5)
        self.proc.stderr.close()

    def __enter__(self) -> "FFmpeg":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def error_lines(stderr: str, limit: int = 3) -> str:
    """The last few lines that say what went wrong, for an error message."""
    keys = ("error", "invalid", "no such", "denied", "not found", "corrupt", "missing", "failed", "unknown")
    lines = [ln.strip() for ln in stderr.splitlines() if any(k in ln.lower() for k in keys)]
    if lines:
        return " | ".join(lines[-limit:])
    rest = stderr.strip().splitlines()
    return rest[-1] if rest else ""


# Demuxer messages that mean the file was cut short (MP4 without its index, a partial MP4/MKV).
TRUNCATION_MARKERS = ("moov atom not found", "partial file", "file ended prematurely")


def open_error(uri: str, stderr: str, path: str) -> VideoError:
    """Map the stderr of an ffmpeg that could not open its input to a typed error."""
    low = stderr.lower()
    detail = error_lines(stderr)
    if _NOT_ON_WHITELIST in low:
        return NotAVideoError(uri, "not a video container: ffmpeg recognised another format (a playlist, manifest, "
                                   "image or image sequence...), which is never opened "
                                   f"(accepted: {', '.join(VIDEO_FORMATS)})")
    if "no such file or directory" in low:
        return InputNotFoundError(uri, f"no such file ({detail})")
    if "permission denied" in low:
        return InputNotFoundError(uri, f"permission denied ({detail})")
    try:
        head = _read_head(uri, path, 8)
    except OSError as e:
        return InputNotFoundError(uri, f"unreadable ({e})")
    if not head:
        return NotAVideoError(uri, "empty file")
    # ffmpeg picks the MP4 demuxer from the extension alone; only real MP4 boxes make it a cut MP4.
    if "moov atom not found" in low and head[4:8] in (b"ftyp", b"mdat", b"moov", b"free", b"wide", b"skip"):
        return CorruptVideoError(uri, f"truncated MP4: no index (moov) box ({detail})")
    return NotAVideoError(uri, f"not a container ffmpeg can read ({detail})")


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_local(uri: str, path: str) -> None:
    """Refuse, before anything opens it, a path that is not a readable regular file. Opening a FIFO
    blocks until a writer comes, and a device (/dev/zero) never ends: only regular files are videos."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputNotFoundError(uri, "no such file") from None
    except PermissionError:
        raise InputNotFoundError(uri, "permission denied") from None
    except (OSError, ValueError) as e:  # a name too long, a symlink loop, a NUL byte in the name
        raise InputNotFoundError(uri, f"unusable path ({e})") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
        raise NotAVideoError(uri, f"{kind}, not a regular file")
    if not os.access(path, os.R_OK):
        raise InputNotFoundError(uri, "permission denied")


def _read_head(uri: str, path: str, size: int) -> bytes:
    """The first bytes of a file, refusing (never waiting on) anything but a regular file: the path
    may have been swapped for a FIFO since `check_local` looked at it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAVideoError(uri, "not a regular file")
        return os.read(fd, size)
    finally:
        os.close(fd)
