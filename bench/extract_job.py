"""The real extraction job on a GPU node, per decode mode and GPU count, with the node's CPU cost.

    python3 bench/extract_job.py --runs cpu:2,auto:2,auto:1 --videos 24 --copies 5 --json /tmp/job.json

Inputs: --videos one-minute synthetic H.264 videos (720p and 1080p alternating, 30 fps, grain so
the codec works as on camera footage), each hard-linked --copies times under other names (each name
draws its own clips). Teacher: InternViT-300M shape, random weights, bf16, compiled (the job's
default on GPUs). Per run MODE:GPUS, `jobs.extract` (views 2, 1-4 fps, WebDataset) on a fresh local
Ray of GPUS GPUs and --cpus-per-gpu CPUs each; the machine's CPU-seconds (/proc/stat, every
process) are read around the run, and sampled every 5 s with Ray's CPUs and object store in use.

Decode runs ahead while the teachers load and compile, so a short run reads as teacher-bound. Two
things keep that head start short: an unmeasured warm-up job on --warmup-videos first fills
torch's compile cache (the measured runs' teachers start in seconds, not a minute), and
--object-store-gb can cap what decode may buffer (Ray's default otherwise; a cap too small for the
in-flight batches stalls the pipeline: see bench/RESULTS.md). The job's `teacher_busy_timeline`
shows when the head start was used up; its `while_decoding` (the windows past the teachers' start
and before decode's last) is the steady state: the bench divides the machine's cores busy then by the
clips/s decode finished then. (Dividing by the teachers' rate instead, over the later half of the
windows, read low: there the teachers drained the head start with the decoders already idle.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


def cpu_seconds() -> float:
    """Busy CPU-seconds of the whole machine so far (user + nice + system + irq + softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU-seconds so far: user and system time, its reaped children's included, so an
    ffmpeg call's CPU lands on the decode worker that waited for it)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, rest = stat.read_text().rsplit(")", 1)                # "pid (comm", fields from state on
            argv = (stat.parent / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:              # the process ended meanwhile
            continue
        cpu = sum(int(v) for v in rest.split()[11:15]) / tick
        out[int(stat.parent.name)] = (process_role(argv, head.split("(", 1)[1]), cpu)
    return out


def process_role(argv: list[str], comm: str) -> str:
    """`ray::<title>` for a Ray worker, `python <script or -m module>`, else the program's name (its
    kernel name where the command line is empty: imageio-ffmpeg's binary shows none)."""
    if argv[0].startswith("ray::"):          # `ray::MapWorker(MapBatches(TeacherStage)).__init__`: no method
        return argv[0].split()[0].split(".", 1)[0]
    name = Path(argv[0]).name or comm
    if name.startswith("python") and len(argv) > 1:
        return f"python {' '.join(argv[1:3]) if argv[1] == '-m' else Path(argv[1]).name}"
    return name


class ProcessCpu:
    """CPU-seconds per role over a run, from `process_cpu` snapshots (`take` each sample): a process
    counts from its first snapshot (0 if it started later) to its last, under the last role it had
    that was not `ray::IDLE` (Ray's task workers rename themselves per task and idle in between;
    actors are gone by the run's end). A process that ends loses what it did after its last snapshot;
    a child seen alive and then reaped counts twice (itself, then in its parent). Where the CPU goes,
    not an exact sum."""

    def __init__(self):
        self.first = {pid: cpu for pid, (_, cpu) in process_cpu().items()}
        self.last: dict[int, tuple[str, float]] = {}

    def take(self) -> int:
        """Snapshot now; returns the ffmpeg processes running (the CPU decodes in flight: one per
        ffmpeg slot or decode task in use)."""
        ffmpeg = 0
        for pid, (role, cpu) in process_cpu().items():
            known = self.last.get(pid)
            self.last[pid] = (known[0] if known and role == "ray::IDLE" else role, cpu)
            ffmpeg += role.startswith("ffmpeg")
        return ffmpeg

    def by_role(self) -> dict[str, float]:
        """CPU-seconds per role, largest first."""
        roles: dict[str, float] = {}
        for pid, (role, cpu) in self.last.items():
            roles[role] = roles.get(role, 0.0) + cpu - self.first.get(pid, 0.0)
        return dict(sorted(roles.items(), key=lambda kv: -kv[1]))


def make_one(job: tuple[str, int, float]) -> None:
    from pipeline.samples import make_video

    path, height, seconds = job
    make_video(path, seconds=seconds, fps=30.0, size=(int(round(height * 16 / 9 / 2)) * 2, height), gop=60,
               noise=4, timeout=900)


def make_inputs(directory: Path, videos: int, copies: int, seconds: float) -> Path:
    originals = directory / "originals"
    jobs = [(str(originals / f"v{i:03d}_{1080 if i % 2 else 720}p.mp4"), 1080 if i % 2 else 720, seconds)
            for i in range(videos)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(make_one, jobs))
    inputs = directory / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for copy in range(copies):
        for path, _, _ in jobs:
            os.link(path, inputs / f"c{copy}_{Path(path).name}")
    return inputs


class ResourceSampler(threading.Thread):
    """Every `every` s while a run goes: [unix time, machine cores busy, Ray CPUs in use, object store
    GiB in use, ffmpeg processes], so a slow run shows whether cores, Ray's CPU slots, the object store
    or the decode slots ran out (the H200 x2's 2-GPU run left 8 of 32 cores idle while decode-bound:
    the ffmpeg count says whether its 26 ffmpeg slots were in use)."""

    def __init__(self, every: float = 5.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.halt = every, [], threading.Event()
        self.processes = ProcessCpu()

    def run(self) -> None:
        import ray

        last_t, last_cpu = time.time(), cpu_seconds()
        total = ray.cluster_resources()
        while not self.halt.wait(self.every):
            now, cpu, free = time.time(), cpu_seconds(), ray.available_resources()
            self.samples.append([round(now, 1), round((cpu - last_cpu) / (now - last_t), 2),
                                 total.get("CPU", 0) - free.get("CPU", 0),
                                 round((total.get("object_store_memory", 0) - free.get("object_store_memory", 0))
                                       / 2**30, 2), self.processes.take()])
            last_t, last_cpu = now, cpu

    def stop(self) -> tuple[list[list[float]], dict[str, float]]:
        """The samples, and CPU-seconds per process role over the run."""
        self.halt.set()
        self.join()
        self.processes.take()
        return self.samples, self.processes.by_role()


@dataclass(frozen=True)
class Run:
    """One measured run, `MODE:GPUS[:SLOTS]` on the command line: SLOTS sets --decode-cpu-slots (the
    ffmpeg calls beside NVDEC's per GPU; fewer push more videos to NVDEC, at the risk of starving the
    teacher)."""

    mode: str
    gpus: int
    slots: int | None = None

    @classmethod
    def parse(cls, spec: str) -> "Run":
        mode, gpus, slots = (spec.split(":") + ["", ""])[:3]
        return cls(mode, int(gpus or 0), int(slots) if slots else None)

    def __str__(self) -> str:
        return f"{self.mode}-{self.gpus}" + (f"-{self.slots}" if self.slots is not None else "")


def run(inputs: Path, teacher: Path, out: Path, spec: Run, args) -> dict:
    import ray

    from jobs.extract import ExtractConfig, extract

    mode, gpus = spec.mode, spec.gpus
    cpus = max(gpus, 1) * args.cpus_per_gpu
    store_bytes = int(args.object_store_gb * 1e9) if args.object_store_gb else None
    ray.init(address="local", num_gpus=gpus, num_cpus=cpus, object_store_memory=store_bytes, include_dashboard=False)
    try:
        cfg = ExtractConfig(input=str(inputs), output=str(out), teacher=str(teacher), views=2, fps=(1.0, 4.0),
                            formats=("webdataset",), decode_device=mode, decode_cpu_slots=spec.slots,
                            ray_address="auto")
        sampler = ResourceSampler()
        sampler.start()
        before, t0 = cpu_seconds(), time.time()
        try:
            summary = extract(cfg)
        finally:
            samples, roles = sampler.stop()
        cpu, wall = cpu_seconds() - before, time.time() - t0
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)      # runs of 10^4 clips write GBs
    clips = summary["clips_written"]
    return {"mode": mode, "gpus": gpus, "decode_cpu_slots": spec.slots, "cpus": cpus, "wall_s": wall, "machine_cpu_s": cpu,
            "cpu_s_per_clip": cpu / clips if clips else None, **summary,
            # where the machine's CPU went (the ten largest roles): decode workers, teachers, writers, Ray
            "cpu_s_per_clip_by_process": {role: round(s / clips, 4) for role, s in list(roles.items())[:10]}
            if clips else None,
            "steady_cpu_s_per_clip": steady_cpu_per_clip(summary.get("while_decoding"), samples),
            "resources": {"columns": ["unix_time", "machine_cores_busy", "ray_cpus_used", "object_store_gib",
                                      "ffmpeg_processes"],
                          "samples": samples}}


def steady_cpu_per_clip(steady: dict | None, samples: list[list[float]]) -> float | None:
    """Machine CPU-seconds per decoded clip while decoding (the job's `while_decoding`): the cores busy
    in the samples taken then, over the clips/s decode finished then."""
    cores = [s[1] for s in samples if steady and steady["from_unix_time"] <= s[0] <= steady["to_unix_time"]]
    if not cores or not steady["decoded_per_second"]:
        return None
    return sum(cores) / len(cores) / steady["decoded_per_second"]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="cpu:1,auto:1",
                        help="MODE:GPUS[:SLOTS], comma-separated (mode: cpu, auto, gpu; SLOTS: --decode-cpu-slots)")
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each synthetic video")
    parser.add_argument("--cpus-per-gpu", type=int, default=16, help="Ray CPUs per GPU (per run without GPUs)")
    parser.add_argument("--object-store-gb", type=float, help="cap on Ray's object store (default: Ray's own)")
    parser.add_argument("--warmup-videos", type=int, default=4, help="videos of the unmeasured warm-up job (0: none)")
    parser.add_argument("--shape", choices=("internvit-300m", "tiny"), default="internvit-300m")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import torch

    import extract as bench_extract    # bench/extract.py: the teacher checkpoint it benchmarks

    shape = bench_extract.INTERNVIT_300M if args.shape == "internvit-300m" else bench_extract.TINY
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher = bench_extract.make_teacher_dir(work / "teacher", shape, torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"))
        inputs = make_inputs(work, args.videos, args.copies, args.seconds)
        print(f"inputs: {len(list(inputs.iterdir()))} videos", flush=True)
        if args.warmup_videos:
            warmup = work / "warmup"
            warmup.mkdir()
            for path in sorted((work / "originals").iterdir())[:args.warmup_videos]:
                os.link(path, warmup / path.name)
            first = Run.parse(args.runs.split(",")[0])
            print("warm-up:", json.dumps(run(warmup, teacher, work / "store-warmup", first, args)), flush=True)
        for spec in map(Run.parse, args.runs.split(",")):
            rows.append(run(inputs, teacher, work / f"store-{spec}", spec, args))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                                 "cpus": os.cpu_count(), "commit": os.environ.get("COMMIT")}, indent=1))
    print("| decode | GPUs | CPUs | clips | by decoder | clips/s (teacher ready) | teacher busy | busy timeline "
          "| machine CPU-s per clip | while decoding: clips/s | decoded/s | teacher busy | CPU-s per decoded clip |")
    print("|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        steady = r["while_decoding"] or {}
        cpu = r["steady_cpu_s_per_clip"]
        slots = "" if r["decode_cpu_slots"] is None else f" ({r['decode_cpu_slots']} CPU slots)"
        print(f"| {r['mode']}{slots} | {r['gpus']} | {r['cpus']} | {r['clips_written']} | {r['clips_by_decoder']} | "
              f"{r['clips_per_second_teacher_ready']} | {r['teacher_busy_fraction']} | {r['teacher_busy_timeline']} | "
              f"{r['cpu_s_per_clip']:.3f} | {steady.get('clips_per_second')} | {steady.get('decoded_per_second')} | "
              f"{steady.get('teacher_busy')} | {'–' if cpu is None else format(cpu, '.3f')} |")
    return rows


if __name__ == "__main__":
    main()
