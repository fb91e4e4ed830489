"""LMA on N GPUs: `torchrun -m lma.finetune` data-parallel, per GPU count and frame count, as a user
runs it.

    python3 bench/lma_scaling.py --gpus 1,2 --frames 64,256 --effective-batch 128 --out /tmp/lma-scaling
    python3 bench/lma_scaling.py --shape tiny --gpus 1,2 --frames 8 --out /tmp/lma-tiny   # CPU smoke run
    python3 bench/lma_scaling.py --launcher ray --gpus 2 --frames 64                       # the Ray Train entry

Builds, once under OUT/models: a causal LM of Qwen2.5-7B's shape from its config (random weights,
bf16, built on the GPU; hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocab 152064) with a
small trained BPE tokenizer (lma.testing), a random `vitb` student, and synthetic H.264 videos
(pipeline.samples, 480x480 at 8 fps, enough frames for each --frames) and a JSONL of --effective-batch
records about them (an epoch per step). Then per (frames, N) it runs lma.finetune with LoRA r=4,
batch 1 per rank and --grad-accum = effective batch / N (the same updates on every N), and reads
rank 0's metrics.jsonl: step time and tokens/s (medians over the steps after --warmup; tokens =
visual + text over all ranks), videos/s, data wait, the peak GPU memory of any rank
(torch.cuda.max_memory_allocated) and the scaling efficiency per GPU against the fewest GPUs of the
same frame count. Prints a markdown table; --json
FILE writes the rows. `--shape tiny` swaps in the tests' tiny LLM and student (on CPU: gloo ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen2.5-7B-Instruct's config.json, the shape-defining part
QWEN25_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)
SHAPES = {"7b": ("vitb", (480, 480)), "tiny": ("tiny", (128, 128))}     # student preset, video size
FPS = 8
VIDEOS = 8


def build_llm(directory: Path, shape: str) -> Path:
    """A random causal LM saved like a checkpoint (loaded back by lma.finetune's from_pretrained)."""
    if (directory / "config.json").exists():
        return directory
    from lma.testing import make_tiny_llm, make_tokenizer

    if shape == "tiny":
        return make_tiny_llm(directory)
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = make_tokenizer(directory)
    config = Qwen2Config(**QWEN25_7B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):    # random init: seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()        # GPU 0 is the runs' from here on
    return directory


def build_student(directory: Path, preset: str) -> Path:
    if (directory / "config.json").exists():
        return directory
    import torch

    from student import LiteFrameModel, preset_config

    torch.manual_seed(0)
    LiteFrameModel(preset_config(preset)).save_pretrained(directory)
    return directory


def build_data(directory: Path, frames: int, size: tuple[int, int], records: int) -> Path:
    """VIDEOS synthetic videos of at least `frames` frames and `records` questions about them."""
    from pipeline.samples import make_video

    directory.mkdir(parents=True, exist_ok=True)
    seconds = frames / FPS + 1
    for i in range(VIDEOS):
        path = directory / f"v{i}-{frames}f.mp4"
        if not path.exists():
            make_video(path, seconds=seconds, fps=FPS, size=size)
    lines = [json.dumps({"video": f"v{i % VIDEOS}-{frames}f.mp4", "conversations": [
        {"from": "human", "value": "<video>\nDescribe what happens in the video."},
        {"from": "gpt", "value": "A square moves across a test pattern while a grid of cells changes."}]})
        for i in range(records)]
    path = directory / f"train-{frames}f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(args, student: Path, llm: Path, data: Path, frames: int, gpus: int) -> list[dict]:
    out = args.out / f"run-{frames}f-{gpus}-{args.launcher}"
    shutil.rmtree(out, ignore_errors=True)       # a fresh run, never a resume
    steps = args.warmup + args.steps
    launcher = ([sys.executable, "-m", "jobs.lma_finetune", "--ray-workers", str(gpus), "--address", "local",
                 *(["--use-gpu"] if args.use_gpu else [])] if args.launcher == "ray" else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                 "-m", "lma.finetune"])
    cmd = [*launcher, "--student", str(student), "--llm", str(llm), "--data", str(data),
           "--output", str(out), "--frames", str(frames), "--batch-size", "1",
           "--grad-accum", str(args.effective_batch // gpus), "--max-steps", str(steps), "--save-every", str(steps),
           "--lora-r", "4", "--lr", "1e-5", "--warmup-ratio", "0", "--prefetch", str(args.prefetch), *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
    # one CPU thread per rank for every N (torchrun sets it for N > 1 only); decode runs in ffmpeg processes
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)   # keep carried packages
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": path}
    subprocess.run(cmd, cwd=REPO, check=True, timeout=args.timeout, env=env)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summarise(rows: list[dict], frames: int, gpus: int, grad_accum: int, warmup: int) -> dict:
    timed = [r for r in rows if r["step"] > warmup]
    median = lambda key: statistics.median(r[key] for r in timed)       # noqa: E731
    return {"frames": frames, "gpus": gpus, "grad_accum": grad_accum, "effective_batch": gpus * grad_accum,
            "timed_steps": len(timed), "step_s": median("step_s"),
            "tokens_per_s": statistics.median((r["visual_tokens"] + r["text_tokens"]) / r["step_s"] for r in timed),
            "videos_per_s": median("videos_per_s"), "data_wait": median("data_wait_frac"),
            "tokens_per_video": (timed[-1]["visual_tokens"] + timed[-1]["text_tokens"]) / (gpus * grad_accum),
            "gpu_peak_gib": max((r["gpu_peak_gib"] for r in rows if "gpu_peak_gib" in r), default=None),
            "all_applied": all(r["applied"] for r in rows)}


def table(rows: list[dict]) -> str:
    fmt = lambda v, f: format(v, f) if v is not None else "–"   # noqa: E731
    lines = ["| frames | GPUs | grad-accum | step s | tokens/s | videos/s | per GPU vs fewest GPUs | peak GiB per GPU "
             "| data wait |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['frames']} | {r['gpus']} | {r['grad_accum']} | {r['step_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['videos_per_s']:.2f} | {fmt(r['efficiency'], '.2f')} | "
                     f"{fmt(r['gpu_peak_gib'], '.1f')} | {r['data_wait']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="7b: the real shapes; tiny: smoke run")
    parser.add_argument("--gpus", default="1,2", help="GPU counts (processes on CPU), comma-separated")
    parser.add_argument("--frames", default="64,256", help="frames per video, comma-separated")
    parser.add_argument("--effective-batch", type=int, default=16, help="videos per optimizer step (e.g. 128)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps left out of the timing")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--launcher", choices=("torchrun", "ray"), default="torchrun",
                        help="ray: the Ray Train entry, jobs.lma_finetune, on a local Ray (one worker per GPU)")
    parser.add_argument("--prefetch", type=int, default=6, help="videos each rank decodes ahead")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    parser.add_argument("--out", type=Path, default=Path("/tmp/lma-scaling"))
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    import torch

    args.use_gpu = torch.cuda.is_available()
    gpus_list = [int(g) for g in args.gpus.split(",")]
    if any(args.effective_batch % g for g in gpus_list):
        parser.error(f"--effective-batch {args.effective_batch} must be a multiple of every GPU count {gpus_list}")
    preset, size = SHAPES[args.shape]
    models = args.out / "models" / args.shape
    llm, student = build_llm(models / "llm", args.shape), build_student(models / "student", preset)
    records = args.effective_batch        # an epoch per step; the probe before training stays short
    rows = []
    for frames in (int(f) for f in args.frames.split(",")):
        data = build_data(args.out / "data", frames, size, records)
        base = None
        for gpus in gpus_list:
            row = summarise(run(args, student, llm, data, frames, gpus), frames, gpus, args.effective_batch // gpus,
                            args.warmup)
            row["launcher"] = args.launcher
            base = base or row
            row["efficiency"] = row["tokens_per_s"] / row["gpus"] / (base["tokens_per_s"] / base["gpus"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows))
    if args.json:
        import transformers

        env = {"torch": torch.__version__, "transformers": transformers.__version__, "shape": args.shape,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "commit": os.environ.get("COMMIT"), "python": sys.version.split()[0]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                         "env": env}, indent=1))
    return rows


if __name__ == "__main__":
    main()
