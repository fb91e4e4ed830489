"""Reading a complete store: store.json and the manifest (O(shards)); a shard's index rows and data
only when asked for."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.remote import storage_options as remote_storage_options
from pipeline.store.codec import decode_target
from pipeline.store.files import Layout, filesystem, is_local, read_json, read_parquet
from pipeline.store.schema import ERRORS_SCHEMA, INDEX_SCHEMA, StoreError, check_version


@dataclass
class Store:
    """A complete store, opened for reading."""

    root: str
    fs: fsspec.AbstractFileSystem
    path: str
    schema: dict
    manifest: pa.Table                  # one row per shard, sorted by shard (pipeline.store.MANIFEST_SCHEMA)
    storage_options: dict = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        return Layout(self.path)

    @property
    def target_dtype(self) -> str:
        return self.schema["target"]["dtype"]

    @property
    def target_shape(self) -> tuple[int, int]:
        return (int(self.schema["target"]["tokens"]), int(self.schema["target"]["dim"]))

    @property
    def num_clips(self) -> int:
        return int(np.asarray(self.manifest.column("clips")).sum())

    def shards(self) -> list[str]:
        return self.manifest.column("shard").to_pylist()

    def shard_urls(self, format: str = "webdataset") -> list[str]:
        """Full URLs (same scheme as the root) of the shards in the manifest, sorted."""
        if format not in self.schema["formats"]:
            raise StoreError(f"{self.root}: no {format} shards (store formats: {self.schema['formats']})")
        suffix = ".tar" if format == "webdataset" else ""
        return [f"{self.root.rstrip('/')}/{format}/{s}{suffix}" for s in self.shards()]

    def shard_index(self, shard: str, columns: Sequence[str] | None = None) -> pa.Table:
        """The index rows of one shard, in row order: one small object read."""
        try:
            table = read_parquet(self.fs.cat_file(self.layout.index(shard)))
        except FileNotFoundError:
            raise StoreError(f"{self.root}: shard {shard} has no index file") from None
        table = table.sort_by("row")
        return table.select(list(columns)) if columns is not None else table

    def read_index(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The whole index: O(clips), for tools and tests that ask for it explicitly."""
        return _dataset(self, "index", INDEX_SCHEMA).to_table(columns=columns)

    def read_errors(self) -> pa.Table:
        """Every error row (errors/ holds one small file per failed input or clip)."""
        return _dataset(self, "errors", ERRORS_SCHEMA).to_table()

    def zarr_group(self, shard: str):
        """The Zarr v3 group of one shard, opened read-only (works for local and S3 roots)."""
        import zarr

        if is_local(self.fs):
            return zarr.open_group(os.path.join(self.path, "zarr", shard), mode="r")
        return zarr.open_group(f"{self.root.rstrip('/')}/zarr/{shard}", mode="r",
                               storage_options=self.storage_options)

    def decode_target(self, array: np.ndarray) -> np.ndarray:
        return decode_target(array, self.target_dtype)


def _dataset(store: Store, folder: str, schema: pa.Schema) -> pads.Dataset:
    path = f"{store.path}/{folder}"
    if not store.fs.exists(path):
        return pads.dataset(schema.empty_table())
    return pads.dataset(path, format="parquet", filesystem=store.fs, schema=schema)


def open_store(root: str, storage_options: Mapping | None = None) -> Store:
    """Open a complete store (manifest.parquet present) for reading: store.json and the manifest only."""
    fs, path = filesystem(root, storage_options)
    layout = Layout(path)
    try:
        schema = read_json(fs, layout.store_json)
    except FileNotFoundError:
        raise StoreError(f"{root}: not a store (no store.json)") from None
    check_version(schema, str(root))
    try:
        manifest = read_parquet(fs.cat_file(layout.manifest))
    except FileNotFoundError:
        raise StoreError(f"{root}: not a complete store (no manifest.parquet; was the extraction job "
                         "finished?)") from None
    options = dict(storage_options) if storage_options is not None else remote_storage_options(root)
    return Store(str(root), fs, path, schema, manifest.sort_by("shard"), options)
