"""bench/scale.py stays runnable: one tiny size, v2 and v1, and the stores it fabricates are real stores
(speed is never asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_bench"] = module     # the fabrication pool's tasks are pickled by module name
    spec.loader.exec_module(module)
    return module


def test_scale_bench_smoke(tmp_path):
    scale = _load_bench()
    if subprocess.run(["git", "cat-file", "-e", f"{scale.V1_COMMIT}^{{commit}}"], cwd=ROOT).returncode:
        pytest.skip(f"layout v1's commit {scale.V1_COMMIT} is not in this checkout")
    from pipeline.store import open_store
    from pipeline.store.writer import STATS_KEY

    bench = scale.Bench(tmp_path, clips_per_shard=100, repeat=1, jobs=2)
    row = json.loads(json.dumps(bench.measure_size(2000)))
    required = {"clips", "shards", "trainer_start_s", "trainer_start_rss_mb", "extract_prepare_finalise_s",
                "extract_peak_rss_mb", "open_store_s", "open_store_rss_mb", "extract_prepare_s",
                "extract_finalise_s", "v1_note", *scale.V1_COLUMNS}
    assert required <= row.keys()
    assert (row["clips"], row["shards"]) == (2000, 20) and row["v1_note"] is None
    assert all(row[k] is not None for k in scale.V1_COLUMNS)
    assert "| 2000 | 20 |" in scale.markdown([row])

    spec = scale.StoreSpec(2000, 100)
    store = open_store(str(tmp_path / spec.name(2)))     # put back as fabricated after the extract measurement
    assert store.num_clips == 2000 and store.manifest.num_rows == 20
    assert store.manifest.column("clips").to_numpy().sum() == 2000
    stats = json.loads(pq.read_schema(tmp_path / spec.name(2) / "manifest.parquet").metadata[STATS_KEY])
    assert stats["count"] == 2000 * scale.TOKENS
    index = store.shard_index(store.shards()[0])
    assert index.num_rows == 100 and index.column("clip_id")[0].as_py().startswith("video_")
    assert len(store.read_index(["clip_id"]).column("clip_id").unique()) == 2000

    v1_store, v1_data = scale.load_v1(tmp_path / "v1-code")
    old = v1_store.open_store(str(tmp_path / spec.name(1)))
    assert old.index.num_rows == 2000 and len(old.shards()) == 20
    info = v1_data.read_store(str(tmp_path / spec.name(1)))
    assert sum(info.counts) == 2000
    assert np.array_equal(np.sort(old.index.column("clip_id").to_numpy(zero_copy_only=False)),
                          np.sort(store.read_index(["clip_id"]).column("clip_id").to_numpy(zero_copy_only=False)))
