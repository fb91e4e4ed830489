"""The whole path on the session's real Ray cluster (conftest's `ray_driver`): `jobs.extract` turns
generated videos into a store with a tiny random teacher; `student.train` learns from it (loss
falls); `jobs.train_student` runs the same loop under Ray Train (TorchTrainer, 2 CPU workers, gloo)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModel

import student
from pipeline.config import parse_config
from pipeline.store import open_store
from student.train import TrainConfig, train


@pytest.fixture(scope="module")
def extracted_store(ray_driver, tmp_path_factory):
    from jobs.extract import ExtractConfig, extract
    from pipeline.samples import make_video
    from pipeline.testing import make_tiny_teacher

    root = tmp_path_factory.mktemp("e2e")
    make_video(root / "videos" / "a.mp4", seconds=3.0, fps=8, size=(96, 64))
    make_video(root / "videos" / "b.mp4", seconds=2.0, fps=10, size=(64, 96))
    teacher = make_tiny_teacher(root / "teacher", "siglip", image_size=56, hidden_size=32)
    extract(parse_config(ExtractConfig, [
        "--input", str(root / "videos"), "--output", str(root / "store"), "--teacher", str(teacher),
        "--size", "56", "--clip-frames", "4", "--views", "2", "--fps", "2-4", "--factors", "2,2,2",
        "--batch-size", "4", "--teacher-cpus", "0.5", "--decode-cpus", "0.5", "--shard-bytes", "20KB",
        "--ray-address", ray_driver.address]))
    return str(root / "store")


@pytest.mark.slow
def test_student_learns_from_an_extracted_store(extracted_store, tmp_path):
    out = tmp_path / "run"
    cfg = parse_config(TrainConfig, [
        "--data", extracted_store, "--output", str(out), "--preset", "tiny", "--batch-size", "4", "--lr", "3e-3",
        "--warmup-steps", "2", "--max-steps", "24", "--num-workers", "1", "--log-every", "1",
        "--checkpoint-every", "0", "--augment", "0"])
    train(cfg)
    loss = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(loss) == 24 and sum(loss[-4:]) < 0.7 * sum(loss[:4]), loss
    model = AutoModel.from_pretrained(out)
    assert model.config.target_dim == 32 and model.config.clip_frames == 4


@pytest.mark.slow
def test_ray_train_runs_the_same_loop(extracted_store, tmp_path):
    from jobs.train_student import main

    out = tmp_path / "run"
    clips = set(open_store(extracted_store).read_index(["clip_id"]).column("clip_id").to_pylist())
    steps = -(-len(clips) // 4) + 1          # all of epoch 0 (2 ranks x 2 clips a step), one step into epoch 1
    main(["--data", extracted_store, "--output", str(out), "--preset", "tiny", "--batch-size", "2",
          "--max-steps", str(steps), "--ray-workers", "2", "--num-workers", "0", "--log-every", "1",
          "--checkpoint-every", "2", "--lr", "1e-3", "--warmup-steps", "1", "--trace-samples"])
    assert isinstance(AutoModel.from_pretrained(out), student.LiteFrameModel)
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
    traces = [[json.loads(line) for line in (out / f"samples-rank{r}.jsonl").read_text().splitlines()]
              for r in range(2)]
    assert [len(t) for t in traces] == [steps, steps]     # both workers ran every step
    epoch0 = [c for t in traces for rec in t if rec["epoch"] == 0 for c in rec["clip_id"]]
    assert set(epoch0) == clips                           # together they read the whole store in epoch 0,
    assert len(epoch0) - len(clips) < 4                   # repeating fewer than a batch per rank to even out
