"""Remote videos (any fsspec URL, s3:// through s3fs) spooled to a bounded local cache.

ffmpeg needs a seekable file for sparse decoding (input seeking jumps between keyframes), so a remote
video is copied in fixed-size chunks (never whole in memory) into a size-capped LRU directory and
decoded from there. The cache is shared by processes on a node: files are written under a temporary
name and renamed, and eviction removes least-recently-used files until the cap is met.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path

from .errors import DecodeTimeoutError, InputNotFoundError

CHUNK = 8 * 1024 * 1024
_lock = threading.Lock()


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


def spool(uri: str, timeout: float = 600.0) -> str:
    """A local copy of a remote video, from the cache when its size and version still match.
    The copy is abandoned (DecodeTimeoutError) once `timeout` seconds have passed."""
    import fsspec

    deadline = time.monotonic() + timeout
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
        meta = fs.info(path)
    except FileNotFoundError as e:
        raise InputNotFoundError(uri, f"no such remote object ({e})") from None
    except PermissionError as e:
        raise InputNotFoundError(uri, f"permission denied ({e})") from None
    if meta.get("type") == "directory":
        raise InputNotFoundError(uri, "is a directory, not a video")
    size = int(meta.get("size") or 0)
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
    try:
        with os.fdopen(fd, "wb") as out, fs.open(path, "rb", block_size=CHUNK) as src:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                out.write(chunk)
                if time.monotonic() > deadline:
                    raise DecodeTimeoutError(uri, f"download exceeded its {timeout:.1f} s timeout")
        os.replace(tmp, target)
    except FileNotFoundError as e:
        raise InputNotFoundError(uri, f"no such remote object ({e})") from None
    except PermissionError as e:
        raise InputNotFoundError(uri, f"permission denied ({e})") from None
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
