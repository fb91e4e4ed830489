"""Decode speed: delivered frames per second, and per CPU core, for the ways of getting sampled frames.

    python bench/decode.py                                   # 60 s 1080p + 720p H.264 and ../shared/videos
    python bench/decode.py --seconds 6 --heights 360 --no-shared   # CPU smoke run (< 1 min)

Methods, per video:
  a_null        `ffmpeg -i X -map 0:v:0 -f null -`: decode every frame, nothing else (the floor)
  a_same        the ffmpeg CLI doing ours_full's work: every frame through the same orientation, crop
                and resize filters to raw RGB24 (same decoder and filter threads), into /dev/null
                (no select filter, no pipe, no Python): a_same / a_null is ffmpeg's own resize and
                RGB cost, ours_full / a_same our overhead
  a_same ft1    a_same with a one-thread filter graph (decoder threads unchanged): does slicing the
                resize over every core pay at full rate, or only cost CPU?
  b_naive@2     decode every frame to full-size RGB through a pipe, keep the ones nearest the 2 fps
                sample times in Python, resize those with Pillow (bicubic shorter side + centre crop)
  ours@F        pipeline.video.decode_frames at F fps (probe included, cold): select inside ffmpeg,
                input seeking between keyframes, crop+scale inside ffmpeg
  ours_full     decode_frames at every frame's time (full rate) through the same path
  ours@2 xN     N processes at once (N = `--parallel`, default all cores), each decoding the video at
                2 fps with single-threaded ffmpeg: the node's throughput when every core has a worker
frames/s = delivered frames / wall time; frames/s/core = delivered frames / CPU seconds (ffmpeg
children from getrusage(RUSAGE_CHILDREN) plus this process), i.e. the rate one fully busy core gives.
Generated videos: ffmpeg testsrc2 + index code + mild temporal grain, libx264 veryfast crf 20, GOP
`--gop-seconds`; `exact` checks the delivered frames' coded indices (generated videos only).
Markdown table on stdout; `--json FILE` writes the rows. Needs only ffmpeg (imageio-ffmpeg works),
numpy, Pillow and this repo's pipeline package (no Ray, webdataset or zarr).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import parse_config, to_dict  # noqa: E402
from pipeline.ffmpeg import ffmpeg_exe  # noqa: E402
from pipeline.samples import frame_index, make_video  # noqa: E402
from pipeline.video import chain_text, clear_probe_cache, decode_frames, geometry, probe  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "videos"


@dataclass
class DecodeBench:
    """Decode throughput of sampled frames (see module docstring)."""

    seconds: float = field(default=60.0, metadata={"help": "length of each generated video"})
    heights: tuple[int, ...] = field(default=(1080, 720), metadata={"help": "generated 16:9 videos, e.g. 1080,720"})
    fps: float = field(default=30.0, metadata={"help": "frame rate of the generated videos"})
    gop_seconds: float = field(default=2.0, metadata={"help": "keyframe interval of the generated videos"})
    noise: int = field(default=4, metadata={"help": "temporal grain of the generated videos (bitrate realism)"})
    sample_fps: tuple[float, ...] = field(default=(1.0, 2.0, 4.0), metadata={"help": "sampling rates for ours"})
    size: int = field(default=448, metadata={"help": "output frame side (shorter side + centre crop)"})
    threads: int = field(default=0, metadata={"help": "ffmpeg decoder threads, 0 = ffmpeg's choice"})
    shared: bool = field(default=True, metadata={"help": "also bench ../shared/videos (except corrupted.mp4)"})
    naive: bool = field(default=True, metadata={"help": "run the naive decode-everything baseline"})
    full: bool = field(default=True, metadata={"help": "run ours at full frame rate"})
    parallel: int | None = field(default=None, metadata={
        "help": "processes for the node-throughput row (default: all cores; 0: skip)"})
    workdir: str = field(default="/tmp/liteframe-bench", metadata={"help": "where generated videos are cached"})
    json: str | None = field(default=None, metadata={"help": "write rows as JSON to this file"})


class Meter:
    """Wall time and CPU seconds (this process + reaped ffmpeg children) of a block."""

    def __enter__(self):
        self.t = time.perf_counter()
        self.c = self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        self.cpu = self._cpu() - self.c

    @staticmethod
    def _cpu() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def null_decode(path: str, threads: int) -> int:
    """(a): every frame decoded by ffmpeg and discarded."""
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-threads", str(threads), "-i", path, "-map", "0:v:0",
           "-f", "null", "-"]
    subprocess.run(cmd, check=True, timeout=3600)
    return probe(path).num_frames


def same_work(path: str, size: int, threads: int, graph_threads: int | None = None) -> int:
    """(a'): every frame through decode_frames' filters, by the ffmpeg CLI alone; graph_threads
    overrides the filter graph's threads (decode_frames: `threads` when > 0, else ffmpeg's choice)."""
    info = probe(path)
    _, chain = geometry(info, size, "shorter_center_crop")
    graph_threads = graph_threads or (threads if threads > 0 else None)
    graph_threads = ["-filter_complex_threads", str(graph_threads)] if graph_threads else []
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", *graph_threads, "-noautorotate", "-threads", str(threads),
           "-i", path, "-filter_complex", f"[0:{info.stream}]{chain_text(chain)}[out]", "-map", "[out]",
           "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-y", os.devnull]
    subprocess.run(cmd, check=True, timeout=3600)
    return info.num_frames


def naive_decode(path: str, times: np.ndarray, size: int, threads: int) -> np.ndarray:
    """(b): full-size RGB of every frame through a pipe; Python keeps the nearest to each time."""
    from PIL import Image

    info = probe(path)
    rel = np.arange(info.num_frames) / info.avg_fps  # CFR assumption: what naive code does
    want = {}
    for k, t in enumerate(times):
        want.setdefault(int(np.argmin(np.abs(rel - t))), []).append(k)
    out = np.empty((len(times), size, size, 3), np.uint8)
    w, h = info.width, info.height
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-threads", str(threads), "-i", path, "-map", "0:v:0",
           "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        for i in range(info.num_frames):
            buf = proc.stdout.read(w * h * 3)
            if len(buf) < w * h * 3:
                break
            if i in want:
                img = Image.frombuffer("RGB", (w, h), buf)
                s = size / min(w, h)
                img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
                x0, y0 = (img.width - size) // 2, (img.height - size) // 2
                arr = np.asarray(img.crop((x0, y0, x0 + size, y0 + size)))
                for k in want[i]:
                    out[k] = arr
    return out


def index_exact(frames: np.ndarray, times: np.ndarray, path: str) -> bool:
    """Each delivered frame's coded index is a frame nearest its time (either one on an exact tie)."""
    info = probe(path)
    rel = np.arange(info.num_frames) / info.avg_fps
    got = np.array([frame_index(f) for f in frames])
    best = np.array([np.abs(rel - t).min() for t in times])
    return bool(np.all(np.abs(rel[np.clip(got, 0, len(rel) - 1)] - times) <= best + 1e-6))


def _worker(job) -> bool | None:
    """One node-throughput worker: a cold single-threaded decode at 2 fps."""
    path, times, size, coded = job
    got = decode_frames(path, times, size=size, threads=1)
    return index_exact(got.frames, times, path) if coded else None


def generated(cfg: DecodeBench) -> list[tuple[str, str]]:
    root = Path(cfg.workdir)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for h in cfg.heights:
        w = int(round(h * 16 / 9 / 2)) * 2
        name = f"gen_{h}p{cfg.fps:g}_{cfg.seconds:g}s_gop{cfg.gop_seconds:g}_n{cfg.noise}.mp4"
        path = root / name
        if not path.exists():
            print(f"generating {name} ...", file=sys.stderr, flush=True)
            tmp = root / ("tmp-" + name)
            make_video(tmp, seconds=cfg.seconds, fps=cfg.fps, size=(w, h), gop=max(1, round(cfg.gop_seconds * cfg.fps)),
                       noise=cfg.noise, timeout=3600)
            tmp.rename(path)
        out.append((f"{h}p H.264 {cfg.seconds:g}s (generated)", str(path)))
    return out


def bench_video(label: str, path: str, cfg: DecodeBench, coded: bool) -> list[dict]:
    info = probe(path)
    mbps = os.path.getsize(path) * 8 / max(info.duration, 1e-9) / 1e6
    desc = f"{info.codec} {info.width}x{info.height} {info.avg_fps:.3g}fps {info.duration:.1f}s {mbps:.1f}Mb/s"
    rows = []

    def row(method, frames, m, exact=None):
        rows.append({"video": label, "source": desc, "method": method, "frames": int(frames),
                     "wall_s": round(m.wall, 3), "cpu_s": round(m.cpu, 3),
                     "fps": round(frames / m.wall, 1) if m.wall else None,
                     "fps_per_core": round(frames / m.cpu, 1) if m.cpu else None, "exact": exact})
        print(f"  {label:<34} {method:<10} {frames:>6} frames {m.wall:7.2f} s wall {m.cpu:7.2f} s cpu",
              file=sys.stderr, flush=True)

    with Meter() as m:
        n = null_decode(path, cfg.threads)
    row("a_null", n, m)
    with Meter() as m:
        n = same_work(path, cfg.size, cfg.threads)
    row("a_same", n, m)
    if cfg.threads != 1:
        with Meter() as m:
            n = same_work(path, cfg.size, cfg.threads, graph_threads=1)
        row("a_same ft1", n, m)

    def sample_times(f):
        return np.arange(0.0, info.last_time + 1e-9, 1.0 / f)

    def check(frames, times):
        return index_exact(frames, times, path) if coded else None

    if cfg.naive:
        times = sample_times(2.0)
        with Meter() as m:
            frames = naive_decode(path, times, cfg.size, cfg.threads)
        row("b_naive@2", len(times), m, check(frames, times))
    for f in cfg.sample_fps:
        times = sample_times(f)
        clear_probe_cache()
        with Meter() as m:
            got = decode_frames(path, times, size=cfg.size, threads=cfg.threads)
        row(f"ours@{f:g}", len(times), m, check(got.frames, times))
        del got
    workers = os.cpu_count() if cfg.parallel is None else cfg.parallel
    if workers:
        times = sample_times(2.0)
        with Meter() as m, ProcessPoolExecutor(workers) as pool:
            oks = list(pool.map(_worker, [(path, times, cfg.size, coded)] * workers))
        row(f"ours@2 x{workers}", workers * len(times), m, all(oks) if coded else None)
    if cfg.full:
        times = np.arange(info.num_frames) / info.avg_fps
        clear_probe_cache()
        with Meter() as m:
            got = decode_frames(path, times, size=cfg.size, threads=cfg.threads)
        row("ours_full", len(times), m, check(got.frames, times))
        del got
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| video | source | method | frames | wall s | frames/s | CPU s | frames/s/core | exact |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        exact = "" if r["exact"] is None else ("yes" if r["exact"] else "NO")
        lines.append(f"| {r['video']} | {r['source']} | {r['method']} | {r['frames']} | {r['wall_s']} | {r['fps']} | "
                     f"{r['cpu_s']} | {r['fps_per_core']} | {exact} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> str:
    """The issue's goals: ours@2 vs naive (>= 3x), ours_full vs null decode (within 1.1x), by wall
    time and by CPU time (the latter is what a node full of workers sees)."""
    out = []
    for video in dict.fromkeys(r["video"] for r in rows):
        by = {r["method"]: r for r in rows if r["video"] == video}
        parts = []
        if "ours@2" in by and "b_naive@2" in by:
            o, n = by["ours@2"], by["b_naive@2"]
            parts.append(f"ours@2 vs naive: {n['wall_s'] / o['wall_s']:.2f}x faster by wall, "
                         f"{n['cpu_s'] / max(o['cpu_s'], 1e-9):.2f}x by CPU")
        for a, b, what in (("ours_full", "a_null", "ours_full / null decode"),
                           ("a_same", "a_null", "ffmpeg's resize+RGB (a_same / a_null)"),
                           ("ours_full", "a_same", "our overhead (ours_full / a_same)")):
            if a in by and b in by:
                parts.append(f"{what}: {by[a]['wall_s'] / by[b]['wall_s']:.2f}x wall, "
                             f"{by[a]['cpu_s'] / max(by[b]['cpu_s'], 1e-9):.2f}x CPU")
        if parts:
            out.append(f"- {video}: " + "; ".join(parts))
    return "\n".join(out)


def main(argv=None) -> None:
    cfg = parse_config(DecodeBench, argv)
    videos = [(label, path, True) for label, path in generated(cfg)]
    if cfg.shared and SHARED.is_dir():
        videos += [(p.name, str(p), False) for p in sorted(SHARED.iterdir())
                   if p.suffix in (".mp4", ".mkv", ".webm", ".mov", ".avi", ".ts") and p.name != "corrupted.mp4"]
    rows = []
    for label, path, coded in videos:
        rows += bench_video(label, path, cfg, coded)
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "ffmpeg": ffmpeg_exe(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parents[1]).stdout.strip()}
    print(f"Decode bench, {env['date']}, {env['cores']} cores ({env['cpu']}), commit {env['commit']}, "
          f"ffmpeg {env['ffmpeg']}, output {cfg.size}px, threads {cfg.threads or 'auto'}\n")
    print(markdown(rows))
    print("\n" + ratios(rows))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"env": env, "config": to_dict(cfg), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
