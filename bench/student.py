"""Student encoder speed: latency, achieved TFLOP/s and per-frame cost next to the teacher.

    python bench/student.py                  # the H200 run (random weights, bf16, batch 1)
    python bench/student.py --tiny           # CPU smoke run of the same code paths

Sections, in priority order (each skipped, and said so, once --budget-s is spent):
  matmul   measured bf16 matmul rate (8192^3, random data): the ceiling the other rates are read against
  student  encoder latency for each frame count, eager bf16 vs the FastEncoder variants, and each
           variant's relative error against the eager fp32 model (the optimised path's check)
  teacher  InternViT-300M-shaped transformers InternVLVisionModel (SDPA), eager and compiled
  train    fwd+bwd+AdamW on synthetic in-memory clips (bf16 autocast): clips/s and MFU
FLOPs are analytic (matmuls and attention only). Timing: CUDA events after warm-up, median.
Rows go to stdout as a markdown table and, with --out, to student_bench.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student import LiteFrameConfig, LiteFrameModel, preset_config  # noqa: E402
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

    def table(self) -> None:
        print("\n| section | variant | frames/batch | ms | ms/frame | TFLOP/s | % matmul | note |")
        print("|---|---|---|---|---|---|---|---|")
        for r in self.rows:
            n = r.get("frames", r.get("batch_clips", r.get("shape", "")))
            note = r.get("skipped") or r.get("error") or (json.dumps(r["groups"]) if "groups" in r else "") or (f"rel err {r['rel_err_vs_fp32']:.2e}" if "rel_err_vs_fp32" in r else "")
            if "clips_per_s" in r:
                note = f"{r['clips_per_s']:.1f} clips/s"
            print(f"| {r['section']} | {r.get('variant', '')} | {n} | {r.get('ms', '')} | {r.get('ms_per_frame', '')} "
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
    ap.add_argument("--sections", default="matmul,student,teacher,train", help="also: profile")
    ap.add_argument("--budget-s", type=float, default=380.0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    args.frames = [int(f) for f in args.frames.split(",") if f]
    args.teacher_frames = [int(f) for f in args.teacher_frames.split(",") if f]
    if args.tiny:
        args.frames, args.teacher_frames, args.train_batch = [8, 16], [8], 2
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
    minimum = {"profile": 60, "matmul": 5, "student": 60, "teacher": 30, "train": 60}
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
