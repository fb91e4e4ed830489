"""The Video LLM: student (frozen by default) → projector → causal LM with LoRA.

A saved model is a folder: `config.json` (VideoLLMConfig), the tokenizer, `projector.safetensors`
(with the time embedding's weights under the `embedding` time-marker scheme), `student/` (the
student, so the folder is self-contained) and either `adapter/` (a PEFT LoRA adapter on the LLM
named in the config) or `llm/` (the LLM with the adapter merged in).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from lma.data import (TIME_MARKER, VIDEO_PLACEHOLDER, Example, TimeMarkers, clip_start_times,
                      tokenize_conversation)

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class VideoLLMConfig(PretrainedConfig):
    """What `VideoLLM.from_pretrained` needs besides the weights: which LLM, how the projector
    is shaped, and how video appears in the prompt."""

    model_type = "liteframe_video_llm"

    def __init__(self, llm: str = "", merged: bool = False, projector_kind: str = "mlp",
                 projector_in: int = 0, hidden_size: int = 0, clip_frames: int = 4,
                 tokens_per_clip: int = 0, image_size: int = 0, frames: int = 64,
                 placeholder: str = VIDEO_PLACEHOLDER, time_marker: str = TIME_MARKER,
                 time_markers: str = "text", marker_every: int = 8, **kwargs):
        self.llm, self.merged = llm, merged
        self.projector_kind, self.projector_in, self.hidden_size = projector_kind, projector_in, hidden_size
        self.clip_frames, self.tokens_per_clip, self.image_size = clip_frames, tokens_per_clip, image_size
        self.frames, self.placeholder, self.time_marker = frames, placeholder, time_marker
        # lma.data.TimeMarkers; the defaults are what a config saved before the schemes existed meant
        self.time_markers, self.marker_every = time_markers, marker_every
        super().__init__(**kwargs)


AutoConfig.register(VideoLLMConfig.model_type, VideoLLMConfig)


class TimeEmbedding(nn.Module):
    """Seconds → sinusoidal features (periods from 1 s to about 4.5 h, geometric) → Linear,
    initialised to zero: a model trained with it starts exactly as one given no time at all,
    and learns how much of it to use."""

    def __init__(self, dim: int, features: int = 64, min_period: float = 1.0, max_period: float = 16384.0):
        super().__init__()
        self.features, self.min_period, self.max_period = features, min_period, max_period
        self.proj = nn.Linear(features, dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, seconds: torch.Tensor) -> torch.Tensor:
        """[...] seconds → [..., dim]. The features are computed in fp32 whatever the weights' dtype
        (a bf16 phase at an hour into a video would be off by whole periods)."""
        half = self.features // 2
        periods = torch.logspace(math.log10(self.min_period), math.log10(self.max_period), half,
                                 device=seconds.device, dtype=torch.float32)
        angles = seconds.to(torch.float32)[..., None] * (2 * math.pi / periods)
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.proj.weight.dtype))


class VideoProjector(nn.Module):
    """LayerNorm → Linear → GELU → Linear (InternVL's projector shape). `residual` (student targets
    already in the LLM's input space, from the teacher's projector head) adds the input back and
    zero-initialises the last layer, so at step 0 the LLM sees exactly the teacher-space tokens.
    `time_embedding` gives it a `TimeEmbedding` (`time`): its weights are the projector's, saved,
    loaded, cast and trained with it; `VideoLLM.embed` adds it where each token's clip time is known."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "auto", time_embedding: bool = False):
        super().__init__()
        if kind == "auto":
            kind = "residual" if in_dim == out_dim else "mlp"
        if kind not in ("mlp", "residual"):
            raise ValueError(f"projector kind must be auto, mlp or residual, got {kind!r}")
        if kind == "residual" and in_dim != out_dim:
            raise ValueError(f"a residual projector needs in_dim == out_dim, got {in_dim} -> {out_dim}")
        self.kind = kind
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)
        if kind == "residual":
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)
        self.time = TimeEmbedding(out_dim) if time_embedding else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(self.norm(x))))
        return x + y if self.kind == "residual" else y


def resolve_device(name: str) -> torch.device:
    """"auto" = the first GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU (the paper's setting), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _load_student(path: str | Path, dtype: torch.dtype, device):
    from student import LiteFrameModel

    return LiteFrameModel.from_pretrained(str(path), dtype=dtype).to(device)


class VideoLLM(nn.Module):
    def __init__(self, config: VideoLLMConfig, student: nn.Module, projector: VideoProjector,
                 llm: nn.Module, tokenizer, train_student: bool = False):
        super().__init__()
        self.config, self.student, self.projector, self.llm = config, student, projector, llm
        self.tokenizer = tokenizer
        self.markers = TimeMarkers(config.time_markers, config.marker_every)
        if (projector.time is not None) != (self.markers.scheme == "embedding"):
            has = "with" if projector.time is not None else "without"
            raise ValueError(f"time markers {self.markers.scheme!r} and a projector {has} a time embedding "
                             "do not go together")
        self.train_student = train_student
        student.requires_grad_(train_student)
        if not train_student:
            student.eval()

    def train(self, mode: bool = True) -> "VideoLLM":
        """A frozen student stays in eval mode (no dropout noise in its tokens) while the rest trains."""
        super().train(mode)
        if not self.train_student:
            self.student.eval()
        return self

    # ---- construction and persistence -------------------------------------------------------
    @classmethod
    def build(cls, student_dir: str | Path, llm: str, *, lora_r: int = 4, lora_alpha: int = 8,
              lora_dropout: float = 0.05, lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
              projector: str = "auto", train_student: bool = False, frames: int = 64,
              time_markers: str = "text", marker_every: int = 8,
              device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "VideoLLM":
        """A fresh model for fine-tuning: pretrained student and LLM, new projector and LoRA.
        `time_markers`, `marker_every`: how clip times reach the LLM (`lma.data.TimeMarkers`)."""
        markers = TimeMarkers(time_markers, marker_every)     # checked before anything loads
        dtype = dtype or default_dtype(device)
        student = _load_student(student_dir, dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(llm)
        base = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype).to(device)
        scfg = student.config
        hidden = base.get_input_embeddings().embedding_dim
        proj = VideoProjector(scfg.target_dim, hidden, projector, markers.scheme == "embedding").to(device)
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=list(lora_targets), task_type="CAUSAL_LM")
        llm_ref = str(Path(llm).resolve()) if Path(llm).is_dir() else llm   # loadable from any cwd
        config = VideoLLMConfig(llm=llm_ref, projector_kind=proj.kind, projector_in=scfg.target_dim,
                                hidden_size=hidden, clip_frames=scfg.clip_frames,
                                tokens_per_clip=scfg.target_tokens, image_size=scfg.image_size, frames=frames,
                                time_markers=markers.scheme, marker_every=markers.every)
        return cls(config, student, proj, get_peft_model(base, lora), tokenizer, train_student)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, is_trainable: bool = False) -> "VideoLLM":
        path = Path(path)
        dtype = dtype or default_dtype(device)
        config = VideoLLMConfig.from_pretrained(path)
        student = _load_student(path / "student", dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        llm = AutoModelForCausalLM.from_pretrained(path / "llm" if config.merged else config.llm, dtype=dtype)
        llm = llm.to(device)
        if not config.merged:
            llm = PeftModel.from_pretrained(llm, path / "adapter", is_trainable=is_trainable)
        proj = VideoProjector(config.projector_in, config.hidden_size, config.projector_kind,
                              config.time_markers == "embedding")
        proj.load_state_dict(load_file(path / "projector.safetensors"))
        # fp32 master weights only while training; for inference it runs in the LLM's dtype
        # (an fp32 3584x3584 MLP over 8192 tokens costs ~9 ms on an H200, bf16 ~1 ms).
        proj = proj.to(device) if is_trainable else proj.to(device, dtype)
        model = cls(config, student, proj, llm, tokenizer)
        return model if is_trainable else model.eval()

    def save_pretrained(self, path: str | Path, merge: bool = False) -> None:
        """`merge=True` folds the LoRA adapter into the LLM weights (this model keeps the merged
        LLM afterwards) and saves the full LLM under `llm/`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.student.save_pretrained(path / "student")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()},
                  path / "projector.safetensors")
        self.tokenizer.save_pretrained(path)
        if merge and isinstance(self.llm, PeftModel):
            self.llm = self.llm.merge_and_unload()
        if isinstance(self.llm, PeftModel):
            self.llm.save_pretrained(path / "adapter")
            self.config.merged = False
        else:
            self.llm.save_pretrained(path / "llm")
            self.tokenizer.save_pretrained(path / "llm")
            self.config.merged = True
        self.config.save_pretrained(path)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes (LoRA, projector, the student if unfrozen): checkpoints stay small."""
        return {n: p.detach().contiguous().cpu() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in state)
        if missing or set(state) - set(params):
            raise KeyError(f"checkpoint does not match the model: missing {missing[:3]}, "
                           f"unexpected {sorted(set(state) - set(params))[:3]}")
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)

    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    # ---- the forward path -------------------------------------------------------------------
    def student_tokens(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames [N, H, W, 3] → teacher-space tokens [clips, tokens_per_clip, target_dim]."""
        if self.train_student:
            return self.student.encode_video(frames)
        with torch.no_grad():   # frozen: no graph through the student
            return self.student.encode_video(frames)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Student tokens → LLM input embeddings (in the projector's dtype, out in the LLM's)."""
        out = self.projector(tokens.to(self.device, self.projector.fc1.weight.dtype))
        return out.to(self.llm.get_input_embeddings().weight.dtype)

    def visual_embeds(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.project(self.student_tokens(frames))

    def prompt(self, messages: Sequence[dict], timestamps: Sequence[float],
               add_generation_prompt: bool = False, max_length: int | None = None) -> Example:
        """Tokenise a conversation about a video whose sampled frames have these timestamps."""
        return tokenize_conversation(
            self.tokenizer, messages, clip_start_times(timestamps, self.config.clip_frames),
            self.config.tokens_per_clip, add_generation_prompt=add_generation_prompt,
            placeholder=self.config.placeholder, time_marker=self.config.time_marker, markers=self.markers,
            max_length=max_length)

    def embed(self, input_ids: torch.Tensor, visual_mask: torch.Tensor, visual: torch.Tensor,
              visual_times: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with the visual slots filled, in order, by `visual` [..., hidden], plus
        the time embedding of each slot's clip (`visual_times`, from the prompt's Example) when
        the model has one."""
        embeds = self.llm.get_input_embeddings()(input_ids.to(self.device))
        visual = visual.reshape(-1, embeds.shape[-1])
        slots = int(visual_mask.sum())
        if slots != visual.shape[0]:
            raise ValueError(f"{slots} visual slots in the prompt but {visual.shape[0]} visual tokens")
        if self.projector.time is not None:
            if visual_times is None or visual_times.numel() != slots:
                raise ValueError(f"this model adds a time embedding: visual_times must give the time of "
                                 f"each of the {slots} visual slots")
            visual = visual.to(self.device) + self.projector.time(visual_times.to(self.device)).to(visual.dtype)
        mask = visual_mask.to(self.device).unsqueeze(-1)
        return embeds.masked_scatter(mask, visual.to(embeds.dtype))

    def forward(self, input_ids, attention_mask, visual_mask, visual, labels=None, visual_times=None, **kwargs):
        embeds = self.embed(input_ids, visual_mask, visual, visual_times)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask.to(self.device),
                        labels=None if labels is None else labels.to(self.device), **kwargs)

    @torch.no_grad()
    def greedy(self, logits: torch.Tensor, past_key_values, attention_mask: torch.Tensor,
               max_new_tokens: int) -> list[int]:
        """Greedy decoding from prefill outputs, until an end-of-turn token."""
        stop = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.llm.generation_config, "eos_token_id", None)
        stop.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        out: list[int] = []
        mask = attention_mask.to(self.device)
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            if token in stop:
                break
            out.append(token)
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            step = self.llm(input_ids=torch.tensor([[token]], device=self.device), attention_mask=mask,
                            past_key_values=past_key_values, use_cache=True)
            logits, past_key_values = step.logits, step.past_key_values
        return out
