"""The trainer's streaming loader over a real store (written by pipeline.store's Ray-free writer) and
read with the webdataset and zarr readers: order, balance over ranks/workers, resume, checks."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import store as st
from student import data as sd
from student.data import loader as sd_loader

T, SIZE, GRID, D = 4, 56, (1, 2, 2), 16
N = int(np.prod(GRID))


def _clip_frames(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Frames of flat-coloured quadrants (plus noise), and the quadrants' mean colours [4, 3]."""
    colours = rng.integers(20, 236, size=(2, 2, 3))
    frames = np.repeat(np.repeat(colours, SIZE // 2, 0), SIZE // 2, 1)[None].repeat(T, 0)
    frames = np.clip(frames + rng.integers(-6, 7, frames.shape), 0, 255).astype(np.uint8)
    return frames, colours.reshape(4, 3) / 255.0


def write_tiny_store(root: Path, videos: int = 7, clips_per_video: int = 3, shard_bytes: int = 12_000,
                     formats=("webdataset", "zarr"), seed: int = 0) -> str:
    """A store whose targets are a fixed linear function of each quadrant's colour, so a student can
    learn them. Several small shards, JPEG frames, float16 targets."""
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(3, D)).astype(np.float32) * 2
    schema = st.make_schema(
        teacher={"name_or_path": "synthetic", "revision": None, "layer": -1, "head": None, "dim": D, "grid": [2, 2]},
        compression={"method": "avg", "factors": [4, 1, 1]},
        clip={"frames": T, "views": 1, "fps_range": [1.0, 4.0]},
        frames={"encoding": "jpg", "size": [SIZE, SIZE], "quality": 90},
        target={"tokens": N, "grid": list(GRID), "dim": D, "dtype": "float16"},
        formats=list(formats))

    def clips():
        for v in range(videos):
            for c in range(clips_per_video):
                frames, colours = _clip_frames(rng)
                yield {"clip_id": f"vid{v}-v0-c{c:05d}", "video_id": f"vid{v}", "video_uri": f"/videos/vid{v}.mp4",
                       "view": 0, "clip_index": c, "fps": 2.0, "start": 2.0 * c,
                       "timestamps": [2.0 * c + 0.5 * i for i in range(T)], "crop_box": [0, 0, SIZE, SIZE],
                       "padded": 0, "video_clips": clips_per_video, "frames": frames,
                       "target": st.encode_target(colours @ proj + 1.0, "float16")}

    st.write_store(str(root), schema, clips(), shard_bytes=shard_bytes)
    return str(root)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> str:
    return write_tiny_store(tmp_path_factory.mktemp("store") / "store")


@pytest.fixture(scope="module")
def info(store_root) -> sd.StoreInfo:
    return sd.read_store(store_root)



def _plan(counts, **kw):
    args = dict(fmt="webdataset", seed=0, epoch=0, world_size=1, streams_per_rank=1, batch_size=2, shuffle_buffer=4)
    args.update(kw)
    return sd.plan_epoch(sd.Selection(np.asarray(counts, dtype=np.int64)), **args)


def _rank_clips(plan, rank):
    """(shard, k) of each of a rank's batches, in training order."""
    orders, out = {}, []
    for b in range(plan.batches_per_rank):
        stream, first = sd.rank_batches(plan, rank, b)
        order = orders.setdefault(stream, plan.order(stream))
        assert order.done == first
        out.append(list(zip(*(a.tolist() for a in plan.locate(stream, order.take(plan.batch_size))))))
    return out


def test_order_is_a_function_of_seed_and_epoch():
    counts = [5, 3, 7, 2, 6]
    for fmt in ("webdataset", "zarr"):
        assert _rank_clips(_plan(counts, fmt=fmt), 0) == _rank_clips(_plan(counts, fmt=fmt), 0)
        assert _rank_clips(_plan(counts, fmt=fmt), 0) != _rank_clips(_plan(counts, fmt=fmt, epoch=1), 0)
        assert _rank_clips(_plan(counts, fmt=fmt), 0) != _rank_clips(_plan(counts, fmt=fmt, seed=1), 0)


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
@pytest.mark.parametrize("world,workers,batch", [(2, 2, 3), (3, 1, 2), (4, 2, 4)])
def test_no_rank_or_worker_runs_dry(fmt, world, workers, batch):
    counts = [5, 1, 6, 0, 2, 6]  # uneven shards (one with no training clips left): 20 clips
    plan = _plan(counts, fmt=fmt, seed=3, epoch=2, world_size=world, streams_per_rank=workers, batch_size=batch,
                 shuffle_buffer=5)
    seen = []
    for rank in range(world):
        batches = _rank_clips(plan, rank)
        assert len(batches) == plan.batches_per_rank and all(len(b) == batch for b in batches)
        seen += [c for b in batches for c in b]
    wanted = {(s, k) for s in range(len(counts)) for k in range(counts[s])}
    assert set(seen) == wanted                                  # every training clip, each epoch
    assert len(seen) == world * plan.batches_per_rank * batch   # same number of whole batches per rank
    assert len(seen) - len(wanted) < world * batch      # padding: less than one global batch, however many workers


def test_webdataset_streams_are_contiguous_runs_of_permuted_shards():
    counts = [4, 3, 5, 2, 3]    # 17 clips: 5 batches per rank, 3 on its first stream and 2 on its second
    plan = _plan(counts, world_size=2, streams_per_rank=2, batch_size=2)
    sequence = [(int(s), k) for s in plan.shard_order for k in range(counts[s])]      # the epoch, unwrapped
    start = 0
    for stream in range(4):
        positions = np.arange(plan.stream_length(stream))
        assert len(positions) == (6 if stream % 2 == 0 else 4)
        got = list(zip(*(a.tolist() for a in plan.locate(stream, positions))))
        assert got == [sequence[(start + p) % len(sequence)] for p in positions]     # streams laid end to end
        start += len(positions)
        runs = [(s, k, n) for p, s, k, n in plan.segments(stream)]
        assert [(s, k + i) for s, k, n in runs for i in range(n)] == got     # segments cover the same positions
        assert all(n > 0 for *_, n in runs)
        p, s, k, n = next(plan.segments(stream, 3))                          # and may start mid-shard
        assert p == 3 and (s, k) == got[3]


def test_shuffle_buffer_is_bounded_permutation_drawn_incrementally():
    order = sd.ShuffleBuffer(200, 16, np.random.default_rng(0)).take(200)
    assert sorted(order) == list(range(200))
    assert all(order[j] < j + 16 for j in range(200))
    assert order != list(range(200))
    # Taken in pieces (as batches are), or replayed past a resume point, the order is the same.
    pieces = sd.ShuffleBuffer(200, 16, np.random.default_rng(0))
    assert [p for _ in range(29) for p in pieces.take(7)] == order
    resumed = sd.ShuffleBuffer(200, 16, np.random.default_rng(0))
    resumed.skip(77)
    assert resumed.take(500) == order[77:] and resumed.buffer == []
    resumed.skip(1)                 # past the end: nothing left, nothing drawn
    for n in (1, 3, 16, 17):        # shorter than, equal to and just past the buffer
        assert sorted(sd.ShuffleBuffer(n, 16, np.random.default_rng(n)).take(n)) == list(range(n))


def test_feistel_permutation_is_a_keyed_bijection():
    for n in (1, 2, 5, 64, 1000, 4097):
        perm = sd.FeistelPermutation(n, np.random.default_rng(n))(np.arange(n))
        assert sorted(perm.tolist()) == list(range(n))
        if n >= 64:
            assert not np.array_equal(perm, np.arange(n))
            other = sd.FeistelPermutation(n, np.random.default_rng(n + 1))(np.arange(n))
            assert not np.array_equal(perm, other)
            assert abs(np.corrcoef(perm, np.arange(n))[0, 1]) < 0.2   # shuffled, not shifted


def test_start_costs_shards_not_clips():
    """10^8 clips in 10^5 shards: a rank plans an epoch and locates its first batch from per-shard
    counts in a few MB (the old plan held 16 bytes per clip: 1.6 GB)."""
    import time
    import tracemalloc

    counts = np.full(100_000, 1000, dtype=np.int64)
    tracemalloc.start()
    t0 = time.monotonic()
    for fmt in ("webdataset", "zarr"):
        plan = sd.plan_epoch(sd.Selection(counts), fmt=fmt, seed=1, epoch=3, world_size=8, streams_per_rank=8,
                             batch_size=64, shuffle_buffer=1024)
        stream, first = sd.rank_batches(plan, 7, 0)
        shards, ks = plan.locate(stream, plan.order(stream).take(64) if fmt == "webdataset" else np.arange(64))
        assert ((0 <= ks) & (ks < 1000)).all()
        spread = len(set(shards.tolist()))      # a stream reads a shard or two at a time; zarr reads anywhere
        assert spread <= 2 if fmt == "webdataset" else spread > 32
        next(plan.segments(stream, 0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 << 20, peak
    assert time.monotonic() - t0 < 10


def _read(info, fmt, workers, start=0, epoch=0, world=1, rank=0, augment=0.0):
    data = sd.TrainData(info, fmt=fmt, batch_size=2, seed=5, rank=rank, world_size=world, num_workers=workers,
                        shuffle_buffer=4, augment=augment)
    return data, list(data.epoch(epoch, start))


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_loader_reads_planned_clips_and_resumes_exactly(info, store_root, fmt):
    data, batches = _read(info, fmt, workers=2, epoch=1, augment=0.2)
    planned = sd.epoch_clip_ids(info, data.plan(1), 0)
    assert [b["clip_id"] for b in batches] == planned
    assert len(batches) == data.batches_per_epoch()
    first = batches[0]
    assert first["frames"].dtype == torch.uint8 and tuple(first["frames"].shape) == (2, T, SIZE, SIZE, 3)
    assert tuple(first["target"].shape) == (2, N, D) and tuple(first["jitter"].shape) == (2, 3)
    # Each clip's target is the one stored under its key: the index's checksum of the stored bytes.
    index = st.open_store(store_root).read_index(["clip_id", "checksum"])
    checksum = dict(zip(index.column("clip_id").to_pylist(), index.column("checksum").to_pylist()))
    for b in batches:
        for clip_id, target in zip(b["clip_id"], b["target"].numpy()):
            stored = st.encode_target(target, "float16").tobytes()
            assert hashlib.sha256(stored).hexdigest()[:16] == checksum[clip_id]
    # Resuming after k batches (k odd, so the worker rotation matters) yields exactly the rest.
    k = 3
    _, rest = _read(info, fmt, workers=2, start=k, epoch=1, augment=0.2)
    assert [b["clip_id"] for b in rest] == planned[k:]
    for a, b in zip(batches[k:], rest):
        assert np.array_equal(a["frames"].numpy(), b["frames"].numpy())
        assert np.array_equal(a["target"].numpy(), b["target"].numpy())
        assert np.array_equal(a["jitter"].numpy(), b["jitter"].numpy())


def test_webdataset_and_zarr_hold_the_same_clips(info):
    _, w = _read(info, "webdataset", workers=0)
    _, z = _read(info, "zarr", workers=0)
    def by_clip(batches):
        return {c: (b["frames"][i].numpy(), b["target"][i].numpy()) for b in batches for i, c in enumerate(b["clip_id"])}
    wb, zb = by_clip(w), by_clip(z)
    assert set(wb) == set(zb)
    for c in wb:
        assert np.array_equal(wb[c][0], zb[c][0]) and np.array_equal(wb[c][1], zb[c][1])


def test_resume_skips_without_decoding(info, monkeypatch):
    calls, opened = [], []
    real, index = st.decode_frame, st.Store.shard_index
    monkeypatch.setattr(st, "decode_frame", lambda b, e: calls.append(1) or real(b, e))
    monkeypatch.setattr(st.Store, "shard_index",
                        lambda self, shard, **kw: opened.append(shard) or index(self, shard, **kw))
    data, _ = _read(info, "webdataset", workers=0, start=5)
    total = data.batches_per_epoch()
    assert len(calls) == (total - 5) * 2 * T
    # Near the end of the stream, the shards it read before are not even opened.
    opened.clear()
    _read(info, "webdataset", workers=0, start=total - 1)
    assert 0 < len(opened) < len(info.shards) - 2


def _rewrite_tar(path: Path, edit) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members = edit(members)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, payload in members:
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))


def test_key_and_count_mismatches_are_errors(tmp_path):
    root = Path(write_tiny_store(tmp_path / "s", videos=2, formats=("webdataset",)))
    shard = sorted((root / "webdataset").glob("*.tar"))[0]

    def rename_first(members):     # the first clip's frame 0 now belongs to another key
        m, payload = members[0]
        m.name = m.name.replace("-c0", "-x0")
        return [(m, payload)] + members[1:]

    _rewrite_tar(shard, rename_first)
    info = sd.read_store(str(root))
    with pytest.raises(sd.TooManyBadClipsError, match=r"clip vid0-v0-c00000: .* missing f00.jpg"):
        _read(info, "webdataset", workers=0)     # the loader's default budget: no bad clip at all

    root = Path(write_tiny_store(tmp_path / "t", videos=2, formats=("webdataset",)))
    shard = sorted((root / "webdataset").glob("*.tar"))[0]
    key = lambda m: m[0].name.split(".")[0]
    _rewrite_tar(shard, lambda members: [m for m in members if key(m) != key(members[-1])])
    with pytest.raises(sd.StoreContentError, match="ends after 2 clips, the index lists 3"):
        _read(sd.read_store(str(root)), "webdataset", workers=0)

    root = Path(write_tiny_store(tmp_path / "u", videos=2, formats=("webdataset",)))
    shard = sorted((root / "webdataset").glob("*.tar"))[0]
    _rewrite_tar(shard, lambda members: [(m, b"not a jpeg" if ".f01." in m.name else p) for m, p in members])
    with pytest.raises(sd.StoreContentError, match="cannot decode"):
        _read(sd.read_store(str(root)), "webdataset", workers=0)


def test_heldout_split_is_by_video(tmp_path):
    root = write_tiny_store(tmp_path / "h", videos=9, shard_bytes=8_000)    # shards of 2 clips: videos straddle them
    info = sd.read_store(root)
    index = st.open_store(root).read_index(["clip_id", "video_id", "shard", "row"])
    index = index.sort_by([("shard", "ascending"), ("row", "ascending")]).to_pylist()      # store order
    score = {r["video_id"]: st.heldout_score(r["video_id"]) for r in index}
    assert min(score.values()) > 0.001          # so the smallest level holds out nothing by itself
    for fraction in (0.2, 0.001):
        train, held = sd.heldout_split(info, fraction)
        cut = fraction if fraction > min(score.values()) else min(score.values())    # at least one video
        want = [r["clip_id"] for r in index if score[r["video_id"]] <= cut]
        assert want and len(want) < len(index)
        got = [c for b in sd.eval_batches(info, batch_size=4, rows=held) for c in b["clip_id"]]
        assert got == want                      # each held-out clip once, in store order
        trained = [c for b in sd.TrainData(info, batch_size=2, rows=train, shuffle_buffer=4).epoch(0)
                   for c in b["clip_id"]]
        assert set(trained) == {r["clip_id"] for r in index} - set(want)
    with pytest.raises(ValueError, match="one of 0.001, 0.002"):
        sd.heldout_split(info, 0.3)
    # A shard whose index disagrees with the manifest's held-out count is an error, not a silent split.
    wrong = dataclasses.replace(info, heldout_clips=info.heldout_clips[::-1].copy())
    with pytest.raises(sd.StoreContentError, match="by its index, the manifest counts"):
        list(sd.eval_batches(wrong, batch_size=4, rows=sd.heldout_split(wrong, 0.2)[1]))


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_a_rank_starts_without_reading_any_index_file(tmp_path, fmt):
    root = Path(write_tiny_store(tmp_path / "s", videos=5))
    (root / "index").rename(root / "away")
    info = sd.read_store(str(root))
    train, held = sd.heldout_split(info, 0.25)
    data = sd.TrainData(info, fmt=fmt, batch_size=2, rows=train, num_workers=0)
    assert data.batches_per_epoch() > 1
    loaders = [data.epoch(1), data.epoch(0, start=data.batches_per_epoch() - 1),
               sd.eval_batches(info, batch_size=2, fmt=fmt, rows=held)]
    for loader in loaders:      # only reading a batch opens a shard, and with it the shard's index file
        with pytest.raises(sd.TooManyBadClipsError, match="has no index file"):
            next(iter(loader))
    (root / "away").rename(root / "index")
    assert all(len(next(iter(loader))["clip_id"]) == 2 for loader in loaders)


def test_streams_from_s3_like_from_disk(s3_env, info):
    import s3fs

    s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"]).mkdir("student-data")
    remote = sd.read_store(write_tiny_store("s3://student-data/store"))     # same seed: the same clips
    assert remote.shard_url(0).startswith("s3://")
    for fmt, workers in (("webdataset", 2), ("zarr", 0)):
        _, here = _read(info, fmt, workers=workers, epoch=1)
        _, there = _read(remote, fmt, workers=workers, epoch=1)
        assert [b["clip_id"] for b in here] == [b["clip_id"] for b in there]
        assert all(torch.equal(a["frames"], b["frames"]) and torch.equal(a["target"], b["target"])
                   for a, b in zip(here, there))


def test_zarr_clip_ids_are_checked_against_the_index(tmp_path):
    import zarr

    root = Path(write_tiny_store(tmp_path / "z", videos=2, formats=("zarr",)))
    shard = sorted(p.name for p in (root / "zarr").iterdir())[0]
    ids = zarr.open_group(str(root / "zarr" / shard), mode="r+")["clip_id"]
    ids[0] = ids[1]
    with pytest.raises(sd.StoreContentError, match="first difference at row 0"):
        _read(sd.read_store(str(root)), "zarr", workers=0)
    with pytest.raises(sd.StoreContentError, match="no webdataset shards"):
        _read(sd.read_store(str(root)), "webdataset", workers=0)


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_one_loader_runs_on_across_epochs_with_the_same_workers(info, fmt, monkeypatch):
    collate = sd_loader._collate

    def tagged(items, info):        # runs in the loader worker (forked: the patch is inherited)
        return {**collate(items, info), "pid": os.getpid()}

    monkeypatch.setattr(sd_loader, "_collate", tagged)
    data = sd.TrainData(info, fmt=fmt, batch_size=2, seed=5, num_workers=2, shuffle_buffer=4)
    per_epoch = data.batches_per_epoch()
    planned = [ids for e in range(3) for ids in sd.epoch_clip_ids(info, data.plan(e), 0)]
    for start in (0, 3):            # from the epoch's start, and resumed mid-epoch (odd: the rotation matters)
        batches = iter(data.run(0, start))
        got = [next(batches) for _ in range(3 * per_epoch - start)]
        batches.close()
        assert [b["clip_id"] for b in got] == planned[start:]
        pids = [{b["pid"] for b in got[e * per_epoch - start:(e + 1) * per_epoch - start]} for e in (1, 2)]
        assert pids[0] == pids[1] and len(pids[0]) == 2 and os.getpid() not in pids[0]   # not restarted
