"""The extraction benches the GPU runs use stay runnable on a CPU (tiny teacher, short videos): a
broken bench would cost device time. Speed is never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.test_fp8 import cpu_scaled_mm

REPO = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_extract_job_bench_runs_the_job_and_samples_resources(tmp_path):
    out = tmp_path / "job.json"
    _bench("extract_job.py", "--runs", "cpu:0", "--videos", "2", "--copies", "2", "--seconds", "4", "--shape", "tiny",
           "--cpus-per-gpu", "2", "--warmup-videos", "0", "--json", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["mode"] == "cpu" and row["decode_cpu_slots"] is None and row["videos_ok"] == 4 and row["clips_written"] == row["store_clips"] > 0
    assert row["clips_by_decoder"] == {"ffmpeg": row["clips_written"]} and row["cpu_s_per_clip"] > 0
    roles = row["cpu_s_per_clip_by_process"]
    assert roles and any(role.startswith("ray::") for role in roles), roles      # Ray workers by title
    # a share of the machine's CPU (a child seen alive and then reaped counts twice: bounded, not exact)
    assert 0 < sum(roles.values()) <= 2 * row["cpu_s_per_clip"]
    assert row["teacher_busy_timeline"].startswith("per 30 s: ")
    assert row["clips_per_second_timeline"].startswith("per 30 s: ")
    assert row["decoded_per_second_timeline"].startswith("per 30 s: ")
    assert "while_decoding" in row and "steady_cpu_s_per_clip" in row   # None on a run shorter than 3 windows
    samples = row["resources"]["samples"]
    assert samples and all(len(s) == 5 and 0 <= s[2] <= 2 for s in samples)    # at most the run's 2 Ray CPUs
    assert all(isinstance(s[4], int) and s[4] >= 0 for s in samples)


def test_extract_job_run_specs():
    sys.path.insert(0, str(REPO / "bench"))
    from extract_job import Run

    assert Run.parse("auto:2:6") == Run("auto", 2, 6) and str(Run.parse("auto:2:6")) == "auto-2-6"
    assert Run.parse("cpu:1") == Run("cpu", 1, None) and Run.parse("cpu") == Run("cpu", 0, None)


def test_extract_job_names_process_roles():
    sys.path.insert(0, str(REPO / "bench"))
    from extract_job import process_role

    assert process_role(["ray::MapWorker(MapBatches(TeacherStage)).__init__", ""], "ray::MapWorker") == \
        "ray::MapWorker(MapBatches(TeacherStage))"
    assert process_role(["/usr/bin/python3", "-m", "jobs.extract", "--input"], "python3") == "python -m jobs.extract"
    assert process_role(["/x/.venv/bin/python", "/x/bench/extract_job.py"], "python") == "python extract_job.py"
    assert process_role([""], "ffmpeg-linux-x8") == "ffmpeg-linux-x8"     # no command line: the kernel's name


def test_extract_scaling_bench_runs_one_process_per_device(tmp_path):
    out = tmp_path / "scaling.json"
    _bench("extract_scaling.py", "--gpus", "2", "--shape", "tiny", "--seconds", "1", "--batch-frames", "8",
           "--frames-per-forward", "8", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["phase_gpus"], r["rank"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    assert all(r["clips"] > 0 for r in rows)


@cpu_scaled_mm
def test_extract_bench_loads_a_static_fp8_teacher(tmp_path, monkeypatch):
    """bench/extract.py's `-fp8static` variant: a bf16 teacher calibrated on its own clips, then FP8 with
    those scales (CPU `_scaled_mm` runs the math; the FP8 device check is faked)."""
    import pipeline.teacher

    sys.path.insert(0, str(REPO / "bench"))
    import extract as bench_extract

    monkeypatch.setattr(pipeline.teacher, "fp8_unsupported_reason", lambda device: None)
    cpu = torch.device("cpu")
    path = bench_extract.make_teacher_dir(tmp_path / "teacher", bench_extract.TINY, cpu)
    teacher = bench_extract._load_teacher(path, cpu, "eager-fp8static", 8)
    assert teacher.fp8 and teacher.describe()["dtype"] == "float8-static"
