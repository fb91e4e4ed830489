"""Student encoder speed: latency, achieved TFLOP/s and per-frame cost next to the teacher.

    python bench/student.py                  # the H200 run (random weights, bf16, batch 1)
    python bench/student.py --tiny           # CPU smoke run of the same code paths

Sections, in priority order (each skipped, and said so, once --budget-s is spent):
  matmul   measured bf16 matmul rate (8192^3, random data): the ceiling the other rates are read against
  student  encoder latency for each frame count, eager bf16 vs the FastEncoder variants, and each
           variant's relative error against the eager fp32 model (the optimised path's check)
  teacher  InternViT-300M-shaped transformers InternVLVisionModel (SDPA), eager and compiled
  train    fwd+bwd+AdamW on synthetic in-memory clips (bf16 autocast): clips/s and MFU
  train_store  the trainer itself (student.train.throughput: jitter, target standardisation, clipped
           loss, AdamW + schedule) fed from memory vs streamed by its loader from a store that this
           section writes to local disk (pipeline.store.write_store, no Ray): clips/s, MFU, step ms
           and the fraction of step time spent waiting for data, per loader worker count; beside
           each, the loader's own rate without training (its headroom)
FLOPs are analytic (matmuls and attention only); MFU is against the measured matmul rate. Timing:
CUDA events after warm-up, median (train_store: wall time per step over a window, as the trainer logs it).
Rows go to stdout as a markdown table and, with --out, to student_bench.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student import LiteFrameConfig, LiteFrameModel, config_for_store, preset_config  # noqa: E402
from student.fast import FastEncoder  # noqa: E402


# -- FLOPs -------------------------------------------------------------------------------------

def student_flops(cfg: LiteFrameConfig, frames: int) -> float:
    """Matmul + attention FLOPs of one pass over `frames` frames (one sequence)."""
    c, m, p = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
    t, (h, w) = frames, cfg.patch_grid
    flops = 2.0 * t * h * w * 3 * p * p * c
    merges = dict(zip(cfg.downsample_after, cfg.downsample_stride))
    for i in range(cfg.num_hidden_layers):
        if i in merges:
            st, sh, sw = merges[i]
            t, h, w = t // st, h // sh, w // sw
            flops += 2.0 * t * h * w * (st * sh * sw * c) * c
        n = h * w
        flops += 2.0 * t * n * (4 * c * c + 2 * c * m) + 4.0 * t * n * n * c
    head = (c * cfg.head_hidden_size + cfg.head_hidden_size * cfg.target_dim) if cfg.head_hidden_size else c * cfg.target_dim
    return flops + 2.0 * t * h * w * head


def vit_flops(frames: int, image: int, patch: int, width: int, layers: int, mlp: int, cls: int = 1) -> float:
    """A plain ViT (the teacher) over `frames` images."""
    n = (image // patch) ** 2
    tokens = n + cls
    per_frame = 2.0 * n * 3 * patch * patch * width
    per_frame += layers * (2.0 * tokens * (4 * width * width + 2 * width * mlp) + 4.0 * tokens * tokens * width)
    return frames * per_frame


# -- a store on local disk ---------------------------------------------------------------------

def texture_frame(rng: np.random.Generator, size: tuple[int, int], noise: float = 10.0) -> np.ndarray:
    """Smooth random texture at three scales plus pixel noise. At 448 px, JPEG quality 90 makes about
    70 KB of it, the size of a real video frame, so the loader decodes as much as it would."""
    from PIL import Image

    h, w = size
    img = np.full((h, w, 3), 128.0, dtype=np.float32)
    for cells, amp in ((4, 70.0), (16, 35.0), (64, 18.0)):
        low = rng.uniform(-amp, amp, (cells, cells, 3)).astype(np.float32)
        img += np.stack([np.asarray(Image.fromarray(low[..., c]).resize((w, h), Image.BICUBIC)) for c in range(3)], -1)
    img += rng.normal(0.0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_bench_store(root: str, cfg: LiteFrameConfig, clips: int, shard_bytes: int, formats: list[str],
                      pool: int = 256, seed: int = 0):
    """A store shaped for `cfg` (frame size, clip length, target grid and width; float16 targets, JPEG
    q90 frames) written in this process by the store's own writer. Frames are drawn from a pool of
    `pool` distinct encoded textures: every sample is still decoded on its own, only making them is
    saved. Targets are random normal."""
    from pipeline.store import encode_frame, frame_column, make_schema, write_store

    rng = np.random.default_rng(seed)
    (h, w), t, grid, dim = cfg.image_hw, cfg.clip_frames, list(cfg.target_grid), cfg.target_dim
    tokens = grid[0] * grid[1] * grid[2]
    teacher_grid = [h // cfg.patch_size, w // cfg.patch_size]
    frames = [encode_frame(texture_frame(rng, (h, w)), "jpg", 90) for _ in range(pool)]
    schema = make_schema(
        teacher={"name_or_path": "bench-random", "revision": None, "layer": -1, "head": None, "dim": dim,
                 "grid": teacher_grid},
        compression={"method": "avg", "factors": [t // grid[0], teacher_grid[0] // grid[1], teacher_grid[1] // grid[2]]},
        clip={"frames": t, "views": 1, "fps_range": [1.0, 4.0]},
        frames={"encoding": "jpg", "size": [h, w], "quality": 90},
        target={"tokens": tokens, "grid": grid, "dim": dim, "dtype": "float16"},
        formats=formats)
    per_video = 16

    def rows():
        for i in range(clips):
            v, c = divmod(i, per_video)
            vid = f"bench{v:05d}"
            yield {"clip_id": f"{vid}-v0-c{c:05d}", "video_id": vid, "video_uri": f"/videos/{vid}.mp4", "view": 0,
                   "clip_index": c, "fps": 2.0, "start": 2.0 * c, "timestamps": [2.0 * c + 0.5 * k for k in range(t)],
                   "crop_box": [0, 0, w, h], "padded": 0, "video_clips": per_video,
                   **{frame_column(k): frames[p] for k, p in enumerate(rng.integers(0, pool, t))},
                   "target": rng.standard_normal((tokens, dim), dtype=np.float32).astype(np.float16)}

    store = write_store(root, schema, rows(), shard_bytes=shard_bytes)
    return store, float(np.mean([len(f) for f in frames]))


def drop_page_cache(root: str) -> bool:
    """Ask the kernel to forget the store's (written, fsynced) pages, so a run reads from the disk
    rather than from memory. Best effort: False where the call is missing or refused."""
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        for d, _, files in os.walk(root):
            for f in files:
                fd = os.open(os.path.join(d, f), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    except OSError:
        return False
    return True


def loader_rate(data, skip: int, batches: int) -> float:
    """Clips/s of the trainer's loader alone (a student.data.TrainData, nothing trained), after
    `skip` batches that drain its start-up burst."""
    it = iter(data.epoch(0))
    for _ in range(skip):
        next(it)
    t0, clips = time.perf_counter(), 0
    for _ in range(batches):
        clips += len(next(it)["clip_id"])
    rate = clips / (time.perf_counter() - t0)
    del it  # stops the workers now
    return rate


# -- timing ------------------------------------------------------------------------------------

def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.t0 = time.monotonic()
        self.rows: list[dict] = []
        self.matmul_tflops: float | None = None
        self.out = Path(args.out) if args.out else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def record(self, **row) -> None:
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        if self.matmul_tflops and "tflops" in row:
            row["pct_matmul"] = round(100 * row["tflops"] / self.matmul_tflops, 1)
        row["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.out:
            with open(self.out / "student_bench.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def section(self, name: str, min_left: float) -> bool:
        if self.left() < min_left:
            self.record(section=name, skipped=f"budget: {self.left():.0f}s left, needs ~{min_left:.0f}s")
            return False
        return True

    # -- sections ------------------------------------------------------------------------------

    def matmul(self) -> None:
        n = 8192 if self.device.type == "cuda" else 512
        a = torch.randn(n, n, device=self.device, dtype=self.dtype)
        b = torch.randn(n, n, device=self.device, dtype=self.dtype)
        ms = median_ms(lambda: a @ b, self.device, warmup=3, iters=20)
        self.matmul_tflops = 2 * n**3 / ms / 1e9
        self.record(section="matmul", shape=f"{n}^3", ms=ms, tflops=self.matmul_tflops)

    def student_model(self) -> LiteFrameModel:
        cfg = preset_config("tiny" if self.args.tiny else "vitb")
        torch.manual_seed(0)
        model = LiteFrameModel(cfg).eval()
        with torch.no_grad():  # exercise every path: temporal convs start at zero
            for block in model.blocks:
                block.temporal.weight.normal_(0, 0.02)
        return model.to(self.device)

    def encoder(self, base: LiteFrameModel, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The student's encode function for one variant (compiled ones lazily, at their first call)."""
        if name == "eager":
            return _cast(base, self.dtype).encode
        spec = VARIANTS[name]
        # Dynamo caches compiled code per function and does not guard on the attention backend.
        torch._dynamo.reset()
        return FastEncoder(base, dtype=self.dtype, mode=spec.get("mode"), dynamic=spec.get("dynamic"),
                           fused_gelu=spec.get("fused_gelu")).encode

    def student(self) -> None:
        """Latency per variant and frame count; at the first frame count also the relative error of
        each variant against the eager fp32 model on the same input (the optimised path's check)."""
        base = self.student_model().float()
        cfg = base.config
        check_frames = min(self.args.frames)
        for name in self.args.variants.split(","):
            fn = self.encoder(base, name)
            spec = VARIANTS.get(name, {})
            for frames in spec.get("frames") or self.args.frames:
                if self.left() < 30:
                    self.record(section="student", variant=name, frames=frames, skipped="budget")
                    continue
                x = torch.randn(1, frames, 3, *cfg.image_hw, device=self.device, dtype=self.dtype)
                flops = student_flops(cfg, frames)
                t0 = time.monotonic()
                try:
                    with torch.inference_mode(), spec.get("sdpa", _null)():
                        out = fn(x)  # compile / autotune for this shape, outside the timing
                        ms = median_ms(lambda: fn(x), self.device)
                        rel = None
                        if frames == check_frames:
                            x_check = torch.randn(1, frames, 3, *cfg.image_hw, device=self.device, dtype=self.dtype)
                            ref = base.encode(x_check.float())
                            rel = ((fn(x_check).float() - ref).norm() / ref.norm()).item()
                except Exception as e:  # e.g. an attention backend this device lacks
                    self.record(section="student", variant=name, frames=frames, error=_short(e))
                    break
                extra = {"rel_err_vs_fp32": rel} if rel is not None else {}
                self.record(section="student", variant=name, frames=frames, ms=ms, ms_per_frame=ms / frames,
                            tflops=flops / ms / 1e9, gflop_per_frame=flops / frames / 1e9,
                            first_call_s=time.monotonic() - t0, dtype=str(out.dtype), **extra)
                del x
            del fn

    def profile(self) -> None:
        """Where the student's time goes: device time per kernel, eager vs compiled, one 64-frame pass."""
        from torch.profiler import ProfilerActivity, profile

        base = self.student_model()
        frames = 8 if self.args.tiny else 64
        x = torch.randn(1, frames, 3, *base.config.image_hw, device=self.device, dtype=self.dtype)
        activities = [ProfilerActivity.CUDA] if self.device.type == "cuda" else [ProfilerActivity.CPU]
        for name in ("eager", "compiled"):
            fn = self.encoder(base, name)
            with torch.inference_mode():
                fn(x)
                fn(x)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                with profile(activities=activities) as prof:
                    for _ in range(3):
                        fn(x)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
            kernels = [(e.key, _self_device_us(e), e.count) for e in prof.key_averages()]
            kernels = sorted([k for k in kernels if k[1] > 0], key=lambda k: -k[1])
            total = sum(k[1] for k in kernels) or 1.0
            groups: dict[str, float] = {}
            for key, us, _ in kernels:
                groups[_kernel_group(key)] = groups.get(_kernel_group(key), 0.0) + us
            self.record(section="profile", variant=name, frames=frames, ms=total / 3e3,
                        groups={g: round(100 * us / total, 1) for g, us in sorted(groups.items(), key=lambda i: -i[1])},
                        top=[[k[:90], round(100 * us / total, 1), n // 3] for k, us, n in kernels[:18]])

    def teacher(self) -> None:
        from transformers import InternVLVisionConfig, InternVLVisionModel

        shape = (dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                      image_size=112) if self.args.tiny else
                 dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      image_size=448))
        vcfg = InternVLVisionConfig(**shape, patch_size=14, attention_bias=True, use_mean_pooling=False)
        torch.manual_seed(0)
        model = InternVLVisionModel._from_config(vcfg, attn_implementation="sdpa").to(self.device, self.dtype).eval()
        fns = {"eager": model}
        if "compiled" in self.args.teacher_variants:
            fns["compiled"] = torch.compile(model)
        for frames in self.args.teacher_frames:
            x = torch.randn(frames, 3, shape["image_size"], shape["image_size"], device=self.device, dtype=self.dtype)
            flops = vit_flops(frames, shape["image_size"], 14, shape["hidden_size"], shape["num_hidden_layers"],
                              shape["intermediate_size"])
            for name, fn in fns.items():
                if self.left() < 60:
                    self.record(section="teacher", variant=name, frames=frames, skipped="budget")
                    continue
                t0 = time.monotonic()
                with torch.inference_mode():
                    fn(pixel_values=x)
                    ms = median_ms(lambda: fn(pixel_values=x), self.device)
                self.record(section="teacher", variant=name, frames=frames, ms=ms, ms_per_frame=ms / frames,
                            tflops=flops / ms / 1e9, gflop_per_frame=flops / frames / 1e9,
                            first_call_s=time.monotonic() - t0)

    def train(self) -> None:
        cfg = preset_config("tiny" if self.args.tiny else "vitb")
        batch = self.args.train_batch
        flops = 3 * batch * student_flops(cfg, cfg.clip_frames)
        for name in self.args.train_variants.split(","):
            if self.left() < 50:
                self.record(section="train", variant=name, skipped="budget")
                continue
            torch.manual_seed(0)
            model = LiteFrameModel(cfg).to(self.device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=self.device.type == "cuda")
            fwd = torch.compile(model) if name == "compiled" else model
            x = torch.randn(batch, cfg.clip_frames, 3, *cfg.image_hw, device=self.device)
            y = torch.randn(batch, cfg.target_tokens, cfg.target_dim, device=self.device)

            def step() -> None:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                    loss = F.mse_loss(fwd(x).float(), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            t0 = time.monotonic()
            ms = median_ms(step, self.device, warmup=3, iters=10)
            mem = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else 0.0
            self.record(section="train", variant=name, batch_clips=batch, ms=ms, clips_per_s=1e3 * batch / ms,
                        tflops=flops / ms / 1e9, max_mem_gib=mem, first_calls_s=time.monotonic() - t0)
            del model, opt, fwd

    def train_store(self) -> None:
        """The trainer's own step (student.train.throughput) fed from memory, then streamed from a
        store on local disk for each loader worker count. Steps stay inside one epoch, so no loader
        restart is timed; store runs warm up for 2 x workers + 3 steps, which drains the loader's
        prefetched start-up batches (prefetch_factor 2), so the window shows its steady state."""
        a = self.args
        preset = "tiny" if a.tiny else "vitb"
        root = a.store_dir or tempfile.mkdtemp(prefix="liteframe-bench-store-")
        try:
            self._train_store(root, preset)
        finally:
            if not a.store_dir:
                shutil.rmtree(root, ignore_errors=True)

    def _train_store(self, root: str, preset: str) -> None:
        from student.data import TrainData, read_store
        from student.train import TrainConfig, throughput

        a = self.args
        formats = a.store_formats.split(",")
        if "zarr" in formats:
            try:
                import zarr  # noqa: F401
            except ImportError as e:  # a bare GPU image: the webdataset rows still count
                self.record(section="store", format="zarr", skipped=_short(e))
                formats.remove("zarr")
        t0 = time.monotonic()
        store, jpeg_bytes = write_bench_store(root, preset_config(preset), a.store_clips,
                                              int(a.store_shard_mb * 2**20), formats)
        sizes = {f: sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(os.path.join(root, f)) for n in ns)
                 for f in formats}
        self.record(section="store", path=root, clips=store.num_clips, shards=len(store.shards()),
                    gib={f: round(b / 2**30, 3) for f, b in sizes.items()}, jpeg_kb=jpeg_bytes / 1e3,
                    target=[store.schema["target"]["tokens"], store.schema["target"]["dim"], "float16"],
                    write_s=time.monotonic() - t0, cpus=os.cpu_count())
        info = read_store(root)
        model_cfg = config_for_store(preset, store.schema)
        flops = 3 * a.train_batch * student_flops(model_cfg, model_cfg.clip_frames)
        compiled = a.store_variant == "compiled"

        def config(fmt: str = "webdataset", workers: int = 0) -> TrainConfig:
            return TrainConfig(data=root, output=os.path.join(root, "run"), preset=preset, format=fmt,
                               batch_size=a.train_batch, num_workers=workers, compile=compiled, seed=0)

        def measure(source: str, fmt: str, workers: int) -> None:
            name = dict(section="train_store", variant=a.store_variant, source=source,
                        **({"format": fmt, "workers": workers} if source == "store" else {}))
            if self.left() < (30 if source == "store" else 90):
                self.record(**name, skipped="budget")
                return
            cfg = config(fmt, workers)
            extra = {}
            t = time.monotonic()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:  # one failing run must not lose the other rows
                if source == "store":
                    # the loader exactly as the throughput hook builds it
                    data = TrainData(info, fmt=fmt, batch_size=cfg.batch_size, seed=cfg.seed, num_workers=workers,
                                     shuffle_buffer=cfg.shuffle_buffer, augment=cfg.augment)
                    per_epoch, skip = data.batches_per_epoch(), 2 * max(1, workers)
                    warmup = skip + 3
                    steps = min(a.store_steps, per_epoch - warmup)
                    if steps < 5:
                        raise ValueError(f"{per_epoch} batches per epoch leave {steps} timed steps: "
                                         "give more --store-clips")
                    extra["cache_dropped"] = drop_page_cache(root)
                    extra["loader_clips_per_s"] = loader_rate(data, skip, min(a.store_steps, per_epoch - skip))
                    drop_page_cache(root)
                else:
                    warmup, steps = 5, a.store_steps
                r = throughput(cfg, source=source, steps=steps, warmup=warmup)
            except Exception as e:
                self.record(**name, error=_short(e))
                return
            mem = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else 0.0
            self.record(**name, batch_clips=r["batch_size"], warmup=warmup, steps=steps, ms=r["step_ms"],
                        clips_per_s=r["clips_per_s"], data_wait_frac=r["data_wait_frac"],
                        tflops=flops / r["step_ms"] / 1e9, **extra, max_mem_gib=mem, call_s=time.monotonic() - t)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

        measure("synthetic", "webdataset", 0)   # first: it pays the compile, the store runs reuse it
        for fmt in formats:
            for workers in a.store_workers:
                measure("store", fmt, workers)

    def table(self) -> None:
        print("\n| section | variant | frames/batch | ms | ms/frame | TFLOP/s | % matmul | note |")
        print("|---|---|---|---|---|---|---|---|")
        for r in self.rows:
            n = r.get("frames", r.get("batch_clips", r.get("shape", "")))
            note = r.get("skipped") or r.get("error") or (json.dumps(r["groups"]) if "groups" in r else "") or (f"rel err {r['rel_err_vs_fp32']:.2e}" if "rel_err_vs_fp32" in r else "")
            if "clips_per_s" in r:
                note = f"{r['clips_per_s']:.1f} clips/s"
            if r["section"] == "store" and "clips" in r:
                note = (f"{r['clips']} clips in {r['shards']} shards, {r['gib']} GiB, JPEG {r['jpeg_kb']:.0f} KB, "
                        f"target {r['target']}, written in {r['write_s']:.0f} s")
            if "data_wait_frac" in r:
                note += f", data wait {100 * r['data_wait_frac']:.1f}%"
            if "loader_clips_per_s" in r:
                note += f", loader alone {r['loader_clips_per_s']:.0f} clips/s"
            variant = " ".join(str(r[k]) for k in ("variant", "source", "format") if k in r)
            if "workers" in r:
                variant += f" {r['workers']} workers"
            print(f"| {r['section']} | {variant} | {n} | {r.get('ms', '')} | {r.get('ms_per_frame', '')} "
                  f"| {r.get('tflops', '')} | {r.get('pct_matmul', '')} | {note} |")


# Attention backends are picked when a graph is traced, so the context wraps compile and calls.
def _null():
    from contextlib import nullcontext
    return nullcontext()


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]


def _self_device_us(event) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def _kernel_group(name: str) -> str:
    n = name.lower()
    for group, marks in (("attention", ("flash", "fmha", "attention", "sdpa")),
                         ("conv", ("implicit_convolve", "cudnn::", "conv2d")),
                         ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "triton_mm", "triton_tem")),
                         ("fused", ("triton_",)), ("copy", ("copy", "cat")), ("norm", ("norm",))):
        if any(m in n for m in marks):
            return group
    return "other"


def _sdpa(*backends: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return lambda: sdpa_kernel([getattr(SDPBackend, b) for b in backends])


VARIANTS: dict[str, dict] = {
    "compiled": {},  # FastEncoder's default: frame axis dynamic, the rest static
    "compiled-unfused": {"fused_gelu": False, "frames": [256]},
    "compiled-dynamic": {"dynamic": True},
    "compiled-static": {"dynamic": False},
    "compiled-cudnn": {"sdpa": _sdpa("CUDNN_ATTENTION")},
    "compiled-flash": {"sdpa": _sdpa("FLASH_ATTENTION")},
    "autotune": {"mode": "max-autotune-no-cudagraphs", "dynamic": False, "frames": [256]},
    "cudagraphs": {"mode": "reduce-overhead", "dynamic": False, "frames": [32]},
}


def _cast(model: LiteFrameModel, dtype: torch.dtype) -> LiteFrameModel:
    import copy
    return copy.deepcopy(model).to(dtype).eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with the tiny preset")
    ap.add_argument("--frames", default="32,64,256,512")
    ap.add_argument("--teacher-frames", default="32,64")
    ap.add_argument("--variants", default="eager,compiled", help=f"student: eager and {sorted(VARIANTS)}")
    ap.add_argument("--teacher-variants", default="eager,compiled")
    ap.add_argument("--train-variants", default="eager,compiled")
    ap.add_argument("--train-batch", type=int, default=32, help="clips per training step")
    ap.add_argument("--store-clips", type=int, default=None, help="train_store: clips written (2048; tiny 64)")
    ap.add_argument("--store-shard-mb", type=float, default=None, help="train_store: shard size (256; tiny 1)")
    ap.add_argument("--store-formats", default="webdataset", help="train_store: webdataset and/or zarr")
    ap.add_argument("--store-workers", default=None, help="train_store: loader worker counts (4,8,12; tiny 0,2)")
    ap.add_argument("--store-steps", type=int, default=None, help="train_store: timed steps per run (40; tiny 20)")
    ap.add_argument("--store-variant", choices=["eager", "compiled"], default=None,
                    help="train_store: the trainer's --compile off or on (compiled; tiny eager)")
    ap.add_argument("--store-dir", default=None, help="train_store: where to write the store (a new temp dir)")
    ap.add_argument("--sections", default="matmul,student,teacher,train,train_store", help="also: profile")
    ap.add_argument("--budget-s", type=float, default=380.0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    args.frames = [int(f) for f in args.frames.split(",") if f]
    args.teacher_frames = [int(f) for f in args.teacher_frames.split(",") if f]
    if args.tiny:
        args.frames, args.teacher_frames, args.train_batch = [8, 16], [8], 2
    for name, full, tiny in (("store_clips", 2048, 64), ("store_shard_mb", 256, 1), ("store_workers", "4,8,12", "0,2"),
                             ("store_steps", 40, 20), ("store_variant", "compiled", "eager")):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    args.store_workers = [int(w) for w in str(args.store_workers).split(",") if w]
    bench = Bench(args)
    env = dict(section="env", torch=torch.__version__, python=platform.python_version(), device=str(bench.device),
               gpu=torch.cuda.get_device_name() if bench.device.type == "cuda" else platform.processor(),
               commit=os.environ.get("COMMIT", "?"), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    bench.record(**env)
    minimum = {"profile": 60, "matmul": 5, "student": 60, "teacher": 30, "train": 60, "train_store": 15 if args.tiny else 150}
    for name in args.sections.split(","):
        if bench.section(name, minimum[name]):
            try:
                getattr(bench, name)()
            except Exception as e:  # one failing section must not lose the others' numbers
                bench.record(section=name, error=_short(e))
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
    bench.table()


if __name__ == "__main__":
    main()
