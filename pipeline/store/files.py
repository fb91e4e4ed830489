"""Where each object of a store lives, and the few filesystem operations the store needs: atomic
writes, and reads of many small objects with bounded parallelism (one GET at a time would take
hours for 10^5 commit records on S3)."""

from __future__ import annotations

import io
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.remote import storage_options as remote_storage_options

# Small objects read at once: enough to hide an object store's latency, few enough to bound memory.
READ_BATCH = 256


def filesystem(root: str, storage_options: Mapping | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fs, path inside fs) for a local dir or an fsspec URL; options default to the environment's
    (endpoint from AWS_ENDPOINT_URL; credentials and region botocore reads from AWS_* itself)."""
    root = str(root)
    options = dict(storage_options) if storage_options is not None else remote_storage_options(root)
    fs, path = fsspec.core.url_to_fs(root, **options)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


@dataclass(frozen=True)
class Layout:
    """Paths of a store's objects inside its filesystem (see pipeline.store's docstring)."""

    path: str

    @property
    def store_json(self) -> str:
        return f"{self.path}/store.json"

    @property
    def lease(self) -> str:
        return f"{self.path}/_lease.json"

    @property
    def manifest(self) -> str:
        return f"{self.path}/manifest.parquet"

    @property
    def accounted_manifest(self) -> str:
        """The last finalised manifest while the store is being added to (see StoreWriter)."""
        return f"{self.path}/_commits/manifest.parquet"

    @property
    def commits(self) -> str:
        return f"{self.path}/_commits"

    def commit(self, shard: str) -> str:
        return f"{self.path}/_commits/{shard}.json"

    def stats(self, shard: str) -> str:
        return f"{self.path}/_commits/{shard}.stats.npy"

    def index(self, shard: str) -> str:
        return f"{self.path}/index/{shard}.parquet"

    def errors(self, name: str) -> str:
        return f"{self.path}/errors/{name}.parquet"

    def tar(self, shard: str) -> str:
        return f"{self.path}/webdataset/{shard}.tar"

    def zarr(self, shard: str = "") -> str:
        return f"{self.path}/zarr/{shard}".rstrip("/")


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Local: temp file + fsync + rename; object stores: a single PUT is already atomic."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def read_parquet(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def list_names(fs: fsspec.AbstractFileSystem, folder: str, suffix: str) -> list[str]:
    """Sorted names (without `suffix`) of the objects in `folder` that end with it."""
    try:
        paths = fs.ls(folder, detail=False, refresh=True) if not is_local(fs) else fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in paths)
    return sorted(n[: -len(suffix)] for n in names if n.endswith(suffix) and not n.startswith("."))


def read_many(fs: fsspec.AbstractFileSystem, paths: Sequence[str], workers: int = 32) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each object, in order, READ_BATCH at a time with `workers` reads in flight.
    An object that vanished meanwhile is left out (a killed job's straggler may be cleaning up)."""
    def read(path: str) -> bytes | None:
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        for i in range(0, len(paths), READ_BATCH):
            batch = paths[i:i + READ_BATCH]
            for path, data in zip(batch, pool.map(read, batch)):
                if data is not None:
                    yield path, data
