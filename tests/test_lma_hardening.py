"""LMA on data nobody checked: bounded JSONL lines, the extraction job's input rules for the records'
videos, epochs over usable records only, and non-finite steps or weights that never reach the model."""

from __future__ import annotations

import json
import math
import socket
import tracemalloc
from pathlib import Path

import pytest
import torch

from lma.data import read_records
from lma.finetune import FinetuneConfig, finetune
from lma.modeling import VideoLLM
from pipeline.config import parse_config
from pipeline.training import checkpoint
from pipeline.training.guards import NonFiniteTrainingError

FRAMES = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    from lma.testing import make_tiny_llm, make_tiny_student

    return make_tiny_student(tmp_path_factory.mktemp("student")), make_tiny_llm(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def listener():
    """A TCP port on 127.0.0.1 that records whether anything connected to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)

    def connected() -> bool:
        try:
            sock.accept()[0].close()
            return True
        except BlockingIOError:
            return False

    yield sock.getsockname()[1], connected
    sock.close()


def _record(video: str, answer: str = "the square is red") -> str:
    return json.dumps({"video": video, "conversations": [{"from": "human", "value": "what colour is the square"},
                                                         {"from": "gpt", "value": answer}]})


@pytest.fixture(scope="module")
def data(tmp_path_factory, listener) -> Path:
    """2 usable records and 5 unusable ones: missing, not a video, and three refused schemes that
    point at `listener` or at fsspec's in-memory filesystem."""
    from pipeline.samples import make_video

    root = tmp_path_factory.mktemp("lma_hard")
    make_video(root / "a.mp4", seconds=1.0, fps=8, size=(64, 64))
    make_video(root / "b.mp4", seconds=1.0, fps=8, size=(64, 64))
    (root / "junk.mp4").write_bytes(b"not a video" * 100)
    port = listener[0]
    lines = [_record("a.mp4"), _record("missing.mp4"), _record(f"http://127.0.0.1:{port}/v.mp4"),
             _record("junk.mp4"), _record(f"ftp://127.0.0.1:{port}/v.mp4"), _record("memory://v.mp4"),
             _record("b.mp4", "the square is blue")]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def _config(models, data, output, *extra) -> FinetuneConfig:
    student, llm = models
    return parse_config(FinetuneConfig, [
        "--student", str(student), "--llm", str(llm), "--data", str(data), "--output", str(output),
        "--frames", str(FRAMES), "--batch-size", "1", "--lr", "1e-2", "--warmup-ratio", "0", "--prefetch", "2",
        "--device", "cpu", *extra])


def _rows(output: Path, name: str) -> list[dict]:
    return [json.loads(t) for t in (output / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, models, data, listener) -> Path:
    output = tmp_path_factory.mktemp("run") / "out"
    finetune(_config(models, data, output, "--epochs", "2"))
    assert not listener[1](), "a refused scheme made a connection"
    return output


def test_one_enormous_line_is_rejected_by_size_in_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    huge = json.dumps({"video": "a.mp4", "conversations": [{"from": "human", "value": "x" * (32 << 20)}]})
    deep = "[" * 200_000 + "]" * 200_000   # under the size limit, deeper than Python's stack
    path.write_text("\n".join([_record("a.mp4"), huge, _record("b.mp4"), deep, _record("c.mp4")]))
    tracemalloc.start()
    try:
        records, errors = read_records(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.line for r in records] == [1, 3, 5]
    assert {e.line: e.message.split(":")[0] for e in errors} == {2: f"longer than {1 << 20} bytes", 4: "not JSON"}
    assert peak < 8 << 20, f"{peak} bytes held for a 32 MiB line"
    exact, _ = read_records(str(path), max_line_bytes=len(_record("a.mp4")))   # the limit itself is allowed
    assert [r.line for r in exact] == [1, 3, 5]


def test_epochs_count_usable_records_and_refused_videos_are_skipped_unrequested(trained):
    rows = _rows(trained, "metrics.jsonl")
    assert len(rows) == 2 * 2           # 2 epochs over the 2 usable records, not over the 7 parsed ones
    assert [r["epoch"] for r in rows] == [0, 1, 1, 2]   # the data position after each step
    assert all(r["applied"] and r["nonfinite_steps"] == 0 for r in rows)
    skipped = {r["line"]: r for r in _rows(trained, "skipped.jsonl")}
    assert sorted(skipped) == [2, 3, 4, 5, 6]
    for line in (3, 5, 6):
        assert skipped[line]["error_type"] == "InputNotAllowedError" and skipped[line]["stage"] == "open"
        assert "://" in skipped[line]["video"] and "is not enabled" in skipped[line]["message"]
    assert skipped[2]["error_type"] == "InputNotFoundError" and skipped[4]["error_type"] == "NotAVideoError"


def test_generate_applies_the_same_input_rules(trained, listener, capsys):
    from lma.generate import main

    port = listener[0]
    for video in (f"http://127.0.0.1:{port}/v.mp4", "local:///etc/passwd", "/dev/zero"):
        with pytest.raises(SystemExit, match="cannot read video: (InputNotAllowedError|NotAVideoError)"):
            main(["--model", str(trained), "--video", video, "--question", "what colour", "--device", "cpu"])
    with pytest.raises(SystemExit, match="InputNotFoundError.*Connect"):   # enabled: tried, and typed
        main(["--model", str(trained), "--video", f"http://127.0.0.1:{port + 1}/v.mp4", "--question", "q",
              "--allow-schemes", "http", "--device", "cpu"])
    assert not listener[1]()


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, models, data, monkeypatch):
    """Steps 2, 4 and 5 get a NaN loss (injected into the real forward): 2 and 4 are not applied
    and the run goes on; 5 is the second in a row, so the run stops with a typed error."""
    forward, calls = VideoLLM.forward, []

    def nan_on_some_steps(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) in (2, 4, 5):
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(VideoLLM, "forward", nan_on_some_steps)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteTrainingError, match="step 5: 2 steps in a row"):
        finetune(_config(models, data, out, "--max-steps", "8", "--save-every", "1", "--max-nonfinite-steps", "2"))
    rows = _rows(out, "metrics.jsonl")
    assert [r["applied"] for r in rows] == [True, False, True, False, False]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 1, 2, 3]
    saved = {int(p.name.split("-")[1]): p for p in checkpoint.checkpoints(out / "checkpoints")}
    assert sorted(saved) == [3, 4]      # the stopping step 5 wrote nothing (two kept: --keep-checkpoints)
    from safetensors.torch import load_file

    w3, w4 = (load_file(saved[s] / "model.safetensors") for s in (3, 4))
    assert all(torch.equal(w3[k], w4[k]) for k in w3)       # step 4 was not applied
    assert all(torch.isfinite(v).all() for v in w4.values())
    assert not (out / "adapter").exists()


def test_nonfinite_weights_are_never_written(tmp_path, models, data):
    """A student to fine-tune whose checkpoint holds a NaN: its steps are skipped, and neither a
    checkpoint nor the final model is ever written with it."""
    from student import LiteFrameModel

    student = LiteFrameModel.from_pretrained(models[0])
    with torch.no_grad():
        student.patch_embed.weight.view(-1)[0] = math.nan
    student.save_pretrained(tmp_path / "nan_student")
    out = tmp_path / "out"
    with pytest.raises(checkpoint.NonFiniteWeightsError,
                       match="not writing the checkpoint of step 1: NaN or inf in model student.patch_embed.weight"):
        finetune(_config((tmp_path / "nan_student", models[1]), data, out, "--train-student", "--max-steps", "3",
                         "--save-every", "1", "--max-nonfinite-steps", "5"))
    assert [r["applied"] for r in _rows(out, "metrics.jsonl")] == [False]
    assert checkpoint.checkpoints(out / "checkpoints") == [] and not (out / "adapter").exists()

