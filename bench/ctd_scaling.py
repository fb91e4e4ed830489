"""CTD on N GPUs: `torchrun -m student.train` over one store, per GPU count, as a user runs it.

    python3 bench/ctd_scaling.py --gpus 1,2,2:nosync,2:ray --clips 2048 --steps 120 --out /tmp/ctd-scaling

Writes a store shaped for the `vitb` preset (448 px JPEG q90 frames, float16 [64, 3584] targets,
the writer of bench/student.py), then per run (N GPUs; `N:nosync` adds --no-sync-steps, to price the
per-step CUDA sync; `N:bf16` adds --grad-reduce bf16; `N:ray` runs the Ray Train entry,
jobs.train_student, instead of torchrun) runs the trainer with NCCL, bf16, --compile and `--log-every 1`, and reads rank 0's metrics.jsonl:
steady-state clips/s (the trainer logs all ranks' clips) and data wait (median over steps after
the compile warm-up, away from epoch boundaries), their mean over the first two steps of each new
epoch, scaling efficiency per GPU, and MFU: clips/s x the student's training
FLOPs per clip (forward + backward, counted by torch's FlopCounterMode) over N x --peak-tflops.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_store(root: Path, clips: int) -> Path:
    """bench/student.py's store writer (loaded by path: bench/ is no package, and its file name is
    the `student` package's)."""
    if (root / "manifest.parquet").exists():
        return root
    spec = importlib.util.spec_from_file_location("bench_student", REPO / "bench" / "student.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from student.presets import preset_config

    module.write_bench_store(str(root), preset_config("vitb"), clips, 256 << 20, ["webdataset"])
    return root


def train_flops_per_clip(store: Path) -> float:
    """Forward + backward FLOPs of one clip through the student the trainer builds for this store."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from student import LiteFrameModel, config_for_store
    from student.data import read_store

    model = LiteFrameModel(config_for_store("vitb", read_store(str(store)).schema))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    c = model.config
    pixels = torch.randn(1, c.clip_frames, 3, *c.image_hw, device=device)
    with FlopCounterMode(display=False) as counter, torch.autocast(device.type, dtype=torch.bfloat16):
        model(pixels).float().square().mean().backward()
    return float(counter.get_total_flops())


def run(store: Path, out: Path, gpus: int, mode: str, args) -> list[dict]:
    """One training run: torchrun (mode "", "nosync": --no-sync-steps, "bf16": --grad-reduce bf16) or
    the Ray Train entry (mode "ray": jobs.train_student on a local Ray, one worker per GPU)."""
    launcher = ([sys.executable, "-m", "jobs.train_student", "--ray-workers", str(gpus), "--use-gpu",
                 "--address", "local"] if mode == "ray" else
                ["torchrun", "--standalone", f"--nproc-per-node={gpus}", "-m", "student.train"])
    cmd = launcher + [
        "--data", str(store), "--output", str(out), "--preset", "vitb", "--batch-size", str(args.batch_size),
        "--num-workers", str(args.workers), "--compile", "--max-steps", str(args.steps), "--warmup-steps", "10",
        "--log-every", "1", "--checkpoint-every", "0", "--eval-every", "0"] + (
        ["--no-sync-steps"] if mode == "nosync" else []) + (["--grad-reduce", "bf16"] if mode == "bf16" else [])
    subprocess.run(cmd, cwd=REPO, check=True, timeout=args.timeout)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summarise(rows: list[dict], gpus: int, mode: str, skip: int) -> dict:
    """Steady state and epoch boundaries (the first step of each new epoch and the step after it,
    found from the logged epoch) of one run's per-step metrics."""
    first = {r["step"] for prev, r in zip(rows, rows[1:]) if r.get("epoch") != prev.get("epoch")}
    near = first | {s + 1 for s in first}
    steady = [r for r in rows if r["step"] > skip and r["step"] not in near and "clips_per_s" in r]
    boundary = [r for r in rows if r["step"] in near and r["step"] > skip and "clips_per_s" in r]

    def over(rs, key, how):
        return how([r[key] for r in rs]) if rs else None

    # steady state: medians; boundary windows: means, so one stalled step shows
    return {"gpus": gpus, "launcher": "ray" if mode == "ray" else "torchrun", "sync_steps": mode != "nosync",
            "grad_reduce": "bf16" if mode == "bf16" else "fp32", "epoch_starts": sorted(first),
            "steady_steps": len(steady),
            "clips_per_s": over(steady, "clips_per_s", statistics.median),
            "data_wait": over(steady, "data_wait_frac", statistics.median), "boundary_steps": len(boundary),
            "boundary_clips_per_s": over(boundary, "clips_per_s", statistics.mean),
            "boundary_data_wait": over(boundary, "data_wait_frac", statistics.mean)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default="1,2",
                        help="runs: GPU counts; N:nosync adds --no-sync-steps, N:bf16 --grad-reduce bf16, "
                             "N:ray uses jobs.train_student")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="per-GPU dense bf16 peak for MFU (H100/H200 SXM datasheet: 989)")
    parser.add_argument("--clips", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--skip", type=int, default=15, help="steps of compile warm-up left out")
    parser.add_argument("--timeout", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ctd-scaling"))
    args = parser.parse_args(argv)
    store = bench_store(args.out / "store", args.clips)
    flops = train_flops_per_clip(store)
    print(f"training FLOPs per clip: {flops / 1e9:.1f} GFLOP", flush=True)
    rows = []
    for spec in args.gpus.split(","):
        gpus, _, mode = spec.partition(":")
        if mode not in ("", "nosync", "bf16", "ray"):
            parser.error(f"--gpus {spec}: the mode after ':' is nosync, bf16 or ray")
        metrics = run(store, args.out / f"run-{spec.replace(':', '-')}", int(gpus), mode, args)
        rows.append(summarise(metrics, int(gpus), mode, args.skip))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["clips_per_s"] / rows[0]["gpus"] if rows[0]["clips_per_s"] else None
    print("| GPUs | launcher | per-step sync | grad all-reduce | clips/s | per GPU vs first row | MFU | data wait "
          "| at epoch boundaries: clips/s | data wait |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        eff = r["clips_per_s"] / r["gpus"] / base if base and r["clips_per_s"] else None
        r["mfu"] = r["clips_per_s"] * flops / (r["gpus"] * args.peak_tflops * 1e12) if r["clips_per_s"] else None
        fmt = lambda v, f: format(v, f) if v is not None else "–"   # noqa: E731
        print(f"| {r['gpus']} | {r['launcher']} | {'yes' if r['sync_steps'] else 'no'} | {r['grad_reduce']} | "
              f"{fmt(r['clips_per_s'], '.0f')} | {fmt(eff, '.2f')} | {fmt(r['mfu'], '.3f')} | "
              f"{fmt(r['data_wait'], '.3f')} | "
              f"{fmt(r['boundary_clips_per_s'], '.0f')} | {fmt(r['boundary_data_wait'], '.3f')} |")
    (args.out / "summary.json").write_text(json.dumps({
        "rows": rows, "train_flops_per_clip": flops, "env": {k: os.environ.get(k) for k in ("COMMIT",)},
        "python": sys.version.split()[0]}, indent=1))


if __name__ == "__main__":
    main()
