"""The CTD trainer end to end on CPU: loss falls, exact resume, DDP over 2 gloo processes, the saved
model loads through the Auto classes, a store that does not fit the model fails at start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import student
from pipeline.config import parse_config
from pipeline.training import checkpoint
from student.data import SchemaMismatchError
from student.evaluate import evaluate
from student.loss import distill_loss
from student.train import TrainConfig, throughput, train
from tests.test_student_data import D, N, write_tiny_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> str:
    return write_tiny_store(tmp_path_factory.mktemp("train") / "store", videos=8, clips_per_video=3)


def _cfg(store: str, out: Path, *extra: str) -> TrainConfig:
    return parse_config(TrainConfig, ["--data", store, "--output", str(out), "--preset", "tiny", "--batch-size", "4",
                                      "--lr", "2e-3", "--warmup-steps", "3", "--num-workers", "0", "--log-every", "1",
                                      "--shuffle-buffer", "6", "--checkpoint-every", "4", *extra])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_the_run_directory_is_a_model(store_root, tmp_path):
    out = tmp_path / "run"
    result = train(_cfg(store_root, out, "--max-steps", "20", "--eval-fraction", "0.25", "--keep-checkpoints", "2"))
    steps = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert {"lr", "clips_per_s", "data_wait_frac", "grad_norm"} <= set(steps[0])
    first, last = sum(r["loss"] for r in steps[:5]) / 5, sum(r["loss"] for r in steps[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    # The held-out evaluation beats the mean-target predictor.
    ev = json.loads((out / "eval.json").read_text())
    assert ev == result["eval"] and ev["clips"] > 0
    assert ev["r2"] > ev["trivial_r2"] + 0.2 and ev["cosine"] > ev["trivial_cosine"]
    # DIR is a save_pretrained directory with the store's target statistics.
    model = AutoModel.from_pretrained(out)
    assert isinstance(model, student.LiteFrameModel)
    assert model.config.target_tokens == N and model.config.target_dim == D
    assert len(model.config.target_mean) == D and model.config.target_std is not None
    assert [p.name for p in checkpoint.checkpoints(out / "checkpoints")] == ["step-00000016", "step-00000020"]
    assert any((out / "tb").iterdir())


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_resume_gives_bit_identical_weights(store_root, tmp_path, fmt):
    # 24 clips less held-out ones, batch 4: epochs of a few steps, so step 7 is mid-epoch.
    args = ("--max-steps", "10", "--format", fmt, "--augment", "0.3", "--trace-samples", "--eval-fraction", "0.2")
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(store_root, a, *args))
    train(_cfg(store_root, b, *args, "--stop-after", "7"))
    assert not (b / "model.safetensors").exists()          # stopped, not finished
    assert checkpoint.latest(b / "checkpoints").name == "step-00000007"
    with pytest.raises(ValueError, match="seed: 0 -> 1"):     # another order: refused, not silently inexact
        train(_cfg(store_root, b, *args, "--resume", "--seed", "1"))
    moved = shutil.copytree(store_root, tmp_path / "moved-store")   # same clips elsewhere: still exact
    train(_cfg(str(moved), b, *args, "--resume"))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ta = (a / "samples-rank0.jsonl").read_text().splitlines()
    tb = (b / "samples-rank0.jsonl").read_text().splitlines()
    assert ta == tb and len(ta) == 10
    assert [r["step"] for r in _records(b) if "loss" in r] == list(range(1, 11))
    assert [r["loss"] for r in _records(a) if "loss" in r] == [r["loss"] for r in _records(b) if "loss" in r]


def _torchrun(store: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    with socket.socket() as sock:          # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "student.train", "--data", store, "--output", str(out),
           "--preset", "tiny", "--batch-size", "2", "--lr", "2e-3", "--warmup-steps", "2", "--num-workers", "1",
           "--log-every", "1", "--max-steps", "8", "--checkpoint-every", "4", "--trace-samples",
           "--shuffle-buffer", "4", "--augment", "0.2", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ddp_two_gloo_processes_and_their_exact_resume(store_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _torchrun(store_root, a)
    traces = [[json.loads(line) for line in (a / f"samples-rank{r}.jsonl").read_text().splitlines()]
              for r in range(2)]
    assert [len(t) for t in traces] == [8, 8]            # both ranks ran every step
    epoch0 = [c for t in traces for rec in t if rec["epoch"] == 0 for c in rec["clip_id"]]
    assert len(epoch0) == 2 * 6 * 2                       # 24 clips: 2 ranks x 6 batches of 2
    assert len(set(epoch0)) == 24                         # ranks split the epoch without overlap
    ckpt = load_file(a / "checkpoints" / "step-00000008" / "model.safetensors")
    final = load_file(a / "model.safetensors")
    assert all(torch.equal(ckpt[k], final[k]) for k in final)
    loss = [r["loss"] for r in _records(a) if "loss" in r]
    assert len(loss) == 8 and loss[-1] < loss[0]
    # Stopped at step 7 (mid-epoch 1) and resumed: the same weights, bit for bit, as the run above.
    _torchrun(store_root, b, "--stop-after", "7")
    _torchrun(store_root, b, "--resume")
    wb = load_file(b / "model.safetensors")
    assert all(torch.equal(final[k], wb[k]) for k in final)
    for r in range(2):
        assert (a / f"samples-rank{r}.jsonl").read_text() == (b / f"samples-rank{r}.jsonl").read_text()
    # A bf16 gradient all-reduce is NCCL's (DDP's hook refuses gloo): CPU ranks say so before step 1.
    with pytest.raises(AssertionError, match=r"--grad-reduce bf16: DDP's bf16 all-reduce needs CUDA ranks"):
        _torchrun(store_root, tmp_path / "c", "--grad-reduce", "bf16")
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_eval_fraction_must_be_a_level_the_manifest_counts(store_root, tmp_path, capsys):
    from student.train import main

    with pytest.raises(SystemExit) as exit:
        main(["--data", store_root, "--output", str(tmp_path / "run"), "--max-steps", "2", "--eval-fraction", "0.3"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--eval-fraction: 0.3 is not one of 0.0, 0.001, " in err and "0.5" in err
    assert not (tmp_path / "run").exists()


def test_store_that_does_not_fit_the_model_fails_at_start(store_root, tmp_path):
    other = student.config_for_store("tiny", json.loads((Path(store_root) / "store.json").read_text()))
    other.target_dim, other.target_mean, other.target_std = D + 8, None, None
    student.LiteFrameModel(other).save_pretrained(tmp_path / "init")
    with pytest.raises(SchemaMismatchError, match=r"target width: model 24, store 16"):
        train(_cfg(store_root, tmp_path / "run", "--max-steps", "2", "--init-from", str(tmp_path / "init")))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_clipped_mse_ignores_differences_beyond_three_sigma():
    target = torch.zeros(1, 2, 2)
    pred = torch.tensor([[[1.0, 5.0], [-4.0, 0.5]]], requires_grad=True)
    loss = distill_loss("mse_clip", pred, target, clip_sigma=3.0)
    loss.backward()
    assert loss.item() == pytest.approx((1 + 9 + 9 + 0.25) / 4)
    assert pred.grad.flatten().tolist() == pytest.approx([0.5, 0.0, 0.0, 0.25])
    assert distill_loss("mse_clip", pred, target, clip_sigma=0).item() == pytest.approx((1 + 25 + 16 + 0.25) / 4)
    assert distill_loss("cos_smoothl1", target + 1, target + 1).item() == pytest.approx(0.0, abs=1e-6)


def test_evaluation_of_perfect_and_trivial_predictors():
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(D, generator=gen), torch.rand(D, generator=gen) + 0.5
    targets = torch.randn(3, N, D, generator=gen) * std + mean

    class Oracle(torch.nn.Module):     # predicts the standardised target exactly
        def forward(self, pixels):
            return (targets - mean) / std

    batch = {"target": targets, "frames": torch.zeros(3, 1)}
    r = evaluate(Oracle(), [batch], to_pixels=lambda b: b["frames"], target_mean=mean, target_std=std,
                 device=torch.device("cpu"))
    assert r["cosine"] == pytest.approx(1.0, abs=1e-5) and r["r2"] == pytest.approx(1.0)
    assert r["trivial_r2"] < 0.1 and r["trivial_cosine"] < 0.99 and r["clips"] == 3


def test_throughput_hook_for_benchmarks(store_root, tmp_path):
    for source in ("synthetic", "store"):
        r = throughput(_cfg(store_root, tmp_path / source), source=source, steps=2, warmup=1)
        assert r["clips_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1 and r["batch_size"] == 4
    schema = json.loads((Path(store_root) / "store.json").read_text())    # no store needed, only its shapes
    r = throughput(_cfg("unused", tmp_path / "schema"), source="synthetic", steps=1, warmup=0, schema=schema)
    assert r["clips_per_s"] > 0


def test_sigterm_stops_with_a_checkpoint_that_resumes(store_root, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "student.train", "--data", store_root, "--output", str(out), "--preset", "tiny",
           "--batch-size", "4", "--num-workers", "1", "--shuffle-buffer", "6", "--log-every", "1",
           "--lr", "2e-3", "--warmup-steps", "3", "--max-steps", "500", "--checkpoint-every", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)                 # the main process only, as Kubernetes does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped = _records(out)[-1]["step"]
    assert checkpoint.latest(out / "checkpoints").name == f"step-{stopped:08d}"
    assert not (out / "model.safetensors").exists()
    result = train(_cfg(store_root, out, "--max-steps", "500", "--resume", "--stop-after", "2",
                        "--checkpoint-every", "0", "--num-workers", "1"))
    assert result["step"] == stopped + 2


def test_resume_refuses_a_changed_schedule(store_root, tmp_path):
    out = tmp_path / "run"
    train(_cfg(store_root, out, "--max-steps", "8", "--stop-after", "4"))
    with pytest.raises(ValueError, match="max_steps: 8 -> 16"):
        train(_cfg(store_root, out, "--max-steps", "16", "--resume"))


def test_evaluation_on_a_second_store(store_root, tmp_path):
    other = write_tiny_store(tmp_path / "eval-store", videos=2, seed=7)
    out = tmp_path / "run"
    train(_cfg(store_root, out, "--max-steps", "2", "--eval-data", other, "--checkpoint-every", "0"))
    ev = json.loads((out / "eval.json").read_text())
    assert ev["clips"] == 6 and {"cosine", "r2", "trivial_cosine", "trivial_r2"} <= set(ev)


def test_init_from_teacher_sets_weights_and_normalisation(store_root, tmp_path):
    from pipeline.testing import make_tiny_teacher

    teacher = make_tiny_teacher(tmp_path / "teacher", "siglip", image_size=56, hidden_size=64, num_layers=4)
    out = tmp_path / "run"
    train(_cfg(store_root, out, "--max-steps", "1", "--lr", "1e-12", "--warmup-steps", "1",
               "--checkpoint-every", "0", "--init-from-teacher", str(teacher)))
    model = AutoModel.from_pretrained(out)
    tw = load_file(teacher / "model.safetensors")
    patch = next(v for k, v in tw.items() if k.endswith("patch_embedding.weight"))
    assert torch.allclose(model.patch_embed.weight, patch[: model.patch_embed.weight.shape[0]], atol=1e-6)
    assert model.config.image_mean == pytest.approx([0.5, 0.5, 0.5])    # SigLIP's, not the ImageNet default
