"""Where an FP8 linear spends its time: bf16 nn.Linear vs pipeline.fp8.FP8Linear (eager, compiled),
the `_scaled_mm` GEMM alone and the per-row activation quantisation alone, at the InternViT-300M
teacher's shapes for 256 frames (M = 256 x 1025 tokens). Then one compiled `vitb` student block at
full resolution for 256 frames (64 clips x 4 frames x 32 x 32 tokens), as the latency path runs it:
bf16 with fc1's bias + GELU in the matmul epilogue, against FP8 on every linear, on the attention's
(qkv, proj: their inputs' quantisation fuses into LayerNorm and the attention output) or on the MLP's
only (fc1's FP8 GEMM loses the GELU epilogue, and fc2's input is the 4x-wide hidden tensor); each
also with static activation scales (`pipeline.fp8.input_amax`, calibrated on the timed input itself,
so its cosine is an upper bound for unseen clips). Needs a CUDA GPU with FP8 (sm_89+).

    python3 bench/fp8_linear.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository before bench/ (bench/student.py)

from pipeline.fp8 import FP8Linear, convert_linears, input_amax, quantize_rows, require_fp8  # noqa: E402

M = 256 * 1025
SHAPES = ((1024, 3072), (1024, 4096), (4096, 1024))   # qkv, fc1, fc2 as (K, N)


def cuda_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def student_block(fp8: str, static: bool, x: torch.Tensor) -> nn.Module:
    """A vitb block (random weights) in bf16, its linears FP8 where `fp8` says (none, all, attention,
    mlp), with static activation scales calibrated on `x` if `static`."""
    from student.modeling import Block
    from student.presets import preset_config

    torch.manual_seed(0)
    block = Block(preset_config("vitb")).cuda().bfloat16().eval()
    block.mlp.fused_gelu = fp8 in ("none", "attention")      # the epilogue needs fc1 in bf16
    parts = {"none": [], "all": [block], "attention": [block.attn], "mlp": [block.mlp]}[fp8]
    for part in parts:
        amax = input_amax(part, lambda: block(x)) if static else None
        convert_linears(part, fast_accum=True, input_amax=amax)   # as FastEncoder(fp8=True) converts
    return block


@torch.inference_mode()
def blocks() -> None:
    x = torch.randn(64, 4, 32, 32, 768, device="cuda", dtype=torch.bfloat16)
    ref = None
    print("| vitb block, 256 frames | activation scales | ms | vs bf16 | output cosine vs bf16 |")
    print("|---|---|---:|---:|---:|")
    for fp8, static in (("none", False), ("all", False), ("attention", False), ("mlp", False),
                        ("all", True), ("attention", True), ("mlp", True)):
        block = torch.compile(student_block(fp8, static, x), dynamic=False)
        ms = cuda_ms(lambda: block(x))
        out = block(x).float().flatten()
        ref = (ms, out) if ref is None else ref
        cos = torch.nn.functional.cosine_similarity(out, ref[1], dim=0).item()
        scales = "–" if fp8 == "none" else "static" if static else "per row"
        print(f"| FP8 linears: {fp8} | {scales} | {ms:.2f} | {ref[0] / ms:.2f}x | {cos:.5f} |", flush=True)


@torch.inference_mode()
def main() -> None:
    require_fp8(torch.device("cuda"))
    quantize = torch.compile(quantize_rows)
    print("| K | N | bf16 ms | fp8 accumulate | fp8 eager ms | fp8 compiled ms | GEMM alone ms | GEMM TFLOP/s | quantise ms |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for k, n in SHAPES:
        linear = nn.Linear(k, n).cuda().bfloat16()
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        flop = 2 * M * k * n
        bf16 = cuda_ms(lambda: linear(x))
        for fast in (False, True):
            fp8 = FP8Linear(linear, fast_accum=fast).cuda()
            compiled = torch.compile(fp8)
            q, scale = quantize_rows(x)
            gemm = cuda_ms(lambda: torch._scaled_mm(q, fp8.weight_fp8.t(), scale_a=scale, scale_b=fp8.weight_scale,
                                                    bias=fp8.bias, out_dtype=torch.bfloat16, use_fast_accum=fast))
            print(f"| {k} | {n} | {bf16:.2f} | {'fast' if fast else 'float32'} | {cuda_ms(lambda: fp8(x)):.2f} | "
                  f"{cuda_ms(lambda: compiled(x)):.2f} | {gemm:.2f} | {flop / gemm / 1e9:.0f} | "
                  f"{cuda_ms(lambda: quantize(x)):.2f} |", flush=True)
    blocks()


if __name__ == "__main__":
    main()
