"""The ffmpeg binary and the one way we run it: a subprocess with a hard deadline.

Every ffmpeg call in the pipeline goes through `FFmpeg`, so no decode can hang a job: on expiry the
process is killed and `DecodeTimeoutError` is raised. stderr is drained on a thread (a full pipe
would otherwise block ffmpeg) and classified into the typed errors of `pipeline.errors`.
"""

from __future__ import annotations

import os
import shutil
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

    def read_all(self) -> bytes:
        return self.proc.stdout.read()

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
    if "no such file or directory" in low:
        return InputNotFoundError(uri, f"no such file ({detail})")
    if "permission denied" in low:
        return InputNotFoundError(uri, f"permission denied ({detail})")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return InputNotFoundError(uri, f"unreadable ({e})")
    if not head:
        return NotAVideoError(uri, "empty file")
    # ffmpeg picks the MP4 demuxer from the extension alone; only real MP4 boxes make it a cut MP4.
    if "moov atom not found" in low and head[4:8] in (b"ftyp", b"mdat", b"moov", b"free", b"wide", b"skip"):
        return CorruptVideoError(uri, f"truncated MP4: no index (moov) box ({detail})")
    return NotAVideoError(uri, f"not a container ffmpeg can read ({detail})")


def check_local(uri: str, path: str) -> None:
    """Fail fast with InputNotFoundError before spawning ffmpeg on a path that cannot be read."""
    if not os.path.exists(path):
        raise InputNotFoundError(uri, "no such file")
    if os.path.isdir(path):
        raise NotAVideoError(uri, "is a directory")
    if not os.access(path, os.R_OK):
        raise InputNotFoundError(uri, "permission denied")
