"""Damaged stores and diverging runs never put bad values into a batch, a step or a checkpoint.

Each damage is made on a copy of a real store (tests/test_student_data.py's writer) after it was
written, since the writer refuses non-finite targets: a NaN target (tar member or zarr chunk, with
the index's checksum stale or updated), a deleted zarr object or array, a truncated, empty or
missing tar, a corrupt JPEG, a missing index file. A bad clip is skipped, counted and logged with
its shard up to the budget, and its batch keeps its place and size (the other clips' positions do
not move); one more is a TooManyBadClipsError naming the shard. Then the trainer: non-finite steps
are skipped on every rank (also under DDP), too many in a row stop the run, non-finite weights are
never saved, and a bad config exits 2 before the output is touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, config_from_dict, parse_config
from pipeline.training import checkpoint
from pipeline.training.guards import NonFiniteTrainingError
from student import data as sd
from student.train import TrainConfig, main, train
from tests.test_student_data import write_tiny_store

# ---------------------------------------------------------------- damaging a store


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    """7 videos x 3 clips in shards of about 3 clips, both formats."""
    return write_tiny_store(tmp_path_factory.mktemp("pristine") / "store")


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine store to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "store"))


def _shards(root: Path) -> list[str]:
    return sd.read_store(str(root)).shards


def _index(root: Path, shard: str) -> list[str]:
    return pq.read_table(root / "index" / f"{shard}.parquet").sort_by("row").column("clip_id").to_pylist()


def _set_checksum(root: Path, shard: str, clip_id: str, stored: np.ndarray) -> None:
    """Make the index's checksum agree with a damaged target, so only the value check can see it."""
    path = root / "index" / f"{shard}.parquet"
    table = pq.read_table(path)
    ids = table.column("clip_id").to_pylist()
    sums = table.column("checksum").to_pylist()
    sums[ids.index(clip_id)] = hashlib.sha256(np.ascontiguousarray(stored).tobytes()).hexdigest()[:16]
    i = table.schema.get_field_index("checksum")
    table = table.set_column(i, table.schema.field(i), [sums])
    pq.write_table(table, path)


def _rewrite_tar(path: Path, edit) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, payload in edit(members):
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))


def _nan_target(payload: bytes) -> np.ndarray:
    target = np.load(io.BytesIO(payload))
    target[0, 1] = np.nan
    return target


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _epoch(root: Path, fmt: str, workers: int = 0, limit: int = 100, **kw) -> tuple[list[dict], sd.TrainData]:
    data = sd.TrainData(sd.read_store(str(root)), fmt=fmt, batch_size=2, seed=3, num_workers=workers,
                        shuffle_buffer=4, max_bad_clips=limit, **kw)
    return list(data.epoch(1)), data


def _rows(batches: list[dict]) -> list[tuple[str, bool]]:
    """(clip id, valid) of every row of every batch, in order."""
    out = []
    for b in batches:
        valid = b["valid"].tolist() if "valid" in b else [True] * len(b["clip_id"])
        out += list(zip(b["clip_id"], valid))
    return out


def _assert_only_these_bad(batches: list[dict], reference: list[dict], bad: set[str]) -> list[dict]:
    """The damaged run has the reference's batches, row for row, except that the rows of `bad` clips
    are zero and invalid; returns the skipped records."""
    assert len(batches) == len(reference)
    assert [len(b["clip_id"]) for b in batches] == [len(b["clip_id"]) for b in reference]    # sizes kept
    assert [c for c, _ in _rows(batches)] == [c for c, _ in _rows(reference)]          # positions kept
    assert {c for c, ok in _rows(batches) if not ok} == bad
    for b, r in zip(batches, reference):
        valid = b.get("valid", torch.ones(len(b["clip_id"]), dtype=torch.bool))
        assert torch.equal(b["frames"][valid], r["frames"][valid])
        assert torch.equal(b["target"][valid], r["target"][valid])
        assert not b["frames"][~valid].any() and not b["target"][~valid].any()     # zeros, and masked
        assert torch.isfinite(b["target"]).all()
    skipped = [s for b in batches for s in b.get("skipped", [])]
    assert {s["clip_id"] for s in skipped} == bad
    return skipped


@pytest.fixture(scope="module")
def reference(pristine):
    """The undamaged store's epoch, by (format, loader workers)."""
    cache: dict[tuple[str, int], list[dict]] = {}

    def get(fmt: str, workers: int = 0) -> list[dict]:
        if (fmt, workers) not in cache:
            cache[fmt, workers] = _epoch(Path(pristine), fmt, workers)[0]
        return cache[fmt, workers]

    return get


# ---------------------------------------------------------------- the loader


def test_nonfinite_store_statistics_fail_at_start(store, tmp_path):
    schema = json.loads((store / "store.json").read_text())
    schema["target_stats"]["std"][3] = float("inf")
    (store / "store.json").write_text(json.dumps(schema))
    with pytest.raises(sd.StoreContentError, match=r"target_stats: std is not finite in 1 channels \(first: \[3\]\)"):
        sd.read_store(str(store))
    schema["target_stats"]["std"][3] = 1.0
    schema["target_stats"]["mean"] = schema["target_stats"]["mean"][:-1]
    (store / "store.json").write_text(json.dumps(schema))
    with pytest.raises(sd.StoreContentError, match=r"mean has shape \[15\], the target width is 16"):
        sd.read_store(str(store))
    # The trainer stops there, before it writes anything.
    with pytest.raises(sd.StoreContentError, match="cannot be standardised"):
        train(TrainConfig(data=str(store), output=str(tmp_path / "run"), preset="tiny"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("checksum", ["stale", "updated"])
def test_nan_target_in_a_tar_is_skipped_counted_and_logged(store, reference, checksum, caplog):
    shard = _shards(store)[1]
    victim = _index(store, shard)[1]
    damaged = {}

    def poison(members):
        out = []
        for m, payload in members:
            if m.name == f"{victim}.target.npy":
                damaged["target"] = _nan_target(payload)
                payload = _npy(damaged["target"])
            out.append((m, payload))
        return out

    _rewrite_tar(store / "webdataset" / f"{shard}.tar", poison)
    if checksum == "updated":
        _set_checksum(store, shard, victim, damaged["target"])
    with caplog.at_level(logging.WARNING, logger="student.data"):
        batches, data = _epoch(store, "webdataset", workers=2)
    skipped = _assert_only_these_bad(batches, reference("webdataset", 2), {victim})
    reason = "non-finite target values" if checksum == "updated" else "do not match the index's checksum"
    assert skipped == [{"clip_id": victim, "shard": shard, "reason": skipped[0]["reason"]}]
    assert reason in skipped[0]["reason"]
    assert data.bad_clips.count == 1       # counted in the main process, from the workers' batches
    assert any(victim in r.message and shard in r.message for r in caplog.records)
    # Over the budget: a typed error that names the shard.
    with pytest.raises(sd.TooManyBadClipsError, match=f"shard {shard}, clip {victim}: .*{reason}") as e:
        _epoch(store, "webdataset", limit=0)
    assert e.value.shard == shard and e.value.count == 1 and e.value.limit == 0


@pytest.mark.parametrize("checksum", ["stale", "updated"])
def test_nan_target_in_a_zarr_chunk(store, reference, checksum):
    import zarr

    shard = _shards(store)[2]
    victim = _index(store, shard)[0]
    targets = zarr.open_group(str(store / "zarr" / shard), mode="r+")["targets"]
    bad = np.asarray(targets[0]).copy()
    bad[2, 3] = np.inf
    targets[0] = bad
    if checksum == "updated":
        _set_checksum(store, shard, victim, bad)
    batches, data = _epoch(store, "zarr", workers=2)
    skipped = _assert_only_these_bad(batches, reference("zarr", 2), {victim})
    assert ("non-finite" if checksum == "updated" else "checksum") in skipped[0]["reason"]
    assert data.bad_clips.count == 1


def test_deleted_zarr_object_or_array_is_not_read_as_black(store, reference):
    """Zarr reads a missing object as its fill value (zeros): the loader lists the stored objects."""
    shards = _shards(store)
    for obj in (store / "zarr" / shards[0] / "frames" / "c").rglob("*"):
        if obj.is_file():
            obj.unlink()                            # the frames of every clip of shard 0
    shutil.rmtree(store / "zarr" / shards[3] / "targets")   # a whole array of shard 3
    obj = next(p for p in (store / "zarr" / shards[5] / "targets" / "c").rglob("*") if p.is_file())
    obj.write_bytes(obj.read_bytes()[:-40])                  # a truncated upload of shard 5's targets
    bad = set(_index(store, shards[0])) | set(_index(store, shards[3])) | set(_index(store, shards[5]))
    batches, _ = _epoch(store, "zarr")
    skipped = _assert_only_these_bad(batches, reference("zarr"), bad)
    reasons = {s["shard"]: s["reason"] for s in skipped}
    assert "zarr frames of row 2: the stored object is missing (zarr would read it as zeros)" in reasons[shards[0]]
    assert "KeyError" in reasons[shards[3]] and "targets" in reasons[shards[3]]
    assert "Stored and computed checksum do not match" in reasons[shards[5]]      # zarr's own crc32c
    count = sum(not ok for _, ok in _rows(batches))      # the epoch wraps round: a clip may come twice
    assert count >= len(bad)
    with pytest.raises(sd.TooManyBadClipsError, match="stored object is missing|KeyError"):
        _epoch(store, "zarr", limit=count - 1)
    assert _epoch(store, "zarr", limit=count)[1].bad_clips.count == count      # exactly the budget: fine


def test_truncated_empty_and_missing_tars(store, reference):
    shards = _shards(store)

    def cut(shard: str, where) -> list[str]:
        ids = _index(store, shard)
        tar = store / "webdataset" / f"{shard}.tar"
        with tarfile.open(tar) as t:
            at = where(t.getmember(f"{ids[1]}.f02.jpg"))
        tar.write_bytes(tar.read_bytes()[:at])
        return ids

    broken = cut(shards[0], lambda m: m.offset_data + 100)     # inside a member of the second clip
    short = cut(shards[3], lambda m: m.offset)                 # at a member boundary of the second clip
    (store / "webdataset" / f"{shards[1]}.tar").write_bytes(b"")       # an empty object (a failed upload)
    (store / "webdataset" / f"{shards[2]}.tar").unlink()               # a deleted one
    bad = set(broken[1:]) | set(short[1:]) | set(_index(store, shards[1])) | set(_index(store, shards[2]))
    batches, _ = _epoch(store, "webdataset", workers=2)
    skipped = _assert_only_these_bad(batches, reference("webdataset", 2), bad)
    reasons = {}
    for s in skipped:
        reasons.setdefault(s["shard"], set()).add(s["reason"])
    assert reasons[shards[0]] == {f"{store}/webdataset/{shards[0]}.tar: unreadable after 1 clips: "
                                  "ReadError: unexpected end of data"}
    assert any("missing f02.jpg, f03.jpg, target.npy" in r for r in reasons[shards[3]])     # cut in two
    assert any("ends after 2 clips, the index lists 3" in r for r in reasons[shards[3]])
    assert reasons[shards[1]] == {f"{store}/webdataset/{shards[1]}.tar: unreadable after 0 clips: "
                                  "ReadError: empty file"}
    assert all("cannot open" in r and "FileNotFoundError" in r for r in reasons[shards[2]])


def test_corrupt_jpeg_missing_clip_and_stray_sample(store, reference):
    shards = _shards(store)
    ids = _index(store, shards[0])

    def damage(members):
        out = []
        for m, payload in members:
            key = m.name.split(".")[0]
            if key == ids[0] and ".f02." in m.name:
                payload = payload[: len(payload) // 3]          # a truncated JPEG
            if key == ids[1]:
                continue                                        # a clip missing from the tar
            out.append((m, payload))
        extra = tarfile.TarInfo("stray-clip.json")
        return out + [(extra, b"{}")]                           # and a sample the index does not list

    _rewrite_tar(store / "webdataset" / f"{shards[0]}.tar", damage)
    batches, data = _epoch(store, "webdataset")
    skipped = [s for b in batches for s in b.get("skipped", [])]
    by_id = {s["clip_id"]: s["reason"] for s in skipped}
    assert "cannot decode" in by_id[ids[0]]
    assert "missing from the tar" in by_id[ids[1]]
    assert "stray sample 'stray-clip'" in by_id["stray-clip"]
    assert data.bad_clips.count == 3
    # The clips after the gap still line up with the index: only the two are invalid rows.
    assert {c for c, ok in _rows(batches) if not ok} == {ids[0], ids[1]}
    assert [c for c, _ in _rows(batches)] == [c for c, _ in _rows(reference("webdataset"))]


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_missing_index_file_makes_its_shard_bad(store, reference, fmt):
    shard = _shards(store)[4]
    ids = _index(store, shard)
    (store / "index" / f"{shard}.parquet").unlink()
    batches, _ = _epoch(store, fmt)
    invalid = [c for c, ok in _rows(batches) if not ok]
    assert len(invalid) == len(ids)               # by count: the ids went with the index file
    skipped = [s for b in batches for s in b.get("skipped", [])]
    assert {s["shard"] for s in skipped} == {shard} and all(s["clip_id"] is None for s in skipped)
    assert all("has no index file" in s["reason"] for s in skipped)
    good = [c for c, ok in _rows(batches) if ok]
    assert good == [c for c in (c for c, _ in _rows(reference(fmt))) if c not in ids]


def test_evaluation_drops_bad_clips(store):
    shard = _shards(store)[0]
    ids = _index(store, shard)
    (store / "webdataset" / f"{shard}.tar").unlink()
    info = sd.read_store(str(store))
    batches = sd.eval_batches(info, batch_size=2, max_bad_clips=len(ids))
    got = list(batches)
    seen = [c for b in got for c in b["clip_id"]]
    assert not any("valid" in b for b in got) and not set(ids) & set(seen)     # dropped, not masked
    assert len(seen) == int(info.counts.sum()) - len(ids) and batches.budget.count == len(ids)
    assert [len(b["clip_id"]) for b in got][:2] == [0, 1]       # the first batches came out short
    with pytest.raises(sd.TooManyBadClipsError, match=f"shard {shard}"):
        list(sd.eval_batches(info, batch_size=2, max_bad_clips=len(ids) - 1))


def test_masked_loss_ignores_invalid_rows():
    from student.loss import distill_loss

    pred = torch.randn(3, 4, 5, requires_grad=True)
    target = torch.randn(3, 4, 5)
    target[1] = float("nan")             # whatever is in an invalid row never shows
    valid = torch.tensor([True, False, True])
    for name in ("mse_clip", "cos_smoothl1"):
        loss = distill_loss(name, pred, target, valid=valid)
        assert torch.allclose(loss, distill_loss(name, pred[[0, 2]], target[[0, 2]]))
        pred.grad = None
        loss.backward()
        assert torch.isfinite(pred.grad).all() and not pred.grad[1].any()
    none = distill_loss("mse_clip", pred, target, valid=torch.zeros(3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and none.requires_grad


# ---------------------------------------------------------------- the trainer


def _cfg(store: Path | str, out: Path, *extra: str) -> TrainConfig:
    return parse_config(TrainConfig, ["--data", str(store), "--output", str(out), "--preset", "tiny",
                                      "--batch-size", "4", "--lr", "2e-3", "--warmup-steps", "2",
                                      "--num-workers", "0", "--log-every", "1", "--shuffle-buffer", "6",
                                      "--checkpoint-every", "0", "--augment", "0", *extra])


def _records(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def _finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(path).values())


def test_training_skips_bad_clips_within_budget_and_resumes_the_count(store, tmp_path):
    shard = _shards(store)[1]
    (store / "webdataset" / f"{shard}.tar").write_bytes(b"")        # its 3 clips, every epoch
    per_epoch = 3
    a = tmp_path / "a"
    result = train(_cfg(store, a, "--max-steps", "12", "--max-bad-clips", "20", "--checkpoint-every", "5"))
    metrics = [r for r in _records(a) if "loss" in r]
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in metrics)
    skipped = _records(a, "skipped-clips-rank0.jsonl")
    epochs = metrics[-1]["epoch"] + 1
    assert len(skipped) == result["data/skipped_clips"] == metrics[-1]["data/skipped_clips"] >= per_epoch
    assert {s["shard"] for s in skipped} == {shard} and all("empty file" in s["reason"] for s in skipped)
    assert len({(s["epoch"], s["clip_id"]) for s in skipped}) == len(skipped) <= per_epoch * epochs
    assert _finite(a / "model.safetensors")
    # Stopped and resumed: the same count (it is in the checkpoint) and the same records.
    b = tmp_path / "b"
    train(_cfg(store, b, "--max-steps", "12", "--max-bad-clips", "20", "--checkpoint-every", "5",
               "--stop-after", "7"))
    train(_cfg(store, b, "--max-steps", "12", "--max-bad-clips", "20", "--checkpoint-every", "5", "--resume"))
    assert _records(b)[-1]["data/skipped_clips"] == metrics[-1]["data/skipped_clips"]
    assert [{k: v for k, v in r.items()} for r in _records(b, "skipped-clips-rank0.jsonl")] == skipped
    # Over the budget: the run stops with the shard's name, and no model is written.
    c = tmp_path / "c"
    with pytest.raises(sd.TooManyBadClipsError, match=f"shard {shard}.*empty file.*more than --max-bad-clips 2"):
        train(_cfg(store, c, "--max-steps", "12", "--max-bad-clips", "2"))
    assert not (c / "model.safetensors").exists()


def test_a_nonfinite_step_is_skipped_and_too_many_stop_the_run(pristine, tmp_path, monkeypatch, capsys):
    import student.train as st_train

    real, calls = st_train.distill_loss, []

    def flaky(*args, **kw):     # the 3rd step's loss is NaN
        calls.append(1)
        loss = real(*args, **kw)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(st_train, "distill_loss", flaky)
    out = tmp_path / "run"
    train(_cfg(pristine, out, "--max-steps", "5", "--checkpoint-every", "1", "--keep-checkpoints", "0"))
    metrics = [r for r in _records(out) if "loss" in r]
    assert metrics[2]["loss"] is None                       # NaN is written as null
    assert [r["train/skipped_steps"] for r in metrics] == [0, 0, 1, 1, 1]
    assert "step 3: loss nan" in capsys.readouterr().err
    w = {s: load_file(out / "checkpoints" / f"step-{s:08d}" / "model.safetensors") for s in (2, 3, 4)}
    assert all(torch.equal(w[2][k], w[3][k]) for k in w[2])     # step 3 changed nothing
    assert any(not torch.equal(w[3][k], w[4][k]) for k in w[3])     # step 4 did
    assert _finite(out / "model.safetensors")
    opt = torch.load(out / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)
    assert int(next(iter(opt["state"].values()))["step"]) == 3       # AdamW took 3 steps out of 4

    # From step 2 on every loss is NaN: steps 2 and 3 are skipped, step 4 is one too many.
    calls.clear()
    monkeypatch.setattr(st_train, "distill_loss", lambda *a, **k: real(*a, **k) * (float("nan") if calls.append(1)
                                                                                   or len(calls) >= 2 else 1.0))
    out = tmp_path / "diverged"
    with pytest.raises(NonFiniteTrainingError, match="step 4: 3 steps in a row .* more than --max-bad-steps 2"):
        train(_cfg(pristine, out, "--max-steps", "10", "--max-bad-steps", "2", "--checkpoint-every", "1"))
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2, 3, 4]
    assert checkpoint.latest(out / "checkpoints").name == "step-00000003"       # finite weights, step 1's
    assert not (out / "model.safetensors").exists()


def test_nonfinite_weights_are_never_saved(pristine, tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(checkpoint.NonFiniteWeightsError, match="NaN or inf in model bias"):
        checkpoint.save(tmp_path / "ckpt", 1, model, opt, {}, {}, keep=1)
    assert not (tmp_path / "ckpt").exists()

    # In the trainer: weights that went bad without a non-finite gradient (here: put there by hand).
    import student.train as st_train

    real = st_train.Trainer.step

    def step(self, batch):
        out = real(self, batch)
        if self.scheduler.last_epoch == 2:
            with torch.no_grad():
                next(self.module.parameters()).view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(st_train.Trainer, "step", step)
    out = tmp_path / "run"
    with pytest.raises(checkpoint.NonFiniteWeightsError, match="checkpoint of step 2: NaN or inf in model"):
        train(_cfg(pristine, out, "--max-steps", "4", "--checkpoint-every", "2"))
    assert checkpoint.checkpoints(out / "checkpoints") == [] and not (out / "model.safetensors").exists()


def _ddp_worker(rank: int, port: int, schema: dict, out: str) -> None:
    import torch.distributed as dist

    from student.data import StoreInfo, synthetic_batches
    from pipeline.training.distributed import Dist
    from student.train import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        cfg = TrainConfig(data="unused", output=out, preset="tiny", lr=1e-2, warmup_steps=0)
        trainer = Trainer(cfg, StoreInfo.from_schema(schema, "(synthetic)"), Dist(rank, 2, torch.device("cpu")))
        trainer.wrap()
        before = [p.detach().clone() for p in trainer.module.parameters()]
        batch = dict(next(synthetic_batches(StoreInfo.from_schema(schema, "(synthetic)"), 2)))
        poisoned = dict(batch, target=batch["target"].clone())
        if rank == 1:       # only rank 1's loss is NaN; mse_clip clamps, so its gradients stay finite
            poisoned["target"][0, 0, 0] = float("nan")
        loss, grad_norm, applied = trainer.step(poisoned)
        assert math.isfinite(grad_norm.item()) and math.isfinite(loss.item()) == (rank == 0)
        assert not applied, rank             # both ranks skip, not only the one that saw the NaN
        assert all(torch.equal(a, p) for a, p in zip(before, trainer.module.parameters()))
        _, _, applied = trainer.step(batch)
        assert applied and any(not torch.equal(a, p) for a, p in zip(before, trainer.module.parameters()))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_on_skipping_a_step(pristine, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    schema = json.loads((Path(pristine) / "store.json").read_text())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(port, schema, str(tmp_path)), nprocs=2, join=True)


# ---------------------------------------------------------------- config validation


BAD_FLAGS = [
    (["--lr", "0"], "--lr: 0.0 must be > 0"),
    (["--lr", "nan"], "--lr: nan is not a finite number"),
    (["--batch-size", "0"], "--batch-size: 0 is below its minimum 1"),
    (["--max-steps", "0"], "--max-steps: 0 is below its minimum 1"),
    (["--grad-clip", "0"], "--grad-clip: 0.0 must be > 0"),
    (["--warmup-steps", "-1"], "--warmup-steps: -1 is below its minimum 0"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio: 1.5 is above its maximum 1"),
    (["--clip-sigma", "-1"], "--clip-sigma: -1.0 is below its minimum 0"),
    (["--augment", "1"], "--augment: 1.0 must be below 1"),
    (["--shuffle-buffer", "-2"], "--shuffle-buffer: -2 is below its minimum 0"),
    (["--num-workers", "-1"], "--num-workers: -1 is below its minimum 0"),
    (["--seed", "-1"], "--seed: -1 is below its minimum 0"),
    (["--eval-fraction", "0.3"], "--eval-fraction: 0.3 is not one of 0.0, 0.001"),
    (["--eval-every", "-5"], "--eval-every: -5 is below its minimum 0"),
    (["--eval-batches", "0"], "--eval-batches: 0 is below its minimum 1"),
    (["--checkpoint-every", "-1"], "--checkpoint-every: -1 is below its minimum 0"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints: -1 is below its minimum 0"),
    (["--log-every", "0"], "--log-every: 0 is below its minimum 1"),
    (["--format", "tar"], "--format: 'tar' is not one of webdataset, zarr"),
    (["--loss", "l1"], "--loss: 'l1' is not one of mse_clip, cos_smoothl1"),
    (["--precision", "fp16"], "--precision: 'fp16' is not one of auto, bf16, fp32"),
    (["--preset", "huge"], "--preset: 'huge' is not one of"),
    (["--stop-after", "0"], "--stop-after: 0 is below its minimum 1"),
    (["--max-bad-clips", "-1"], "--max-bad-clips: -1 is below its minimum 0"),
    (["--max-bad-steps", "-1"], "--max-bad-steps: -1 is below its minimum 0"),
    (["--init-from", "a", "--init-from-teacher", "b"], "--init-from and --init-from-teacher exclude each other"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_config_exits_2_before_touching_the_output(pristine, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["--data", pristine, "--output", str(out), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_config_checks_cover_yaml_direct_construction_and_the_ray_job(tmp_path, capsys):
    from jobs.train_student import RayTrainConfig
    from pipeline.config import check_config

    path = tmp_path / "train.yaml"
    path.write_text("data: x\noutput: y\nbatch_size: 0\nlr: -1.0\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size: 0 is below its minimum 1" in err and "--lr: -1.0 is below its minimum 0" in err
    with pytest.raises(ConfigError, match="--augment: 1.5 is above its maximum 1"):
        check_config(TrainConfig(data="x", output="y", augment=1.5))
    with pytest.raises(ConfigError, match="--grad-clip"):
        train(TrainConfig(data="x", output=str(tmp_path / "never"), grad_clip=0.0))
    assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigError, match="--max-bad-steps"):       # the Ray Train job inherits the rules
        config_from_dict(RayTrainConfig, {"data": "x", "output": "y", "max_bad_steps": -3})
    assert config_from_dict(TrainConfig, {"data": "x", "output": "y", "warmup_steps": 5000, "max_steps": 10,
                                          "clip_sigma": 0, "keep_checkpoints": 0, "shuffle_buffer": 0})
