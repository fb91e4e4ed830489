"""Elastic resume: a run stopped on N ranks (or loader workers) continues its epoch on M, reading every
clip of the epoch once (beyond the wrap-round filler of each phase's last step: less than one global
batch), deterministically."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from student import data as sd
from student.data import PLAN_VERSION
from student.train import stale_plan
from tests.test_student_data import write_tiny_store

REPO = Path(__file__).resolve().parents[1]


def _read(plan: sd.EpochPlan, batches: int) -> list[tuple[int, int]]:
    """(shard, k) of every entry all ranks read in their first `batches` batches of the plan."""
    out = []
    for rank in range(plan.world_size):
        orders: dict[int, sd.ShuffleBuffer] = {}
        for b in range(batches):
            stream, _ = sd.rank_batches(plan, rank, b)
            order = orders.setdefault(stream, plan.order(stream))
            out += zip(*(a.tolist() for a in plan.locate(stream, order.take(plan.batch_size))))
    return out


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
@pytest.mark.parametrize("counts, phases, buffer", [
    ([5, 3, 7, 1, 8], [(2, 1, 2), (1, 2, 3), (3, 1, None)], 4),     # 24 clips, every phase whole batches
    ([5, 3, 7, 1, 8], [(2, 2, 1), (3, 1, 1), (1, 3, None)], 6),
    ([4, 9, 2, 6, 5, 1, 3], [(3, 2, 3), (2, 1, 1), (1, 1, 2), (4, 2, None)], 5),   # 30: filler in phases
    ([4, 9, 2, 6, 5, 1, 3], [(2, 1, 0), (1, 1, 7), (2, 3, None)], 0),
    # The 2 -> 1 -> 2 ranks of 2 workers GPU run, scaled to 64 clips: 34 left for the last phase once
    # took 2 x ceil(34 / 8) = 10 batches per rank (6 repeats, more than a global batch), not 9.
    ([3] * 21 + [1], [(2, 2, 5), (1, 2, 5), (2, 2, None)], 64),
])
def test_phases_read_every_clip_of_the_epoch_once(fmt, counts, phases, buffer):
    counts = np.asarray(counts, dtype=np.int64)
    done, got, filler = [], [], 0
    for world, workers, batches in phases:
        plan = sd.plan_epoch(sd.Selection(counts), fmt=fmt, seed=4, epoch=1, world_size=world,
                             streams_per_rank=workers, batch_size=2, shuffle_buffer=buffer, done=done)
        batches = plan.batches_per_rank if batches is None else batches
        got += _read(plan, batches)
        padding = plan.world_size * plan.batches_per_rank * plan.batch_size - plan.total
        assert 0 <= padding < plan.world_size * plan.batch_size    # the fewest whole steps, whatever the workers
        filler += padding
        done.append((world, workers, batches))
    seen = Counter(got)
    assert set(seen) == {(s, k) for s in range(len(counts)) for k in range(counts[s])}
    assert len(got) - len(seen) <= filler        # repeats: wrap-round filler only
    if filler == 0:
        assert max(seen.values()) == 1


def test_a_phase_without_progress_changes_nothing():
    counts = np.asarray([5, 3, 7, 1, 8], dtype=np.int64)
    kw = dict(fmt="webdataset", seed=4, epoch=1, batch_size=2, shuffle_buffer=4)
    fresh = sd.plan_epoch(sd.Selection(counts), world_size=3, streams_per_rank=1, **kw)
    after = sd.plan_epoch(sd.Selection(counts), world_size=3, streams_per_rank=1, done=[(2, 1, 0)], **kw)
    assert sorted(_read(fresh, fresh.batches_per_rank)) == sorted(_read(after, after.batches_per_rank))


def _torchrun(nproc: int, store: str, out: Path, *extra: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(port), "-m", "student.train", "--data", store, "--output", str(out),
           "--preset", "tiny", "--batch-size", "2", "--lr", "2e-3", "--warmup-steps", "2", "--log-every", "1",
           "--max-steps", "8", "--checkpoint-every", "4", "--trace-samples", "--shuffle-buffer", "4",
           "--augment", "0.2", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _traces(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("samples-rank*.jsonl")) for line in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return write_tiny_store(tmp_path_factory.mktemp("elastic") / "store", videos=8, clips_per_video=3)   # 24 clips


def test_two_ranks_then_one_then_three(store, tmp_path):
    run = tmp_path / "run"
    _torchrun(2, store, run, "--num-workers", "1", "--stop-after", "2")    # 8 clips on 2 ranks
    _torchrun(1, store, run, "--num-workers", "2", "--stop-after", "2", "--resume")   # 4 on 1 rank, 2 streams
    state = json.loads((run / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["loader"] == {"epoch": 0, "batch": 2, "phases": [[2, 1, 2]], "world_size": 1,
                               "streams_per_rank": 2, "samples": 12, "plan": PLAN_VERSION}
    again = shutil.copytree(run, tmp_path / "again")
    for out in (run, again):            # the last 12 clips on 3 ranks, then 2 steps of epoch 1
        _torchrun(3, store, out, "--num-workers", "1", "--resume")
    records = _traces(run)
    epoch0 = Counter(c for r in records if r["epoch"] == 0 for c in r["clip_id"])
    index = sd.read_store(store)
    assert len(epoch0) == int(index.counts.sum()) == 24 and set(epoch0.values()) == {1}
    # Epoch 1 is the seed's order for 3 ranks, as a fresh 3-rank run would read it.
    data = [sd.TrainData(index, batch_size=2, seed=0, rank=r, world_size=3, num_workers=1, shuffle_buffer=4)
            for r in range(3)]
    for r in range(3):
        got = [json.loads(line)["clip_id"] for line in (run / f"samples-rank{r}.jsonl").read_text().splitlines()
               if json.loads(line)["epoch"] == 1]
        assert got == sd.epoch_clip_ids(index, data[r].plan(1), r)[:2]
    # Resuming the same checkpoint twice gives the same run, bit for bit.
    assert _traces(run) == _traces(again)
    wa, wb = load_file(run / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_split_by_an_older_plan_is_flagged_where_it_matters():
    old = {"epoch": 3, "batch": 2, "phases": [], "world_size": 2, "streams_per_rank": 2}
    assert "epoch 3 was split by loader plan 1" in stale_plan(old)
    assert "later epochs are exact" in stale_plan({**old, "batch": 0, "phases": [[4, 2, 5]]})
    assert stale_plan({**old, "plan": PLAN_VERSION}) is None
    assert stale_plan({**old, "streams_per_rank": 1}) is None      # one stream per rank: both plans alike
    assert stale_plan({**old, "batch": 0}) is None                  # at an epoch's start: nothing to replay


def test_two_ranks_of_two_workers_then_one_then_two(store, tmp_path):
    """The GPU run's shape: the 10 clips left for the last phase take 3 steps on 2 ranks (2 repeats,
    less than one global batch of 4), not 2 x ceil(10 / 8) = 4 steps of whole batches per worker."""
    run = tmp_path / "run"
    common = ("--num-workers", "2", "--max-steps", "10")
    _torchrun(2, store, run, *common, "--stop-after", "2")                  # 8 clips
    _torchrun(1, store, run, *common, "--stop-after", "3", "--resume")      # 6 clips
    state = json.loads((run / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert state["loader"] == {"epoch": 0, "batch": 3, "phases": [[2, 2, 2]], "world_size": 1,
                               "streams_per_rank": 2, "samples": 14, "plan": PLAN_VERSION}
    _torchrun(2, store, run, *common, "--resume")       # the last 10 clips, then 2 steps of epoch 1
    records = _traces(run)
    epoch0 = [c for r in records if r["epoch"] == 0 for c in r["clip_id"]]
    assert len([r for r in records if r["epoch"] == 0]) == 2 * 2 + 3 + 2 * 3
    assert len(set(epoch0)) == 24 and len(epoch0) == 24 + 2
    index = sd.read_store(store)
    for r in range(2):      # epoch 1: the seed's order for 2 ranks of 2 workers, as a fresh run reads it
        data = sd.TrainData(index, batch_size=2, seed=0, rank=r, world_size=2, num_workers=2, shuffle_buffer=4)
        got = [json.loads(line)["clip_id"] for line in (run / f"samples-rank{r}.jsonl").read_text().splitlines()
               if json.loads(line)["epoch"] == 1]
        assert got == sd.epoch_clip_ids(index, data.plan(1), r)[:2]


def _evaluate(store: str, rank: int, world_size: int) -> dict:
    """The tiny student (seed 0) evaluated on rank `rank`'s slice of the store, sums all-reduced."""
    import torch.distributed as dist

    from student import LiteFrameModel, config_for_store
    from student.evaluate import evaluate

    info = sd.read_store(store)
    torch.manual_seed(0)
    model = LiteFrameModel(config_for_store("tiny", info.schema))
    batches = sd.eval_batches(info, batch_size=4, rank=rank, world_size=world_size)
    return evaluate(model, batches, to_pixels=lambda b: model.preprocess(b["frames"].flatten(0, 1)).unflatten(
                        0, b["frames"].shape[:2]), target_mean=torch.as_tensor(info.target_mean),
                    target_std=torch.as_tensor(info.target_std), device=torch.device("cpu"),
                    all_reduce=dist.all_reduce if world_size > 1 else None)


def _eval_worker(rank: int, port: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        Path(out, f"rank{rank}.json").write_text(json.dumps(_evaluate(store, rank, 2)))
    finally:
        dist.destroy_process_group()


def test_evaluation_split_over_ranks_equals_one_process(store, tmp_path):
    import torch.multiprocessing as mp

    info = sd.read_store(store)
    slices = [[c for b in sd.eval_batches(info, batch_size=4, rank=r, world_size=2) for c in b["clip_id"]]
              for r in range(2)]
    whole = [c for b in sd.eval_batches(info, batch_size=4) for c in b["clip_id"]]
    assert slices[0] + slices[1] == whole and len(slices[0]) == len(slices[1]) == 12
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_eval_worker, args=(port, store, str(tmp_path)), nprocs=2, join=True)
    one = _evaluate(store, 0, 1)
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got.keys() == one.keys() and got["clips"] == one["clips"] == 24
        assert all(got[k] == pytest.approx(one[k], rel=1e-6, abs=1e-9) for k in one), (got, one)
