"""Ask a fine-tuned Video LLM about a video; prints the answer and where the time went. The prompt
marks clip times the way the model was trained to read them (its config's time-marker scheme).

    python -m lma.generate --model runs/lma --video clip.mp4 --question "What happens?" [--frames 256]
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lma.data import DECODE_DEVICES, load_frames, nvdec_gpu
from lma.modeling import VideoLLM, resolve_device
from pipeline.config import parse_config
from pipeline.errors import VideoError

STAGES = ("decode", "student", "projector", "prefill", "generation")


@dataclass
class GenerateConfig:
    """Answer a question about a video with a fine-tuned Video LLM."""

    model: str = field(metadata={"help": "dir written by lma.finetune (VideoLLM.save_pretrained)"})
    video: str = field(metadata={"help": "video path or URL"})
    question: str = field(metadata={"help": "question about the video"})
    frames: int = field(default=0, metadata={"min": 0, "max": 4096, "help": "frames sampled uniformly; 0 = the model's training value"})
    max_new_tokens: int = field(default=128, metadata={"min": 1})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    decode_timeout: float = field(default=120.0, metadata={"min": 1})
    decode_device: str = field(default="auto", metadata={"choices": DECODE_DEVICES, "help": (
        "gpu: decode on the model's GPU (NVDEC, frames stay on the GPU; ffmpeg for videos NVDEC cannot take); "
        "cpu: ffmpeg; auto: gpu when the model is on a GPU with NVDEC, else cpu")})
    allow_schemes: tuple[str, ...] = field(default=(), metadata={
        "help": "video URI schemes accepted besides local paths, file:// and s3:// (e.g. gs,https)"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of text"})


@contextmanager
def stage_timer(timings: dict[str, float], name: str, device: torch.device):
    """Wall time of a stage in ms; synchronises the GPU so queued kernels count where they belong."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = (time.perf_counter() - start) * 1e3


@torch.no_grad()
def answer(model: VideoLLM, video: str, question: str, frames: int, max_new_tokens: int,
           decode_timeout: float | None = None, policy=None, nvdec: int | None = None) -> tuple[str, dict]:
    """(answer text, report with per-stage milliseconds and token counts). `policy`: the
    `pipeline.video.InputPolicy` the video must pass (default: its defaults). `nvdec`: the CUDA
    device whose NVDEC decodes (lma.data.nvdec_gpu), None for ffmpeg."""
    timings: dict[str, float] = {}
    device = model.device
    size = model.config.image_size
    with stage_timer(timings, "decode", device):
        pixels, timestamps = load_frames(video, frames, tuple(size) if isinstance(size, list) else size,
                                         timeout=decode_timeout, policy=policy,
                                         gpu=nvdec)
    with stage_timer(timings, "student", device):
        tokens = model.student_tokens(pixels)
    with stage_timer(timings, "projector", device):
        visual = model.project(tokens)
    messages = [{"role": "user", "content": f"{model.config.placeholder}\n{question}"}]
    example = model.prompt(messages, timestamps, add_generation_prompt=True)
    input_ids, visual_mask = example.input_ids[None], example.visual_mask[None]
    attention_mask = torch.ones_like(input_ids)
    with stage_timer(timings, "prefill", device):
        out = model(input_ids, attention_mask, visual_mask, visual, visual_times=example.visual_times, use_cache=True)
    with stage_timer(timings, "generation", device):
        ids = model.greedy(out.logits, out.past_key_values, attention_mask, max_new_tokens)
    text = model.tokenizer.decode(ids, skip_special_tokens=True).strip()
    report = {"time_ms": {k: round(timings[k], 2) for k in STAGES}, "frames": len(timestamps),
              "visual_tokens": int(visual_mask.sum()), "prompt_tokens": int(input_ids.shape[1]),
              "new_tokens": len(ids), "time_markers": model.markers.scheme,
              "decoder": "nvdec" if isinstance(pixels, torch.Tensor) and pixels.is_cuda else "ffmpeg"}
    return text, report


def main(argv: list[str] | None = None) -> None:
    from pipeline.nvdec import NvdecUnavailableError
    from pipeline.video import InputPolicy

    cfg = parse_config(GenerateConfig, argv)
    model = VideoLLM.from_pretrained(cfg.model, device=resolve_device(cfg.device))
    try:
        gpu = nvdec_gpu(cfg.decode_device, model.device)
    except NvdecUnavailableError as err:
        raise SystemExit(str(err)) from None
    try:
        text, report = answer(model, cfg.video, cfg.question, cfg.frames or model.config.frames,
                              cfg.max_new_tokens, cfg.decode_timeout, InputPolicy(allow_schemes=cfg.allow_schemes),
                              nvdec=gpu)
    except VideoError as err:
        raise SystemExit(f"cannot read video: {type(err).__name__}: {err}") from None
    if cfg.json:
        print(json.dumps({"answer": text, **report}))
        return
    print(text)
    times = " ".join(f"{k}={v:.1f}" for k, v in report["time_ms"].items())
    print(f"time_ms: {times} | frames={report['frames']} visual_tokens={report['visual_tokens']} "
          f"prompt_tokens={report['prompt_tokens']} new_tokens={report['new_tokens']} "
          f"time_markers={report['time_markers']} decoder={report['decoder']}")


if __name__ == "__main__":
    main(sys.argv[1:])
