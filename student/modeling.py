"""LiteFrame student: per-frame spatial attention, depth-wise temporal convs, strided space-time merges.

Activations stay channels-last `[B, T, h, w, C]` through the whole trunk, so attention sees a free
view `[B*T, h*w, C]` and the temporal conv is a shifted sum over T (no permutes, fuses under
torch.compile). Spatial attention is per frame; only the temporal convs mix frames, which is what
lets `encode_video` run a whole video at once (convs span clip boundaries) and chunk it exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN

from pipeline.preprocess import Preprocessing

from .configuration import LiteFrameConfig

# Maps standardised pixel values [B, T, 3, H, W] to standardised tokens [B, T', h', w', D].
Encoder = Callable[[torch.Tensor], torch.Tensor]


class TemporalConv(nn.Module):
    """Depth-wise conv over time, per token, zero-padded: y[t] = b + sum_j w[j] * x[t + j - k//2]."""

    def __init__(self, hidden_size: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(kernel, hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, N, C]
        k, t = self.weight.shape[0], x.shape[1]
        xp = F.pad(x, (0, 0, 0, 0, k // 2, k // 2))
        y = self.bias
        for j in range(k):
            y = y + xp[:, j : j + t] * self.weight[j]
        return y


class Attention(nn.Module):
    def __init__(self, config: LiteFrameConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [M, N, C], M = frames
        m, n, c = x.shape
        q, k, v = self.qkv(x).view(m, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(m, n, c))


class MLP(nn.Module):
    """fc1 -> activation -> fc2.

    `fused_gelu` (set by the optimised path, inference only: the op has no backward) runs fc1's bias and
    GELU as the matmul's epilogue, so the 4x-wide hidden tensor is written once instead of three times.
    On CUDA that epilogue (cuBLASLt) is the tanh approximation of GELU: |delta| < 5e-4, under bf16's resolution.
    """

    def __init__(self, config: LiteFrameConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.fused_gelu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gelu:
            h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), use_gelu=True)
            return self.fc2(h.view(*x.shape[:-1], -1))
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x + temporal(x), then a pre-norm ViT block applied to each frame separately."""

    def __init__(self, config: LiteFrameConfig):
        super().__init__()
        self.temporal = TemporalConv(config.hidden_size, config.temporal_kernel)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, h, w, C]
        shape = x.shape
        x = x.flatten(2, 3)
        x = x + self.temporal(x)
        frames = x.flatten(0, 1)
        frames = frames + self.attn(self.norm1(frames))
        frames = frames + self.mlp(self.norm2(frames))
        return frames.view(shape)


class Merge(nn.Module):
    """Strided space-time downsampling: a (t, h, w) neighbourhood concatenated, then a Linear.

    Equivalent to a strided Conv3d, computed as one matmul on channels-last tokens. Initialised to the
    neighbourhood average so that a teacher-initialised student starts as the teacher on pooled tokens.
    """

    def __init__(self, hidden_size: int, stride: tuple[int, int, int]):
        super().__init__()
        self.stride = tuple(stride)
        self.weight = nn.Parameter(torch.empty(hidden_size, math.prod(stride) * hidden_size))
        self.bias = nn.Parameter(torch.empty(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, h, w, C]
        b, t, h, w, c = x.shape
        st, sh, sw = self.stride
        x = x.view(b, t // st, st, h // sh, sh, w // sw, sw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return F.linear(x.reshape(b, t // st, h // sh, w // sw, st * sh * sw * c), self.weight, self.bias)

    def reset_to_average(self) -> None:
        c, n = self.weight.shape[0], self.weight.shape[1] // self.weight.shape[0]
        init.copy_(self.weight, torch.eye(c).repeat(1, n) / n)
        init.zeros_(self.bias)


class Head(nn.Module):
    def __init__(self, config: LiteFrameConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.head_hidden_size:
            self.hidden = nn.Linear(config.hidden_size, config.head_hidden_size)
            self.act = ACT2FN[config.hidden_act]
            self.out = nn.Linear(config.head_hidden_size, config.target_dim)
        else:
            self.hidden = None
            self.out = nn.Linear(config.hidden_size, config.target_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.hidden is not None:
            x = self.act(self.hidden(x))
        return self.out(x)


class LiteFrameModel(PreTrainedModel):
    config_class = LiteFrameConfig
    base_model_prefix = "liteframe"
    main_input_name = "pixel_values"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: LiteFrameConfig):
        super().__init__(config)
        config.check_geometry()
        c = config.hidden_size
        self.patch_embed = nn.Conv2d(3, c, kernel_size=config.patch_size, stride=config.patch_size)
        gh, gw = config.patch_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, gh, gw, c))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.merges = nn.ModuleList(Merge(c, s) for s in config.downsample_stride)
        self.head = Head(config)
        # Plain ints for the forward pass: reading the config there breaks torch.compile's graph.
        self._patch = config.patch_size
        self._temporal_stride = config.temporal_stride
        self._merge_before = tuple(config.downsample_after)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, Merge):
            module.reset_to_average()
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, TemporalConv):
            init.zeros_(module.weight)  # each block starts as a purely spatial ViT block
            init.zeros_(module.bias)
        elif isinstance(module, LiteFrameModel):
            init.trunc_normal_(module.pos_embed, std=std)

    # Trunk ------------------------------------------------------------------------------------

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """The learned [gh, gw, C] table, bicubically resized when the input grid differs."""
        pos = self.pos_embed
        if pos.shape[1:3] != (gh, gw):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(gh, gw), mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1)
        return pos[0]

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] -> patch tokens + position embedding [B, T, gh, gw, C].

        The patch conv is computed as one matmul on gathered patches: cuDNN runs this stride-14
        conv on a slow generic kernel (a fifth of the compiled student's time on an H200), and the
        tokens come out channels-last with no permute.
        """
        b, t = pixel_values.shape[:2]
        p = self._patch
        gh, gw = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
        patches = pixel_values.reshape(b * t, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b * t, gh, gw, -1)
        x = F.linear(patches, self.patch_embed.weight.flatten(1), self.patch_embed.bias)
        return (x + self.position_embedding(gh, gw)).reshape(b, t, gh, gw, -1)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] normalised -> trunk tokens [B, T', h', w', C] (before the head)."""
        t = pixel_values.shape[1]
        if t % self._temporal_stride:
            raise ValueError(f"{t} frames is not a multiple of the temporal stride {self._temporal_stride}")
        x = self.embed(pixel_values)
        for i, block in enumerate(self.blocks):
            if i in self._merge_before:
                x = self.merges[self._merge_before.index(i)](x)
            x = block(x)
        return x

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] -> standardised tokens on their grid [B, T', h', w', D]."""
        return self.head(self.features(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Clips [B, T, 3, H, W] (normalised) -> standardised target tokens [B, T'*h'*w', D]."""
        return self.encode(pixel_values).flatten(1, 3)

    # Video inference -------------------------------------------------------------------------

    def temporal_halo(self) -> int:
        """Context frames each side that make chunked inference equal to whole-video inference.

        A conv at a stage of temporal stride S widens the receptive field by (k//2)*S frames per side;
        merges do not widen it. Rounded up to whole clips so chunks stay aligned to the merges.
        """
        cfg = self.config
        strides = np.cumprod([1] + [s[0] for s in cfg.downsample_stride])
        reach = sum((cfg.temporal_kernel // 2) * int(strides[s]) for s in cfg.stage_of_block())
        return math.ceil(reach / cfg.clip_frames) * cfg.clip_frames

    def preprocess(self, frames: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> normalised [N, 3, H', W'] at the model's image size, on its device."""
        pre = Preprocessing(size=self.config.image_hw, image_mean=tuple(self.config.image_mean),
                            image_std=tuple(self.config.image_std))
        return pre.to_pixel_values(frames, device=self.device, dtype=dtype or self.dtype)

    def destandardise(self, tokens: torch.Tensor) -> torch.Tensor:
        """Standardised predictions -> the teacher's target space, with the store's per-channel stats."""
        tokens = tokens.float()
        if self.config.target_std is not None:
            tokens = tokens * torch.tensor(self.config.target_std, device=tokens.device)
        if self.config.target_mean is not None:
            tokens = tokens + torch.tensor(self.config.target_mean, device=tokens.device)
        return tokens

    def encode_video(
        self,
        frames: np.ndarray | torch.Tensor,
        chunk_frames: int | None = None,
        span_clips: bool = True,
        encoder: Encoder | None = None,
    ) -> torch.Tensor:
        """uint8 frames [N, H, W, 3] -> float32 [clips, target_tokens, target_dim] in the teacher's space.

        N is padded to whole clips by repeating the last frame. With `span_clips` the video is one
        sequence (temporal convs see neighbours across clip boundaries); `chunk_frames` bounds memory
        and gives the same result, each chunk computed with `temporal_halo()` frames of context.
        Without `span_clips` each clip is encoded alone, exactly as in training.
        `encoder` replaces `self.encode` (the optimised path in `student.fast` passes its own).
        Like `forward`, it follows the caller's grad mode: wrap inference in `torch.inference_mode()`.
        """
        frames = torch.as_tensor(frames)
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
            raise ValueError(f"expected uint8 frames [N>0, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        encoder = encoder or self.encode
        cf = self.config.clip_frames
        n = len(frames)
        padded = math.ceil(n / cf) * cf
        if padded > n:
            frames = torch.cat([frames, frames[-1:].expand(padded - n, *frames.shape[1:])])
        if not span_clips:
            step = chunk_frames or padded
            step = max(cf, step // cf * cf)
            out = [
                encoder(self.preprocess(frames[a : a + step]).unflatten(0, (-1, cf))).flatten(1, 3)
                for a in range(0, padded, step)
            ]
            return self.destandardise(torch.cat(out))
        step = max(cf, (chunk_frames or padded) // cf * cf)
        halo = self.temporal_halo() if step < padded else 0
        stride_t = self.config.temporal_stride
        out = []
        for a in range(0, padded, step):
            b = min(a + step, padded)
            lo, hi = max(0, a - halo), min(padded, b + halo)
            grid = encoder(self.preprocess(frames[lo:hi])[None])[0]  # [T', h', w', D]
            out.append(grid[(a - lo) // stride_t : (b - lo) // stride_t])
        tokens = torch.cat(out).unflatten(0, (padded // cf, -1)).flatten(1, 3)
        return self.destandardise(tokens)
