"""The teacher stage on N GPUs of one node at once, frames decoded ahead (decode cannot limit).

    python3 bench/extract_scaling.py --gpus 2 --seconds 20 --json /tmp/extract-scaling.json

One process per GPU builds the job's own TeacherStage (InternViT-300M shape, random weights, bf16,
`--teacher-compile`'s one-graph compile) and warms it up; then, in phases of 1, 2, ... N GPUs at
once (a barrier starts and ends each), the first n processes call it back to back from 2 threads, as
the job's teacher actor does, for --seconds over host batches of random frames. What one node's
shared parts (cores, host memory, PCIe) take from each GPU shows as clips/s per GPU falling from
the 1-GPU phase; the real job (decode on the node's cores) is `jobs.extract` itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import extract as bench_extract  # noqa: E402  (bench/extract.py: the stage as the job builds it)


def worker(rank: int, gpus: int, teacher: str, args, barrier, results) -> None:
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_grad_enabled(False)
    shape = bench_extract.INTERNVIT_300M if args.shape == "internvit-300m" else bench_extract.TINY
    cfr = 4
    batches = bench_extract._host_batches(4, args.batch_frames // cfr, cfr, shape["image_size"])
    stage = bench_extract._stage(Path(teacher), device, "compile" if device.type == "cuda" else "eager",
                                 args.frames_per_forward)
    for b in batches[:2]:
        stage(dict(b))
    for n in range(1, gpus + 1):
        barrier.wait()
        if rank < n:
            clips_s, clips = bench_extract._stage_rate(stage, batches, 2, args.seconds)
            results.put({"phase_gpus": n, "rank": rank, "clips_per_s": clips_s, "clips": clips})
        barrier.wait()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count() or 1)
    parser.add_argument("--shape", choices=("internvit-300m", "tiny"), default="internvit-300m")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch-frames", type=int, default=256, help="frames per stage call (the job's batch)")
    parser.add_argument("--frames-per-forward", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shape = bench_extract.INTERNVIT_300M if args.shape == "internvit-300m" else bench_extract.TINY
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.gpus), ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        teacher = bench_extract.make_teacher_dir(Path(tmp) / "teacher", shape, device)
        torch.cuda.empty_cache() if device.type == "cuda" else None
        procs = [ctx.Process(target=worker, args=(r, args.gpus, str(teacher), args, barrier, results))
                 for r in range(args.gpus)]
        for p in procs:
            p.start()
        rows = [results.get(timeout=1800) for _ in range(args.gpus * (args.gpus + 1) // 2)]
        for p in procs:
            p.join()
    rows.sort(key=lambda r: (r["phase_gpus"], r["rank"]))
    alone = next(r["clips_per_s"] for r in rows if r["phase_gpus"] == 1)
    print("| GPUs at once | clips/s (all) | clips/s per GPU | per GPU vs 1 GPU alone |")
    print("|---:|---:|---:|---:|")
    for n in range(1, args.gpus + 1):
        per = [r["clips_per_s"] for r in rows if r["phase_gpus"] == n]
        print(f"| {n} | {sum(per):.1f} | {' / '.join(f'{c:.1f}' for c in per)} | {sum(per) / n / alone:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                         "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                            time.gmtime()),
                                         "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
                                        indent=1))
    return rows


if __name__ == "__main__":
    main()
