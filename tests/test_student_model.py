"""LiteFrame student model: config round trip, shapes, video inference, de-standardisation, geometry errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

import student
from student import GeometryError, LiteFrameConfig, LiteFrameModel, config_for_store, preset_config


def randomise(model: LiteFrameModel, seed: int = 0) -> LiteFrameModel:
    """Non-trivial weights everywhere (temporal convs start at zero, merges at the average)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = preset_config("tiny", target_mean=list(np.linspace(-1, 1, 32)), target_std=list(np.linspace(0.5, 2, 32)))
    return randomise(LiteFrameModel(cfg))


def test_auto_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, LiteFrameConfig) and cfg.model_type == "liteframe"
    assert cfg.downsample_stride == [[2, 2, 2], [2, 2, 2]] and cfg.target_std == tiny.config.target_std
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LiteFrameModel)
    x = torch.randn(2, 4, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny(x))


@pytest.mark.parametrize("name,tokens,dim", [("tiny", 4, 32), ("vitb", 64, 3584), ("teacher", 64, 3584)])
def test_preset_shapes(name, tokens, dim):
    cfg = preset_config(name)
    assert (cfg.target_tokens, cfg.target_dim) == (tokens, dim)
    if name == "tiny":
        out = LiteFrameModel(cfg)(torch.randn(2, cfg.clip_frames, 3, 112, 112))
        assert out.shape == (2, tokens, dim)
    if name == "vitb":
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size) == (12, 768, 12, 14)
        assert cfg.output_grid() == (1, 8, 8)


def test_temporal_conv_is_a_depthwise_conv1d():
    conv = student.modeling.TemporalConv(8, 3)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    x = torch.randn(2, 5, 6, 8)  # [B, T, N, C]
    ref = F.conv1d(x.permute(0, 2, 3, 1).reshape(12, 8, 5), conv.weight.t().unsqueeze(1), conv.bias, padding=1, groups=8)
    assert torch.allclose(conv(x), ref.reshape(2, 6, 8, 5).permute(0, 3, 1, 2), atol=1e-5)


def test_patch_embedding_is_the_strided_conv(tiny):
    x = torch.randn(2, 4, 3, 112, 112)
    ref = F.conv2d(x.flatten(0, 1), tiny.patch_embed.weight, tiny.patch_embed.bias, stride=14).permute(0, 2, 3, 1)
    ref = ref + tiny.pos_embed[0]
    with torch.no_grad():
        assert torch.allclose(tiny.embed(x), ref.reshape(2, 4, 8, 8, -1), atol=1e-5)


def frames(n: int, size: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_encode_video_pads_with_the_last_frame_and_matches_clip_forward(tiny):
    video = frames(10)  # 2.5 clips of 4; resized 96 -> 112 by preprocess
    out = tiny.encode_video(video, span_clips=False)
    assert out.shape == (3, 4, 32) and out.dtype == torch.float32
    padded = np.concatenate([video, video[-1:].repeat(2, 0)])
    assert torch.equal(out, tiny.encode_video(padded, span_clips=False))
    pixels = tiny.preprocess(torch.from_numpy(padded)).unflatten(0, (3, 4))
    with torch.no_grad():
        expected = tiny.destandardise(tiny(pixels))
    assert torch.allclose(out, expected, atol=1e-5)


def test_whole_video_convs_span_clips_and_chunking_is_exact(tiny):
    video = frames(37, seed=1)
    whole = tiny.encode_video(video)
    assert whole.shape == (10, 4, 32)
    assert tiny.temporal_halo() == 8  # 2 blocks at stride 1 + 1 at 2 + 1 at 4 = 8 frames each side
    for chunk in (4, 8, 12):
        assert torch.allclose(tiny.encode_video(video, chunk_frames=chunk), whole, atol=1e-5), chunk
    per_clip = tiny.encode_video(video, span_clips=False)
    # Interior clips see their neighbours through the temporal convs, so they differ from per-clip inference.
    assert not torch.allclose(per_clip[1:-1], whole[1:-1], atol=1e-3)


def test_destandardisation_uses_the_stored_target_stats(tiny, tmp_path):
    video = frames(8, seed=2)
    pixels = tiny.preprocess(torch.from_numpy(video))[None]
    with torch.no_grad():
        standardised = tiny.encode(pixels).flatten(1, 3).unflatten(1, (2, 4))[0]
    mean, std = torch.tensor(tiny.config.target_mean), torch.tensor(tiny.config.target_std)
    assert torch.allclose(tiny.encode_video(video), standardised * std + mean, atol=1e-5)
    tiny.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert torch.allclose(loaded.encode_video(video), standardised * std + mean, atol=1e-5)
    loaded.config.target_mean = loaded.config.target_std = None
    assert torch.allclose(loaded.encode_video(video), standardised, atol=1e-5)


def test_encode_video_rejects_non_frames(tiny):
    with pytest.raises(ValueError, match="uint8"):
        tiny.encode_video(np.zeros((4, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="N>0"):
        tiny.encode_video(np.zeros((0, 32, 32, 3), dtype=np.uint8))


SCHEMA = {
    "schema_version": 1,
    "frames": {"encoding": "jpg", "size": [112, 112], "quality": 90},
    "clip": {"frames": 4, "views": 1, "fps_range": [1, 4]},
    "target": {"tokens": 16, "grid": [1, 4, 4], "dim": 48, "dtype": "float16"},
    "target_stats": {"mean": [0.5] * 48, "std": [2.0] * 48, "count": 10},
}


def test_config_for_store_sizes_the_preset_and_refits_strides():
    cfg = config_for_store("tiny", SCHEMA)
    assert (cfg.image_hw, cfg.clip_frames, cfg.target_tokens, cfg.target_dim) == ((112, 112), 4, 16, 48)
    assert cfg.target_grid == [1, 4, 4] and cfg.target_mean == [0.5] * 48 and cfg.target_std == [2.0] * 48
    assert cfg.downsample_stride == [[2, 2, 2], [2, 1, 1]]  # 4x8x8 patches -> 1x4x4
    out = LiteFrameModel(cfg)(torch.randn(1, 4, 3, 112, 112))
    assert out.shape == (1, 16, 48)
    eight = config_for_store("vitb", {**SCHEMA, "frames": {"size": [448, 448]}, "clip": {"frames": 8},
                                      "target": {"tokens": 128, "grid": [2, 8, 8], "dim": 3584},
                                      "target_stats": None})
    assert eight.downsample_stride == [[2, 2, 2], [2, 2, 2]] and eight.output_grid() == (2, 8, 8)


@pytest.mark.parametrize("change,match", [
    ({"frames": {"size": [100, 100]}}, "patch size 14"),
    ({"target": {"tokens": 9, "grid": [1, 3, 3], "dim": 48}}, "not a multiple of 3"),
    ({"target": {"tokens": 15, "grid": [1, 4, 4], "dim": 48}}, "does not hold"),
    ({"clip": {"frames": 6}, "target": {"tokens": 64, "grid": [4, 4, 4], "dim": 48}}, "time axis has 6"),
    ({"target_stats": {"mean": [0.0] * 7, "std": [1.0] * 7}}, "target_mean has 7 channels"),
    ({"frames": None}, "lacks"),
])
def test_store_schema_mismatch_is_a_clear_error(change, match):
    with pytest.raises(GeometryError, match=match):
        config_for_store("tiny", {**SCHEMA, **change})


def test_explicit_strides_that_miss_the_target_grid_are_an_error():
    with pytest.raises(GeometryError, match="give a 1x2x2 token grid per clip, but the target grid is 1x4x4"):
        config_for_store("tiny", SCHEMA, downsample_stride=[[2, 2, 2], [2, 2, 2]])
    with pytest.raises(KeyError, match="unknown student preset"):
        preset_config("huge")
