"""jobs.train_student: the same CTD loop under Ray Train (TorchTrainer, 2 CPU workers over gloo) on a
real local Ray instance, started and stopped here."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModel

import student
from test_student_data import write_tiny_store


@pytest.mark.slow
def test_ray_train_runs_the_same_loop(tmp_path):
    ray = pytest.importorskip("ray")
    from jobs.train_student import main

    store = write_tiny_store(tmp_path / "store", videos=4)
    out = tmp_path / "run"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        main(["--data", store, "--output", str(out), "--preset", "tiny", "--batch-size", "2", "--max-steps", "4",
              "--ray-workers", "2", "--num-workers", "0", "--log-every", "1", "--checkpoint-every", "2",
              "--lr", "1e-3", "--warmup-steps", "1", "--trace-samples"])
    finally:
        ray.shutdown()
    assert isinstance(AutoModel.from_pretrained(out), student.LiteFrameModel)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    traces = [[json.loads(line) for line in (out / f"samples-rank{r}.jsonl").read_text().splitlines()]
              for r in range(2)]
    assert [len(t) for t in traces] == [4, 4]
    epoch0 = [{c for rec in t if rec["epoch"] == 0 for c in rec["clip_id"]} for t in traces]
    assert len(epoch0[0]) == len(epoch0[1]) == 6 and not epoch0[0] & epoch0[1]   # 12 clips split over 2 ranks
