"""Fine-tuning data for the Video LLM: JSONL records, uniform frame sampling, and tokenisation
with the LLM's own chat template, visual slots and answer-only labels.

Visual tokens are never added to the vocabulary (that would need new embedding rows that LoRA
does not train): the prompt keeps a text placeholder, which is cut out of the rendered chat
text and replaced by slots that `lma.modeling.VideoLLM` fills through `inputs_embeds`.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator, Sequence

import fsspec
import numpy as np
import torch

from pipeline.remote import storage_options

log = logging.getLogger("lma.data")

VIDEO_PLACEHOLDER = "<video>"
TIME_MARKER = "<t={:.1f}s>"
TIME_MARKER_SCHEMES = ("text", "text-every-n", "embedding")
IGNORE_INDEX = -100
MAX_RECORD_BYTES = 1 << 20  # a conversation longer than this is no training record, whatever it holds

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


class RecordError(ValueError):
    """A JSONL line that is not a usable training record; `line` is 1-based."""

    def __init__(self, line: int, message: str, video: str | None = None):
        self.line, self.message, self.video = line, message, video
        super().__init__(f"line {line}: {message}")


@dataclass(frozen=True)
class VideoRecord:
    line: int                                 # 1-based line in the JSONL file, for error reports
    video: str                                # local path or URL, resolved against the file's folder
    messages: tuple[dict[str, str], ...]      # {"role", "content"}, exactly one VIDEO_PLACEHOLDER


@dataclass(frozen=True)
class TimeMarkers:
    """How each clip's start time reaches the LLM. Markers are prompt text: at 512 frames of a
    10-minute video one per clip is 1,128 prefill tokens with Qwen2.5's tokenizer, hence cheaper schemes:

    - `text`: a TIME_MARKER before every clip (the original scheme, and what a config saved
      before schemes existed means);
    - `text-every-n`: a marker before clips 0, `every`, 2*`every`, ... only;
    - `embedding`: no marker text; the model adds a learned embedding of the clip's start time to
      its visual tokens (`lma.modeling.TimeEmbedding`)."""

    scheme: str = "text"
    every: int = 8           # clips per marker under text-every-n

    def __post_init__(self) -> None:
        if self.scheme not in TIME_MARKER_SCHEMES:
            raise ValueError(f"time markers must be one of {', '.join(TIME_MARKER_SCHEMES)}, got {self.scheme!r}")
        if self.every < 1:
            raise ValueError(f"marker_every must be at least 1, got {self.every}")

    def marked(self, clip: int) -> bool:
        """Whether clip number `clip` (0-based) is preceded by a text marker."""
        if self.scheme == "embedding":
            return False
        return clip % (self.every if self.scheme == "text-every-n" else 1) == 0


@dataclass
class Example:
    """One tokenised conversation. `visual_mask` marks the slots for visual tokens (their
    `input_ids` hold the pad id and are never looked up); `visual_times` holds, per slot in
    order, the start time of the clip it belongs to (what a time embedding is computed from)."""

    input_ids: torch.Tensor      # long [L]
    labels: torch.Tensor         # long [L], IGNORE_INDEX outside answers
    visual_mask: torch.Tensor    # bool [L]
    visual_times: torch.Tensor   # float32 [visual_mask.sum()], seconds
    meta: dict[str, Any] = field(default_factory=dict)


def _content_text(content: Any, placeholder: str) -> str:
    """OpenAI-style content: a string, or a list of parts where a video part becomes the placeholder."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind in ("video", "video_url"):
                parts.append(placeholder)
            else:
                raise ValueError(f"unsupported content part {part!r}")
        return "".join(parts)
    raise ValueError(f"content must be a string or a list of parts, got {type(content).__name__}")


def parse_record(obj: Any, line: int, base: str = "", placeholder: str = VIDEO_PLACEHOLDER) -> VideoRecord:
    """Validate one LLaVA-style (`conversations`) or OpenAI-style (`messages`) record."""
    if not isinstance(obj, dict):
        raise RecordError(line, f"expected a JSON object, got {type(obj).__name__}")
    video = obj.get("video")
    if not isinstance(video, str) or not video.strip():
        raise RecordError(line, "missing 'video' (a path or URL)")
    video = resolve_video(video.strip(), base)
    if "conversations" in obj:
        turns, role_key, text_key = obj["conversations"], "from", "value"
    elif "messages" in obj:
        turns, role_key, text_key = obj["messages"], "role", "content"
    else:
        raise RecordError(line, "expected 'conversations' (LLaVA) or 'messages' (OpenAI)", video)
    if not isinstance(turns, list) or not turns:
        raise RecordError(line, "conversation must be a non-empty list", video)
    messages = []
    try:
        for turn in turns:
            role = _ROLES.get(turn.get(role_key)) if isinstance(turn, dict) else None
            if role is None:
                raise ValueError(f"turn {turn!r} has no known {role_key!r}")
            messages.append({"role": role, "content": _content_text(turn.get(text_key), placeholder)})
    except (ValueError, AttributeError) as e:
        raise RecordError(line, str(e), video) from None
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RecordError(line, "no assistant answer to learn from", video)
    count = sum(m["content"].count(placeholder) for m in messages)
    if count > 1:
        raise RecordError(line, f"{count} {placeholder} placeholders; one video per record", video)
    if count == 0:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise RecordError(line, "no user turn to hold the video", video)
        first["content"] = f"{placeholder}\n{first['content']}"
    elif not any(placeholder in m["content"] for m in messages if m["role"] == "user"):
        raise RecordError(line, f"{placeholder} must be in a user turn", video)
    return VideoRecord(line=line, video=video, messages=tuple(messages))


def resolve_video(video: str, base: str) -> str:
    """Relative video paths are relative to the JSONL file's folder (local or remote)."""
    if "://" in video or video.startswith("/") or not base:
        return video
    return posixpath.join(base, video)


def read_records(uri: str, placeholder: str = VIDEO_PLACEHOLDER,
                 max_line_bytes: int = MAX_RECORD_BYTES) -> tuple[list[VideoRecord], list[RecordError]]:
    """All usable records of a JSONL file (local or any fsspec URL), and one error per bad line.
    A line longer than `max_line_bytes` is an error without being held or parsed."""
    base = posixpath.dirname(uri)
    records, errors = [], []
    with fsspec.open(uri, "rb", **storage_options(uri)) as f:
        for n, raw in enumerate(_lines(f, max_line_bytes), start=1):
            if raw is None:
                errors.append(RecordError(n, f"longer than {max_line_bytes} bytes: not parsed"))
                continue
            text = raw.decode("utf-8", "replace")
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nesting deeper than Python's stack
                errors.append(RecordError(n, f"not JSON: {type(e).__name__}: {e}"[:500]))
                continue
            try:
                records.append(parse_record(obj, n, base, placeholder))
            except RecordError as e:
                errors.append(e)
    return records, errors


def _lines(f: BinaryIO, max_bytes: int) -> Iterator[bytes | None]:
    """The lines of a binary stream; a line over `max_bytes` comes out as None and is dropped as it
    streams by, so memory stays about `max_bytes` whatever one line holds."""
    buf, dropping = bytearray(), False
    for chunk in iter(lambda: f.read(1 << 16), b""):
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            if dropping:  # the end of a line already reported as too long
                dropping = False
            else:
                yield bytes(buf[start:end]) if end - start <= max_bytes else None
            start = end + 1
        del buf[:start]
        if len(buf) > max_bytes:
            if not dropping:
                yield None
            dropping = True
            buf.clear()
    if buf and not dropping:
        yield bytes(buf)


def sample_timestamps(duration: float, frames: int, available: int | None = None) -> list[float]:
    """`frames` timestamps at the centres of equal segments: uniform coverage of the whole video,
    never more frames than the video has (repeated frames only cost tokens)."""
    n = max(1, min(frames, available) if available else frames)
    return [(i + 0.5) * duration / n for i in range(n)]


def video_timestamps(info, frames: int) -> list[float]:
    """The times `load_frames` asks for in a probed video (`pipeline.video.VideoInfo`)."""
    available = info.num_frames or int(info.duration * info.avg_fps) or None
    return sample_timestamps(info.duration, frames, available)


DECODE_DEVICES = ("auto", "cpu", "gpu")


def nvdec_gpu(decode_device: str, device: torch.device) -> int | None:
    """A decode device (auto, cpu, gpu) resolved for a model on `device`: the CUDA index whose NVDEC
    decodes the videos (pass to `load_frames(gpu=...)`), or None for ffmpeg. gpu where NVDEC cannot
    run raises pipeline.nvdec.NvdecUnavailableError naming why; auto then falls back to ffmpeg."""
    if decode_device not in DECODE_DEVICES:
        raise ValueError(f"decode device {decode_device!r}: one of {', '.join(DECODE_DEVICES)}")
    if decode_device == "cpu":
        return None
    from pipeline.nvdec import NvdecUnavailableError, unavailable_reason

    index = device.index or 0
    reason = "the model is on the CPU" if device.type != "cuda" else unavailable_reason(index)
    if reason is not None and decode_device == "gpu":
        raise NvdecUnavailableError(f"--decode-device gpu: {reason}")
    return index if reason is None else None


def load_frames(uri: str, frames: int, size: int, timeout: float | None = None, policy=None, gpu: int | None = None):
    """Probe and decode `frames` uniformly sampled frames -> (uint8 [N, size, size, 3], seconds [N]).
    `policy`: a `pipeline.video.InputPolicy` (default: its defaults), the same rules as extraction.
    `gpu`: decode on that CUDA device's NVDEC and return the frames as a CUDA tensor there (no host
    round trip before the student); a video NVDEC cannot take exactly is decoded by ffmpeg.
    Raises `pipeline.errors.VideoError` subclasses for unusable or refused videos."""
    # Imported here: the model, tokenisation and benchmarks must run where ffmpeg is not installed.
    from pipeline.video import DEFAULT_POLICY, decode_frames, probe

    policy = policy or DEFAULT_POLICY
    info = probe(uri, timeout=timeout or 30.0, policy=policy)
    times = video_timestamps(info, frames)
    if gpu is not None:
        from pipeline import nvdec

        try:
            decoded = nvdec.decode_frames(uri, times, size=size, timeout=timeout, info=info, policy=policy, gpu=gpu,
                                          device=True)
            return decoded.frames, decoded.timestamps
        except nvdec.NvdecFallback as e:
            log.info("%s: decoded on the CPU: %s", uri, e)
    decoded = decode_frames(uri, times, size=size, timeout=timeout, info=info, policy=policy)
    return decoded.frames, decoded.timestamps


def clip_start_times(timestamps: Sequence[float], clip_frames: int) -> list[float]:
    """Time of the first frame of each clip the student makes (the last clip may be padded)."""
    return [float(timestamps[i]) for i in range(0, len(timestamps), clip_frames)]


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _segments(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """The rendered chat as (text, is_answer) pieces. Answer spans come from rendering each
    prefix of the conversation: the text an assistant turn adds to its generation prompt."""
    full = _render(tokenizer, messages, add_generation_prompt)
    cuts: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or add_generation_prompt:
            continue
        start = len(_render(tokenizer, messages[:i], True))
        end = len(_render(tokenizer, messages[: i + 1], False))
        if not full.startswith(_render(tokenizer, messages[: i + 1], False)) or start > end:
            raise ValueError("chat template is not prefix-stable; cannot locate answer tokens")
        cuts.append((start, end))
    pieces, pos = [], 0
    for start, end in cuts:
        pieces += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    pieces.append((full[pos:], False))
    return [p for p in pieces if p[0]]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def marker_tokens(tokenizer, clip_times: Sequence[float], markers: TimeMarkers,
                  time_marker: str = TIME_MARKER) -> int:
    """Prompt tokens the time markers of these clips cost: exactly what `tokenize_conversation`
    adds for them (each marker is tokenised on its own there, so the sum is exact)."""
    return sum(len(_ids(tokenizer, time_marker.format(t))) for i, t in enumerate(clip_times) if markers.marked(i))


def tokenize_conversation(tokenizer, messages: Sequence[dict], clip_times: Sequence[float],
                          tokens_per_clip: int, *, add_generation_prompt: bool = False,
                          placeholder: str = VIDEO_PLACEHOLDER, time_marker: str = TIME_MARKER,
                          markers: TimeMarkers = TimeMarkers(), max_length: int | None = None) -> Example:
    """Chat text → ids with `tokens_per_clip` visual slots per clip in place of the placeholder,
    each clip preceded by a time marker where `markers` says so; labels only on the assistant
    answers (including their end-of-turn token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids: list[int] = []
    labels: list[int] = []
    visual: list[bool] = []
    times: list[float] = []

    def add_text(text: str, is_answer: bool) -> None:
        if not text:
            return
        tok = _ids(tokenizer, text)
        ids.extend(tok)
        labels.extend(tok if is_answer else [IGNORE_INDEX] * len(tok))
        visual.extend([False] * len(tok))

    for text, is_answer in _segments(tokenizer, messages, add_generation_prompt):
        before, found, after = text.partition(placeholder) if not is_answer else (text, "", "")
        add_text(before, is_answer)
        if found:
            for i, t in enumerate(clip_times):
                if markers.marked(i):
                    add_text(time_marker.format(t), False)
                ids.extend([pad] * tokens_per_clip)
                labels.extend([IGNORE_INDEX] * tokens_per_clip)
                visual.extend([True] * tokens_per_clip)
                times.extend([float(t)] * tokens_per_clip)
        add_text(after, is_answer)
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"{len(ids)} tokens exceed max_length {max_length}; use fewer frames")
    return Example(input_ids=torch.tensor(ids, dtype=torch.long),
                   labels=torch.tensor(labels, dtype=torch.long),
                   visual_mask=torch.tensor(visual, dtype=torch.bool),
                   visual_times=torch.tensor(times, dtype=torch.float32))


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padded positions carry no label and no attention. `visual_times`
    are the examples' slot times in order, as the visual slots are filled."""
    length = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    visual_mask = torch.zeros((batch, length), dtype=torch.bool)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n], labels[i, :n], visual_mask[i, :n] = e.input_ids, e.labels, e.visual_mask
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "visual_mask": visual_mask,
            "attention_mask": attention_mask, "visual_times": torch.cat([e.visual_times for e in examples])}


def epoch_order(num_records: int, seed: int, epoch: int) -> np.ndarray:
    """Sample order as a pure function of (seed, epoch): resuming needs no replay."""
    return np.random.default_rng([seed, epoch]).permutation(num_records)
