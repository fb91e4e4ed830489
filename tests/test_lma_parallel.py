"""LMA data-parallel on CPU, for real: `torchrun` with 2 gloo ranks against one process. The ranks
split the probing and every step's records; their updates equal one process's with twice the
gradient accumulation, and a run stopped on 2 ranks resumes on 1 with the same samples."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lma.finetune import FinetuneConfig, finetune
from pipeline.config import parse_config
from pipeline.training.resume import ResumeMismatchError

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    from lma.testing import make_tiny_llm, make_tiny_student

    return make_tiny_student(tmp_path_factory.mktemp("student")), make_tiny_llm(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """6 usable records over 4 videos; lines 2 (not a video) and 4 (missing) fall to rank 1's probing."""
    from pipeline.samples import make_video

    root = tmp_path_factory.mktemp("lma_ddp")
    for i, name in enumerate("abcd"):
        make_video(root / f"{name}.mp4", seconds=1.0, fps=8, size=(64, 64))
    (root / "junk.mp4").write_bytes(b"not a video" * 100)
    answers = ["the square is red", "", "the square is blue", "", "one square", "the video shows a moving square",
               "the square is blue", "one square"]
    videos = ["a", "junk", "b", "missing", "c", "d", "a", "b"]
    lines = [json.dumps({"video": f"{v}.mp4", "conversations": [
        {"from": "human", "value": "describe the video"}, {"from": "gpt", "value": a or "red"}]})
        for v, a in zip(videos, answers)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def _args(models, data, output, grad_accum: int, *extra: str) -> list[str]:
    student, llm = models
    return ["--student", str(student), "--llm", str(llm), "--data", str(data), "--output", str(output),
            "--frames", "4", "--batch-size", "1", "--grad-accum", str(grad_accum), "--max-steps", str(STEPS),
            "--save-every", str(STEPS // 2), "--lr", "1e-2", "--warmup-ratio", "0.25", "--lora-dropout", "0",
            "--seed", "1", "--prefetch", "2", "--device", "cpu", *extra]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "lma.finetune", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(output: Path, name: str) -> list[dict]:
    return [json.loads(t) for t in (output / name).read_text().splitlines()]


def _weights(output: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(output / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and any("lora_B" in k for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    ra, rb = _rows(a, "metrics.jsonl"), _rows(b, "metrics.jsonl")
    same = ("step", "epoch", "visual_tokens", "text_tokens", "skipped", "applied", "lr")
    assert [{k: r[k] for k in same} for r in ra] == [{k: r[k] for k in same} for r in rb]
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-5)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, models, data) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ddp") / "out"
    proc = _torchrun(_args(models, data, out, 2))
    return out, proc.stderr


def test_two_ranks_equal_one_rank_with_twice_the_accumulation(two_ranks, models, data, tmp_path):
    ddp, stderr = two_ranks
    assert "rank 0 probes 4 of 8 records" in stderr and "rank 1 probes 4 of 8 records" in stderr
    assert "effective batch 4 = 2 ranks x --batch-size 1 x --grad-accum 2" in stderr
    one = tmp_path / "one"
    finetune(parse_config(FinetuneConfig, _args(models, data, one, 4)))
    _assert_same_run(ddp, one)
    rows = _rows(ddp, "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 2]       # 4 of 6 records a step, steps across epochs
    assert all(r["visual_tokens"] == 4 * 4 for r in rows)    # 4 videos x 1 clip x 4 tokens, over both ranks
    # rank 1 found both bad videos; rank 0 wrote them, once
    rows_of = lambda out: [(r["line"], r["video"], r["stage"], r["error_type"]) for r in _rows(out, "skipped.jsonl")]
    assert [r[0] for r in rows_of(ddp)] == [2, 4] and rows_of(ddp) == rows_of(one)
    assert not list(ddp.glob("*rank*"))
    state = json.loads((ddp / "checkpoints" / f"step-{STEPS:08d}" / "state.json").read_text())
    assert state["world_size"] == 2 and state["loader"] == {"epoch": 2, "cursor": 4}
    assert torch.load(ddp / "checkpoints" / f"step-{STEPS:08d}" / "rng.pt")["torch"].shape[0] == 2


def test_stopped_on_two_ranks_resumes_on_one(two_ranks, models, data, tmp_path):
    ddp, _ = two_ranks
    run = shutil.copytree(ddp, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:08d}")
    for name in ("adapter", "student", "projector.safetensors", "config.json"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(ResumeMismatchError, match="effective_batch: 4 -> 2"):
        finetune(parse_config(FinetuneConfig, _args(models, data, run, 2, "--resume")))
    finetune(parse_config(FinetuneConfig, _args(models, data, run, 4, "--resume")))
    _assert_same_run(ddp, run)


def test_scaling_bench_tiny_smoke(tmp_path):
    """bench/lma_scaling.py --shape tiny: models, videos and a 2-rank torchrun at tiny shapes (times not checked)."""
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "bench/lma_scaling.py", "--shape", "tiny", "--gpus", "2", "--frames", "8",
                           "--effective-batch", "2", "--steps", "1", "--warmup", "1", "--out", str(tmp_path),
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads(out.read_text())["rows"]
    assert row["gpus"] == 2 and row["grad_accum"] == 1 and row["timed_steps"] == 1 and row["all_applied"]
    assert row["tokens_per_s"] > 0 and row["efficiency"] == 1.0 and row["gpu_peak_gib"] is None
    assert row["tokens_per_video"] > 2 * 4        # 8 frames = 2 clips of 4 visual tokens, and the text
    assert "| 8 | 2 | 1 |" in done.stdout
