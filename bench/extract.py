"""Extraction speed: the teacher alone, the teacher + compression stage, decode included, Ray vs one process.

    python bench/extract.py --json out.json                   # on an H200: InternViT-300M shape, bf16
    python bench/extract.py --shape tiny --parts teacher,pipeline,decode,ray    # CPU smoke run / part (4)

Parts (--parts):
  matmul    the device's measured bf16 matmul rate (8192^3, random data), the ceiling for `teacher`;
            on FP8 GPUs also the rate of pipeline.fp8's GEMM (e4m3, row-wise scales), the FP8 ceiling.
  teacher   Teacher.encode on frames already on the device: frames/s, clips/s, TFLOP/s from the ViT's
            FLOPs counted analytically, % of the measured matmul rate; per variant (eager SDPA,
            torch.compile, compile + CUDA graphs; '-fp8': the teacher's dtype "float8", FP8 block
            linears, skipped with a note where the device has no FP8 matmuls) and frames per forward.
            Each variant's tokens and WAP targets are compared with eager bf16's (relative error,
            cosine) on the same frames, and eager bf16 with float32.
  pipeline  pipeline.stages.TeacherStage (teacher + WAP + float16 targets back on the host, built as
            jobs.extract builds it: variant 'compile' = --teacher-compile) over clips
            decoded ahead into host memory, as the Ray actor gets them; efficiency = its clips/s over
            `teacher` clips/s at the same frames per forward and variant.
  decode    the same stage fed by pipeline.stages.decode_video (area A's decode_clips) in a process pool
            of N CPU workers: decode-only clips/s per worker count, then the GPU fed by the pool; the teacher
            busy fraction and the CPU cores per GPU needed for >= 90% busy (decode + JPEG encode).
  ray       CPU, tiny teacher: jobs.extract (Ray Data, local cluster) vs the same stages in one process.

Prints a markdown table last; --json writes every number with the device, torch version and commit.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.compress import Compression, compress_tokens  # noqa: E402
from pipeline.config import parse_config, to_dict  # noqa: E402
from pipeline.fp8 import fp8_unsupported_reason, quantize_rows  # noqa: E402
from pipeline.teacher import FLOAT8  # noqa: E402

INTERNVIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      image_size=448, patch_size=14)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=112,
            patch_size=14)


class Variant(NamedTuple):
    compile_kw: dict | None          # torch.compile kwargs; None = eager
    attention: tuple[str, ...]       # SDPA backends by priority; () = torch's choice
    dtype: str | None                # the teacher's dtype: "float8", or None = bf16 on GPU, float32 on CPU
    static_fp8: bool = False         # FP8 with calibrated static activation scales (part teacher only)


def variant_options(variant: str) -> Variant:
    """'eager' | 'compile' | 'compile-cudagraphs', each optionally '-cudnn' (cuDNN SDPA first) and
    '-fp8' (FP8 block linears) or '-fp8static' (the same with static activation scales calibrated on
    CALIBRATION_CLIPS random clips; part teacher only). Static shapes: one graph per batch size.
    '-static' matters in the pipeline/decode parts only: see `_stage`."""
    words = variant.split("-")
    unknown = set(words) - {"eager", "compile", "cudagraphs", "cudnn", "static", "fp8", "fp8static"}
    if unknown or words[0] not in ("eager", "compile"):
        raise ValueError(f"unknown variant {variant!r}")
    compile_kw = None
    if words[0] == "compile":
        compile_kw = {"dynamic": False, **({"mode": "reduce-overhead"} if "cudagraphs" in words else {})}
    return Variant(compile_kw, ("cudnn", "flash", "efficient") if "cudnn" in words else (),
                   FLOAT8 if {"fp8", "fp8static"} & set(words) else None, "fp8static" in words)


def _skipped(part: str, variant: str, device: torch.device) -> dict | None:
    """A row saying why `variant` cannot run here (FP8 without FP8 matmuls), printed as a note; None if it can."""
    reason = fp8_unsupported_reason(device) if variant_options(variant).dtype == FLOAT8 else None
    if reason is None:
        return None
    print(f"{part} variant {variant}: skipped: {reason}", flush=True)
    return {"part": part, "variant": variant, "skipped": reason}


@dataclass
class BenchConfig:
    """Extraction throughput benchmark (see the module docstring)."""

    parts: tuple[str, ...] = field(default=("matmul", "teacher", "pipeline", "decode"),
                                   metadata={"help": "matmul,teacher,pipeline,decode,ray"})
    shape: str = field(default="internvit-300m", metadata={"help": "internvit-300m | tiny"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    variants: tuple[str, ...] = field(default=("eager", "compile", "compile-fp8"), metadata={
        "help": "eager|compile|compile-cudagraphs, each with optional -cudnn and -fp8 (skipped without FP8)"})
    frames_per_forward: tuple[int, ...] = field(default=(64, 128, 256), metadata={"help": "teacher batch sizes"})
    compile_frames_per_forward: tuple[int, ...] = field(default=(256,),
                                                        metadata={"help": "batch sizes for compiled variants"})
    clip_frames: int = field(default=4, metadata={"help": "frames per clip"})
    seconds: float = field(default=6.0, metadata={"help": "timed seconds per measurement"})
    pipeline_variants: tuple[str, ...] | None = field(default=None, metadata={
        "help": "variants for pipeline/decode parts (default: --variants without -fp8 ones); decode uses the last"})
    pipeline_frames: int = field(default=256, metadata={"help": "frames per stage batch in pipeline/decode parts"})
    pipeline_threads: tuple[int, ...] = field(default=(1, 2), metadata={"help": "concurrent stage calls"})
    pipeline_chunk_frames: tuple[int, ...] = field(default=(256, 64),
                                                  metadata={"help": "frames per forward inside the stage"})
    decode_workers: tuple[int, ...] = field(default=(1, 4, 8, 15), metadata={"help": "process-pool sizes"})
    decode_seconds: float = field(default=12.0, metadata={"help": "timed seconds per decode measurement"})
    videos: str = field(default=str(ROOT.parent / "shared" / "videos"), metadata={"help": "videos for decode/ray"})
    views: int = field(default=2, metadata={"help": "views per video in decode/ray parts"})
    json: str | None = field(default=None, metadata={"help": "write all results here (after every part)"})
    commit: str | None = field(default=None, metadata={"help": "commit measured, where the copy has no .git"})


# ------------------------------------------------------------------------------------------ utilities
def _device(cfg: BenchConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_loop(fn, device: torch.device, seconds: float, min_iters: int = 3) -> tuple[float, int]:
    """Median seconds per call of `fn` over at least `seconds` (device-synchronised per call)."""
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < seconds:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def vit_flops_per_frame(cfg: dict, tokens: int) -> float:
    """Multiply-adds x2 of one ViT forward: patch embedding, QKV/out projections, attention, MLP."""
    d, mlp, layers, p = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["patch_size"]
    patches = (cfg["image_size"] // p) ** 2
    per_layer = 2 * tokens * (4 * d * d) + 2 * tokens * (2 * d * mlp) + 2 * 2 * tokens * tokens * d
    return 2 * patches * (3 * p * p) * d + layers * per_layer


def matmul_tflops(device: torch.device, seconds: float, shape: tuple[int, int, int] = (8192, 8192, 8192),
                  fp8: bool = False) -> dict:
    """bf16 (GPU) / fp32 (CPU) matmul rate on random data: 20 back-to-back products per timed call.
    fp8: the GEMM of pipeline.fp8 instead (e4m3 operands, row-wise scales, bf16 out, float32 accumulation
    as the FP8 teacher runs it)."""
    m, k, n = shape if device.type == "cuda" else (1024, 1024, 1024)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if fp8:
        (a, scale_a), (b, scale_b) = (quantize_rows(torch.randn(r, k, device=device)) for r in (m, n))
        b, scale_b = b.t(), scale_b.t().contiguous()     # column-major [K, N] and [1, N], as FP8Linear passes them

        def product():
            torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=dtype)
    else:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        c = torch.empty(m, n, device=device, dtype=dtype)

        def product():
            torch.matmul(a, b, out=c)

    def run():
        for _ in range(20):
            product()

    warm = time.perf_counter()
    while time.perf_counter() - warm < 1.0:   # clocks up from idle
        run()
        _sync(device)
    sec, iters = _time_loop(run, device, seconds)
    return {"shape": [m, k, n], "dtype": str(a.dtype).removeprefix("torch."),
            "tflops": 20 * 2 * m * k * n / sec / 1e12, "iters": iters}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "pipeline", "bench"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_teacher_dir(directory: Path, shape: dict, device: torch.device) -> Path:
    """A random-weight InternViT-shaped vision model saved like a real checkpoint (bf16 on GPU)."""
    from transformers import InternVLVisionConfig, InternVLVisionModel

    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLVisionModel(InternVLVisionConfig(**shape))
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.save_pretrained(directory)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": shape["image_size"], "width": shape["image_size"]}, "image_mean": mean,
         "image_std": std, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}))
    del model
    return directory


CALIBRATION_CLIPS = 16


def _load_teacher(path: Path, device: torch.device, variant: str, fpf: int):
    from pipeline.teacher import Teacher

    options = variant_options(variant)
    teacher = Teacher.from_pretrained(path, device=device, batch_size=fpf, attention_backends=options.attention,
                                      dtype="bfloat16" if options.static_fp8 else options.dtype)
    if options.static_fp8:     # calibrated on other random clips than the ones timed and compared
        gen = torch.Generator(device=device).manual_seed(1)
        size = teacher.image_size
        teacher.use_fp8(teacher.calibrate_fp8(torch.randint(0, 256, (CALIBRATION_CLIPS, 4, size, size, 3),
                                                            dtype=torch.uint8, device=device, generator=gen)))
    if options.compile_kw is not None:
        teacher.compile_tokens(**options.compile_kw)
    return teacher


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a.double() - b.double())) / torch.linalg.vector_norm(b.double()))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _accuracy(tokens: torch.Tensor, ref: torch.Tensor) -> dict:
    """Tokens [B, T, h, w, D] against eager's on the same frames, and the same for their WAP targets
    (windows of all T frames x 2 x 2 tokens: the stored values)."""
    wap = Compression(method="wap", factors=(tokens.shape[1], 2, 2))
    target, ref_target = compress_tokens(tokens, wap), compress_tokens(ref, wap)
    return {"rel_err_vs_eager": _rel_err(tokens, ref), "cos_vs_eager": _cos(tokens, ref),
            "target_rel_err_vs_eager": _rel_err(target, ref_target), "target_cos_vs_eager": _cos(target, ref_target)}


# ------------------------------------------------------------------------------------------ parts
def part_teacher(cfg: BenchConfig, path: Path, shape: dict, device: torch.device, matmul: float | None,
                 fp8_matmul: float | None) -> list:
    """`matmul`, `fp8_matmul`: the measured TFLOP/s ceilings, from part `matmul` if it ran."""
    from pipeline.teacher import Teacher

    rows = []
    size, cfr = shape["image_size"], cfg.clip_frames
    gen = torch.Generator(device=device).manual_seed(0)
    eager = Teacher.from_pretrained(path, device=device, batch_size=max(cfg.frames_per_forward))
    check = torch.randint(0, 256, (2, cfr, size, size, 3), dtype=torch.uint8, device=device, generator=gen)
    seq = eager.backbone(pixel_values=eager.preprocessing.to_pixel_values(check[0], dtype=eager.dtype)
                         ).last_hidden_state.shape[1]
    flops = vit_flops_per_frame(shape, seq)
    bf16_vs_fp32 = None
    if eager.dtype != torch.float32:
        fp32 = Teacher.from_pretrained(path, device=device, dtype=torch.float32)
        bf16_vs_fp32 = _rel_err(eager.encode(check), fp32.encode(check))
        del fp32
    for variant in cfg.variants:
        if skipped := _skipped("teacher", variant, device):
            rows.append(skipped)
            continue
        try:
            with torch.inference_mode():   # as TeacherStage runs it: the fair denominator of efficiency
                rows += _teacher_variant(cfg, path, shape, device, (matmul, fp8_matmul), eager, variant, gen, seq,
                                         flops, bf16_vs_fp32)
        except Exception as e:  # e.g. a compile mode this torch/GPU lacks: report, go on with the others
            print(f"teacher variant {variant}: FAILED {type(e).__name__}: {e}", flush=True)
            rows.append({"part": "teacher", "variant": variant, "error": f"{type(e).__name__}: {e}"[:500]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _teacher_variant(cfg, path, shape, device, ceilings, eager, variant, gen, seq, flops, bf16_vs_fp32) -> list:
    """One variant at each of its batch sizes; eager is also the reference for the others' outputs."""
    rows = []
    size, cfr = shape["image_size"], cfg.clip_frames
    teacher = eager if variant == "eager" else _load_teacher(path, device, variant, 0)
    options = variant_options(variant)
    sizes = cfg.frames_per_forward if options.compile_kw is None else cfg.compile_frames_per_forward
    matmul, fp8_matmul = ceilings
    for fpf in sizes:
        teacher.batch_size = eager.batch_size = fpf
        sets = [torch.randint(0, 256, (fpf // cfr, cfr, size, size, 3), dtype=torch.uint8, device=device,
                              generator=gen) for _ in range(2)]
        t0 = time.perf_counter()
        out = teacher.encode(sets[0])      # warm-up (and compilation for this shape)
        first_call = time.perf_counter() - t0
        accuracy = _accuracy(out, eager.encode(sets[0]))
        del out
        teacher.encode(sets[1])
        it = iter(range(1 << 30))
        sec, iters = _time_loop(lambda: teacher.encode(sets[next(it) % 2]), device, cfg.seconds)
        fps = fpf / sec
        tflops = fps * flops / 1e12
        rows.append({"part": "teacher", "variant": variant, "frames_per_forward": fpf, "frames_per_s": fps,
                     "clips_per_s": fps / cfr, "tflops": tflops,
                     "pct_matmul": 100 * tflops / matmul if matmul else None,
                     "pct_fp8_matmul": 100 * tflops / fp8_matmul if fp8_matmul and options.dtype == FLOAT8 else None,
                     "iters": iters, **accuracy, "first_call_s": first_call, "tokens_per_frame": seq,
                     "gflop_per_frame": flops / 1e9, "bf16_vs_fp32_rel_err": bf16_vs_fp32})
        print(_row_text(rows[-1]), flush=True)
        del sets
    return rows


def _host_batches(n_batches: int, clips: int, cfr: int, size: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"clip_id": np.array([f"b{b}-c{i}" for i in range(clips)]),
             "frames": rng.integers(0, 256, (clips, cfr, size, size, 3), dtype=np.uint8)} for b in range(n_batches)]


def _stage(path: Path, device: torch.device, variant: str, fpf: int):
    """The stage as jobs.extract builds it; plain 'compile' (and 'compile-fp8') is the job's --teacher-compile
    (compiled and warmed up in the constructor, then one graph for any batch size). The others compile the
    teacher afterwards with static shapes ('compile-static': the same, one graph per batch size)."""
    from pipeline.stages import TeacherStage

    options = variant_options(variant)
    if options.static_fp8:
        raise ValueError(f"{variant}: static FP8 scales are benchmarked in part teacher only")
    as_job = variant.removesuffix("-fp8") == "compile"
    stage = TeacherStage(str(path), compression=Compression(), target_dtype="float16", device=str(device),
                         dtype=options.dtype or ("bfloat16" if device.type == "cuda" else "float32"),
                         frames_per_forward=fpf, compile=as_job)
    stage.teacher.attention_backends = options.attention
    if options.compile_kw is not None and not as_job:
        stage.teacher.compile_tokens(**options.compile_kw)
    return stage


def _teacher_rate(rows: list, variant: str, fpf: int) -> float | None:
    """Teacher-only clips/s for this variant and batch, from part `teacher`, if it ran."""
    variant = "-".join(w for w in variant.split("-") if w != "static")
    return next((r["clips_per_s"] for r in rows if r["part"] == "teacher" and r["variant"] == variant
                 and r["frames_per_forward"] == fpf), None)


def _pipeline_variants(cfg: BenchConfig) -> tuple[str, ...]:
    """--pipeline-variants, else --variants without the FP8 ones (the stage in FP8 is asked for by name)."""
    return cfg.pipeline_variants or tuple(v for v in cfg.variants if variant_options(v).dtype != FLOAT8)


def part_pipeline(cfg: BenchConfig, path: Path, shape: dict, device: torch.device, teacher_rows: list) -> list:
    """TeacherStage over host batches of `pipeline_frames` frames, forwarded in chunks of
    `pipeline_chunk_frames`, called from 1 or more threads at once (a Ray actor's max_concurrency):
    with 2, one call's host work (upload, target conversion) hides behind the other's GPU work."""
    rows = []
    fpf, cfr = cfg.pipeline_frames, cfg.clip_frames
    batches = _host_batches(4, fpf // cfr, cfr, shape["image_size"])
    for variant in _pipeline_variants(cfg):
        if skipped := _skipped("pipeline", variant, device):
            rows.append(skipped)
            continue
        for chunk in cfg.pipeline_chunk_frames:
            stage = _stage(path, device, variant, chunk)
            for b in batches[:2]:
                stage(dict(b))
            if chunk == min(cfg.pipeline_chunk_frames):
                rows.append(_stage_breakdown(stage, batches, device, variant, chunk))
                print(_row_text(rows[-1]), flush=True)
            for threads in cfg.pipeline_threads:
                clips_s, calls = _stage_rate(stage, batches, threads, cfg.seconds)
                alone = _teacher_rate(teacher_rows, variant, fpf)
                rows.append({"part": "pipeline", "variant": variant, "frames_per_forward": chunk,
                             "batch_frames": fpf, "threads": threads, "clips_per_s": clips_s,
                             "frames_per_s": clips_s * cfr, "teacher_only_clips_per_s": alone,
                             "efficiency": clips_s / alone if alone else None, "calls": calls})
                print(_row_text(rows[-1]), flush=True)
            del stage
    return rows


def _stage_rate(stage, batches: list[dict], threads: int, seconds: float) -> tuple[float, int]:
    """Clips/s of `stage` called back to back from `threads` threads for about `seconds`."""
    import threading

    stop = time.perf_counter() + seconds
    done = [0] * threads

    def worker(i: int) -> None:
        k = i
        while time.perf_counter() < stop:
            out = stage(dict(batches[k % len(batches)]))
            done[i] += len(out["target"])
            k += threads

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done) / (time.perf_counter() - start), sum(done)


def _stage_breakdown(stage, batches: list[dict], device: torch.device, variant: str, chunk: int) -> dict:
    """Where one TeacherStage call's time goes (each step synchronised), median of 5 calls."""
    from pipeline.compress import compress_tokens
    from pipeline.stages import stored_target
    from pipeline.store import encode_target

    steps: dict[str, list[float]] = {}

    def timed(name, fn):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        steps.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    for i in range(5):
        frames = batches[i % len(batches)]["frames"]
        with torch.inference_mode():   # as the stage runs: the compiled graph guards on it
            tokens = timed("encode_from_host_s", lambda: stage.teacher.encode(frames))
            target = timed("compress_s", lambda: compress_tokens(tokens, stage.compression))
            host = timed("to_host_f32_s", lambda: target.float().cpu().numpy())
            timed("encode_target_cpu_s", lambda: encode_target(host, "float16"))
            timed("to_host_f16_on_gpu_s", lambda: target.to(torch.float16).cpu().numpy())
            timed("stored_target_s", lambda: stored_target(target, "float16"))   # what the stage does
            on_device = torch.as_tensor(frames).to(device)
            timed("encode_from_device_s", lambda: stage.teacher.encode(on_device))
        del tokens, target, on_device
    return {"part": "stage-breakdown", "variant": variant, "frames_per_forward": chunk,
            **{k: statistics.median(v) for k, v in steps.items()}}


def host_to_device(device: torch.device, frames: int, size: int, seconds: float) -> dict:
    """GB/s of one uint8 frame batch to the GPU, from pageable and from pinned host memory."""
    host = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8))
    pinned = host.pin_memory()
    out = {"bytes": host.numel()}
    for name, src in (("pageable", host), ("pinned", pinned)):
        sec, _ = _time_loop(lambda: src.to(device, non_blocking=True), device, seconds)
        out[f"{name}_gb_s"] = host.numel() / sec / 1e9
    return out


def _video_list(cfg: BenchConfig) -> list[str]:
    folder = Path(cfg.videos)
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.name != "corrupted.mp4"
                  and p.suffix.lower() in (".mp4", ".mkv", ".webm", ".ts", ".avi", ".mov"))


def _decode_task(uri: str, seed: int, cfr: int, size: int, views: int) -> tuple[list[dict], float, str | None]:
    """One video (one seed) in a worker: its clips as batches, CPU seconds spent, error type if any."""
    from pipeline.clips import ClipSpec
    from pipeline.errors import VideoError
    from pipeline.stages import DecodeOptions, decode_video

    options = DecodeOptions(clip_spec=ClipSpec(frames=cfr, views=views), size=size, seed=seed)
    t0 = time.process_time()
    children0 = os.times()
    try:
        batches = list(decode_video(uri, options))
        error = None
    except VideoError as e:
        batches, error = [], type(e).__name__
    c1 = os.times()
    cpu = (time.process_time() - t0) + (c1.children_user - children0.children_user) + (
        c1.children_system - children0.children_system)
    return batches, cpu, error


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    # spawn: forking a process that holds a CUDA context is unsafe.
    return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))


def _run_decode(videos: list[str], workers: int, cfg: BenchConfig, size: int, seconds: float,
                consume: "_Consumer | None" = None) -> dict:
    """Feed (video, seed) tasks to the pool for `seconds`. With `consume`, decoded clips are regrouped
    into stage batches and handed to consumer threads that run the teacher stage."""
    import queue
    import threading

    tasks = ((v, seed) for seed in range(1 << 20) for v in videos)
    counted = {"clips": 0, "cpu": 0.0, "errors": 0}
    ready: queue.Queue = queue.Queue(maxsize=4)
    pending: list[np.ndarray] = []
    sample = None
    stop = threading.Event()

    def consumer() -> None:
        while not stop.is_set():
            try:
                batch = ready.get(timeout=0.1)
            except queue.Empty:
                continue
            consume(batch)
            counted["clips"] += len(batch["frames"])

    threads = [threading.Thread(target=consumer) for _ in range(consume.threads if consume else 0)]
    with _pool(workers) as pool:
        list(pool.map(_noop, range(workers)))          # start-up (imports) outside the timed window
        inflight = {pool.submit(_decode_task, *next(tasks), cfg.clip_frames, size, cfg.views)
                    for _ in range(2 * workers)}
        for t in threads:
            t.start()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            done, inflight = cf.wait(inflight, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                batches, cpu, err = fut.result()
                counted["cpu"] += cpu
                counted["errors"] += err is not None
                for b in batches:
                    sample = b["frames"] if sample is None else sample
                    if consume is None:
                        counted["clips"] += len(b["frames"])
                    else:
                        pending.append(b["frames"])
                inflight.add(pool.submit(_decode_task, *next(tasks), cfg.clip_frames, size, cfg.views))
            while consume is not None and sum(len(f) for f in pending) >= consume.clips:
                frames = np.concatenate(pending)
                pending = [frames[consume.clips:]] if len(frames) > consume.clips else []
                try:
                    ready.put({"frames": frames[: consume.clips]}, timeout=max(0.0, seconds - (time.perf_counter() - start)))
                except queue.Full:
                    break
        wall = time.perf_counter() - start
        stop.set()
        for t in threads:
            t.join()
        for fut in inflight:
            fut.cancel()
    clips = counted["clips"]
    return {"workers": workers, "clips_per_s": clips / wall, "cpu_s_per_clip_est": counted["cpu"] / max(clips, 1),
            "errors": counted["errors"], "seconds": wall, "sample": sample}


def _noop(_: int) -> None:
    import pipeline.stages  # noqa: F401  (warm the worker's imports)


class _Consumer:
    def __init__(self, stage, clips: int, threads: int):
        self.stage, self.clips, self.threads = stage, clips, threads

    def __call__(self, batch: dict) -> None:
        self.stage(batch)


def jpeg_seconds_per_clip(frames: np.ndarray, seconds: float = 2.0) -> float:
    """One core's seconds to JPEG-encode one decoded clip (the store's default frame encoding)."""
    from pipeline.stages import encoded_frames

    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoded_frames(frames)
        n += len(frames)
    return (time.perf_counter() - start) / n


def part_decode(cfg: BenchConfig, path: Path, shape: dict, device: torch.device, teacher_rows: list) -> list:
    videos = _video_list(cfg)
    if not videos:
        print(f"decode: no videos under {cfg.videos}; skipped", flush=True)
        return []
    size, cfr, fpf = shape["image_size"], cfg.clip_frames, cfg.pipeline_frames
    rows = []
    sample = None
    for workers in cfg.decode_workers:
        r = _run_decode(videos, workers, cfg, size, cfg.decode_seconds)
        sample = r.pop("sample")
        rows.append({"part": "decode-only", **r, "clips_per_s_per_worker": r["clips_per_s"] / workers})
        print(_row_text(rows[-1]), flush=True)
    jpeg = jpeg_seconds_per_clip(sample)
    rows.append({"part": "jpeg-encode", "workers": 1, "cpu_s_per_clip": jpeg, "clips_per_s": 1 / jpeg})
    print(_row_text(rows[-1]), flush=True)
    variant = _pipeline_variants(cfg)[-1]
    if skipped := _skipped("decode+teacher", variant, device):
        return rows + [skipped]
    chunk = min(cfg.pipeline_chunk_frames)
    stage = _stage(path, device, variant, chunk)
    for b in _host_batches(2, fpf // cfr, cfr, size):
        stage(b)
    workers = max(cfg.decode_workers)
    threads = max(cfg.pipeline_threads)
    r = _run_decode(videos, workers, cfg, size, cfg.decode_seconds, consume=_Consumer(stage, fpf // cfr, threads))
    r.pop("sample")
    alone = _teacher_rate(teacher_rows, variant, fpf)
    # CPU seconds per clip measured with the whole node decoding (ffmpeg threads included), plus JPEG.
    full_node = rows[len(cfg.decode_workers) - 1]
    cpu_per_clip = full_node["cpu_s_per_clip_est"] + jpeg
    need = 0.9 * alone * cpu_per_clip if alone else None
    # cpu_s_per_clip_est here counts only the clips the teacher finished, so it is not a decode cost.
    r.pop("cpu_s_per_clip_est")
    rows.append({"part": "decode+teacher", "variant": variant, **r, "stage_threads": threads,
                 "teacher_only_clips_per_s": alone, "teacher_busy": r["clips_per_s"] / alone if alone else None,
                 "cpu_s_per_clip_decode_jpeg": cpu_per_clip, "cpu_cores_per_gpu_for_90pct": need,
                 "videos": [Path(v).name for v in videos]})
    print(_row_text(rows[-1]), flush=True)
    return rows


def part_ray(cfg: BenchConfig, work: Path) -> list:
    """CPU: jobs.extract on a local Ray vs the same stages chained in this process, same inputs."""
    from jobs.extract import ExtractConfig, extract, store_schema
    from pipeline.stages import DecodeOptions, TeacherStage, decode_videos, write_shards
    from pipeline.store import StoreWriter, open_store
    from pipeline.testing import make_tiny_teacher

    videos = _video_list(cfg)
    if not videos:
        print(f"ray: no videos under {cfg.videos}; skipped", flush=True)
        return []
    teacher = make_tiny_teacher(work / "tiny", "internvl_vision", image_size=112, hidden_size=64)
    listing = work / "videos.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"video_uri": videos}), listing)
    common = dict(input=str(listing), teacher=str(teacher), size=112, views=cfg.views, formats=("webdataset",),
                  ray_address="local")
    ray_cfg = ExtractConfig(output=str(work / "ray-store"), **common)
    t0 = time.perf_counter()
    summary = extract(ray_cfg)
    ray_wall = time.perf_counter() - t0
    ray_clips = open_store(ray_cfg.output).num_clips

    local_cfg = ExtractConfig(output=str(work / "local-store"), **common)
    t0 = time.perf_counter()
    from jobs.extract import clip_spec, describe_teacher

    store = StoreWriter(local_cfg.output, store_schema(local_cfg, describe_teacher(local_cfg, "float32")))
    store.prepare()
    stage = TeacherStage(str(teacher), compression=Compression(), device="cpu", dtype="float32", keep_frames=False)
    options = DecodeOptions(clip_spec=clip_spec(local_cfg), size=local_cfg.size, seed=local_cfg.seed,
                            frame_encoding=local_cfg.frame_encoding, quality=local_cfg.jpeg_quality)
    decoded = decode_videos({"video_uri": videos, "skip": [[] for _ in videos]}, options=options, store=store)
    write_shards(store, (stage(batch) for batch in decoded), shard_bytes=512 * 10 ** 6)
    store.finalise()
    local_wall = time.perf_counter() - t0
    local_clips = open_store(local_cfg.output).num_clips
    row = {"part": "ray-vs-local", "clips": ray_clips, "ray_wall_s": ray_wall, "ray_clips_per_s": ray_clips / ray_wall,
           "ray_pipeline_clips_per_s": summary.get("clips_per_second"), "local_clips": local_clips,
           "local_wall_s": local_wall, "local_clips_per_s": local_clips / local_wall,
           "ray_over_local": (ray_clips / ray_wall) / (local_clips / local_wall), "videos": len(videos)}
    print(_row_text(row), flush=True)
    return [row]


# ------------------------------------------------------------------------------------------ report
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def _row_text(row: dict) -> str:
    return "  " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if not isinstance(v, list))


def markdown(result: dict) -> str:
    lines = [f"device: {result['device']}; torch {result['torch']}; commit {result['commit']}; {result['date']}"]
    if result.get("matmul"):
        m = result["matmul"]
        lines.append(f"measured {m['dtype']} matmul {'x'.join(map(str, m['shape']))}: {m['tflops']:.3g} TFLOP/s")
    if result.get("matmul_end"):
        lines.append(f"same, after all parts: {result['matmul_end']['tflops']:.3g} TFLOP/s")
    for key, what in (("matmul_teacher_gemm", "teacher-shaped GEMM"), ("matmul_fp8", "FP8 GEMM (pipeline.fp8)"),
                      ("matmul_fp8_teacher_gemm", "teacher-shaped FP8 GEMM")):
        if result.get(key):
            g = result[key]
            lines.append(f"{what} {'x'.join(map(str, g['shape']))}: {g['tflops']:.3g} TFLOP/s")
    if result.get("h2d"):
        h = result["h2d"]
        lines.append(f"host->GPU copy of {h['bytes'] / 1e6:.0f} MB: pageable {h['pageable_gb_s']:.3g} GB/s, "
                     f"pinned {h['pinned_gb_s']:.3g} GB/s")
    for name, why in result.get("failed", {}).items():
        lines.append(f"part {name} FAILED: {why}")
    lines += [f"{r['part']} variant {r['variant']} skipped: {r['skipped']}" for r in result["rows"] if "skipped" in r]
    cols = {
        "teacher": ["variant", "frames_per_forward", "frames_per_s", "clips_per_s", "tflops", "pct_matmul",
                    "pct_fp8_matmul", "rel_err_vs_eager", "cos_vs_eager", "target_rel_err_vs_eager",
                    "target_cos_vs_eager", "bf16_vs_fp32_rel_err", "first_call_s"],
        "stage-breakdown": ["variant", "frames_per_forward", "encode_from_host_s", "encode_from_device_s",
                            "compress_s", "to_host_f32_s", "encode_target_cpu_s", "to_host_f16_on_gpu_s",
                            "stored_target_s"],
        "pipeline": ["variant", "batch_frames", "frames_per_forward", "threads", "clips_per_s",
                     "teacher_only_clips_per_s", "efficiency"],
        "decode-only": ["workers", "clips_per_s", "clips_per_s_per_worker", "cpu_s_per_clip_est", "errors"],
        "jpeg-encode": ["workers", "cpu_s_per_clip", "clips_per_s"],
        "decode+teacher": ["variant", "workers", "stage_threads", "clips_per_s", "teacher_only_clips_per_s",
                           "teacher_busy",
                           "cpu_s_per_clip_decode_jpeg", "cpu_cores_per_gpu_for_90pct"],
        "ray-vs-local": ["clips", "ray_clips_per_s", "local_clips_per_s", "ray_over_local", "ray_wall_s",
                         "local_wall_s"],
    }
    for part, names in cols.items():
        rows = [r for r in result["rows"] if r["part"] == part and "skipped" not in r]
        if not rows:
            continue
        lines += ["", f"**{part}**", "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
        lines += ["| " + " | ".join(_fmt(r.get(n)) for n in names) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchConfig, argv)
    device = _device(cfg)
    shape = INTERNVIT_300M if cfg.shape == "internvit-300m" else TINY
    torch.set_grad_enabled(False)
    result: dict[str, Any] = {
        "config": to_dict(cfg), "shape": shape, "torch": torch.__version__, "commit": cfg.commit or _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host_cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "rows": []}
    if device.type == "cuda":
        result["sdpa_flash"] = torch.backends.cuda.flash_sdp_enabled()
    matmul = fp8_matmul = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "matmul" in cfg.parts:
            result["matmul"] = matmul_tflops(device, min(cfg.seconds, 3.0))
            matmul = result["matmul"]["tflops"]
            print(f"matmul: {matmul:.1f} TFLOP/s", flush=True)
            if device.type == "cuda":
                # The teacher's own GEMM shape (MLP up-projection of 256 frames): the reachable ceiling.
                tokens = 256 * ((shape["image_size"] // shape["patch_size"]) ** 2 + 1)
                result["matmul_teacher_gemm"] = matmul_tflops(
                    device, 2.0, (tokens, shape["hidden_size"], shape["intermediate_size"]))
                result["h2d"] = host_to_device(device, cfg.pipeline_frames, shape["image_size"], 2.0)
                print(f"teacher GEMM: {result['matmul_teacher_gemm']['tflops']:.1f} TFLOP/s; "
                      f"H2D: {result['h2d']}", flush=True)
                if fp8_unsupported_reason(device) is None:
                    result["matmul_fp8"] = matmul_tflops(device, min(cfg.seconds, 3.0), fp8=True)
                    fp8_matmul = result["matmul_fp8"]["tflops"]
                    result["matmul_fp8_teacher_gemm"] = matmul_tflops(
                        device, 2.0, (tokens, shape["hidden_size"], shape["intermediate_size"]), fp8=True)
                    print(f"FP8 GEMM: {fp8_matmul:.1f} TFLOP/s, teacher-shaped "
                          f"{result['matmul_fp8_teacher_gemm']['tflops']:.1f}", flush=True)
        need_model = {"teacher", "pipeline", "decode"} & set(cfg.parts)
        path = make_teacher_dir(work / "teacher", shape, device) if need_model else None
        parts = {"teacher": lambda: part_teacher(cfg, path, shape, device, matmul, fp8_matmul),
                 "pipeline": lambda: part_pipeline(cfg, path, shape, device, result["rows"]),
                 "decode": lambda: part_decode(cfg, path, shape, device, result["rows"]),
                 "ray": lambda: part_ray(cfg, work)}
        for name, run in parts.items():
            if name not in cfg.parts:
                continue
            try:
                result["rows"] += run()
            except Exception as e:  # a failed part is reported, the others still run
                import traceback

                traceback.print_exc()
                result.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"
                print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            if cfg.json:
                Path(cfg.json).write_text(json.dumps(result, indent=2, default=str))
    if "matmul" in cfg.parts and device.type == "cuda":
        result["matmul_end"] = matmul_tflops(device, 2.0)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
