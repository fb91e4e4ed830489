"""The whole LiteFrame loop on one machine, in minutes, with nothing downloaded.

    python -m jobs.demo --output demo-out

1. sample videos: generated with ffmpeg (plus ../shared/videos when present, or --videos DIR);
2. a tiny random InternVL teacher saved like a real checkpoint;
3. `jobs.extract`: a local Ray job writes the WebDataset + Zarr store of compressed teacher tokens;
4. `student.train`: the tiny student learns those tokens from the store (CTD);
   `jobs.inspect` writes report.html: the store's clips, their tokens and the student's predictions;
5. `lma.finetune`: LoRA on a tiny random LLM so it reads the student's tokens (LMA);
6. `lma.generate`: a question about a video, with the time spent in each stage.

Every step is the same command a user runs at scale, called with the demo's small settings; the
weights are random, so the answer is not meant to be right, only to come out of the real path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "videos"
QUESTIONS = (("describe the video", "the video shows a moving square"),
             ("what colour is the square in the video", "the square is red"))


def sample_videos(root: Path, extra: Path | None) -> list[Path]:
    from pipeline.samples import make_video

    root.mkdir(parents=True, exist_ok=True)
    videos = [make_video(root / f"sample-{i}.mp4", seconds=seconds, fps=fps, size=size)
              for i, (seconds, fps, size) in enumerate([(4, 24, (160, 120)), (6, 30, (192, 108)),
                                                       (3, 10, (120, 160)), (5, 25, (128, 128))])]
    if extra is not None and extra.is_dir():
        for path in sorted(extra.iterdir()):
            if path.suffix.lower() in (".mp4", ".mkv", ".webm", ".avi", ".mov", ".ts"):
                videos.append((root / path.name).resolve())
                if not videos[-1].exists():
                    videos[-1].symlink_to(path.resolve())
    return videos


def step(title: str, fn, argv: list[str]):
    print(f"\n=== {title}\n$ python -m {fn.__module__} {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    result = fn(argv)
    print(f"--- {title}: {time.perf_counter() - start:.1f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="demo-out", help="folder for everything the demo writes")
    parser.add_argument("--videos", type=Path, default=SHARED_VIDEOS,
                        help="extra real videos to include (default: ../shared/videos when present)")
    parser.add_argument("--steps", type=int, default=30, help="student training steps")
    parser.add_argument("--fresh", action="store_true", help="delete --output first (else the store resumes)")
    args = parser.parse_args(argv)

    from jobs import extract, inspect
    from lma import finetune, generate
    from lma.testing import make_tiny_llm
    from pipeline.testing import make_tiny_teacher
    from student import train

    out = Path(args.output).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    videos = sample_videos(out / "videos", args.videos)
    teacher = make_tiny_teacher(out / "teacher", "internvl", image_size=112, hidden_size=32)
    llm = make_tiny_llm(out / "llm")
    print(f"{len(videos)} videos, tiny teacher at {teacher}, tiny LLM at {llm}")

    code = step("extract teacher targets (Ray job)", extract.main, [
        "--input", str(out / "videos"), "--output", str(out / "store"), "--teacher", str(teacher),
        "--ray-address", "local", "--size", "112", "--views", "2", "--fps", "1-4", "--max-clips-per-view", "4", "--shard-bytes", "2MB"])
    if code:
        return code
    step("train the student (CTD)", train.main, [
        "--data", str(out / "store"), "--output", str(out / "student"), "--preset", "tiny",
        "--max-steps", str(args.steps), "--warmup-steps", "3", "--batch-size", "4", "--lr", "3e-3",
        "--num-workers", "0", "--eval-every", str(args.steps), "--checkpoint-every", str(args.steps)])

    step("look at the store and the student (HTML report)", inspect.main, [
        str(out / "store"), "--student", str(out / "student"), "--html", str(out / "report.html")])

    records = out / "lma.jsonl"
    with records.open("w") as f:
        for i, video in enumerate(videos):
            question, answer = QUESTIONS[i % len(QUESTIONS)]
            f.write(json.dumps({"video": str(video), "conversations": [
                {"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]}) + "\n")
    step("adapt the LLM (LoRA)", finetune.main, [
        "--student", str(out / "student"), "--llm", str(llm), "--data", str(records), "--output", str(out / "lma"),
        "--frames", "16", "--max-steps", "6", "--lr", "1e-3"])
    step("ask the video a question", generate.main, [
        "--model", str(out / "lma"), "--video", str(videos[0]), "--question", QUESTIONS[0][0],
        "--frames", "16", "--max-new-tokens", "12"])
    print(f"\nDone. Store: {out / 'store'} (report: {out / 'report.html'})  student: {out / 'student'}  "
          f"Video LLM: {out / 'lma'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
