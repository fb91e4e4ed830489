"""Where an FP8 linear spends its time: bf16 nn.Linear vs pipeline.fp8.FP8Linear (eager, compiled),
the `_scaled_mm` GEMM alone and the per-row activation quantisation alone, at the InternViT-300M
teacher's shapes for 256 frames (M = 256 x 1025 tokens). Needs a CUDA GPU with FP8 (sm_89+).

    PYTHONPATH=. python3 bench/fp8_linear.py
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.fp8 import FP8Linear, quantize_rows

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


@torch.inference_mode()
def main() -> None:
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


if __name__ == "__main__":
    main()
