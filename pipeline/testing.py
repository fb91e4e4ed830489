"""Tiny random-weight teachers saved like real checkpoints, for tests, demos and CPU benchmarks.

No weights can be downloaded in CI, so each family is built from a small config, saved with
`save_pretrained` plus a `preprocessor_config.json` in the HF format, and loaded back through
the same `from_pretrained(dir)` path a real checkpoint takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("internvl", "llava", "internvl_vision", "siglip", "siglip2", "clip", "dinov2", "dinov2_registers",
            "vit")

_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
_CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
_HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


def make_tiny_teacher(directory: str | Path, family: str = "internvl", *, image_size: int = 56,
                      patch_size: int = 14, hidden_size: int = 32, num_layers: int = 2,
                      seed: int = 0) -> Path:
    """Save a random tiny teacher of `family` to `directory` and return the directory.

    "internvl" and "llava" are whole VLMs (vision tower + projector + a 1-layer LLM), so tests
    cover loading only the vision part and head="projector"; the others are vision models.
    """
    from transformers import (CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                              Dinov2WithRegistersModel, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLVisionConfig, InternVLVisionModel, LlavaConfig, LlavaForConditionalGeneration,
                              Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel,
                              ViTConfig, ViTModel)

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    directory = Path(directory)
    vit: dict[str, Any] = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=2,
                               intermediate_size=2 * hidden_size, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    if family == "internvl":
        text = dict(model_type="qwen2", hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=64, vocab_size=128)
        model = InternVLForConditionalGeneration(InternVLConfig(vision_config=vit, text_config=text,
                                                                image_token_id=127))
        processor = {"size": {"height": image_size, "width": image_size}, "image_mean": _IMAGENET[0],
                     "image_std": _IMAGENET[1], "resample": 3}
    elif family == "llava":
        text = dict(model_type="llama", hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, intermediate_size=64, vocab_size=128)
        vision = dict(vit, model_type="clip_vision_model")
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                          image_token_id=127))
        processor = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size},
                     "do_center_crop": True, "image_mean": _CLIP[0], "image_std": _CLIP[1], "resample": 3}
    elif family == "internvl_vision":
        model = InternVLVisionModel(InternVLVisionConfig(**vit))
        processor = {"size": {"height": image_size, "width": image_size}, "image_mean": _IMAGENET[0],
                     "image_std": _IMAGENET[1], "resample": 3}
    elif family == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**vit))
        processor = {"size": {"height": image_size, "width": image_size}, "image_mean": _HALF[0],
                     "image_std": _HALF[1], "resample": 2}
    elif family == "siglip2":
        patches = (image_size // patch_size) ** 2
        naflex = {k: v for k, v in vit.items() if k != "image_size"}
        model = Siglip2VisionModel(Siglip2VisionConfig(**naflex, num_patches=patches))
        processor = {"patch_size": patch_size, "max_num_patches": patches, "image_mean": _HALF[0],
                     "image_std": _HALF[1], "resample": 2}
    elif family == "clip":
        text = dict(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=2 * hidden_size, vocab_size=128, max_position_embeddings=16,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = CLIPModel(CLIPConfig(vision_config=vit, text_config=text, projection_dim=hidden_size))
        processor = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size},
                     "do_center_crop": True, "image_mean": _CLIP[0], "image_std": _CLIP[1], "resample": 3}
    elif family in ("dinov2", "dinov2_registers"):
        cls, cfg = ((Dinov2WithRegistersModel, Dinov2WithRegistersConfig) if family == "dinov2_registers"
                    else (Dinov2Model, Dinov2Config))
        extra = {"num_register_tokens": 4} if family == "dinov2_registers" else {}
        vit_dino = dict(vit, mlp_ratio=2)
        vit_dino.pop("intermediate_size")
        model = cls(cfg(**vit_dino, **extra))
        processor = {"size": {"shortest_edge": image_size + 8}, "crop_size": {"height": image_size, "width": image_size},
                     "do_center_crop": True, "image_mean": _IMAGENET[0], "image_std": _IMAGENET[1], "resample": 3}
    else:
        model = ViTModel(ViTConfig(**vit))
        processor = {"size": {"height": image_size, "width": image_size}, "image_mean": _HALF[0],
                     "image_std": _HALF[1], "resample": 2}
    model.save_pretrained(directory)
    processor.update({"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True})
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return directory
