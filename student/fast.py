"""Optimised inference path for the student: low-precision weights (bf16, optionally FP8) + a compiled trunk.

The eager model is already laid out for speed (channels-last tokens, fused QKV, SDPA, temporal conv
as a shifted sum); what is left is fusing the memory-bound glue between the matmuls (LayerNorm,
bias + GELU, residual adds, the temporal conv), which torch.compile does. The wrapper keeps the
eager model's API (`encode`, `__call__`, `encode_video`) so callers switch paths with one line,
and `tests/test_student_model_fast.py` checks the outputs match the eager model.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from pipeline.fp8 import convert_linears, require_fp8

from .modeling import LiteFrameModel


class FastEncoder:
    """A compiled, cast copy of a LiteFrameModel for inference; the original model is left untouched.

    `mode` is torch.compile's (None = default, "max-autotune-no-cudagraphs", "reduce-overhead" for
    CUDA graphs). By default the frame axis is compiled dynamic and everything else static: one
    compile serves every video length at nearly the speed of a per-length specialisation.
    `dynamic=False` specialises per input shape (a compile per new length, a few % faster).
    `fused_gelu` (default: on CUDA, for GELU students) moves fc1's bias + GELU into the matmul epilogue.
    `fp8` runs the trunk's linears (attention qkv/proj, MLP fc1/fc2) as FP8 matmuls (`pipeline.fp8`,
    CUDA compute capability 8.9+), bf16 elsewhere. It replaces the fused GELU: `_scaled_mm` has no GELU
    epilogue, and the compiled graph fuses fc1's GELU with fc2's input quantisation instead.
    """

    def __init__(
        self,
        model: LiteFrameModel,
        dtype: torch.dtype | None = None,
        compile: bool = True,
        mode: str | None = None,
        dynamic: bool | None = None,
        backend: str = "inductor",
        fused_gelu: bool | None = None,
        fp8: bool = False,
    ):
        if fp8:
            if fused_gelu or dtype not in (None, torch.bfloat16):
                raise ValueError(f"fp8=True runs in bfloat16 without the fused GELU epilogue; got dtype={dtype}, "
                                 f"fused_gelu={fused_gelu}")
            require_fp8(model.device)
            dtype, fused_gelu = torch.bfloat16, False
        if dtype is None:
            dtype = torch.bfloat16 if model.device.type == "cuda" else torch.float32
        self.model = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        self.config = model.config
        self.dtype = dtype
        if fused_gelu is None:
            fused_gelu = self.model.device.type == "cuda" and self.config.hidden_act in ("gelu", "gelu_pytorch_tanh")
        for block in self.model.blocks:
            block.mlp.fused_gelu = fused_gelu
        # Latency path: Hopper's fast FP8 accumulation (the teacher, whose outputs are stored data, does not).
        self.fp8_layers = convert_linears(self.model.blocks, fast_accum=True) if fp8 else []
        self.frames_dynamic = compile and dynamic is None
        encode = self.model.encode
        self._encode = torch.compile(encode, mode=mode, dynamic=dynamic, backend=backend) if compile else encode

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] normalised -> standardised tokens [B, T', h', w', D]."""
        x = pixel_values.to(self.model.device, self.dtype)
        if self.frames_dynamic and x.shape[1] > 1:
            torch._dynamo.maybe_mark_dynamic(x, 1)
        return self._encode(x)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Same contract as LiteFrameModel.forward: [B, T, 3, H, W] -> [B, T'*h'*w', D]."""
        return self.encode(pixel_values).flatten(1, 3)

    @torch.inference_mode()
    def encode_video(
        self, frames: np.ndarray | torch.Tensor, chunk_frames: int | None = None, span_clips: bool = True
    ) -> torch.Tensor:
        """LiteFrameModel.encode_video through the compiled trunk: float32 [clips, tokens, D], teacher space."""
        return self.model.encode_video(frames, chunk_frames=chunk_frames, span_clips=span_clips, encoder=self.encode)
