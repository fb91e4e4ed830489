"""The optimised inference path (student.fast.FastEncoder: cast + torch.compile) matches the eager model."""

import numpy as np
import torch

from student import LiteFrameModel, preset_config
from student.fast import FastEncoder


def test_compiled_path_matches_eager():
    torch.manual_seed(0)
    # Two blocks keep the CPU compile short; one (4,2,2) merge still exercises time and space strides.
    cfg = preset_config("tiny", num_hidden_layers=2, downsample_after=[1], downsample_stride=[[4, 2, 2]],
                        target_mean=[0.1] * 32, target_std=[3.0] * 32)
    model = LiteFrameModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # fused_gelu: on CPU the epilogue op computes exact GELU, so the fused MLP must match exactly too.
    fast = FastEncoder(model, fused_gelu=True)
    assert fast.dtype == torch.float32 and next(model.parameters()).requires_grad  # the original is untouched
    assert not model.blocks[0].mlp.fused_gelu

    video = np.random.default_rng(0).integers(0, 256, (13, 112, 112, 3), dtype=np.uint8)
    eager = model.encode_video(video, chunk_frames=8)
    fast_out = fast.encode_video(video, chunk_frames=8)  # 16 padded frames: chunks of 8 + halo, one compile
    assert fast_out.shape == eager.shape == (4, 16, 32)
    assert torch.allclose(fast_out, eager, rtol=1e-4, atol=1e-4)

    clips = torch.randn(3, 4, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(fast(clips), model(clips), rtol=1e-4, atol=1e-4)


def test_trunk_traces_as_one_graph():
    """Graph breaks (e.g. reading the HF config inside forward) split the compiled trunk and cost
    fusions across block boundaries; on an H200 removing them was part of 0.25 -> 0.17 ms/frame."""
    model = LiteFrameModel(preset_config("tiny")).eval()
    for block in model.blocks:
        block.mlp.fused_gelu = True
    with torch.inference_mode():
        explained = torch._dynamo.explain(model.encode)(torch.randn(1, 8, 3, 112, 112))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
