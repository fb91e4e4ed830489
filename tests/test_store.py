"""The store layout without Ray: writer, commits, resume bookkeeping, finalise, official readers."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import zarr

from pipeline import store as st

T, S, N, D = 4, 32, 8, 16


def schema(dtype="float16", encoding="jpg", formats=("webdataset", "zarr"), method="wap"):
    return st.make_schema(
        teacher={"name_or_path": "tiny", "revision": None, "layer": -1, "head": None, "dim": D, "grid": [4, 4]},
        compression={"method": method, "factors": [2, 2, 2]},
        clip={"frames": T, "views": 1, "fps_range": [1.0, 4.0]},
        frames={"encoding": encoding, "size": [S, S], "quality": 90},
        target={"tokens": N, "grid": [2, 2, 2], "dim": D, "dtype": dtype},
        formats=formats)


def clips(n_videos=3, per_video=5, dtype="float16", seed=0):
    rng = np.random.default_rng(seed)
    for v in range(n_videos):
        for c in range(per_video):
            target = rng.normal(2.0, 3.0, size=(N, D)).astype(np.float32)
            yield {"clip_id": f"vid{v}-v0-c{c:05d}", "video_id": f"vid{v}", "video_uri": f"/data/vid{v}.mp4",
                   "view": 0, "clip_index": c, "fps": 2.0, "start": c * 2.0,
                   "timestamps": [c * 2.0 + i * 0.5 for i in range(T)], "crop_box": [0, 0, 64, 64],
                   "padded": 0, "video_clips": per_video,
                   "frames": rng.integers(0, 255, size=(T, S, S, 3), dtype=np.uint8),
                   "target": st.encode_target(target, dtype), "_float": target}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_target_roundtrip(dtype):
    x = np.random.default_rng(1).normal(size=(50, 7)).astype(np.float32) * 10
    y = st.decode_target(st.encode_target(x, dtype), dtype)
    assert y.dtype == np.float32
    tol = 1e-3 if dtype == "float16" else 8e-3
    np.testing.assert_allclose(y, x, rtol=tol, atol=1e-3)
    assert st.encode_target(x, dtype).dtype == (np.float16 if dtype == "float16" else np.uint16)


@pytest.mark.parametrize("encoding", ["jpg", "png", "npy"])
def test_frame_roundtrip(encoding):
    frame = np.zeros((S, S, 3), np.uint8)
    frame[:, : S // 2] = (200, 30, 90)
    out = st.decode_frame(st.encode_frame(frame, encoding, 95), encoding)
    assert out.shape == frame.shape
    err = np.abs(out.astype(int) - frame)
    if encoding == "jpg":
        assert err.mean() < 3
    else:
        assert err.max() == 0


def test_write_and_read_with_official_readers(tmp_path):
    root = str(tmp_path / "store")
    data = list(clips())
    errors = [{"video_uri": "/data/bad.mp4", "stage": "probe", "error_type": "NotAVideoError", "message": "x"}]
    store = st.write_store(root, schema(), data, errors, shard_bytes=40_000)
    assert store.num_clips == 15
    assert len(store.shards()) > 1, "shard_bytes should have rolled shards"
    assert sorted(store.read_index().column("clip_id").to_pylist()) == sorted(c["clip_id"] for c in data)
    assert store.read_errors().to_pylist() == [{**errors[0], "clip_id": "", "video_clips": 0, "good_clips": 0}]
    by_id = {c["clip_id"]: c for c in data}

    # webdataset: every clip exactly once, frames + target + json under one key
    seen = []
    for sample in wds.WebDataset(store.shard_urls("webdataset"), shardshuffle=False):
        key = sample["__key__"]
        seen.append(key)
        target = np.load(io.BytesIO(sample["target.npy"]), allow_pickle=False)
        assert target.shape == (N, D) and target.dtype == np.float16
        np.testing.assert_array_equal(target, by_id[key]["target"])
        meta = json.loads(sample["json"])
        assert meta["clip_id"] == key and meta["target_dtype"] == "float16"
        frame = st.decode_frame(sample["f03.jpg"], "jpg")
        assert frame.shape == (S, S, 3)
    assert sorted(seen) == sorted(by_id)

    # zarr: the row of the index points at the clip in its shard group
    for row in store.read_index().to_pylist():
        group = zarr.open_group(os.path.join(root, "zarr", row["shard"]), mode="r")
        assert group["clip_id"][row["row"]] == row["clip_id"]
        # zarr holds the decoded pixels of the stored JPEGs: both formats feed the same input
        jpeg_pixels = [st.decode_frame(st.encode_frame(f, "jpg", 90), "jpg") for f in by_id[row["clip_id"]]["frames"]]
        np.testing.assert_array_equal(group["frames"][row["row"]], np.stack(jpeg_pixels))
        np.testing.assert_array_equal(group["targets"][row["row"]], by_id[row["clip_id"]]["target"])
        assert group["targets"].chunks[0] == 1 and group["targets"].shards is not None  # one chunk per clip

    # target stats: of the stored (float16) values
    stored = np.concatenate([st.decode_target(c["target"], "float16") for c in data])
    stats = store.schema["target_stats"]
    np.testing.assert_allclose(stats["mean"], stored.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats["std"], stored.std(0), rtol=1e-5)
    assert stats["count"] == 15 * N


def test_bfloat16_zarr_only_lossless_frames(tmp_path):
    root = str(tmp_path / "s")
    data = list(clips(1, 3, dtype="bfloat16"))
    store = st.write_store(root, schema(dtype="bfloat16", encoding="png", formats=["zarr"]), data)
    assert not (tmp_path / "s" / "webdataset").exists()
    with pytest.raises(st.StoreError):
        store.shard_urls("webdataset")
    group = store.zarr_group(store.shards()[0])
    assert group["targets"].dtype == np.uint16 and group["targets"].attrs["dtype"] == "bfloat16"
    got = store.decode_target(group["targets"][:])
    np.testing.assert_allclose(got, np.stack([c["_float"] for c in data]), rtol=8e-3, atol=1e-2)
    np.testing.assert_array_equal(group["frames"][:], np.stack([c["frames"] for c in data]))


def test_open_incomplete_store_fails(tmp_path):
    writer = st.StoreWriter(str(tmp_path), schema())
    writer.prepare()
    with pytest.raises(st.StoreError, match="not a complete store.*manifest"):
        st.open_store(str(tmp_path))


def test_mismatch_is_a_clear_error(tmp_path):
    st.write_store(str(tmp_path), schema(), clips(1, 1))
    with pytest.raises(st.StoreMismatchError, match="compression"):
        st.StoreWriter(str(tmp_path), schema(method="avg")).prepare()
    st.StoreWriter(str(tmp_path), schema()).prepare()   # same config: fine


def test_commits_drive_resume_and_leftovers_are_removed(tmp_path):
    writer = st.StoreWriter(str(tmp_path), schema())
    assert len(writer.prepare().done_keys) == 0
    data = list(clips(2, 3))
    shard = writer.shard_writer()
    for c in data[:4]:              # video 0 complete, video 1 one clip of three
        shard.add(c)
    shard.commit()
    writer.commit_errors([{"video_uri": "/data/bad.mp4", "stage": "probe", "error_type": "E", "message": "m"}])
    # a crashed writer: published data and index but no commit record, plus a staging folder
    crashed = writer.shard_writer()
    crashed.add(data[4])
    crashed._tar.close()
    crashed._tar = None
    os.makedirs(tmp_path / "webdataset", exist_ok=True)
    os.replace(os.path.join(crashed.dir, "shard.tar"), tmp_path / "webdataset" / "shard-orphan.tar")
    (tmp_path / "index" / "shard-orphan.parquet").write_bytes(b"half")
    (tmp_path / "index" / "shard-x.parquet.tmp-123").write_bytes(b"half")

    progress = st.StoreWriter(str(tmp_path), schema()).prepare()
    assert progress.done("/data/vid0.mp4") and progress.done("/data/bad.mp4")
    assert not progress.done("/data/vid1.mp4")
    assert progress.partial == {"/data/vid1.mp4": {"vid1-v0-c00000"}}
    pending = progress.pending(pa.array(["/data/vid0.mp4", "/data/vid1.mp4", "/data/new.mp4"]), chunk=2)
    assert pending.to_pylist() == [{"video_uri": "/data/vid1.mp4", "skip": ["vid1-v0-c00000"]},
                                   {"video_uri": "/data/new.mp4", "skip": []}]
    assert (progress.complete_videos, progress.failed_videos) == (1, 1)
    assert not (tmp_path / "webdataset" / "shard-orphan.tar").exists()
    assert sorted(os.listdir(tmp_path / "index")) == [f"{n}.parquet" for n in writer.commit_names()
                                                       if n.startswith("shard-")]
    assert not (tmp_path / "_tmp").exists()

    # the same clips again make the same shard name: a retried writer overwrites, never duplicates
    again = writer.shard_writer()
    for c in data[:4]:
        again.add(c)
    again.commit()
    assert len(writer.commit_names()) == 1
    writer.finalise()
    assert st.open_store(str(tmp_path)).read_index().num_rows == 4


def test_partly_failed_video_is_done_only_once_its_good_clips_are_committed(tmp_path):
    writer = st.StoreWriter(str(tmp_path), schema())
    writer.prepare()
    data = list(clips(1, 3))
    uri = data[0]["video_uri"]
    # the decoder yielded two clips, then failed; the error is committed before the clips are
    writer.commit_errors([{"video_uri": uri, "stage": "decode", "error_type": "CorruptVideoError",
                           "message": "m", "good_clips": [c["clip_id"] for c in data[:2]]}])
    assert not writer.prepare().done(uri)
    shard = writer.shard_writer()
    for c in data[:2]:
        shard.add(c)
    shard.commit()
    progress = writer.prepare()
    assert progress.done(uri) and progress.complete_videos == 0 and progress.failed_videos == 1
    schema_out = writer.finalise()
    assert schema_out["summary"]["partial_videos"] == 1 and schema_out["summary"]["videos"] == 0
    assert pq.read_table(tmp_path / "errors").column_names == st.ERRORS_SCHEMA.names


def test_a_failed_clip_is_accounted_for_and_its_video_completes(tmp_path):
    """A clip the teacher could not give finite targets is an error row of its own: the video's
    other clips complete it, a rerun redoes nothing, and the errors name the clip."""
    writer = st.StoreWriter(str(tmp_path), schema())
    writer.prepare()
    data = list(clips(1, 3))
    uri = data[0]["video_uri"]
    for c in data[1:]:   # two clip-level errors of one video are two rows, not one
        row = {"video_uri": uri, "stage": "teacher", "error_type": "NonFiniteTargetError",
               "message": "m", "clip_id": c["clip_id"], "video_clips": 3}
        writer.commit_errors([row])
        writer.commit_errors([row])    # a retried task: the same row, counted once
    progress = writer.prepare()
    assert not progress.done(uri)
    assert progress.partial == {uri: {c["clip_id"] for c in data[1:]}}
    shard = writer.shard_writer()
    shard.add(data[0])
    shard.commit()
    progress = writer.prepare()
    assert progress.done(uri) and progress.complete_videos == 1 and progress.failed_videos == 0
    summary = writer.finalise()["summary"]
    assert summary["videos"] == 1 and summary["failed_videos"] == 0 and summary["clips"] == 1
    errors = st.open_store(str(tmp_path)).read_errors().to_pylist()
    assert sorted(e["clip_id"] for e in errors) == sorted(c["clip_id"] for c in data[1:])


def test_finalise_drops_shards_committed_by_a_stale_job(tmp_path):
    """A killed job's worker that outlives its driver may commit after the rerun started: its
    clips are also written by the rerun, so its shard is dropped instead of duplicating them."""
    data = list(clips(1, 3))
    job = st.StoreWriter(str(tmp_path), schema())
    job.prepare()
    zombie = st.StoreWriter(str(tmp_path), schema()).shard_writer()
    for c in data[:2]:
        zombie.add(c)
    stale = zombie.commit().shard
    mine = list(st.roll_shards(job, data, shard_bytes=1 << 30))
    job.finalise(written=[r.shard for r in mine])
    store = st.open_store(str(tmp_path))
    assert sorted(store.read_index().column("clip_id").to_pylist()) == sorted(c["clip_id"] for c in data)
    assert not (tmp_path / "webdataset" / f"{stale}.tar").exists()
    assert not (tmp_path / "index" / f"{stale}.parquet").exists()
    assert not (tmp_path / "_commits" / f"{stale}.json").exists()


def test_shape_and_finiteness_are_checked(tmp_path):
    writer = st.StoreWriter(str(tmp_path), schema())
    writer.prepare()
    shard = writer.shard_writer()
    clip = next(clips(1, 1))
    with pytest.raises(st.StoreError, match="expects"):
        shard.add({**clip, "target": clip["target"][:-1]})
    with pytest.raises(st.StoreError, match="expects"):
        shard.add({**clip, "frames": clip["frames"][:, :-1]})
    bad = clip["target"].copy()
    bad[0, 0] = np.inf
    with pytest.raises(st.StoreError, match="non-finite"):
        shard.add({**clip, "target": bad})
    shard.abort()


def test_append_adds_shards_and_rewrites_only_what_is_per_shard(tmp_path):
    """A second job with more videos on a complete store: old shards, index files and statistics
    are not touched (finalise adds the new shards' sums to the manifest's exact totals), and the
    result equals a store written in one go."""
    first, more = list(clips(2, 3)), list(clips(3, 3, seed=1))[6:]     # video 2 is new
    st.write_store(str(tmp_path / "a"), schema(), first, shard_bytes=40_000)
    old = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file() and "shard-" in p.name}
    for p in (tmp_path / "a" / "_commits").glob("*.stats.npy"):
        p.unlink()          # proves finalise does not read the old shards' statistics again

    writer = st.StoreWriter(str(tmp_path / "a"), schema())
    assert writer.prepare().pending(pa.array(sorted({c["video_uri"] for c in first + more}))).column(
        "video_uri").to_pylist() == ["/data/vid2.mp4"]
    writer.mark_incomplete()
    with pytest.raises(st.StoreError, match="not a complete store"):
        st.open_store(str(tmp_path / "a"))
    written = [r.shard for r in st.roll_shards(writer, more, shard_bytes=40_000)]
    writer.finalise(written=written)

    appended = st.open_store(str(tmp_path / "a"))
    whole = st.write_store(str(tmp_path / "b"), schema(), first + more, shard_bytes=40_000)
    assert sorted(appended.read_index().column("clip_id").to_pylist()) == \
        sorted(whole.read_index().column("clip_id").to_pylist())
    assert {p: p.read_bytes() for p in old if p.exists()} == {p: v for p, v in old.items() if "stats" not in p.name}
    assert appended.num_clips == whole.num_clips == 9 and len(appended.shards()) == len(set(appended.shards()))
    for k in ("mean", "std"):
        np.testing.assert_allclose(appended.schema["target_stats"][k], whole.schema["target_stats"][k], rtol=1e-9)
    assert appended.schema["summary"]["videos"] == 3


def test_a_version_1_store_is_a_clear_error(tmp_path):
    (tmp_path / "store.json").write_text(json.dumps({**schema(), "schema_version": 1}))
    (tmp_path / "index.parquet").write_bytes(b"")
    with pytest.raises(st.StoreError, match="schema_version 1.*upgrade"):
        st.open_store(str(tmp_path))
    with pytest.raises(st.StoreError, match="schema_version 1"):
        st.StoreWriter(str(tmp_path), schema()).prepare()


def test_manifest_counts_held_out_clips_per_level(tmp_path):
    data = list(clips(6, 2))
    store = st.write_store(str(tmp_path), schema(), data, shard_bytes=40_000)
    scores = {c["video_id"]: st.heldout_score(c["video_id"]) for c in data}
    for level_i, level in enumerate(st.HELDOUT_LEVELS):
        counted = sum(r["heldout_clips"][level_i] for r in store.manifest.to_pylist())
        assert counted == sum(scores[c["video_id"]] <= level for c in data)
    for row in store.manifest.to_pylist():
        index = store.shard_index(row["shard"])
        shard_scores = [scores[v] for v in index.column("video_id").to_pylist()]
        assert row["first_video_score"] == min(shard_scores)
        assert row["first_video_clips"] == shard_scores.count(min(shard_scores)) and row["clips"] == index.num_rows
        assert index.column("row").to_pylist() == list(range(row["clips"]))


def test_many_small_metadata_objects_on_s3(s3_env, tmp_path):
    """A store of one-clip shards in moto's S3: commit records, index files, statistics and error
    rows are read back with bounded parallelism, a resume after a lost manifest sees every video,
    and the partitioned index opens with pyarrow straight from the bucket."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    fs.mkdir("many-objects")
    root = "s3://many-objects/store"
    data = list(clips(8, 5))
    errors = [{"video_uri": f"/data/bad{i}.mp4", "stage": "probe", "error_type": "NotAVideoError", "message": "x"}
              for i in range(6)]
    local = st.write_store(str(tmp_path / "local"), schema(formats=["webdataset"]), data, errors, shard_bytes=1)
    store = st.write_store(root, schema(formats=["webdataset"]), data, errors, shard_bytes=1)
    assert len(store.shards()) == len(data) == 40
    assert fs.ls("many-objects/store/index") and len(fs.ls("many-objects/store/_commits")) == 2 * 40
    assert store.read_index().sort_by("clip_id").equals(local.read_index().sort_by("clip_id"))
    assert store.read_errors().num_rows == 6 and store.schema["summary"] == local.schema["summary"]
    np.testing.assert_allclose(store.schema["target_stats"]["mean"], local.schema["target_stats"]["mean"])

    writer = st.StoreWriter(root, schema(formats=["webdataset"]), read_workers=4)
    writer.mark_incomplete()             # as a new job does before adding shards
    progress = writer.prepare()
    uris = sorted({c["video_uri"] for c in data} | {e["video_uri"] for e in errors})
    assert progress.pending(pa.array(uris + ["/data/new.mp4"])).column("video_uri").to_pylist() == ["/data/new.mp4"]
    assert writer.finalise(written=[])["summary"] == store.schema["summary"]
    assert st.open_store(root).manifest.equals(store.manifest)


def test_read_many_keeps_order_and_skips_vanished_objects(tmp_path):
    from pipeline.store.files import read_many

    fs, _ = st.filesystem(str(tmp_path))
    paths = [str(tmp_path / f"{i:04d}") for i in range(600)]       # more than one READ_BATCH
    for i, p in enumerate(paths):
        if i % 7:
            (tmp_path / f"{i:04d}").write_bytes(str(i).encode())
    got = list(read_many(fs, paths, workers=8))
    assert [p for p, _ in got] == [p for i, p in enumerate(paths) if i % 7]
    assert all(data == p.rsplit("/", 1)[-1].lstrip("0").encode() for p, data in got)


def _as_version_1(store: st.Store, root) -> None:
    """Rewrite a v2 store's metadata the way the version 1 writer laid it out."""
    import shutil

    index = store.read_index()
    for shard in store.shards():
        rows = index.filter(pa.compute.equal(index.column("shard"), shard)).sort_by("row").to_pylist()
        sums = np.load(root / "_commits" / f"{shard}.stats.npy")
        record = json.loads((root / "_commits" / f"{shard}.json").read_text())
        v1 = {"shard": shard, "formats": record["formats"], "clips": rows, "errors": [], "bytes": record["bytes"],
              "stats": {"sum": sums[0].tolist(), "sumsq": sums[1].tolist(), "count": record["stats_count"]}}
        (root / "_commits" / f"{shard}.json").write_text(json.dumps(v1))
        (root / "_commits" / f"{shard}.stats.npy").unlink()
    errors = store.read_errors().to_pylist()
    for i, e in enumerate(errors):
        (root / "_commits" / f"err-{i}.json").write_text(json.dumps(
            {"shard": f"err-{i}", "clips": [], "stats": None, "formats": [],
             "errors": [{**e, "good_clips": [f"c{k}" for k in range(e.pop("good_clips"))]}]}))
    pq.write_table(index.sort_by("clip_id"), root / "index.parquet")
    pq.write_table(store.read_errors().select(["video_uri", "stage", "error_type", "message", "clip_id"]),
                   root / "errors.parquet")
    for folder in ("index", "errors"):
        shutil.rmtree(root / folder)
    (root / "manifest.parquet").unlink()
    (root / "zarr" / "zarr.json").unlink()
    (root / "store.json").write_text(json.dumps({**store.schema, "schema_version": 1}))


def test_upgrade_a_version_1_store_in_place(tmp_path):
    from pipeline.store.upgrade import main

    data = list(clips(3, 4))
    errors = [{"video_uri": "/data/bad.mp4", "stage": "probe", "error_type": "NotAVideoError", "message": "x"},
              {"video_uri": "/data/vid0.mp4", "stage": "teacher", "error_type": "NonFiniteTargetError",
               "message": "y", "clip_id": "vid0-v0-c00009", "video_clips": 5}]
    want = st.write_store(str(tmp_path / "want"), schema(), data, errors, shard_bytes=40_000)
    root = tmp_path / "old"
    st.write_store(str(root), schema(), data, errors, shard_bytes=40_000)
    _as_version_1(st.open_store(str(root)), root)
    data_files = {p: p.read_bytes() for d in ("webdataset", "zarr") for p in (root / d).rglob("*") if p.is_file()}
    with pytest.raises(st.StoreError, match="upgrade"):
        st.open_store(str(root))

    assert main([str(root)]) == 0
    got = st.open_store(str(root))
    assert got.manifest.equals(want.manifest)
    assert got.read_index().sort_by("clip_id").equals(want.read_index().sort_by("clip_id"))
    assert got.read_errors().sort_by("video_uri").equals(want.read_errors().sort_by("video_uri"))
    from pipeline.video import DEFAULT_POLICY

    upgraded = {**want.schema, "clip": {**want.schema["clip"], **DEFAULT_POLICY.plan_limits()}}
    assert got.schema == {**upgraded, "config_hash": st.schema.identity_hash(upgraded)}
    assert {p: p.read_bytes() for p in data_files} == data_files, "the data objects are not rewritten"
    assert not (root / "index.parquet").exists() and not (root / "errors.parquet").exists()
    assert sorted(zarr.open_group(str(root / "zarr"), mode="r").group_keys()) == got.shards()
    assert main([str(root)]) == 0 and st.open_store(str(root)).manifest.equals(want.manifest)   # idempotent


def test_zarr_writes_every_chunk_even_all_black_clips(tmp_path):
    """A reader tells a lost chunk from a black clip only if black clips are stored too."""
    data = list(clips(1, 3))
    for c in data:
        c["frames"] = np.zeros_like(c["frames"])
    store = st.write_store(str(tmp_path), schema(encoding="png", formats=["zarr"]), data)
    shard = store.shards()[0]
    stored = [p.name for p in (tmp_path / "zarr" / shard / "frames" / "c").iterdir()]
    assert stored, "the all-black shard object was not written"
    np.testing.assert_array_equal(store.zarr_group(shard)["frames"][:], 0)
