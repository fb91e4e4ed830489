"""GPU decode (pipeline.nvdec) against the CPU path (pipeline.video) on the same files and requests.

    python bench/nvdec.py --json out.json                       # on a GPU with PyNvVideoCodec
    python bench/nvdec.py --videos DIR --sessions 1,2,4,8

Per video: exactness at 2 fps (same frame timestamps as the CPU path; PSNR and max |diff| of the
frames), then delivered frames/s and CPU seconds per frame for each sampling rate (and every frame),
NVDEC vs the CPU path with one ffmpeg thread (the job's decode task). Last, `--sessions` threads each
decoding the first generated video at 2 fps at once: a GPU's NVDEC throughput with several sessions.
Generated videos: 60 s 1080p and 720p H.264 (`pipeline.samples.make_video`, GOP 2 s); `--videos`
adds every video file of a folder. CPU seconds = this process (NVDEC's host work, the demuxer)
plus reaped ffmpeg children.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import Meter  # noqa: E402
from pipeline import nvdec  # noqa: E402
from pipeline.config import parse_config, to_dict  # noqa: E402
from pipeline.samples import make_video  # noqa: E402
from pipeline.video import clear_probe_cache, decode_frames, probe  # noqa: E402

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".ts", ".avi")


@dataclass
class NvdecBench:
    """NVDEC vs CPU decode of sampled frames (see module docstring)."""

    seconds: float = field(default=60.0, metadata={"min": 1, "help": "length of each generated video"})
    heights: tuple[int, ...] = field(default=(1080, 720), metadata={"help": "generated 16:9 H.264 videos"})
    videos: str | None = field(default=None, metadata={"help": "also every video file in this folder"})
    sample_fps: tuple[float, ...] = field(default=(1.0, 2.0, 4.0), metadata={"help": "sampling rates"})
    full: bool = field(default=True, metadata={"help": "also every frame"})
    size: int = field(default=448, metadata={"help": "output side (shorter side + centre crop)"})
    sessions: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata={"help": "concurrent NVDEC sessions to try"})
    workdir: str = field(default="/tmp/liteframe-bench", metadata={"help": "where generated videos are cached"})
    json: str | None = field(default=None, metadata={"help": "write rows as JSON to this file"})


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def generated(cfg: NvdecBench) -> list[Path]:
    root = Path(cfg.workdir)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for h in cfg.heights:
        path = root / f"nvdec_{h}p30_{cfg.seconds:g}s.mp4"
        if not path.exists():
            tmp = root / ("tmp-" + path.name)
            make_video(tmp, seconds=cfg.seconds, fps=30.0, size=(int(round(h * 16 / 9 / 2)) * 2, h), gop=60, noise=4,
                       timeout=3600)
            tmp.rename(path)
        out.append(path)
    return out


def bench_video(path: Path, cfg: NvdecBench) -> list[dict]:
    info = probe(path)
    label = f"{path.name} ({info.codec} {info.pix_fmt} {info.width}x{info.height} {info.duration:.0f}s)"
    reason = nvdec.unsupported_reason(info)
    rows: list[dict] = []
    if reason:
        return [{"video": label, "method": "nvdec", "note": f"CPU path: {reason}"}]

    def times_at(f: float) -> np.ndarray:
        return np.arange(0.0, info.last_time + 1e-9, 1.0 / f)

    times = times_at(2.0)
    try:
        gpu = nvdec.decode_frames(path, times, size=cfg.size, info=info)
    except nvdec.NvdecFallback as e:
        return [{"video": label, "method": "nvdec", "note": f"fallback: {e}"}]
    cpu = decode_frames(path, times, size=cfg.size, info=info, threads=1)
    diff = np.abs(gpu.frames.astype(np.int16) - cpu.frames.astype(np.int16))
    rows.append({"video": label, "method": "exactness@2", "frames": len(times),
                 "same_timestamps": bool(np.array_equal(gpu.timestamps, cpu.timestamps)),
                 "psnr_db": round(psnr(gpu.frames, cpu.frames), 2), "max_abs_diff": int(diff.max()),
                 "mean_abs_diff": round(float(diff.mean()), 3)})
    rates = [(f"@{f:g}", times_at(f)) for f in cfg.sample_fps]
    if cfg.full:
        rates.append(("full", np.arange(info.num_frames) / info.avg_fps))
    for name, ts in rates:
        for method, run in (("nvdec", lambda: nvdec.decode_frames(path, ts, size=cfg.size, info=info)),
                            ("cpu 1 thread", lambda: decode_frames(path, ts, size=cfg.size, info=info, threads=1))):
            clear_probe_cache()
            with Meter() as m:
                run()
            rows.append({"video": label, "method": f"{method} {name}", "frames": len(ts), "wall_s": round(m.wall, 3),
                         "frames_per_s": round(len(ts) / m.wall, 1), "cpu_ms_per_frame": round(1e3 * m.cpu / len(ts), 3)})
            print(f"  {label} {method} {name}: {len(ts) / m.wall:.1f} frames/s", file=sys.stderr, flush=True)
    return rows


def sessions(path: Path, cfg: NvdecBench) -> list[dict]:
    """N threads, each its own NVDEC session, decoding the video at 2 fps at once."""
    info = probe(path)
    times = np.arange(0.0, info.last_time + 1e-9, 0.5)
    rows = []
    for n in cfg.sessions:
        with Meter() as m, ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda _: nvdec.decode_frames(path, times, size=cfg.size, info=info), range(n)))
        rows.append({"video": path.name, "method": f"nvdec@2 x{n} sessions", "frames": n * len(times),
                     "wall_s": round(m.wall, 3), "frames_per_s": round(n * len(times) / m.wall, 1),
                     "cpu_ms_per_frame": round(1e3 * m.cpu / (n * len(times)), 3)})
    return rows


def markdown(rows: list[dict]) -> str:
    cols = ["video", "method", "frames", "frames_per_s", "cpu_ms_per_frame", "same_timestamps", "psnr_db",
            "max_abs_diff", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    cfg = parse_config(NvdecBench, argv)
    missing = nvdec.unavailable_reason(0)
    if missing:
        sys.exit(f"bench/nvdec.py needs NVDEC: {missing}")
    videos = generated(cfg)
    if cfg.videos:
        videos += sorted(p for p in Path(cfg.videos).iterdir() if p.suffix in VIDEO_SUFFIXES)
    rows = [r for v in videos for r in bench_video(v, cfg)]
    rows += sessions(videos[0], cfg)
    import torch

    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
           "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parents[1]).stdout.strip()}
    print(f"NVDEC bench, {env['date']}, {env['gpu']}, {env['cores']} cores, commit {env['commit']}\n")
    print(markdown(rows))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"env": env, "config": to_dict(cfg), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
