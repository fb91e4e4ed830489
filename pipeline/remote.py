"""Which inputs may be opened at all, and remote videos (fsspec URLs) spooled to a bounded local cache.

`check_uri` is the one gate every input passes (videos of the extraction job, `lma` records and
questions): local paths, file:// and s3:// by default, other schemes only when the caller enables
them. A refused URI is an `InputNotAllowedError` before any request is made.

ffmpeg needs a seekable file for sparse decoding (input seeking jumps between keyframes), so a remote
video is copied in fixed-size chunks (never whole in memory) into a size-capped LRU directory and
decoded from there. The cache is shared by processes on a node: files are written under a temporary
name and renamed, and eviction removes least-recently-used files until the cap is met. The copy runs
on a helper thread, so a stalled connection cannot hold the caller past its deadline.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterable

from .errors import DecodeTimeoutError, InputNotAllowedError, InputNotFoundError, LimitExceededError, VideoError

CHUNK = 8 * 1024 * 1024
DEFAULT_SCHEMES = ("file", "s3")  # "file": local paths and file:// URLs
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_lock = threading.Lock()


def scheme(uri: str) -> str:
    """'file' for a local path or a file:// URL, else the lower-cased text before '://'."""
    uri = str(uri)
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def check_uri(uri: str, allow_schemes: Iterable[str] = ()) -> str:
    """The URI's scheme, if inputs of that scheme may be opened; else InputNotAllowedError.

    Accepted: DEFAULT_SCHEMES plus `allow_schemes` (e.g. ("gs", "https")). fsspec's chained URLs
    (`a::b`) are refused: they name several filesystems at once."""
    s = scheme(uri)
    allowed = {*DEFAULT_SCHEMES, *(str(a).strip().lower().removesuffix("://") for a in allow_schemes)}
    if not _SCHEME.fullmatch(s) or s not in allowed:
        raise InputNotAllowedError(uri, f"scheme {s!r} is not enabled (enabled: {', '.join(sorted(allowed))}; "
                                        "more with allow_schemes / --allow-schemes)")
    if s != "file" and "::" in str(uri):
        raise InputNotAllowedError(uri, "chained fsspec URLs ('::') are not accepted")
    return s


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def local_path(uri: str) -> str:
    """The path of a local input: plain paths and file:// URLs."""
    uri = str(uri)
    return uri[len("file://"):] if uri.startswith("file://") else uri


def storage_options(uri: str) -> dict:
    """fsspec options for a URL; the S3 endpoint comes from the environment, read at call time
    (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL as botocore names them, or fsspec's FSSPEC_S3_ENDPOINT_URL)."""
    if not str(uri).startswith(("s3://", "s3a://")):
        return {}
    endpoint = (
        os.environ.get("FSSPEC_S3_ENDPOINT_URL")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    return {"endpoint_url": endpoint} if endpoint else {}


def cache_dir() -> Path:
    return Path(os.environ.get("LITEFRAME_VIDEO_CACHE", Path(tempfile.gettempdir()) / "liteframe-video-cache"))


def cache_bytes() -> int:
    return int(float(os.environ.get("LITEFRAME_VIDEO_CACHE_BYTES", 20e9)))


def spool(uri: str, timeout: float = 600.0, allow_schemes: Iterable[str] = ()) -> str:
    """A local copy of a remote video, from the cache when its size and version still match.

    The URI must pass `check_uri` first. Every remote call runs on a helper thread: past `timeout`
    the caller gets DecodeTimeoutError even if a read never returns (the thread then stops at its
    next chunk, or when the backend gives up, and removes its partial file). Any failure of the
    remote side (refused connection, DNS, 403, missing key) is an InputNotFoundError naming the URI."""
    check_uri(uri, allow_schemes)
    box: dict = {}
    done, cancel = threading.Event(), threading.Event()

    def work() -> None:
        try:
            box["path"] = _copy(uri, cancel, timeout)
        except BaseException as e:  # handed to the caller below
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name=f"spool {uri}", daemon=True).start()
    if not done.wait(max(0.0, timeout)):
        cancel.set()
        raise DecodeTimeoutError(uri, f"remote read exceeded its {timeout:.1f} s timeout")
    if "error" in box:
        raise box["error"]
    return box["path"]


@contextmanager
def _remote_errors(uri: str):
    """Whatever a remote filesystem raises for this input becomes one typed error naming it. The
    innermost cause decides the words: fsspec's HTTP wraps a refused connection in FileNotFoundError."""
    try:
        yield
    except VideoError:
        raise
    except Exception as e:  # aiohttp, botocore, socket errors...: the backends share no base class
        while e.__cause__ is not None:
            e = e.__cause__
        what = ("no such remote object" if isinstance(e, FileNotFoundError) else
                "permission denied" if isinstance(e, PermissionError) else "remote read failed")
        raise InputNotFoundError(uri, f"{what} ({type(e).__name__}: {e})") from None


def _copy(uri: str, cancel: threading.Event, timeout: float) -> str:
    import fsspec

    with _remote_errors(uri):
        try:
            fs, path = fsspec.core.url_to_fs(scheme(uri) + uri[uri.index("://"):], **storage_options(uri))
        except (ImportError, ValueError) as e:  # no fsspec backend for this scheme (or not installed)
            raise InputNotAllowedError(uri, f"no filesystem for this URI ({type(e).__name__}: {e})") from None
        meta = fs.info(path)
        size = int(meta.get("size") or 0)
    if meta.get("type") == "directory":
        raise InputNotFoundError(uri, "is a directory, not a video")
    limit = size or cache_bytes()
    if limit > cache_bytes():
        raise LimitExceededError(uri, f"{size} bytes: larger than the whole video cache ({cache_bytes()} bytes, "
                                      "LITEFRAME_VIDEO_CACHE_BYTES)")
    version = str(meta.get("ETag") or meta.get("etag") or meta.get("LastModified") or meta.get("mtime") or "")
    key = hashlib.sha256(f"{uri}\0{size}\0{version}".encode()).hexdigest()[:32]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / (key + Path(path).suffix[:10])
    if target.exists() and target.stat().st_size == size:
        os.utime(target)  # mark as recently used
        return str(target)
    _evict(root, keep_free=size)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".part-")
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            with _remote_errors(uri):
                src = fs.open(path, "rb", block_size=CHUNK)
            try:
                while not cancel.is_set():
                    with _remote_errors(uri):
                        chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    written += len(chunk)
                    if written > limit:
                        raise LimitExceededError(uri, f"sent more than {limit} bytes ("
                                                      f"{'its declared size' if size else 'the video cache size'})")
                    out.write(chunk)
            finally:
                with suppress(Exception):  # a read-only handle: nothing to lose, and the read's error matters
                    src.close()
        if cancel.is_set():
            raise DecodeTimeoutError(uri, f"remote read exceeded its {timeout:.1f} s timeout")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target)


IN_USE_S = 900.0      # a cached video touched this recently may still be read by a decode: never evicted
STALE_PART_S = 3600.0  # a partial download this old belongs to a killed process


def _evict(root: Path, keep_free: int) -> None:
    """Remove least-recently-used cached videos until `keep_free` more bytes fit under the cap.

    Videos used in the last IN_USE_S seconds stay even if the cap is exceeded for a while: a decode
    reopens its file for each ffmpeg run, and deleting it under a running job would fail that video."""
    now = time.time()
    with _lock:
        files = []
        for p in root.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
            if p.name.startswith(".part-"):
                if now - st.st_mtime > STALE_PART_S:
                    p.unlink(missing_ok=True)
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in files)
        for mtime, s, p in sorted(files):
            if total + keep_free <= cache_bytes() or now - mtime < IN_USE_S:
                break
            p.unlink(missing_ok=True)
            total -= s
