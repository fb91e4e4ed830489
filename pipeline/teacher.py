"""The teacher: a pretrained HF vision backbone whose patch tokens the student learns to predict.

`Teacher.from_pretrained(name_or_path)` accepts a standalone vision model (SigLIP/CLIP vision,
DINOv2 with or without registers, ViT, InternVL's vision model) or a whole VLM checkpoint
(InternVL, LLaVA-style: vision tower + projector + LLM). For a VLM only the vision tower (and
the projector, for `head="projector"`) is built from the config and filled from the safetensors
by key prefix, so an 8B checkpoint costs the 300M of its vision tower, not 8B.

`encode` takes uint8 frames and returns the patch-token grid of every frame, float32, with
CLS/register tokens dropped. Blocks after the chosen layer are removed rather than computed.

`dtype="float8"` is a precision, not a torch dtype: the transformer blocks' linear layers run as FP8
matmuls (`pipeline.fp8`, exact float32 accumulation: the targets are stored data), bf16 elsewhere
(embeddings, norms, attention, projector). It needs a CUDA GPU of compute capability 8.9+, and
`describe()` records it as dtype "float8", so a store's identity says its targets came from FP8.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.fp8 import convert_linears, fp8_unsupported_reason
from pipeline.fp8 import input_amax as linear_input_amax
from pipeline.preprocess import PREPROCESSOR_CONFIG, Preprocessing, as_tensor

log = logging.getLogger(__name__)

HEADS = ("none", "projector")
ATTENTION_BACKENDS = ("cudnn", "flash", "efficient", "math")
NAFLEX_FAMILIES = ("siglip2_vision_model",)
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
FLOAT8 = "float8"   # the FP8 precision's name in `dtype` arguments and in describe()


class TeacherError(ValueError):
    """A teacher checkpoint or option that cannot give patch-token targets."""


class Teacher(nn.Module):
    """Frozen vision backbone (+ optional VLM projector) -> per-frame patch-token grids."""

    def __init__(self, backbone: nn.Module, *, preprocessing: Preprocessing, patch_size: int, layer: int,
                 num_layers: int, head: str = "none", projector: nn.Module | None = None,
                 downsample_ratio: float = 1.0, dim: int, name_or_path: str = "", revision: str | None = None,
                 family: str = "", batch_size: int = 256, interpolate_pos_encoding: bool = False,
                 patch_inputs: bool = False, attention_backends: Sequence[str] | None = None):
        super().__init__()
        if head not in HEADS:
            raise TeacherError(f"head must be one of {HEADS}, got {head!r}")
        h, w = preprocessing.size
        if h % patch_size or w % patch_size:
            raise TeacherError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
        self.backbone = backbone.eval().requires_grad_(False)
        self.projector = projector.eval().requires_grad_(False) if projector is not None else None
        self.preprocessing = preprocessing
        self.patch_size = patch_size
        self.layer = layer
        self.num_layers = num_layers
        self.head = head
        self.downsample_ratio = downsample_ratio
        self.name_or_path = name_or_path
        self.revision = revision
        self.family = family
        self.batch_size = batch_size
        self.patch_grid = (h // patch_size, w // patch_size)
        scale = downsample_ratio if head == "projector" else 1.0
        self.grid = (int(self.patch_grid[0] * scale), int(self.patch_grid[1] * scale))
        self.dim = dim
        self._forward_kwargs = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}
        # SigLIP2 (NaFlex) takes flattened patches + their grid instead of images.
        self.patch_inputs = patch_inputs
        unknown = set(attention_backends or ()) - set(ATTENTION_BACKENDS)
        if unknown:
            raise TeacherError(f"unknown attention backends {sorted(unknown)}; choose from {ATTENTION_BACKENDS}")
        self.attention_backends = tuple(attention_backends or ())
        # The FP8 precision once use_fp8 (from_pretrained(dtype="float8")) made the blocks' linears FP8:
        # "float8", or "float8-static" with calibrated activation scales; None before.
        self.fp8: str | None = None
        self._copy_stream: torch.cuda.Stream | None = None
        # Per thread: a Ray actor with max_concurrency > 1 runs encode in several threads at once.
        self._captured = threading.local()
        self._tokens_fn = self._tokens
        if layer != -1:
            # Intermediate layers: the model was truncated after this block; take the block's own
            # output (HF's hidden_states[layer]), not the final norm the model would apply on top.
            self._layers()[-1].register_forward_hook(self._capture)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, layer: int = -1, head: str = "none",
                        revision: str | None = None, device: torch.device | str | None = None,
                        dtype: torch.dtype | str | None = None, image_size: int | None = None,
                        image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                        attn_implementation: str = "sdpa", batch_size: int = 256,
                        attention_backends: Sequence[str] | None = None, compile: bool = False) -> "Teacher":
        """Load a teacher; see the module docstring for what checkpoints are accepted.

        layer: HF `hidden_states` index — 1..L is the output of that block, -1 the model's
            `last_hidden_state` (with its final norm, as VLMs feed their projector), -k counts back.
        head: "none" (backbone tokens) or "projector" (InternVL pixel shuffle + MLP projector, so
            targets live in the LLM's input space).
        image_size/image_mean/image_std override preprocessor_config.json.
        batch_size: frames per forward pass. attention_backends: SDPA kernels by priority, e.g.
            ("cudnn", "flash"); None leaves torch's choice. compile: torch.compile the forward.
        dtype: a torch dtype or its name, or "float8" (see the module docstring); default bf16 on
            CUDA, float32 on CPU.
        """
        from transformers import AutoConfig, AutoModel

        name_or_path = str(name_or_path)
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        fp8 = dtype == FLOAT8
        if fp8 and (reason := fp8_unsupported_reason(device)) is not None:
            raise TeacherError(f"dtype {FLOAT8!r}: {reason}; use bfloat16 there")
        dtype = torch.bfloat16 if fp8 else _dtype(dtype, device)
        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
        vision_config = getattr(config, "vision_config", None)
        composite = vision_config is not None
        vision_config = vision_config if composite else config
        if head == "projector" and not hasattr(config, "downsample_ratio"):
            raise TeacherError(f"head='projector' needs an InternVL-style VLM checkpoint (pixel shuffle + "
                               f"multi_modal_projector); {name_or_path} is model_type {config.model_type!r}")
        if head not in HEADS:
            raise TeacherError(f"head must be one of {HEADS}, got {head!r}")

        num_layers = int(vision_config.num_hidden_layers)
        keep = _blocks_to_keep(layer, num_layers)
        if keep == 0:
            raise TeacherError("layer 0 is the patch embedding, not a transformer block; choose layer >= 1")
        if composite:
            backbone = AutoModel.from_config(vision_config, attn_implementation=attn_implementation)
        else:
            backbone = AutoModel.from_pretrained(name_or_path, revision=revision,
                                                 attn_implementation=attn_implementation)
        if keep < num_layers:
            _truncate_blocks(backbone, num_layers, keep)

        projector = None
        dim = int(vision_config.hidden_size)
        ratio = 1.0
        if head == "projector":
            from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

            projector = InternVLMultiModalProjector(config)
            ratio = float(config.downsample_ratio)
            dim = int(config.text_config.hidden_size)
            if layer != getattr(config, "vision_feature_layer", -1):
                log.warning("teacher layer %d differs from the layer the projector was trained on (%s)",
                            layer, getattr(config, "vision_feature_layer", -1))
        if composite:
            checkpoint = SafetensorsCheckpoint(name_or_path, revision)
            checkpoint.load_into(backbone, hint="vision")
            if projector is not None:
                checkpoint.load_into(projector, hint="multi_modal_projector")

        patch_size = _first(vision_config.patch_size)
        pre_dir = checkpoint_file(name_or_path, PREPROCESSOR_CONFIG, revision)
        patch_inputs = vision_config.model_type in NAFLEX_FAMILIES
        if patch_inputs:
            # A square frame filling the processor's patch budget (the model's num_patches by default).
            budget = _read_json(pre_dir).get("max_num_patches") or vision_config.num_patches
            native = int(math.isqrt(int(budget))) * patch_size
        else:
            native = _first(getattr(vision_config, "image_size", 0) or 0)
        preprocessing = Preprocessing.from_pretrained(
            pre_dir.parent if pre_dir is not None else None, default_size=native or None,
            size=image_size, image_mean=image_mean, image_std=image_std)
        if preprocessing.size[0] != preprocessing.size[1]:
            raise TeacherError(f"teacher input must be square, preprocessing says {preprocessing.size}; "
                               f"pass image_size")
        interpolate = preprocessing.size[0] != native and _accepts(backbone, "interpolate_pos_encoding")
        teacher = cls(backbone, preprocessing=preprocessing, patch_size=patch_size, layer=layer,
                      num_layers=num_layers, head=head, projector=projector, downsample_ratio=ratio, dim=dim,
                      name_or_path=name_or_path, revision=revision or _snapshot_revision(pre_dir),
                      family=str(vision_config.model_type), batch_size=batch_size,
                      interpolate_pos_encoding=interpolate, patch_inputs=patch_inputs,
                      attention_backends=attention_backends)
        teacher = teacher.to(device=device, dtype=dtype)
        if fp8:
            teacher.use_fp8()
        if compile:
            teacher.compile_tokens()
        return teacher

    def calibrate_fp8(self, frames: Any) -> dict[str, float]:
        """Each block linear's max |input| over `frames` ([clips, T, H, W, 3] uint8), run on this (not yet
        FP8) teacher: the static activation scales `use_fp8` can take."""
        if self.fp8:
            raise TeacherError("calibrate_fp8 needs the teacher before use_fp8: its inputs, not FP8's")
        with torch.inference_mode():
            return linear_input_amax(self._layers(), lambda: self.encode(frames))

    def use_fp8(self, input_amax: Mapping[str, float] | None = None) -> None:
        """The blocks' linear layers as FP8 matmuls (float32 accumulation: targets are stored data), their
        activations quantised per row, or with `input_amax`'s static scales (`calibrate_fp8`; described as
        dtype "float8-static", since the scales change the targets). Before compile_tokens."""
        convert_linears(self._layers(), fast_accum=False, input_amax=input_amax)
        self.fp8 = FLOAT8 if input_amax is None else f"{FLOAT8}-static"

    # -- properties -----------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.preprocessing.size[0]

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.preprocessing.image_mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.preprocessing.image_std

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def describe(self) -> dict[str, Any]:
        """What identifies the targets (for store.json and config-mismatch checks)."""
        return self._identity(self.fp8 or str(self.dtype).removeprefix("torch."))

    @classmethod
    def describe_pretrained(cls, name_or_path: str | Path, *, dtype: str, **kwargs: Any) -> dict[str, Any]:
        """`describe()` of `from_pretrained(name_or_path, dtype=dtype, **kwargs)` as the job's GPU workers
        will load it, computed on this process's CPU (a driver may have no GPU, let alone an FP8 one):
        a float8 teacher is loaded here in bfloat16, the weights its FP8 ones are quantised from."""
        fp8 = dtype == FLOAT8
        teacher = cls.from_pretrained(name_or_path, device="cpu", dtype="bfloat16" if fp8 else dtype, **kwargs)
        return teacher._identity(FLOAT8) if fp8 else teacher.describe()

    def _identity(self, precision: str) -> dict[str, Any]:
        return {"name_or_path": self.name_or_path, "revision": self.revision, "layer": self.layer,
                "head": self.head, "dim": self.dim, "grid": list(self.grid), "family": self.family,
                "dtype": precision, "image_size": self.image_size,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "patch_size": self.patch_size, "num_layers": self.num_layers}

    # -- compute --------------------------------------------------------------------------------
    def compile_tokens(self, **kwargs: Any) -> None:
        """torch.compile the per-batch token function (fuses norms, GELU, layer scale, casts).

        kwargs go to torch.compile; with a CUDA-graph mode ("reduce-overhead") outputs live in graph
        memory that the next replay overwrites, so `encode` copies them out.
        """
        compiled = torch.compile(self._tokens, **kwargs)
        if kwargs.get("mode") in ("reduce-overhead", "max-autotune"):
            def replay(pixel_values: torch.Tensor) -> torch.Tensor:
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(pixel_values).clone()

            self._tokens_fn = replay
        else:
            self._tokens_fn = compiled

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [B, T, H, W, 3] frames at `image_size` -> float32 [B, T, h, w, D] on the teacher's device.

        All B*T frames go through the backbone as one image batch, in chunks of `batch_size`.
        """
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [B, T, H, W, 3], got shape {tuple(frames.shape)}")
        if str(frames.dtype).removeprefix("torch.") != "uint8":
            raise ValueError(f"expected uint8 frames, got {frames.dtype}")
        b, t = frames.shape[:2]
        flat = frames.reshape(b * t, *frames.shape[2:])
        with self._attention():
            out = [self._tokens_fn(self.preprocessing.to_pixel_values(chunk, device=self.device, dtype=self.dtype))
                   for chunk in self._device_chunks(flat)]
        tokens = out[0] if len(out) == 1 else torch.cat(out)
        return tokens.view(b, t, *self.grid, self.dim)

    def _device_chunks(self, frames: np.ndarray | torch.Tensor) -> Iterator[torch.Tensor]:
        """`batch_size`-frame chunks on the device, consumed lazily by `encode`.

        Host frames bound for a GPU go through pinned memory and a side stream, so chunk i+1 is
        uploaded while the GPU computes chunk i and only the first upload is not hidden.
        """
        spans = range(0, frames.shape[0], self.batch_size)
        on_device = isinstance(frames, torch.Tensor) and frames.device == self.device
        if self.device.type != "cuda" or on_device:
            yield from (frames[s:s + self.batch_size] for s in spans)
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        for s in spans:
            host = as_tensor(frames[s:s + self.batch_size])
            pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
            pinned.copy_(host)
            with torch.cuda.stream(self._copy_stream):
                chunk = pinned.to(self.device, non_blocking=True)
            compute.wait_stream(self._copy_stream)
            chunk.record_stream(compute)
            yield chunk

    def _attention(self) -> contextlib.AbstractContextManager:
        """SDPA kernels in the order asked for (e.g. cuDNN's Hopper kernel before FlashAttention-2)."""
        if not self.attention_backends:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
        return sdpa_kernel([names[n] for n in self.attention_backends], set_priority=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised [N, 3, H, W] -> float32 [N, h, w, D]."""
        return self._tokens_fn(pixel_values)

    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.backbone(**self._backbone_inputs(pixel_values), **self._forward_kwargs)
        if self.layer == -1:
            hidden = out.last_hidden_state
        else:
            hidden, self._captured.output = self._captured.output, None
        gh, gw = self.patch_grid
        n = hidden.shape[0]
        # CLS and register tokens come first in every supported family; patches are the tail.
        hidden = hidden[:, hidden.shape[1] - gh * gw:].reshape(n, gh, gw, hidden.shape[-1])
        if self.projector is not None:
            from transformers.models.internvl.modeling_internvl import InternVLModel

            hidden = InternVLModel.pixel_shuffle(None, hidden, scale_factor=self.downsample_ratio)
            hidden = self.projector(hidden)
        return hidden.float()

    def _backbone_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.patch_inputs:
            return {"pixel_values": pixel_values}
        n, c = pixel_values.shape[:2]
        (gh, gw), p = self.patch_grid, self.patch_size
        # Row-major patches, each flattened (row, column, channel) as Siglip2ImageProcessor does.
        patches = (pixel_values.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
                   .reshape(n, gh * gw, p * p * c))
        shapes = torch.tensor([[gh, gw]], device=pixel_values.device).expand(n, 2)
        mask = torch.ones(n, gh * gw, dtype=torch.int32, device=pixel_values.device)
        return {"pixel_values": patches, "spatial_shapes": shapes, "pixel_attention_mask": mask}

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        self._captured.output = output[0] if isinstance(output, (tuple, list)) else output

    def _layers(self) -> nn.ModuleList:
        return _find_blocks(self.backbone)[1]


# -- helpers -----------------------------------------------------------------------------------
def _dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise TeacherError(f"unknown dtype {dtype!r}")
    if dtype.itemsize == 1:
        raise TeacherError(f"dtype {dtype} would cast every weight; {FLOAT8!r} runs the linears as FP8 matmuls")
    return dtype


def _first(value: Any) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def _blocks_to_keep(layer: int, num_layers: int) -> int:
    if layer == -1:
        return num_layers
    index = layer if layer >= 0 else num_layers + 1 + layer
    if not 0 <= index <= num_layers:
        raise TeacherError(f"layer {layer} out of range for a {num_layers}-layer backbone")
    return index


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: the largest ModuleList (by parameters) in the backbone."""
    best = max(((name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)),
               key=lambda nm: sum(p.numel() for p in nm[1].parameters()), default=None)
    if best is None:
        raise TeacherError(f"{type(model).__name__} has no list of transformer blocks")
    return best


def _truncate_blocks(model: nn.Module, num_layers: int, keep: int) -> None:
    name, blocks = _find_blocks(model)
    if len(blocks) != num_layers:
        raise TeacherError(f"{type(model).__name__}.{name} has {len(blocks)} blocks, config says {num_layers}")
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.ModuleList(list(blocks)[:keep]))
    model.config.num_hidden_layers = keep


def _accepts(model: nn.Module, arg: str) -> bool:
    import inspect

    return arg in inspect.signature(model.forward).parameters


def checkpoint_file(name_or_path: str, filename: str, revision: str | None) -> Path | None:
    """A model file as a local path: from the dir, or from the hub cache (downloading it); None if absent."""
    local = Path(name_or_path)
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(name_or_path, filename, revision=revision))
    except EntryNotFoundError:
        return None


def _read_json(path: Path | None) -> dict[str, Any]:
    return json.loads(path.read_text()) if path is not None else {}


def _snapshot_revision(path: Path | None) -> str | None:
    """The commit hash of a hub-cache snapshot path (…/snapshots/<sha>/file), else None."""
    match = re.search(r"/snapshots/([0-9a-f]{40})/", str(path)) if path is not None else None
    return match.group(1) if match else None


class SafetensorsCheckpoint:
    """Tensor-level access to a (possibly sharded) safetensors checkpoint, reading only what is asked."""

    def __init__(self, name_or_path: str, revision: str | None):
        self.name_or_path, self.revision = name_or_path, revision
        index = checkpoint_file(name_or_path, SAFETENSORS_INDEX, revision)
        if index is not None:
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            single = checkpoint_file(name_or_path, SAFETENSORS, revision)
            if single is None:
                raise TeacherError(f"{name_or_path}: no {SAFETENSORS} or {SAFETENSORS_INDEX}; loading part of a "
                                   f"VLM needs safetensors weights")
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {k: SAFETENSORS for k in f.keys()}

    def _prefix(self, wanted: list[str], hint: str) -> str:
        """The key prefix under which the checkpoint stores `wanted` (e.g. 'model.vision_tower.')."""
        anchor = max(wanted, key=len)
        candidates = {k[: len(k) - len(anchor)] for k in self.weight_map
                      if k.endswith(anchor) and (len(k) == len(anchor) or k[-len(anchor) - 1] == ".")}

        def score(prefix: str) -> tuple[int, bool, int]:
            return sum(prefix + k in self.weight_map for k in wanted), hint in prefix, -len(prefix)

        best = max(candidates, key=score, default=None)
        if best is None or score(best)[0] < len(wanted):
            found = score(best)[0] if best is not None else 0
            missing = [k for k in wanted if (best or "") + k not in self.weight_map][:5]
            raise TeacherError(f"{self.name_or_path}: checkpoint lacks {len(wanted) - found} of the {len(wanted)} "
                               f"{hint} weights (e.g. {missing})")
        return best

    def load_into(self, module: nn.Module, hint: str) -> None:
        from safetensors import safe_open

        wanted = list(module.state_dict())
        prefix = self._prefix(wanted, hint)
        by_file: dict[str, list[str]] = {}
        for k in wanted:
            by_file.setdefault(self.weight_map[prefix + k], []).append(k)
        state: dict[str, torch.Tensor] = {}
        for filename, keys in by_file.items():
            path = checkpoint_file(self.name_or_path, filename, self.revision)
            with safe_open(str(path), framework="pt") as f:
                for k in keys:
                    state[k] = f.get_tensor(prefix + k)
        module.load_state_dict(state, strict=True)
