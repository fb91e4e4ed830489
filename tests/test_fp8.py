"""FP8 inference (pipeline.fp8) for the student and the teacher: flags, which layers, errors, numerics.

CPU: the quantisation math against an independent emulation (float8 casts + float32 matmuls), the
real FP8Linear through torch's CPU `_scaled_mm`, and the student/teacher FP8 paths with the device
check faked. GPU (CUDA compute capability 8.9+, else skipped): FP8 vs bf16 outputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pipeline.teacher
import student.fast
from pipeline.compress import Compression, compress_tokens
from pipeline.fp8 import (E4M3, E4M3_MAX, FP8Linear, FP8UnsupportedError, convert_linears, fp8_unsupported_reason,
                          input_amax, quantize_rows, require_fp8)
from pipeline.teacher import FLOAT8, Teacher, TeacherError
from pipeline.testing import make_tiny_teacher
from student import LiteFrameModel, preset_config
from student.fast import FastEncoder


def _cpu_scaled_mm_missing() -> str | None:
    """Why the CPU tests of the real FP8 path cannot run here (torch 2.13 has a CPU `_scaled_mm`)."""
    a = torch.zeros(16, 16).to(E4M3)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                             bias=torch.zeros(16, dtype=dtype), out_dtype=dtype)
    except (RuntimeError, NotImplementedError) as e:
        return f"torch {torch.__version__}'s CPU _scaled_mm: {str(e).splitlines()[0]}"
    return None


cpu_scaled_mm = pytest.mark.skipif(_cpu_scaled_mm_missing() is not None, reason=str(_cpu_scaled_mm_missing()))
GPU_MISSING = fp8_unsupported_reason("cuda")
fp8_gpu = pytest.mark.skipif(GPU_MISSING is not None, reason=f"FP8 GPU tests: {GPU_MISSING}")


def emulate_row_fp8(t: torch.Tensor) -> torch.Tensor:
    """Reference: per-row e4m3 round trip in float32 (the row's max |value| scaled to 448)."""
    scale = t.abs().amax(-1, keepdim=True) / 448.0
    return (t / scale).to(torch.float8_e4m3fn).float() * scale


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def tiny_student(**overrides) -> LiteFrameModel:
    """Random tiny student whose weights are large enough that every block changes the tokens."""
    torch.manual_seed(0)
    model = LiteFrameModel(preset_config("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def frames(n: int = 16, size: int = 112, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("fp8") / "t", "internvl_vision", image_size=112, hidden_size=64)


@pytest.fixture
def fake_fp8_cpu(monkeypatch):
    """The device checks of the student and teacher paths pass on CPU (CPU _scaled_mm runs the math)."""
    monkeypatch.setattr(pipeline.teacher, "fp8_unsupported_reason", lambda device: None)
    monkeypatch.setattr(student.fast, "require_fp8", lambda device: None)


# -- the quantisation math -----------------------------------------------------------------------
def test_quantize_rows_is_per_row_e4m3_rounding():
    torch.manual_seed(0)
    # Rows spanning 1e-3 .. 1e3 in magnitude: per-row scales keep each row's relative precision.
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]
    x[5] = 0.0
    q, scale = quantize_rows(x)
    assert q.dtype == E4M3 and q.shape == x.shape and scale.shape == (64, 1) and scale.dtype == torch.float32
    amax = q.float().abs().amax(-1)
    assert torch.all(amax[torch.arange(64) != 5] == E4M3_MAX) and torch.all(q[5].float() == 0)
    back = q.float() * scale
    torch.testing.assert_close(back, emulate_row_fp8(x).nan_to_num(), rtol=0, atol=0)
    # Round to nearest: half an e4m3 ULP, 2^-4 relative for normals, 2^-10 x scale among subnormals.
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10)
    assert torch.all((back - x).abs() <= bound * (1 + 1e-6))


@cpu_scaled_mm
@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_is_the_emulated_math_and_close_to_float32(bias):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=bias)
    x = torch.randn(3, 40, 256)
    fp8 = FP8Linear(linear, fast_accum=False)
    assert fp8.weight_fp8.shape == (96, 256) and fp8.weight_fp8.dtype == E4M3 and fp8.weight_scale.shape == (1, 96)
    with torch.no_grad():
        out, exact = fp8(x), linear(x)
        ref = emulate_row_fp8(x) @ emulate_row_fp8(linear.weight).t() + (linear.bias if bias else 0)
    assert out.shape == (3, 40, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)   # same rounding, only the sum order differs
    # e4m3's 3 mantissa bits on both operands: a few % relative error on random data.
    assert rel_err(out, exact) < 0.05 and cosine(out, exact) > 0.998


@cpu_scaled_mm
def test_static_scales_from_calibration_are_per_tensor_e4m3_and_saturate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    calib = torch.randn(50, 64)
    amax = input_amax(model, lambda: model(calib))
    assert not model[0]._forward_pre_hooks                  # calibration leaves no hooks behind
    with torch.no_grad():
        assert set(amax) == {"0", "2"} and amax["0"] == pytest.approx(float(calib.abs().max()))
        assert amax["2"] == pytest.approx(float(model[1](model[0](calib)).abs().max()))
        exact = model(calib)
        layer = FP8Linear(model[0], fast_accum=False, input_amax=amax["0"])
        scale = amax["0"] / 448.0
        ref = (calib / scale).to(E4M3).float() * scale @ emulate_row_fp8(model[0].weight).t() + model[0].bias
        torch.testing.assert_close(layer(calib), ref, rtol=1e-5, atol=1e-5)
        # an input past the calibrated range saturates at 448 x scale
        torch.testing.assert_close(layer(calib * 10), layer((calib * 10).clamp(-amax["0"], amax["0"])))
        convert_linears(model, fast_accum=False, input_amax=amax)
        assert all(m.input_scale is not None for m in model if isinstance(m, FP8Linear))
        assert cosine(model(calib), exact) > 0.998
    with pytest.raises(ValueError, match="no calibrated input range for linear"):
        convert_linears(nn.Sequential(nn.Linear(16, 16)), fast_accum=False, input_amax={"1": 1.0})


# -- which layers ----------------------------------------------------------------------------------
def test_convert_linears_takes_only_linears_aligned_to_16():
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 40), nn.Linear(40, 16),
                          nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 64)), nn.Conv1d(16, 16, 1))
    names = convert_linears(model, fast_accum=True)
    assert names == ["0", "4.1"]
    assert isinstance(model[0], FP8Linear) and isinstance(model[4][1], FP8Linear) and model[4][1].fast_accum
    assert type(model[2]) is nn.Linear and type(model[3]) is nn.Linear   # N=40, K=40: not multiples of 16
    assert type(model[4][0]) is nn.LayerNorm and type(model[5]) is nn.Conv1d


@cpu_scaled_mm
def test_student_fp8_swaps_the_trunk_linears_only(fake_fp8_cpu):
    model = tiny_student()
    fast = FastEncoder(model, fp8=True, compile=False)
    per_block = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    assert fast.fp8_layers == [f"{i}.{n}" for i in range(len(model.blocks)) for n in per_block]
    block = fast.model.blocks[0]
    c, mlp = model.config.hidden_size, model.config.intermediate_size
    shapes = {n: tuple(block.get_submodule(n).weight_fp8.shape) for n in per_block}
    assert shapes == {"attn.qkv": (3 * c, c), "attn.proj": (c, c), "mlp.fc1": (mlp, c), "mlp.fc2": (c, mlp)}
    assert fast.dtype == torch.bfloat16 and not block.mlp.fused_gelu and block.mlp.fc1.fast_accum
    assert isinstance(fast.model.patch_embed, nn.Conv2d) and type(fast.model.head.out) is nn.Linear
    assert all(isinstance(m, nn.Linear) for m in model.modules() if "Linear" in type(m).__name__)   # original untouched
    # The trunk in FP8 (bf16 elsewhere) against the same model in bf16, on CPU.
    bf16 = FastEncoder(model, dtype=torch.bfloat16, compile=False, fused_gelu=False)
    a, b = fast.encode_video(frames()), bf16.encode_video(frames())
    assert a.shape == b.shape == (4, 4, 32) and cosine(a, b) > 0.999


# -- flags and errors ------------------------------------------------------------------------------
def test_fp8_flag_errors_on_cpu():
    model = tiny_student()
    with pytest.raises(FP8UnsupportedError, match="compute capability 8.9 or newer.*device cpu"):
        FastEncoder(model, fp8=True)
    with pytest.raises(ValueError, match="without the fused GELU"):
        FastEncoder(model, fp8=True, fused_gelu=True)
    with pytest.raises(ValueError, match="runs in bfloat16"):
        FastEncoder(model, fp8=True, dtype=torch.float32)
    assert FastEncoder(model, compile=False).fp8_layers == []   # the default path is unchanged


def test_require_fp8_names_what_is_needed(monkeypatch):
    with pytest.raises(FP8UnsupportedError, match="8.9 or newer.*this is device cpu"):
        require_fp8("cpu")
    assert issubclass(FP8UnsupportedError, ValueError)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(FP8UnsupportedError, match="NVIDIA A100 is 8.0"):
        require_fp8("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    require_fp8("cuda:0")


def test_teacher_float8_errors_on_cpu_and_is_described_for_the_store(tiny_teacher):
    with pytest.raises(TeacherError, match="'float8'.*compute capability 8.9"):
        Teacher.from_pretrained(tiny_teacher, device="cpu", dtype=FLOAT8)
    with pytest.raises(TeacherError, match="would cast every weight"):
        Teacher.from_pretrained(tiny_teacher, device="cpu", dtype="float8_e4m3fn")
    bf16 = Teacher.from_pretrained(tiny_teacher, device="cpu", dtype="bfloat16").describe()
    assert Teacher.describe_pretrained(tiny_teacher, dtype=FLOAT8) == {**bf16, "dtype": FLOAT8}
    assert Teacher.describe_pretrained(tiny_teacher, dtype="bfloat16") == bf16


@cpu_scaled_mm
def test_teacher_float8_converts_block_linears_only(tiny_teacher, fake_fp8_cpu):
    teacher = Teacher.from_pretrained(tiny_teacher, device="cpu", dtype=FLOAT8)
    assert teacher.fp8 and teacher.dtype == torch.bfloat16 and teacher.describe()["dtype"] == FLOAT8
    fp8 = {n for n, m in teacher.backbone.named_modules() if isinstance(m, FP8Linear)}
    per_layer = {"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.projection_layer",
                 "mlp.fc1", "mlp.fc2"}
    assert fp8 == {f"encoder.layer.{i}.{n}" for i in range(2) for n in per_layer}
    assert not any(isinstance(m, nn.Linear) for m in teacher._layers().modules())
    assert isinstance(teacher.backbone.embeddings.patch_embeddings.projection, nn.Conv2d)
    bf16 = Teacher.from_pretrained(tiny_teacher, device="cpu", dtype="bfloat16")
    clips = frames(8).reshape(2, 4, 112, 112, 3)
    tokens, ref = teacher.encode(clips), bf16.encode(clips)
    wap = Compression()
    assert cosine(tokens, ref) > 0.999 and cosine(compress_tokens(tokens, wap), compress_tokens(ref, wap)) > 0.999


@cpu_scaled_mm
def test_teacher_static_fp8_is_calibrated_first_and_described_apart(tiny_teacher, fake_fp8_cpu):
    bf16 = Teacher.from_pretrained(tiny_teacher, device="cpu", dtype="bfloat16")
    clips = frames(8).reshape(2, 4, 112, 112, 3)
    ref = bf16.encode(clips)
    teacher = Teacher.from_pretrained(tiny_teacher, device="cpu", dtype="bfloat16")
    amax = teacher.calibrate_fp8(frames(8, seed=1).reshape(2, 4, 112, 112, 3))    # other clips than the test's
    assert len(amax) == 2 * 6 and all(v > 0 for v in amax.values())
    teacher.use_fp8(amax)
    assert teacher.describe() == {**bf16.describe(), "dtype": "float8-static"}     # a store tells it apart
    assert all(m.input_scale is not None for m in teacher._layers().modules() if isinstance(m, FP8Linear))
    tokens, wap = teacher.encode(clips), Compression()
    assert cosine(tokens, ref) > 0.999 and cosine(compress_tokens(tokens, wap), compress_tokens(ref, wap)) > 0.999
    with pytest.raises(TeacherError, match="before use_fp8"):
        teacher.calibrate_fp8(clips)


# -- on an FP8 GPU ---------------------------------------------------------------------------------
@fp8_gpu
def test_gpu_fp8_student_tokens_match_bf16():
    model = tiny_student().cuda()
    fp8 = FastEncoder(model, fp8=True)
    assert len(fp8.fp8_layers) == 4 * len(model.blocks)
    bf16 = FastEncoder(model)
    video = frames(16)
    a, b = fp8.encode_video(video), bf16.encode_video(video)
    assert torch.isfinite(a).all() and a.shape == b.shape
    assert cosine(a, b) >= 0.999, cosine(a, b)


@fp8_gpu
def test_gpu_fp8_teacher_targets_match_bf16(tiny_teacher):
    fp8 = Teacher.from_pretrained(tiny_teacher, device="cuda", dtype=FLOAT8, compile=True)
    bf16 = Teacher.from_pretrained(tiny_teacher, device="cuda", dtype="bfloat16")
    assert fp8.describe() == {**bf16.describe(), "dtype": FLOAT8}
    clips = frames(16).reshape(4, 4, 112, 112, 3)
    with torch.inference_mode():
        tokens, ref = fp8.encode(clips), bf16.encode(clips)
    wap = Compression()
    target, ref_target = compress_tokens(tokens, wap), compress_tokens(ref, wap)
    assert torch.isfinite(target).all()
    assert cosine(target, ref_target) >= 0.999 and rel_err(target, ref_target) <= 0.02, \
        (cosine(target, ref_target), rel_err(target, ref_target))


def test_extract_refuses_an_fp8_teacher_on_cpu_actors():
    from jobs.extract import ExtractConfig, teacher_precision
    from pipeline.config import ConfigError

    cfg = ExtractConfig(input="in", output="out", teacher="t", teacher_dtype="float8")
    with pytest.raises(ConfigError, match="float8 needs GPU"):
        teacher_precision(cfg, use_gpu=False)
    assert teacher_precision(cfg, use_gpu=True) == "float8"
    assert teacher_precision(ExtractConfig(input="in", output="out", teacher="t"), use_gpu=False) == "float32"
