"""GPU decode (pipeline.nvdec) against the CPU path (pipeline.video) on the same files and requests.

    python bench/nvdec.py --json out.json                       # on a GPU with PyNvVideoCodec
    python bench/nvdec.py --videos DIR --sessions 1,2,4,8

Per video: exactness at 2 fps (same frame timestamps as the CPU path; PSNR and max |diff| of the
frames), then delivered frames/s and CPU seconds per frame for each sampling rate (and every frame),
NVDEC vs the CPU path with one ffmpeg thread (the job's decode task). Then `--sessions` threads each
decoding the first generated video at 2 fps at once: a GPU's NVDEC throughput with several sessions.

`--stage MODES` (e.g. `cpu:14,gpu:8,auto:8+14`) runs the extraction job's own decode stage
(`pipeline.stages.GpuDecodeStage`, clips as `jobs.extract` plans them: 2 views at 1-4 fps) over the
generated videos (`--stage-videos` copies of them) with that many calls at once, one video a call:
`cpu:K` = K ffmpeg slots and no NVDEC (what `--decode-device cpu` gives a node's K cores), `gpu:S` =
S NVDEC sessions, `auto:S+K` = both. It reports clips/s and the CPU seconds per clip of the whole
process (threads and ffmpeg children): the numbers the job's teacher busy fraction and CPU cost
follow from, without Ray or a teacher. `--only-stage` skips the per-video parts (CPU smoke run).
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
    stage: tuple[str, ...] = field(default=(), metadata={"help": "decode-stage modes, e.g. cpu:14,gpu:8,auto:8+14"})
    stage_videos: int = field(default=16, metadata={"min": 1, "help": "videos per stage run (generated ones, repeated)"})
    only_stage: bool = field(default=False, metadata={"help": "run only --stage (no NVDEC needed for cpu:K)"})
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


def stage_mode(mode: str) -> tuple[str, int, int]:
    """'cpu:14' / 'gpu:8' / 'auto:8+14' -> (name, NVDEC sessions, ffmpeg slots)."""
    name, _, counts = mode.partition(":")
    if name == "cpu":
        return mode, 0, int(counts)
    if name == "gpu":
        return mode, int(counts), 0
    if name == "auto":
        sessions, _, slots = counts.partition("+")
        return mode, int(sessions), int(slots)
    raise SystemExit(f"--stage: unknown mode {mode!r} (cpu:K, gpu:S, auto:S+K)")


def stage(videos: list[Path], cfg: NvdecBench, work: Path) -> list[dict]:
    """The job's decode actor over `videos`, per mode: clips/s, CPU s per clip, clips per decoder."""
    from pipeline.clips import ClipSpec
    from pipeline.stages import DecodeOptions, GpuDecodeStage
    from pipeline.store import StoreWriter, make_schema

    options = DecodeOptions(clip_spec=ClipSpec(frames=4, views=2, fps_range=(1.0, 4.0)), size=cfg.size, threads=1)
    rows = []
    for mode in cfg.stage:
        name, sessions, slots = stage_mode(mode)
        # where a video's error row goes (the stage commits them itself); nothing else is written
        store = StoreWriter(str(work / f"stage-{name.replace(':', '-').replace('+', '-')}"), make_schema(
            teacher={}, compression={}, clip={}, frames={"encoding": "jpg"}, target={"dtype": "float16", "dim": 1},
            formats=["webdataset"]))
        actor = GpuDecodeStage(options=options, store=store, sessions=sessions, cpu_slots=slots,
                               require_nvdec=sessions > 0 and slots == 0)
        by_decoder: dict[str, int] = {}

        def one(uri: str) -> None:
            for batch in actor({"video_uri": [uri], "skip": [[]]}):
                for decoder in batch["decoder"]:
                    by_decoder[str(decoder)] = by_decoder.get(str(decoder), 0) + 1

        clear_probe_cache()
        uris = [str(videos[i % len(videos)]) for i in range(cfg.stage_videos)]
        with Meter() as m, ThreadPoolExecutor(sessions + slots) as pool:
            list(pool.map(one, uris))
        clips = sum(by_decoder.values())
        rows.append({"video": f"{cfg.stage_videos} videos", "method": f"stage {name}", "frames": 4 * clips,
                     "clips": clips, "wall_s": round(m.wall, 2), "clips_per_s": round(clips / m.wall, 1),
                     "cpu_s_per_clip": round(m.cpu / max(clips, 1), 4), "clips_by_decoder": by_decoder})
        print(f"  stage {name}: {clips / m.wall:.1f} clips/s, {m.cpu / max(clips, 1):.4f} CPU s/clip {by_decoder}",
              file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = ["video", "method", "frames", "frames_per_s", "cpu_ms_per_frame", "same_timestamps", "psnr_db",
            "max_abs_diff", "clips_per_s", "cpu_s_per_clip", "clips_by_decoder", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    cfg = parse_config(NvdecBench, argv)
    missing = nvdec.unavailable_reason(0)
    if missing and not (cfg.only_stage and all(stage_mode(m)[1] == 0 for m in cfg.stage)):
        sys.exit(f"bench/nvdec.py needs NVDEC: {missing}")
    generated_videos = generated(cfg)
    rows = []
    if not cfg.only_stage:
        videos = generated_videos + (sorted(p for p in Path(cfg.videos).iterdir() if p.suffix in VIDEO_SUFFIXES)
                                     if cfg.videos else [])
        rows = [r for v in videos for r in bench_video(v, cfg)]
        rows += sessions(videos[0], cfg)
    rows += stage(generated_videos, cfg, Path(cfg.workdir))
    import torch

    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
           "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parents[1]).stdout.strip()}
    print(f"NVDEC bench, {env['date']}, {env['gpu']}, {env['cores']} cores, commit {env['commit']}\n")
    print(markdown(rows))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"env": env, "config": to_dict(cfg), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
