"""Upgrade a schema_version 1 store (one index.parquet, commit records holding every clip row) to
version 2 in place, rewriting metadata only: tars and Zarr groups stay as they are.

    python -m pipeline.store.upgrade ROOT [ROOT ...]

Shard by shard, so memory is one shard's rows; each v1 commit record is replaced only after its
shard's index file and statistics are written, and store.json changes version last, so an
interrupted upgrade is finished by running it again.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pyarrow as pa

from pipeline.store.codec import npy_bytes
from pipeline.store.files import list_names, parquet_bytes, read_json, read_many, write_atomic
from pipeline.store.records import ShardCommit
from pipeline.store.schema import INDEX_SCHEMA, SCHEMA_VERSION, StoreError, identity_hash

from pipeline.store.writer import StoreWriter
from pipeline.video import DEFAULT_POLICY


def upgrade(root: str) -> dict:
    """Upgrade one store; returns its new store.json. A version 2 store is left as it is."""
    probe = StoreWriter(root, {})
    fs, layout = probe.fs, probe.layout
    try:
        schema = read_json(fs, layout.store_json)
    except FileNotFoundError:
        raise StoreError(f"{root}: not a store (no store.json)") from None
    if schema.get("schema_version") == SCHEMA_VERSION:
        return schema
    if schema.get("schema_version") != 1:
        raise StoreError(f"{root}: schema_version {schema.get('schema_version')} cannot be upgraded")
    complete = fs.exists(f"{layout.path}/index.parquet")
    # Version 1 planned clips without input limits; its videos were within today's defaults unless
    # longer than 4 h, which a v1 store with such videos would differ on.
    clip = {**DEFAULT_POLICY.plan_limits(), **schema["clip"]}
    schema = {**schema, "schema_version": SCHEMA_VERSION, "clip": clip}
    schema["config_hash"] = identity_hash(schema)
    writer = StoreWriter(root, schema, probe.storage_options)
    names = list_names(fs, layout.commits, ".json")
    for path, data in read_many(fs, [layout.commit(n) for n in names]):
        record = json.loads(data)
        if not isinstance(record.get("clips"), list):
            continue                                      # upgraded by an earlier, interrupted run
        shard = record["shard"]
        if record["clips"]:
            rows = record["clips"]
            write_atomic(fs, layout.index(shard), parquet_bytes(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)))
            stats = record["stats"]
            write_atomic(fs, layout.stats(shard), npy_bytes(np.array([stats["sum"], stats["sumsq"]], dtype=np.float64)))
            commit = ShardCommit.of_rows(shard, rows, record["formats"], record.get("bytes", {}), int(stats["count"]))
            write_atomic(fs, path, commit.to_json())
        else:
            writer.commit_errors(record["errors"])
            fs.rm(path)
    if "zarr" in schema["formats"] and not fs.exists(f"{layout.zarr()}/zarr.json"):
        group = {"zarr_format": 3, "node_type": "group", "attributes": {"config_hash": schema["config_hash"]}}
        write_atomic(fs, f"{layout.zarr()}/zarr.json", json.dumps(group).encode())
    if complete:
        new = writer.finalise()
    else:                                                 # an unfinished v1 job: the v2 job resumes it
        new = writer.schema
        write_atomic(fs, layout.store_json, json.dumps(new, indent=1).encode())
    for old in ("index.parquet", "errors.parquet"):
        if fs.exists(f"{layout.path}/{old}"):
            fs.rm(f"{layout.path}/{old}")
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.store.upgrade", description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", help="store roots (folders or s3://...)")
    for root in parser.parse_args(argv).roots:
        try:
            summary = upgrade(root).get("summary", {})
        except StoreError as e:
            print(f"pipeline.store.upgrade: error: {e}", file=sys.stderr)
            return 2
        print(f"{root}: schema_version {SCHEMA_VERSION} ({summary.get('clips', '?')} clips, "
              f"{summary.get('shards', '?')} shards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
