"""FP8 (e4m3) linear layers for inference: the one mechanism behind the FP8 student and FP8 teacher.

Why: an H200's FP8 tensor cores run at about twice its bf16 rate, and nearly all of both ViTs'
FLOPs are in their nn.Linear layers (attention in/out projections, MLP).

Recipe: each weight is quantised once, per output channel; each activation per row (token) at every
call, from that row's own max |value| (dynamic: no calibration data; an outlier token costs only its
own row's precision). Both are float8_e4m3fn with float32 scales, multiplied by `torch._scaled_mm`
with row-wise scales and the bias in the GEMM epilogue, output in the input's dtype (bf16 on GPU).
Under torch.compile the activation's row max, scaling and cast are ordinary reduction/pointwise ops
that inductor fuses into the kernel producing the activation (LayerNorm, GELU, the attention
output's transpose), which then writes it in one byte per value instead of two.

Static scales (`input_amax`, then `convert_linears(input_amax=...)`): one scale per linear from a
calibration pass, so quantising needs no row max at all. Why it exists: on the H200 a compiled
student block lost 12% with dynamic rows on every linear (the MLP's 4096-wide row max costs more than
its FP8 GEMM saves; bench/RESULTS.md); whether static scales pay, and at what accuracy, is measured
by bench/fp8_linear.py (a student block) and bench/extract.py's `-fp8static` (the teacher,
`Teacher.calibrate_fp8` then `use_fp8`); the jobs do not use them yet.

Own code rather than torchao 0.18.0 (`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`
is the same recipe, and its wheel loads its compiled extensions on any torch >= 2.11, so version
pins are not the reason): (1) an FP8 teacher's targets are stored data whose identity the store
records as dtype "float8"; owning these ~50 lines ties their numerics to this file, not to whichever
torchao release and kernel choice a worker happens to have; (2) no extra package on GPU nodes (the
lent H200 has none and no network); (3) torch's CPU `_scaled_mm` (2.13) runs this very function, so
the CPU tests check the real code path, not a stand-in.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max          # 448: a row's max |value| maps here
ALIGN = 16                                # _scaled_mm needs K and N to be multiples of 16


class FP8UnsupportedError(ValueError):
    """FP8 matmuls were asked for on a device that has none."""


def fp8_unsupported_reason(device: torch.device | str) -> str | None:
    """Why `device` cannot run FP8 matmuls, or None when it can (CUDA, compute capability 8.9+)."""
    device = torch.device(device)
    need = "FP8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)"
    if device.type != "cuda" or torch.version.hip is not None:
        return f"{need}; this is device {device}" + (" (ROCm)" if device.type == "cuda" else "")
    if not torch.cuda.is_available():
        return f"{need}; torch {torch.__version__} sees no CUDA device"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"{need}; {torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}"
    return None


def require_fp8(device: torch.device | str) -> None:
    """Raise FP8UnsupportedError (saying what is needed) unless `device` runs FP8 matmuls."""
    reason = fp8_unsupported_reason(device)
    if reason is not None:
        raise FP8UnsupportedError(reason)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3 [M, K], float32 scales [M, 1]) with x ~= q * scale, each row's max |x| at 448."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3 [M, K], float32 scales [M, 1]) with one fixed scale for every row; values past
    448 x scale saturate. A multiply and a cast, no row max: it fuses into the kernel producing `x`."""
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale.expand(x.shape[0], 1).contiguous()       # _scaled_mm's row-wise form


class FP8Linear(nn.Module):
    """Inference replacement for an nn.Linear: e4m3 weight with per-output-channel scales, activations
    quantised per row on every call, or, given `input_amax` (calibrated), with one static scale that
    maps that max |input| to 448. `fast_accum` lets Hopper accumulate in the tensor cores' reduced
    precision (faster; cuBLAS otherwise promotes partial sums to float32)."""

    def __init__(self, linear: nn.Linear, fast_accum: bool, input_amax: float | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fast_accum = linear.in_features, linear.out_features, fast_accum
        weight, scale = quantize_rows(linear.weight.detach())
        # Not `weight`: code that reads `linear.weight.dtype` to cast its input must fail, not cast to e4m3.
        self.register_buffer("weight_fp8", weight)                          # [N, K] row-major
        self.register_buffer("weight_scale", scale.t().contiguous())        # [1, N]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.register_buffer("input_scale", None if input_amax is None else
                             torch.tensor(max(float(input_amax), 1e-12) / E4M3_MAX, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        q, scale = quantize_rows(rows) if self.input_scale is None else quantize_static(rows, self.input_scale)
        # mat2 must be column-major: the transposed view of the row-major [N, K] weight.
        out = torch._scaled_mm(q, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=x.dtype, use_fast_accum=self.fast_accum)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fast_accum={self.fast_accum}"


@torch.no_grad()
def input_amax(module: nn.Module, run: Callable[[], object]) -> dict[str, float]:
    """The max |input| of each nn.Linear under `module` (by name, relative to it) over whatever `run`
    feeds it: the calibration that static scales (`convert_linears(input_amax=...)`) come from."""
    seen: dict[str, float] = {}

    def hook(name: str):
        return lambda _, args: seen.__setitem__(name, max(seen.get(name, 0.0), float(args[0].abs().max())))

    hooks = [child.register_forward_pre_hook(hook(name)) for name, child in module.named_modules()
             if isinstance(child, nn.Linear)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def convert_linears(module: nn.Module, *, fast_accum: bool, input_amax: Mapping[str, float] | None = None) -> list[str]:
    """Replace, in place, every nn.Linear under `module` whose K and N are multiples of 16 by an FP8Linear
    (the others cannot go through `_scaled_mm`, and are too small to pay); returns the replaced names.
    `input_amax` (from `input_amax()`): static activation scales, one per replaced linear.

    Device-agnostic on purpose (CPU tests run it): callers that promise FP8 speed check the device
    with `require_fp8` first. Convert after any `.to(dtype)`: a later cast would cast the e4m3 weights too.
    """
    names = [name for name, child in module.named_modules() if isinstance(child, nn.Linear)
             and child.in_features % ALIGN == 0 and child.out_features % ALIGN == 0]
    missing = [name for name in names if input_amax is not None and name not in input_amax]
    if missing:
        raise ValueError(f"no calibrated input range for linear(s) {', '.join(missing)}: "
                         "calibrate the module these names are relative to")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        amax = None if input_amax is None else input_amax[name]
        setattr(owner, leaf, FP8Linear(getattr(owner, leaf), fast_accum, amax))
    return names
