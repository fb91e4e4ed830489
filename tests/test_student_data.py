"""The trainer's streaming loader over a real store (written by pipeline.store's Ray-free writer) and
read with the webdataset and zarr readers: order, balance over ranks/workers, resume, checks."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import store as st
from student import data as sd

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
    return sd.plan_epoch(counts, None, **args)


def _ids(plan):
    return [tuple(map(tuple, plan.rows[s, plan.order(s)])) for s in range(plan.rows.shape[0])]


def test_order_is_a_function_of_seed_and_epoch():
    counts = [5, 3, 7, 2, 6]
    assert _ids(_plan(counts)) == _ids(_plan(counts))
    assert _ids(_plan(counts)) != _ids(_plan(counts, epoch=1))
    assert _ids(_plan(counts)) != _ids(_plan(counts, seed=1))
    z0, z1 = _plan(counts, fmt="zarr"), _plan(counts, fmt="zarr", epoch=1)
    assert not np.array_equal(z0.rows, z1.rows)


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
@pytest.mark.parametrize("world,workers,batch", [(2, 2, 3), (3, 1, 2), (4, 2, 4)])
def test_no_rank_or_worker_runs_dry(fmt, world, workers, batch):
    counts = [5, 1, 7, 2, 6]     # uneven shards: 21 clips
    keep = [np.ones(c, dtype=bool) for c in counts]
    keep[2][3] = False           # a held-out clip never appears
    plan = sd.plan_epoch(counts, keep, fmt=fmt, seed=3, epoch=2, world_size=world, streams_per_rank=workers,
                         batch_size=batch, shuffle_buffer=5)
    seen = []
    for rank in range(world):
        for b in range(plan.batches_per_rank):
            stream, first = sd.rank_batches(plan, rank, b)
            pos = plan.order(stream)[first:first + batch]
            assert len(pos) == batch
            seen += [tuple(r) for r in plan.rows[stream, pos]]
    wanted = {(s, r) for s in range(len(counts)) for r in range(counts[s]) if keep[s][r]}
    assert set(seen) == wanted                                  # every training clip, each epoch
    assert len(seen) == world * plan.batches_per_rank * batch   # same number of whole batches per rank
    assert len(seen) - len(wanted) < world * max(1, workers if fmt == "webdataset" else 1) * batch  # little padding


def test_shuffle_buffer_is_bounded_permutation():
    order = sd.shuffle_buffer_order(200, 16, np.random.default_rng(0))
    assert sorted(order) == list(range(200))
    assert all(order[j] < j + 16 for j in range(200))
    assert not np.array_equal(order, np.arange(200))
    for n in (1, 3, 16, 17):        # shorter than, equal to and just past the buffer
        assert sorted(sd.shuffle_buffer_order(n, 16, np.random.default_rng(n))) == list(range(n))


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
    index = st.open_store(store_root).index
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
    calls = []
    real = st.decode_frame
    monkeypatch.setattr(st, "decode_frame", lambda b, e: calls.append(1) or real(b, e))
    data, _ = _read(info, "webdataset", workers=0, start=5)
    total = data.batches_per_epoch()
    assert len(calls) == (total - 5) * 2 * T


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
    with pytest.raises(sd.StoreContentError, match="index says"):
        _read(info, "webdataset", workers=0)

    root = Path(write_tiny_store(tmp_path / "t", videos=2, formats=("webdataset",)))
    shard = sorted((root / "webdataset").glob("*.tar"))[0]
    key = lambda m: m[0].name.split(".")[0]
    _rewrite_tar(shard, lambda members: [m for m in members if key(m) != key(members[-1])])
    with pytest.raises(sd.StoreContentError, match="the index lists"):
        _read(sd.read_store(str(root)), "webdataset", workers=0)

    root = Path(write_tiny_store(tmp_path / "u", videos=2, formats=("webdataset",)))
    shard = sorted((root / "webdataset").glob("*.tar"))[0]
    _rewrite_tar(shard, lambda members: [(m, b"not a jpeg" if ".f01." in m.name else p) for m, p in members])
    with pytest.raises(sd.StoreContentError, match="cannot decode"):
        _read(sd.read_store(str(root)), "webdataset", workers=0)


def test_heldout_split_is_by_video(info):
    held = sd.heldout_mask(info, 0.3)
    videos_held = {v for vids, h in zip(info.video_ids, held) for v, x in zip(vids, h) if x}
    videos_kept = {v for vids, h in zip(info.video_ids, held) for v, x in zip(vids, h) if not x}
    assert videos_held and videos_kept and not videos_held & videos_kept
    assert [h.tolist() for h in held] == [h.tolist() for h in sd.heldout_mask(info, 0.3)]


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
