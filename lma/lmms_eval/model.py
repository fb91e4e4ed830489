"""`lmms-eval --model liteframe`: a LiteFrame Video LLM (a folder `lma.finetune` wrote) as an
lmms-eval "simple" model.

    lmms-eval --model liteframe --model_args pretrained=runs/lma,frames=256 --tasks videomme ...

Model args (`--model_args k=v,k=v`):
    pretrained      the folder `lma.finetune` saved (`VideoLLM.from_pretrained`); required
    frames          frames sampled uniformly over each video (0 = the model's training value);
                    capped by the frames a video has; every `clip_frames` (4) of them become one
                    clip = `tokens_per_clip` visual tokens, its time marked as the model was
                    trained (the saved config's time-marker scheme: a text marker before every
                    clip, before every N-th, or a time embedding on its tokens)
    dtype           auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32
    max_new_tokens  default when a task's generation_kwargs give none (256)
    decode_timeout  seconds per video decode (120)
    decode_workers  videos decoded ahead, in threads, while the GPU works (4)
    video_cache     videos whose visual tokens are kept for the next questions about them (8)
    video_errors    raise (default): an unreadable video stops the run, naming it | empty: its
                    questions get "" (and an infinite loss), counted and logged at the end
    image_fps       spacing assumed for tasks that give frames as images (1.0 frames per second)
    allow_schemes   video URI schemes accepted besides local paths, file:// and s3://, joined by
                    "+" (e.g. gs+https)
`--batch_size N` batches N requests through the LLM (left-padded; videos are still encoded one at a
time); `--device` defaults to cuda:$LOCAL_RANK when there is a GPU (one model per process under
`accelerate launch`), else cpu.

Requests: `generate_until` (greedy unless the task asks for sampling with temperature > 0; `until`
strings cut the answer) and `loglikelihood` (multiple-choice tasks). The prompt is the one
`lma.generate` builds: the LLM's chat template, one user turn `<video>\\n{task text}`, the video's
clips (time markers as the model's scheme places them + visual tokens) in place of `<video>`.

loglikelihood, as lmms-eval 0.7.3 uses it: a continuation is scored as the start of the assistant's
reply after that prompt (its leading whitespace dropped: the chat template already separates the
turns), and the value returned is its mean negative log-likelihood per token, because 0.7.3's
multiple-choice scoring picks the choice with the *smallest* value (`np.argmin` in
`ConfigurableTask.process_results`, "we return the actual loss"), as its own models return the
LM loss. The pair (loss, is_greedy) goes back wrapped in `GenerationResult`: 0.7.3's evaluator
passes every model output through `unwrap_generation_output`, which turns a plain tuple into its
`str()` and breaks multiple-choice scoring for tuples; the wrapper's payload is passed through as is.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from loguru import logger as eval_logger
from tqdm import tqdm

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from lma.data import Example
from lma.modeling import VideoLLM, default_dtype

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
VIDEO_ERRORS = ("raise", "empty")


def resolve_device(name: str | None) -> torch.device:
    """None/"auto": this process's GPU (LOCAL_RANK, as `accelerate launch` and torchrun set it) when
    there is one, else the CPU. A bare "cuda" also means this process's GPU."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if name in (None, "", "auto"):
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    return torch.device("cuda", local) if device.type == "cuda" and device.index is None else device


def _as_int(name: str, value: Any, minimum: int) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"liteframe: {name} must be an integer, got {value!r}") from None
    if out < minimum or (isinstance(value, float) and value != out):
        raise ValueError(f"liteframe: {name} must be an integer >= {minimum}, got {value!r}")
    return out


@dataclass
class Visual:
    embeds: torch.Tensor          # [clips, tokens_per_clip, hidden] in the LLM's dtype
    timestamps: list[float]       # seconds of the sampled frames


@dataclass
class _Pending:
    raw: list                     # what doc_to_visual gave (empty: text only)
    key: Any                      # cache key (None: not cacheable)
    future: Future | None         # decode in flight (None: cached when submitted, or nothing to decode)
    error: Exception | None = None


class VideoDecodeError(RuntimeError):
    """A visual the model cannot take, or (video_errors=raise) one that could not be read."""


def _input_errors() -> tuple[type[Exception], ...]:
    """What an unreadable or unusable input raises (as opposed to a bug, which always propagates)."""
    from pipeline.errors import VideoError

    return (VideoError, VideoDecodeError, OSError)


class LiteFrameVideoLLM(lmms):
    is_simple = True

    def __init__(self, pretrained: str, frames: int = 0, device: str | None = None, dtype: str = "auto",
                 batch_size: int | str = 1, max_batch_size: int | None = None, max_new_tokens: int = 256,
                 decode_timeout: float = 120.0, decode_workers: int = 4, video_cache: int = 8,
                 video_errors: str = "raise", image_fps: float = 1.0, allow_schemes: str = "",
                 decode_device: str = "auto", **unknown) -> None:
        super().__init__()
        if unknown:
            names = ", ".join(sorted(unknown))
            raise TypeError(f"liteframe: unknown model_args {names}; known: pretrained, frames, dtype, "
                            "max_new_tokens, decode_timeout, decode_workers, video_cache, video_errors, "
                            "image_fps, allow_schemes, decode_device")
        if str(batch_size).startswith("auto"):
            raise ValueError("liteframe: --batch_size auto is not supported; give a number (1 = no batching)")
        self.batch_size_per_gpu = _as_int("batch_size", batch_size, 1)
        self.frames = _as_int("frames", frames, 0)
        self.max_new_tokens = _as_int("max_new_tokens", max_new_tokens, 1)
        self.decode_workers = _as_int("decode_workers", decode_workers, 1)
        self.video_cache_size = _as_int("video_cache", video_cache, 0)
        self.decode_timeout = float(decode_timeout)
        self.image_fps = float(image_fps)
        if not (self.decode_timeout > 0 and self.image_fps > 0):
            raise ValueError("liteframe: decode_timeout and image_fps must be positive")
        if video_errors not in VIDEO_ERRORS:
            raise ValueError(f"liteframe: video_errors must be one of {VIDEO_ERRORS}, got {video_errors!r}")
        self.video_errors = video_errors
        from pipeline.video import InputPolicy

        self.policy = InputPolicy(allow_schemes=tuple(s for s in str(allow_schemes or "").split("+") if s))

        self._device = resolve_device(device)
        if str(dtype) == "auto":
            self._dtype = default_dtype(self._device)
        elif str(dtype) in DTYPES:
            self._dtype = DTYPES[str(dtype)]
        else:
            raise ValueError(f"liteframe: dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        from lma.data import nvdec_gpu

        # videos decode on the model's GPU (NVDEC; the frames stay there), ffmpeg for what it cannot take
        self.nvdec = nvdec_gpu(str(decode_device), self._device)
        self.model = VideoLLM.from_pretrained(str(pretrained), device=self._device, dtype=self._dtype)
        self.tokenizer = self.model.tokenizer
        config = self.model.config
        self.frames = self.frames or int(config.frames)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        gen_eos = getattr(self.model.llm.generation_config, "eos_token_id", None)
        stop = {self.tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])}
        self.stop_ids = sorted(t for t in stop if t is not None)
        base = self.model.llm.get_base_model() if hasattr(self.model.llm, "get_base_model") else self.model.llm
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        self._cache: OrderedDict[Any, Visual] = OrderedDict()
        self._pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="liteframe-decode")
        self.stats = {"requests": 0, "videos_decoded": 0, "frames": 0, "visual_tokens": 0, "cache_hits": 0,
                      "video_errors": 0, "decode_s": 0.0, "encode_s": 0.0, "llm_s": 0.0}
        self.failed: list[str] = []
        eval_logger.info(f"liteframe: {pretrained} on {self._device} ({self._dtype}), {self.frames} frames per video, "
                         f"batch {self.batch_size_per_gpu}, {config.tokens_per_clip} tokens per "
                         f"{config.clip_frames}-frame clip, time markers {self.model.markers}, videos decoded by "
                         f"{'NVDEC' if self.nvdec is not None else 'ffmpeg'}")

    # ---- what lmms-eval reads ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---- visuals ----------------------------------------------------------------------------------
    def _raw_visuals(self, request: Instance) -> list:
        """What the task's doc_to_visual gives for this request's document (empty: text only)."""
        args = request.args
        if len(args) < 6 or args[2] is None:
            return []
        doc_to_visual, doc_id, task, split = args[2], args[3], args[4], args[5]
        raw = doc_to_visual(self.task_dict[task][split][doc_id])
        if raw is None:
            return []
        return list(raw) if isinstance(raw, (list, tuple)) else [raw]

    @staticmethod
    def _key(raw: list) -> Any:
        """Videos are cached by path; frames handed over as images are not cached."""
        if len(raw) == 1 and isinstance(raw[0], (str, os.PathLike)):
            return os.fspath(raw[0])
        return None

    def _decode(self, raw: list) -> tuple[np.ndarray | torch.Tensor, list[float]]:
        """uint8 frames [N, S, S, 3] (a CUDA tensor when NVDEC decoded them) and their times, from one
        video path or a list of images."""
        size = self.model.config.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else int(size)
        if len(raw) == 1 and isinstance(raw[0], (str, os.PathLike)):
            from lma.data import load_frames

            frames, times = load_frames(os.fspath(raw[0]), self.frames, size, timeout=self.decode_timeout,
                                        policy=self.policy, gpu=self.nvdec)
            return frames, list(times)
        if all(_is_image(x) for x in raw):
            return _image_frames(raw, self.frames, size, self.model.config.clip_frames, self.image_fps)
        kinds = sorted({type(x).__name__ for x in raw})
        raise VideoDecodeError(f"one video (a path) or a list of images per question is supported; "
                               f"the task gave {len(raw)} visuals of type {', '.join(kinds)}")

    def _timed_decode(self, raw: list):
        start = time.perf_counter()
        try:
            return self._decode(raw), time.perf_counter() - start
        except _input_errors() as err:   # surfaced, with the document, where it is consumed
            return err, time.perf_counter() - start

    def _visuals(self, requests: Sequence[Instance]) -> Iterator[Visual | None | Exception]:
        """Each request's visual embeddings (None: text only; an exception: unreadable), in order.
        Videos are decoded up to `decode_workers` requests ahead in threads while the caller runs
        the model; a video's embeddings are kept (`video_cache`) for the next questions about it."""
        pending: dict[int, _Pending] = {}
        inflight: dict[Any, Future] = {}
        ahead = 0

        def submit(j: int) -> None:
            try:
                raw = self._raw_visuals(requests[j])
            except _input_errors() as err:
                pending[j] = _Pending([], None, None, err)
                return
            key = self._key(raw) if raw else None
            future = None
            if raw and (key is None or key not in self._cache):
                future = inflight.get(key) if key is not None else None
                if future is None:
                    future = self._pool.submit(self._timed_decode, raw)
                    if key is not None:
                        inflight[key] = future
            pending[j] = _Pending(raw, key, future)

        for i in range(len(requests)):
            while ahead < len(requests) and ahead <= i + self.decode_workers:
                submit(ahead)
                ahead += 1
            item = pending.pop(i)
            if item.error is not None:
                yield item.error
                continue
            if not item.raw:
                yield None
                continue
            if item.key is not None and item.key in self._cache:
                self.stats["cache_hits"] += 1
                self._cache.move_to_end(item.key)
                yield self._cache[item.key]
                continue
            # not cached (or evicted since it was submitted): its decode, in flight or now
            future = item.future or inflight.get(item.key) or self._pool.submit(self._timed_decode, item.raw)
            result, seconds = future.result()
            if inflight.get(item.key) is future:
                del inflight[item.key]
            if not getattr(future, "liteframe_counted", False):   # one decode may serve several requests
                future.liteframe_counted = True
                self.stats["decode_s"] += seconds
            if isinstance(result, Exception):
                yield result
                continue
            visual = self._encode(*result)
            if item.key is not None and self.video_cache_size:
                self._cache[item.key] = visual
                while len(self._cache) > self.video_cache_size:
                    self._cache.popitem(last=False)
            yield visual

    def _encode(self, frames: np.ndarray | torch.Tensor, times: list[float]) -> Visual:
        """Student → projector; the GPU is synchronised so the time is the work's."""
        start = time.perf_counter()
        embeds = self.model.visual_embeds(frames)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        self.stats["encode_s"] += time.perf_counter() - start
        self.stats["videos_decoded"] += 1
        self.stats["frames"] += len(times)
        self.stats["visual_tokens"] += embeds.shape[0] * embeds.shape[1]
        return Visual(embeds, times)

    def _visual_failed(self, request: Instance, err: Exception) -> None:
        task, doc_id = request.args[4], request.args[3]
        message = f"{task} doc {doc_id}: {type(err).__name__}: {err}"
        if self.video_errors == "raise":
            raise VideoDecodeError(f"liteframe: cannot read the visual of {message} "
                                   "(model_args video_errors=empty answers such questions with '' instead)") from err
        self.stats["video_errors"] += 1
        self.failed.append(message)
        eval_logger.error(f"liteframe: unreadable visual, answered empty: {message}")

    # ---- prompts ----------------------------------------------------------------------------------
    def _example(self, context: str, visual: Visual | None, continuation: str | None = None) -> tuple[Example, int]:
        """The prompt `lma.generate` builds (plus, when given, the continuation's tokens) and the
        continuation's length in tokens."""
        placeholder = self.model.config.placeholder
        if visual is None:
            content, times = context.replace(placeholder, ""), []
        else:
            content = context if placeholder in context else f"{placeholder}\n{context}"
            times = visual.timestamps
        example = self.model.prompt([{"role": "user", "content": content}], times, add_generation_prompt=True)
        if not continuation:
            return example, 0
        cont = torch.tensor(self.tok_encode(continuation.lstrip()), dtype=torch.long)
        mask = torch.cat([example.visual_mask, torch.zeros(len(cont), dtype=torch.bool)])
        ids, labels = torch.cat([example.input_ids, cont]), torch.cat([example.labels, cont])
        return Example(input_ids=ids, labels=labels, visual_mask=mask, visual_times=example.visual_times), len(cont)

    def _embeds(self, example: Example, visual: Visual | None) -> torch.Tensor:
        hidden = self.model.llm.get_input_embeddings().embedding_dim
        vis = visual.embeds if visual is not None else torch.zeros(0, hidden, device=self._device, dtype=self._dtype)
        return self.model.embed(example.input_ids[None], example.visual_mask[None], vis, example.visual_times)[0]

    def _left_pad(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[L_i, H] rows → left-padded embeds [B, L, H], attention mask and position ids (positions
        count from each row's first real token, as in an unpadded run)."""
        length = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=self._device)
        for i, r in enumerate(rows):
            embeds[i, length - r.shape[0]:] = r
            mask[i, length - r.shape[0]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return embeds, mask, positions

    # ---- generate_until ---------------------------------------------------------------------------
    def _generation_kwargs(self, gen: dict) -> tuple[dict, list[str]]:
        gen = dict(gen or {})
        until = gen.pop("until", None)
        until = [until] if isinstance(until, str) else [u for u in (until or []) if u]
        temperature = float(gen.get("temperature", 0) or 0)
        sample = temperature > 0 and gen.get("do_sample", True) is not False
        kwargs = {"max_new_tokens": int(gen.get("max_new_tokens") or self.max_new_tokens),
                  "eos_token_id": self.stop_ids, "pad_token_id": self.pad_id, "do_sample": sample,
                  "num_beams": int(gen.get("num_beams") or 1)}
        if sample:
            kwargs["temperature"] = temperature
            if gen.get("top_p") is not None:
                kwargs["top_p"] = float(gen["top_p"])
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs, until

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = [""] * len(requests)
        keys = [json.dumps(r.args[1], sort_keys=True, default=str) for r in requests]
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        order = [i for idx in groups.values() for i in idx]   # same generation kwargs together
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="liteframe generate")
        batch: list[tuple[int, torch.Tensor]] = []
        with torch.inference_mode():
            for k, visual in enumerate(self._visuals([requests[i] for i in order])):
                n = order[k]
                if isinstance(visual, Exception):
                    self._visual_failed(requests[n], visual)
                    bar.update(1)
                else:
                    example, _ = self._example(requests[n].args[0], visual)
                    batch.append((n, self._embeds(example, visual)))
                last = k + 1 == len(order) or keys[order[k + 1]] != keys[n]
                if batch and (len(batch) >= self.batch_size_per_gpu or last):
                    for (m, _), text in zip(batch, self._generate([b[1] for b in batch], requests[n].args[1])):
                        answers[m] = text
                        self.cache_hook.add_partial("generate_until", (requests[m].args[0], requests[m].args[1]), text)
                    bar.update(len(batch))
                    batch = []
        bar.close()
        self.stats["requests"] += len(requests)
        self._log_stats("generate_until")
        return answers

    def _generate(self, rows: list[torch.Tensor], gen: dict) -> list[str]:
        kwargs, until = self._generation_kwargs(gen)
        embeds, mask, _ = self._left_pad(rows)
        start = time.perf_counter()
        out = self.model.llm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        self.stats["llm_s"] += time.perf_counter() - start
        texts = []
        for ids in out.tolist():
            text = self.tok_decode(_until_stop(ids, self.stop_ids))
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text.strip())
        return texts

    # ---- loglikelihood ----------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request GenerationResult(text=(mean negative log-likelihood per continuation token,
        whether greedy decoding gives the continuation)); see the module's docstring for why."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="liteframe loglikelihood")
        batch: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        with torch.inference_mode():
            for n, visual in enumerate(self._visuals(requests)):
                request = requests[n]
                context, continuation = request.args[0], request.args[1]
                if callable(continuation):   # output_type loglikelihood passes doc_to_target itself
                    continuation = continuation(self.task_dict[request.args[4]][request.args[5]][request.args[3]])
                if isinstance(visual, Exception):
                    self._visual_failed(request, visual)
                    results[n] = (float("inf"), False)
                    bar.update(1)
                else:
                    example, count = self._example(context, visual, str(continuation))
                    if count == 0:
                        results[n] = (0.0, True)
                        bar.update(1)
                    else:
                        batch.append((n, self._embeds(example, visual), example.input_ids[-count:]))
                if batch and (len(batch) >= self.batch_size_per_gpu or n == len(requests) - 1):
                    for (m, _, _), res in zip(batch, self._score(batch)):
                        results[m] = res
                        self.cache_hook.add_partial("loglikelihood", (requests[m].args[0], requests[m].args[1]), res)
                    bar.update(len(batch))
                    batch = []
        bar.close()
        self.stats["requests"] += len(requests)
        self._log_stats("loglikelihood")
        return [GenerationResult(text=r) for r in results]

    def _score(self, batch: list[tuple[int, torch.Tensor, torch.Tensor]]) -> list[tuple[float, bool]]:
        """Mean negative log-likelihood of each row's continuation (its last tokens), and whether
        greedy decoding would have produced it. Only the continuation's logits are computed."""
        embeds, mask, positions = self._left_pad([b[1] for b in batch])
        keep = max(len(b[2]) for b in batch) + 1
        start = time.perf_counter()
        extra = {"logits_to_keep": keep} if self._logits_to_keep else {}
        logits = self.model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                use_cache=False, **extra).logits[:, -keep:].float()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        self.stats["llm_s"] += time.perf_counter() - start
        out = []
        for i, (_, _, target) in enumerate(batch):
            c = len(target)
            row = torch.log_softmax(logits[i, keep - 1 - c: keep - 1], dim=-1)
            target = target.to(row.device)
            nll = -row.gather(-1, target[:, None]).mean().item()
            out.append((float(nll), bool((row.argmax(-1) == target).all().item())))
        return out

    # ---- the rest of the interface -----------------------------------------------------------------
    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("liteframe: multi-round generation is not implemented; "
                                  "use generate_until or multiple-choice tasks")

    def _log_stats(self, kind: str) -> None:
        s = self.stats
        eval_logger.info(
            f"liteframe after {kind}: requests={s['requests']} videos_encoded={s['videos_decoded']} "
            f"reused={s['cache_hits']} frames={s['frames']} visual_tokens={s['visual_tokens']} "
            f"decode_s={s['decode_s']:.1f} (in {self.decode_workers} threads) student_projector_s={s['encode_s']:.1f} "
            f"llm_s={s['llm_s']:.1f} unreadable={s['video_errors']}")
        if self.failed:
            eval_logger.warning("liteframe: questions answered empty for unreadable visuals:\n  "
                                + "\n  ".join(self.failed))


def _until_stop(ids: list[int], stop_ids: Sequence[int]) -> list[int]:
    """Generated ids up to the first end-of-turn token (padding after it included)."""
    for k, t in enumerate(ids):
        if t in stop_ids:
            return ids[:k]
    return ids


def _is_image(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Image.Image)


def _image_frames(images: list, frames: int, size, clip_frames: int, fps: float) -> tuple[np.ndarray, list[float]]:
    """Frames given as images (a task's frame folder, or one still image): `frames` of them taken
    uniformly, each resized on its shorter side and centre-cropped like decoded video; one image is
    held for a whole clip. Times are index / fps."""
    from PIL import Image

    if len(images) == 1:
        picks, times = [0] * clip_frames, [0.0] * clip_frames
    else:
        n = min(frames, len(images))
        picks = [min(len(images) - 1, int((i + 0.5) * len(images) / n)) for i in range(n)]
        times = [p / fps for p in picks]
    tw, th = (size, size) if isinstance(size, int) else (size[1], size[0])
    out = []
    cache: dict[int, np.ndarray] = {}
    for p in picks:
        if p not in cache:
            img = images[p].convert("RGB")
            scale = max(tw / img.width, th / img.height)
            w, h = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
            img = img.resize((w, h), Image.BICUBIC)
            x0, y0 = (w - tw) // 2, (h - th) // 2
            cache[p] = np.asarray(img.crop((x0, y0, x0 + tw, y0 + th)), dtype=np.uint8)
        out.append(cache[p])
    return np.stack(out), times
