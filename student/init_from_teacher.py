"""Initialise a student from a teacher checkpoint by clipping the teacher's weights (as the paper does).

Student block i takes teacher layer i; every matrix keeps its leading rows/columns (the first
channels, hence the first heads when head widths agree). Teacher layer scales are folded into the
output projections, so the clipped block computes exactly what the teacher's leading channels
would. Position embeddings drop the CLS row and are resized to the student's patch grid.
Temporal convs, merges and the head's projection are the student's own and keep their init.

Tensors are read by name from the checkpoint's safetensors (the hub names are stable across
transformers versions, in-memory module names are not), from a standalone vision model or from
the vision tower of a whole VLM (e.g. `model.vision_tower.` in InternVL checkpoints).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.preprocess import Preprocessing
from pipeline.teacher import SafetensorsCheckpoint, checkpoint_file

from .modeling import LiteFrameModel

log = logging.getLogger(__name__)


class TeacherLayoutError(ValueError):
    """The teacher checkpoint's weights cannot be mapped onto the student."""


@dataclass(frozen=True)
class Layout:
    """Where one family keeps each tensor; `{i}` is the layer index, None = the family has none."""

    name: str
    patch: str
    pos: str
    pos_has_cls: bool
    block: str
    norm1: str
    q: str
    k: str
    v: str
    proj: str
    norm2: str
    fc1: str
    fc2: str
    scale1: str | None
    scale2: str | None
    final_norm: str | None


LAYOUTS = (
    Layout("internvl_vision", "embeddings.patch_embeddings.projection", "embeddings.position_embeddings", True,
           "encoder.layer.{i}.", "layernorm_before", "attention.q_proj", "attention.k_proj", "attention.v_proj",
           "attention.projection_layer", "layernorm_after", "mlp.fc1", "mlp.fc2", "lambda_1", "lambda_2", "layernorm"),
    Layout("dinov2", "embeddings.patch_embeddings.projection", "embeddings.position_embeddings", True,
           "encoder.layer.{i}.", "norm1", "attention.attention.query", "attention.attention.key",
           "attention.attention.value", "attention.output.dense", "norm2", "mlp.fc1", "mlp.fc2",
           "layer_scale1.lambda1", "layer_scale2.lambda1", "layernorm"),
    Layout("vit", "embeddings.patch_embeddings.projection", "embeddings.position_embeddings", True,
           "encoder.layer.{i}.", "layernorm_before", "attention.attention.query", "attention.attention.key",
           "attention.attention.value", "attention.output.dense", "layernorm_after", "intermediate.dense",
           "output.dense", None, None, "layernorm"),
    Layout("siglip", "embeddings.patch_embedding", "embeddings.position_embedding.weight", False,
           "encoder.layers.{i}.", "layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
           "self_attn.out_proj", "layer_norm2", "mlp.fc1", "mlp.fc2", None, None, "post_layernorm"),
)


class _TeacherWeights:
    """Named tensors of one vision model inside a checkpoint, with the family's layout resolved."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            self.checkpoint = SafetensorsCheckpoint(self.path, None)
        except ValueError as e:
            raise TeacherLayoutError(str(e)) from None
        keys = self.checkpoint.weight_map
        self.layout, self.prefix = self._resolve(keys)
        if any(k.startswith(self.prefix) and k.endswith("embeddings.class_embedding") for k in keys):
            raise TeacherLayoutError(f"{self.path}: CLIP vision towers (class embedding + pre-LayerNorm) are not "
                                     "supported for clipping; use InternViT, ViT, DINOv2 or SigLIP")
        if any(k.startswith(self.prefix) and ("q_norm" in k or "k_norm" in k) for k in keys):
            raise TeacherLayoutError(f"{self.path}: teachers with QK-norm have no counterpart in the student")
        self.num_layers = 0
        while self.has(self.block_key(self.num_layers, self.layout.q) + ".weight"):
            self.num_layers += 1
        self._files: dict[str, object] = {}

    def _resolve(self, keys: dict[str, str]) -> tuple[Layout, str]:
        for layout in LAYOUTS:
            anchors = [layout.block.format(i=0) + layout.q + ".weight", layout.block.format(i=0) + layout.norm1 + ".weight",
                       layout.block.format(i=0) + layout.fc1 + ".weight"]
            prefixes = {k[: -len(anchors[0])] for k in keys if k.endswith(anchors[0])}
            prefixes = [p for p in prefixes if all(p + a in keys for a in anchors) and p + layout.patch + ".weight" in keys]
            if prefixes:
                # A VLM holds one vision tower; prefer a prefix that says so, then the shortest.
                return layout, min(prefixes, key=lambda p: ("vision" not in p, len(p)))
        sample = sorted(keys)[:6]
        raise TeacherLayoutError(f"{self.path}: unknown vision-model layout (supported: "
                                 f"{', '.join(lay.name for lay in LAYOUTS)}); first keys: {sample}")

    def has(self, key: str) -> bool:
        return self.prefix + key in self.checkpoint.weight_map

    def block_key(self, i: int, name: str) -> str:
        return self.layout.block.format(i=i) + name

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        filename = self.checkpoint.weight_map[self.prefix + key]
        if filename not in self._files:
            self._files[filename] = safe_open(str(checkpoint_file(self.path, filename, None)), framework="pt")
        return self._files[filename].get_tensor(self.prefix + key).float()

    def vision_config(self) -> dict:
        cfg = json.loads((Path(self.path) / "config.json").read_text())
        return cfg.get("vision_config") or cfg


def _clip(src: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The leading block of `src` with `shape` (first rows, first columns, ...)."""
    if any(s < d for s, d in zip(src.shape, shape)) or src.ndim != len(shape):
        raise TeacherLayoutError(f"teacher tensor {tuple(src.shape)} is smaller than the student's {tuple(shape)}")
    return src[tuple(slice(0, d) for d in shape)]


@torch.no_grad()
def init_from_teacher(model: LiteFrameModel, teacher_path: str | Path) -> dict:
    """Copy clipped teacher weights into `model` in place; returns what was copied and from where.

    Also sets the student's image_mean/std from the teacher's preprocessor_config.json, so the
    student sees pixels normalised the way the copied patch embedding expects.
    """
    teacher = _TeacherWeights(teacher_path)
    lay, cfg = teacher.layout, model.config
    vcfg = teacher.vision_config()
    if vcfg.get("norm_type", "layer_norm") != "layer_norm":
        raise TeacherLayoutError(f"{teacher_path}: norm_type {vcfg['norm_type']!r}; the student uses LayerNorm")
    patch = vcfg.get("patch_size", cfg.patch_size)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if patch != cfg.patch_size:
        raise TeacherLayoutError(f"teacher patch size {patch} != student patch size {cfg.patch_size}")
    if teacher.num_layers < cfg.num_hidden_layers:
        raise TeacherLayoutError(f"teacher has {teacher.num_layers} layers, the student needs {cfg.num_hidden_layers}")
    if vcfg.get("hidden_act", cfg.hidden_act) != cfg.hidden_act:
        log.warning("teacher activation %s differs from the student's %s", vcfg.get("hidden_act"), cfg.hidden_act)

    names = {id(p): n for n, p in model.named_parameters()}
    copied: list[str] = []

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(_clip(value, param.shape).to(param.dtype))
        copied.append(names[id(param)])

    put(model.patch_embed.weight, teacher.get(lay.patch + ".weight"))
    if teacher.has(lay.patch + ".bias"):
        put(model.patch_embed.bias, teacher.get(lay.patch + ".bias"))

    pos = teacher.get(lay.pos)
    pos = pos.reshape(-1, pos.shape[-1])
    pos = pos[1:] if lay.pos_has_cls else pos
    side = math.isqrt(pos.shape[0])
    if side * side != pos.shape[0]:
        raise TeacherLayoutError(f"teacher position table of {pos.shape[0]} patches is not a square grid")
    grid = pos[:, : cfg.hidden_size].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if (side, side) != cfg.patch_grid:
        grid = F.interpolate(grid, size=cfg.patch_grid, mode="bicubic", align_corners=False)
    put(model.pos_embed, grid.permute(0, 2, 3, 1))

    for i, block in enumerate(model.blocks):
        key = lambda name: teacher.block_key(i, name)  # noqa: E731
        scale1 = teacher.get(key(lay.scale1)) if lay.scale1 else None
        scale2 = teacher.get(key(lay.scale2)) if lay.scale2 else None
        for norm, name in ((block.norm1, lay.norm1), (block.norm2, lay.norm2)):
            put(norm.weight, teacher.get(key(name) + ".weight"))
            put(norm.bias, teacher.get(key(name) + ".bias"))
        c = cfg.hidden_size
        qkv_w = torch.cat([_clip(teacher.get(key(n) + ".weight"), (c, c)) for n in (lay.q, lay.k, lay.v)])
        put(block.attn.qkv.weight, qkv_w)
        if teacher.has(key(lay.q) + ".bias"):
            qkv_b = torch.cat([teacher.get(key(n) + ".bias")[:c] for n in (lay.q, lay.k, lay.v)])
            put(block.attn.qkv.bias, qkv_b)
        else:
            put(block.attn.qkv.bias, torch.zeros_like(block.attn.qkv.bias))
        for linear, name, scale in ((block.attn.proj, lay.proj, scale1), (block.mlp.fc1, lay.fc1, None),
                                    (block.mlp.fc2, lay.fc2, scale2)):
            weight, bias = teacher.get(key(name) + ".weight"), teacher.get(key(name) + ".bias")
            if scale is not None:  # fold the layer scale: lambda * (W x + b)
                weight, bias = weight * scale[:, None], bias * scale
            put(linear.weight, weight)
            put(linear.bias, bias)

    if lay.final_norm and teacher.has(lay.final_norm + ".weight"):
        put(model.head.norm.weight, teacher.get(lay.final_norm + ".weight"))
        put(model.head.norm.bias, teacher.get(lay.final_norm + ".bias"))

    pre = Preprocessing.from_pretrained(teacher_path)
    cfg.image_mean, cfg.image_std = list(pre.image_mean), list(pre.image_std)
    fresh = [n for n in names.values() if n not in copied]
    return {"layout": lay.name, "prefix": teacher.prefix, "teacher_layers": teacher.num_layers,
            "copied": copied, "fresh": fresh}
