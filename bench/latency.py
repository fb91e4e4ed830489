"""The paper's latency table: ViT + projector + LLM prefill, batch 1, random weights at real shapes.

Baseline: InternVL3-8B shape (InternViT-300M 24x1024 at 448 px, 1025 tokens/frame, pixel shuffle
0.5 -> 256 tokens/frame of width 4096, projector 4096->3584, Qwen2.5-7B) at 32 and 64 frames.
LiteFrame: the student (`vitb` preset, 64 tokens per 4-frame clip) + `lma.VideoProjector`
(3584->3584) + the same LLM at 64, 256 and 512 frames. Both share one LLM instance.

    python bench/latency.py                 # on a GPU: bf16, SDPA, CUDA events after warm-up
    python bench/latency.py --tiny          # CPU smoke run with tiny shapes (numbers mean nothing)

ViT paths: eager, compiled (torch.compile; the student through `student.FastEncoder`) and, on GPUs
with FP8 (compute capability 8.9+), compiled-fp8: both ViTs' transformer-block linears as FP8
matmuls (`pipeline.fp8`, the same treatment for the student and the baseline), bf16 elsewhere. An
FP8 row also gives the cosine of its ViT output against the compiled bf16 path on the same input.

Text tokens per row: a prompt of --prompt-tokens plus time markers, so the LLM sees what it would
in use. Baseline: --marker-tokens per frame (InternVL's "Frame i:"). LiteFrame: the markers of the
--time-markers scheme (`lma.data.TimeMarkers`: one per clip, one per --marker-every clips, or none
with a time embedding added after the projector) for the clip times of a --video-seconds video,
each counted with --tokenizer (e.g. Qwen2.5-7B-Instruct's dir) exactly as the prompt is built, or
--marker-tokens each without one.

    python bench/latency.py --marker-table --tokenizer /ckpt/Qwen2.5-7B-Instruct   # counts only
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lma.data import TIME_MARKER_SCHEMES, TimeMarkers, clip_start_times, marker_tokens, sample_timestamps  # noqa: E402
from lma.modeling import VideoProjector  # noqa: E402
from pipeline.fp8 import convert_linears, fp8_unsupported_reason, require_fp8  # noqa: E402
from student.fast import FastEncoder  # noqa: E402

QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6)
INTERNVIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      image_size=448, patch_size=14)
BASELINE = "InternVL3-8B shape"
FP8_PATH = "compiled-fp8"
TINY_LLM = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768)
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=112, patch_size=14)


class Timer:
    """Median milliseconds over `reps` runs after `warmup`: CUDA events on GPU, a wall clock on CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def __call__(self, fn):
        for _ in range(self.warmup):
            out = fn()
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                torch.cuda.synchronize(self.device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), out


def build_internvl(tiny: bool, device: torch.device, dtype: torch.dtype):
    """Random InternVL (vision tower + pixel shuffle + projector + Qwen2 LLM), built on the device."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    text = dict(TINY_LLM if tiny else QWEN25_7B, model_type="qwen2")
    cfg = InternVLConfig(vision_config=TINY_VIT if tiny else INTERNVIT_300M, text_config=text,
                         downsample_ratio=0.5, image_token_id=text["vocab_size"] - 1)
    cfg.vision_config._attn_implementation = "sdpa"
    cfg.text_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def build_student(preset: str, device: torch.device, dtype: torch.dtype, target_dim: int):
    from student import LiteFrameModel, preset_config

    config = preset_config(preset, target_dim=target_dim)
    with torch.device(device):
        model = LiteFrameModel(config)
    return model.to(dtype=dtype).eval()


def prefill(model, visual: torch.Tensor, text_tokens: int) -> torch.Tensor:
    """LLM prefill over [text | visual | text] embeddings: KV cache written, next-token logits only."""
    lm = model.model.language_model
    hidden = visual.shape[-1]
    half = text_tokens // 2
    text_a = torch.randn(1, half, hidden, device=visual.device, dtype=visual.dtype)
    text_b = torch.randn(1, text_tokens - half, hidden, device=visual.device, dtype=visual.dtype)
    embeds = torch.cat([text_a, visual.reshape(1, -1, hidden), text_b], dim=1)
    out = lm(inputs_embeds=embeds, use_cache=True)
    return model.lm_head(out.last_hidden_state[:, -1:])


class MarkerCost:
    """LiteFrame's time markers at a frame count: how many, and the prompt tokens they cost."""

    def __init__(self, args, clip_frames: int):
        from transformers import AutoTokenizer

        self.args, self.clip_frames = args, clip_frames
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None

    def clip_times(self, frames: int) -> list[float]:
        """Clip start times for `frames` frames sampled uniformly over a --video-seconds video."""
        return clip_start_times(sample_timestamps(self.args.video_seconds, frames), self.clip_frames)

    def __call__(self, frames: int, scheme: str | None = None) -> tuple[int, int]:
        markers = TimeMarkers(scheme or self.args.time_markers, self.args.marker_every)
        times = self.clip_times(frames)
        count = sum(markers.marked(i) for i in range(len(times)))
        if self.tokenizer is None:
            return count, count * self.args.marker_tokens
        return count, marker_tokens(self.tokenizer, times, markers)

    def table(self, frame_counts: list[int]) -> str:
        counted = f"counted with {self.args.tokenizer}" if self.tokenizer else f"{self.args.marker_tokens} per marker"
        lines = [f"time markers for a {self.args.video_seconds:g} s video, {self.clip_frames}-frame clips, "
                 f"marker tokens {counted}:",
                 "| scheme | frames | clips | markers | marker tokens |", "|---|---:|---:|---:|---:|"]
        for scheme in TIME_MARKER_SCHEMES:
            name = f"text-every-{self.args.marker_every}" if scheme == "text-every-n" else scheme
            for frames in frame_counts:
                count, tokens = self(frames, scheme)
                lines.append(f"| {name} | {frames} | {len(self.clip_times(frames))} | {count} | {tokens} |")
        return "\n".join(lines)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


class Bench:
    """Rows of the table. Projector and prefill depend only on the token count, so they are timed
    once per (model, frames) and shared by every ViT path's rows. Inputs are seeded per frame count,
    so every path sees the same frames and the FP8 path's output is compared with compiled bf16's."""

    def __init__(self, model, student, projector, markers: MarkerCost, timer: Timer, args, device, dtype):
        self.model, self.student, self.projector, self.markers = model, student, projector, markers
        self.timer, self.args, self.device, self.dtype = timer, args, device, dtype
        self.after_vit: dict[tuple[str, int], dict] = {}
        self.bf16_out: dict[tuple[str, int], torch.Tensor] = {}

    def _row(self, name: str, path: str, frames: int, vit_ms: float, out: torch.Tensor, rest: dict) -> dict:
        row = {"model": name, "vit": path, "frames": frames, "vit_ms": vit_ms, **rest}
        if path == "compiled":
            self.bf16_out[(name, frames)] = out
        elif path == FP8_PATH and (name, frames) in self.bf16_out:
            row["vit_cos_vs_compiled_bf16"] = cosine(out, self.bf16_out[(name, frames)])
        return row

    def _generator(self, frames: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(frames)

    def _after_vit(self, key, project, marker_tokens: int, extra: dict) -> dict:
        if key not in self.after_vit:
            proj_ms, visual = self.timer(project)
            text = self.args.prompt_tokens + marker_tokens
            prefill_ms, _ = self.timer(lambda: prefill(self.model, visual, text))
            self.after_vit[key] = {"visual_tokens": visual.shape[0] * visual.shape[1], "text_tokens": text,
                                   **extra, "projector_ms": proj_ms, "prefill_ms": prefill_ms}
        return self.after_vit[key]

    @torch.inference_mode()
    def baseline(self, path: str, tower, frames: int) -> dict:
        model = self.model
        size = model.config.vision_config.image_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        pixels = torch.randn(frames, 3, size, size, device=self.device, dtype=self.dtype,
                             generator=self._generator(frames))
        vit_ms, feats = self.timer(lambda: tower(pixel_values=pixels).last_hidden_state)

        def project():
            x = feats[:, 1:]                       # drop CLS: 1024 patches per frame
            side = int(x.shape[1] ** 0.5)
            x = model.model.pixel_shuffle(x.reshape(frames, side, side, -1), model.config.downsample_ratio)
            return model.model.multi_modal_projector(x.reshape(frames, -1, x.shape[-1]))

        rest = self._after_vit((BASELINE, frames), project, self.args.marker_tokens * frames,   # a marker per frame
                               {"time_markers": "per frame", "markers": frames})
        return self._row(BASELINE, path, frames, vit_ms, feats, rest)

    @torch.inference_mode()
    def student_row(self, path: str, encode, frames: int) -> dict:
        video = torch.randint(0, 256, (frames, *self.student.config.image_hw, 3), dtype=torch.uint8,
                              device=self.device, generator=self._generator(frames))
        vit_ms, tokens = self.timer(lambda: encode(video, chunk_frames=self.args.chunk_frames))
        name = f"LiteFrame student ({self.args.student_preset})"
        seconds = torch.tensor(self.markers.clip_times(frames), device=self.device)

        def project():   # under the embedding scheme, the time embedding VideoLLM.embed adds too
            out = self.projector(tokens.to(self.dtype))
            return out if self.projector.time is None else out + self.projector.time(seconds)[:, None]

        count, cost = self.markers(frames)
        rest = self._after_vit((name, frames), project, cost,
                               {"time_markers": self.args.time_markers, "markers": count})
        return self._row(name, path, frames, vit_ms, tokens, rest)


def table(rows: list[dict]) -> str:
    """Ratios against the paper's baseline as shipped: InternVL at 32 frames, eager bf16 ViT; and
    against the baseline with the same ViT path (compiled vs compiled, FP8 vs FP8), the fair comparison."""
    def total(r):
        return r["vit_ms"] + r["projector_ms"] + r["prefill_ms"]

    base = {r["vit"]: total(r) for r in rows if r["model"] == BASELINE and r["frames"] == 32}
    first = total(rows[0])
    lines = ["| model | ViT path | frames | visual tokens | text tokens | ViT ms | projector ms | prefill ms | "
             "total ms | vs baseline 32f eager | vs baseline 32f same path | ViT cos vs compiled bf16 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        r["total_ms"] = total(r)
        r["ratio"] = r["total_ms"] / base.get("eager", first)
        r["ratio_same_path"] = r["total_ms"] / base.get(r["vit"], base.get("eager", first))
        cos = f"{r['vit_cos_vs_compiled_bf16']:.5f}" if "vit_cos_vs_compiled_bf16" in r else ""
        lines.append(f"| {r['model']} | {r['vit']} | {r['frames']} | {r['visual_tokens']} | {r['text_tokens']} | "
                     f"{r['vit_ms']:.1f} | "
                     f"{r['projector_ms']:.1f} | {r['prefill_ms']:.1f} | {r['total_ms']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['ratio_same_path']:.2f}x | {cos} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke run)")
    p.add_argument("--baseline-frames", default="32,64")
    p.add_argument("--student-frames", default="64,256,512")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--marker-tokens", type=int, default=6,
                   help="tokens per time marker where no --tokenizer counts them (the baseline's always)")
    p.add_argument("--time-markers", choices=TIME_MARKER_SCHEMES, default="text", help="LiteFrame's scheme")
    p.add_argument("--marker-every", type=int, default=8, help="clips per marker under text-every-n")
    p.add_argument("--tokenizer", help="HF tokenizer dir or name to count LiteFrame's markers with")
    p.add_argument("--video-seconds", type=float, default=600.0,
                   help="video length the frames are sampled from (markers' text grows with the times)")
    p.add_argument("--marker-table", action="store_true",
                   help="print the markers and their tokens per scheme at --student-frames, then exit")
    p.add_argument("--chunk-frames", type=int, default=None, help="student encode_video chunking")
    p.add_argument("--json-out", help="write rows and environment to this JSON file")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no further ViT path after this many seconds (device leases are short)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile'd ViTs (student.fast.FastEncoder); default: on GPU")
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                   help=f"also time the {FP8_PATH} path; default: where the GPU has FP8 matmuls")
    args = p.parse_args(argv)
    student_frames = [int(f) for f in args.student_frames.split(",")]
    args.student_preset = "tiny" if args.tiny else "vitb"
    if args.marker_table:
        from student import preset_config

        print(MarkerCost(args, preset_config(args.student_preset).clip_frames).table(student_frames))
        return
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    fp8_missing = fp8_unsupported_reason(device)
    if args.fp8:
        require_fp8(device)      # asked for explicitly: fail, saying what is needed
    args.fp8 = fp8_missing is None if args.fp8 is None else args.fp8
    if not args.fp8:
        print(f"{FP8_PATH} rows skipped: {fp8_missing or '--no-fp8'}", flush=True)
    torch.manual_seed(0)
    timer = Timer(device, args.warmup, args.reps)
    model = build_internvl(args.tiny, device, dtype)
    hidden = model.config.text_config.hidden_size
    student = build_student(args.student_preset, device, dtype, target_dim=hidden)
    # residual: targets already in LLM space; in the LLM's dtype, as VideoLLM.from_pretrained runs it
    projector = VideoProjector(hidden, hidden, time_embedding=args.time_markers == "embedding").to(device, dtype)
    towers, encoders = {"eager": model.model.vision_tower}, {"eager": student.encode_video}
    if args.compile:   # the student's own fast path (frame axis dynamic: one compile for all lengths)
        towers["compiled"] = torch.compile(model.model.vision_tower, dynamic=False)
        encoders["compiled"] = FastEncoder(student).encode_video
    if args.fp8:        # a converted copy: the other paths keep the bf16 tower
        tower = copy.deepcopy(model.model.vision_tower)
        convert_linears(tower.encoder.layer, fast_accum=True)    # as FastEncoder(fp8=True) treats the student
        towers[FP8_PATH] = torch.compile(tower, dynamic=False)
        encoders[FP8_PATH] = FastEncoder(student, fp8=True).encode_video
    bench = Bench(model, student, projector, MarkerCost(args, student.config.clip_frames), timer, args, device, dtype)
    rows: list[dict] = []
    start = time.monotonic()
    for path in towers:      # every eager row first: the compiled ones are extra, and compiles are slow
        if rows and time.monotonic() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f}s spent: {path} rows skipped", flush=True)
            break
        jobs = [(bench.baseline, towers[path], int(f)) for f in args.baseline_frames.split(",")]
        jobs += [(bench.student_row, encoders[path], f) for f in student_frames]
        for run, vit, frames in jobs:
            rows.append(run(path, vit, frames))
            print(json.dumps(rows[-1]), flush=True)
            if args.json_out:
                Path(args.json_out).write_text(json.dumps({"rows": rows}, indent=1))
    print(table(rows))
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": str(dtype), "warmup": args.warmup, "reps": args.reps,
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "attention": {"vit": model.config.vision_config._attn_implementation,
                         "llm": model.config.text_config._attn_implementation},
           "compiled_student": "student.fast.FastEncoder defaults" if args.compile else None,
           "time_markers": {"scheme": args.time_markers, "every": args.marker_every,
                            "video_seconds": args.video_seconds,
                            "tokens": f"counted with {args.tokenizer}" if args.tokenizer
                            else f"{args.marker_tokens} per marker"},
           "fp8": "pipeline.fp8: e4m3 block linears, per-row scales, fast accumulation" if args.fp8 else fp8_missing}
    print(json.dumps(env))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
