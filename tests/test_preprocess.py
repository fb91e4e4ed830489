"""Preprocessing config reading and torch resize/normalise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.preprocess import Preprocessing, read_preprocessor_config, resize


@pytest.mark.parametrize("cfg,size", [
    ({"size": {"height": 448, "width": 448}}, (448, 448)),                                  # InternVL, SigLIP
    ({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}, (224, 224)),  # CLIP, DINOv2
    ({"size": {"shortest_edge": 256}, "crop_size": 224, "do_center_crop": False}, (256, 256)),
    ({"size": 384}, (384, 384)),                                                           # old int format
    ({"size": [192, 256]}, (192, 256)),
    ({}, (224, 224)),
])
def test_size_formats(cfg, size):
    assert Preprocessing.from_config(cfg).size == size


def test_from_pretrained_reads_file_and_overrides_win(tmp_path):
    assert read_preprocessor_config(tmp_path) == {}
    assert Preprocessing.from_pretrained(tmp_path, default_size=448).size == (448, 448)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 96, "width": 96}, "image_mean": [0.1, 0.2, 0.3], "image_std": 0.5,
         "rescale_factor": 0.5, "resample": 2}))
    pre = Preprocessing.from_pretrained(tmp_path, default_size=448)
    assert pre == Preprocessing(size=(96, 96), image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.5, 0.5),
                                rescale_factor=0.5, resample="bilinear")
    over = Preprocessing.from_pretrained(tmp_path, size=64, image_mean=[0, 0, 0], image_std=None)
    assert over.size == (64, 64) and over.image_mean == (0.0, 0.0, 0.0) and over.image_std == (0.5, 0.5, 0.5)
    off = Preprocessing.from_config({"do_normalize": False, "do_rescale": False, "image_mean": [0.3] * 3})
    x = np.full((1, 224, 224, 3), 200, np.uint8)
    assert (off.to_pixel_values(x) == 200).all()


def test_to_pixel_values_normalises_channels_last_uint8():
    pre = Preprocessing(size=(8, 8), image_mean=(0.1, 0.5, 0.9), image_std=(0.2, 0.4, 0.8))
    frames = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    out = pre.to_pixel_values(frames, dtype=torch.float64)
    assert out.shape == (2, 3, 3, 8, 8) and out.dtype == torch.float64
    expected = (frames.astype(np.float64) / 255 - [0.1, 0.5, 0.9]) / [0.2, 0.4, 0.8]
    np.testing.assert_allclose(out.permute(0, 1, 3, 4, 2).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert pre.to_pixel_values(frames, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="channels-last"):
        pre.to_pixel_values(np.zeros((2, 3, 8, 8), np.uint8))


def test_resize_is_close_to_pil_and_stays_in_range():
    rng = np.random.default_rng(1)
    # Smooth content, so filter details matter less than getting geometry and antialiasing right.
    base = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((160, 120), Image.BICUBIC))
    pil = np.asarray(Image.fromarray(img).resize((40, 30), Image.BICUBIC)).astype(np.float64)
    pre = Preprocessing(size=(30, 40), image_mean=(0, 0, 0), image_std=(1, 1, 1), rescale_factor=1.0)
    ours = pre.to_pixel_values(img[None]).permute(0, 2, 3, 1)[0].double().numpy()
    assert ours.min() >= 0 and ours.max() <= 255
    assert np.abs(ours - pil).mean() < 2.0, np.abs(ours - pil).mean()
    assert resize(torch.rand(1, 3, 10, 10), (5, 7), "nearest").shape == (1, 3, 5, 7)
