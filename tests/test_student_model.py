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
