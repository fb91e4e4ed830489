"""Language Model Adaptation: LoRA fine-tuning of a causal LLM on the student's video tokens.

    python -m lma.finetune --student STUDENT_DIR --llm Qwen/Qwen2.5-7B-Instruct \\
        --data train.jsonl --output runs/lma [--frames 256] [--grad-accum 128] [--resume]

Bad JSONL lines and unusable videos go to `<output>/skipped.jsonl` with their line number and
are skipped; the run goes on. Before training every record's video is probed (and its prompt
measured), so `--epochs` counts passes over the records that can really be trained on. Sample order
is a pure function of (seed, epoch) over those records, so `--resume` continues from the last
checkpoint exactly (same batches, same dropout masks, same schedule).

A step whose loss or gradient norm is not finite is not applied (the schedule still advances);
`--max-nonfinite-steps` such steps in a row stop the run, and weights that are not finite are never
saved, as a checkpoint or as the final model.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from lma.data import Example, VideoRecord, collate, epoch_order, load_frames, read_records, video_timestamps
from lma.modeling import DEFAULT_LORA_TARGETS, VideoLLM, resolve_device
from pipeline.config import log_to_stderr, parse_config, to_dict
from pipeline.errors import VideoError
from student import checkpoint
from student.metrics import MetricsLog

log = logging.getLogger("lma.finetune")

# Changing these between a checkpoint and its resume would not continue the same run.
# (max_steps and epochs shape the cosine schedule, so they count too.)
_RUN_DEFINING = ("student", "llm", "data", "frames", "max_steps", "epochs", "batch_size", "grad_accum", "lr",
                 "warmup_ratio", "weight_decay", "grad_clip", "lora_r", "lora_alpha", "lora_dropout",
                 "lora_targets", "projector", "train_student", "seed", "max_length")


@dataclass
class FinetuneConfig:
    """LoRA fine-tuning of an LLM on LiteFrame student tokens."""

    student: str = field(metadata={"help": "student model dir (LiteFrameModel.save_pretrained)"})
    llm: str = field(metadata={"help": "causal LM name or dir (AutoModelForCausalLM)"})
    data: str = field(metadata={"help": "JSONL file, local or fsspec URL (s3://...)"})
    output: str = field(metadata={"help": "output dir: model, checkpoints, metrics, skipped records"})
    frames: int = field(default=64, metadata={"min": 1, "max": 4096, "help": "frames sampled uniformly per video (up to 512)"})
    max_steps: int = field(default=0, metadata={"min": 0, "help": "optimizer steps; 0 = epochs over the data"})
    epochs: int = field(default=1, metadata={"min": 1, "help": "passes over the data when max_steps is 0"})
    batch_size: int = field(default=1, metadata={"min": 1, "help": "videos per micro-batch"})
    grad_accum: int = field(default=1, metadata={"min": 1, "help": "micro-batches per optimizer step"})
    lr: float = field(default=4e-5, metadata={"min": 1e-12, "max": 1.0, "help": "peak learning rate (cosine schedule)"})
    warmup_ratio: float = field(default=0.03, metadata={"min": 0, "max": 1, "help": "fraction of steps of linear warm-up"})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    grad_clip: float = field(default=1.0, metadata={"min": 1e-12, "help": "gradient-norm clip"})
    lora_r: int = field(default=4, metadata={"min": 1})
    lora_alpha: int = field(default=8, metadata={"min": 1})
    lora_dropout: float = field(default=0.05, metadata={"min": 0, "max": 0.99})
    lora_targets: tuple[str, ...] = field(default=DEFAULT_LORA_TARGETS,
                                          metadata={"help": "LLM modules that get LoRA"})
    projector: str = field(default="auto", metadata={"choices": ("auto", "mlp", "residual"), "help": "auto | mlp | residual"})
    train_student: bool = field(default=False, metadata={"help": "unfreeze the student"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for LLM memory"})
    max_length: int | None = field(default=None, metadata={"min": 1, 
        "help": "skip samples longer than this many tokens; default: the LLM's max_position_embeddings"})
    seed: int = field(default=0, metadata={"min": 0})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    save_every: int = field(default=500, metadata={"min": 1, "help": "checkpoint every N steps (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"min": 0, "help": "checkpoints kept on disk"})
    decode_timeout: float = field(default=120.0, metadata={"min": 1, "help": "seconds per video decode"})
    allow_schemes: tuple[str, ...] = field(default=(), metadata={
        "help": "video URI schemes accepted besides local paths, file:// and s3:// (e.g. gs,https)"})
    max_record_bytes: int = field(default=1 << 20, metadata={"min": 64, 
        "help": "longest JSONL line read; a longer one is skipped unparsed"})
    max_nonfinite_steps: int = field(default=3, metadata={"min": 1, 
        "help": "stop after this many steps in a row with a non-finite loss or gradient (each is skipped)"})
    prefetch: int = field(default=4, metadata={"min": 0, "help": "videos decoded ahead in background threads"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output"})
    merge: bool = field(default=False, metadata={"help": "merge the LoRA adapter into the saved LLM"})


class FinetuneError(ValueError):
    """A run that cannot start or continue as asked (a changed config on --resume, no usable record)."""


class NonFiniteError(FinetuneError):
    """Training diverged: too many non-finite steps in a row, or weights about to be saved are not
    finite. The last checkpoint written is still good (none is ever written with such weights)."""


class SkipLog:
    """`skipped.jsonl`: one row per unusable record (line, video, stage, error_type, message),
    each line once, also across resumes."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: set[int] = set()
        if path.exists():
            self.lines = {json.loads(t)["line"] for t in path.read_text().splitlines() if t.strip()}

    def add(self, line: int, video: str | None, stage: str, error_type: str, message: str) -> None:
        if line in self.lines:
            return
        self.lines.add(line)
        log.warning("skipping line %d (%s, %s): %s", line, video, error_type, message)
        row = {"line": line, "video": video, "stage": stage, "error_type": error_type, "message": message}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


@dataclass
class Position:
    """Where the data stream is: the next record to consume is order(epoch)[cursor]."""

    epoch: int = 0
    cursor: int = 0


class VideoStream:
    """Decoded videos in (seed, epoch) order, skipping and recording unusable ones. Decoding runs
    `prefetch` records ahead in threads (ffmpeg is a subprocess) so the accelerator is not kept waiting."""

    def __init__(self, records: list[VideoRecord], cfg: FinetuneConfig, image_size, skipped: SkipLog,
                 start: Position):
        self.records, self.cfg, self.size, self.skipped = records, cfg, image_size, skipped
        self.position = Position(start.epoch, start.cursor)
        self.pool = ThreadPoolExecutor(max(1, cfg.prefetch))

    def _decode(self, record: VideoRecord):
        size = tuple(self.size) if isinstance(self.size, (list, tuple)) else self.size
        return load_frames(record.video, self.cfg.frames, size, timeout=self.cfg.decode_timeout,
                           policy=input_policy(self.cfg))

    def _upcoming(self) -> Iterator[tuple[int, int, VideoRecord]]:
        epoch, cursor = self.position.epoch, self.position.cursor
        while True:
            order = epoch_order(len(self.records), self.cfg.seed, epoch)
            for i in range(cursor, len(order)):
                yield epoch, i, self.records[order[i]]
            epoch, cursor = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[VideoRecord, np.ndarray, np.ndarray]]:
        pending: deque = deque()
        upcoming = self._upcoming()
        # An epoch that starts at record 0 and yields nothing means no record is usable at all.
        used_in_epoch, epoch, whole = 0, self.position.epoch, self.position.cursor == 0
        while True:
            while len(pending) < max(1, self.cfg.prefetch):
                e, i, rec = next(upcoming)
                bad = rec.line in self.skipped.lines
                pending.append((e, i, rec, None if bad else self.pool.submit(self._decode, rec)))
            e, i, rec, future = pending.popleft()
            if e != epoch:
                if whole and used_in_epoch == 0:
                    raise RuntimeError(f"no record of {self.cfg.data} could be used; see {self.skipped.path}")
                used_in_epoch, epoch, whole = 0, e, True
            self.position = Position(e, i + 1) if i + 1 < len(self.records) else Position(e + 1, 0)
            if future is None:
                continue
            try:
                frames, timestamps = future.result()
            except VideoError as err:
                self.skipped.add(rec.line, rec.video, err.stage, type(err).__name__, err.message)
                continue
            used_in_epoch += 1
            yield rec, frames, timestamps

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class TrainableWeights(nn.Module):
    """The checkpoint view of a VideoLLM: only the weights training changes (LoRA, projector, an
    unfrozen student), so `student.checkpoint` stays small instead of copying a frozen 7B LLM."""

    def __init__(self, model: VideoLLM):
        super().__init__()
        self.__dict__["model"] = model      # not a submodule: its frozen weights must stay out

    def state_dict(self, *args, **kwargs):
        return self.model.trainable_state_dict()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.model.load_trainable_state_dict(state_dict)
        return nn.modules.module._IncompatibleKeys([], [])


def input_policy(cfg: FinetuneConfig):
    """The extraction job's rules for the records' videos (pipeline.video.InputPolicy)."""
    from pipeline.video import InputPolicy

    return InputPolicy(allow_schemes=cfg.allow_schemes)


def usable_records(records: list[VideoRecord], model: VideoLLM, cfg: FinetuneConfig,
                   skipped: SkipLog) -> list[VideoRecord]:
    """The records a run trains on: video accepted and probed (`prefetch` at a time), conversation
    within max_length with the frames it will get; every other one goes to the skip log. Epochs and
    the schedule count these, not the parsed lines. A video that probes but fails to decode later is
    still skipped then."""
    from pipeline.video import probe

    policy = input_policy(cfg)
    limit = cfg.max_length or getattr(model.llm.config, "max_position_embeddings", None)

    def check(rec: VideoRecord):
        try:
            return probe(rec.video, timeout=cfg.decode_timeout, policy=policy)
        except VideoError as err:
            return err

    todo = [r for r in records if r.line not in skipped.lines]
    usable = []
    with ThreadPoolExecutor(max(1, cfg.prefetch)) as pool:
        for rec, got in zip(todo, pool.map(check, todo)):
            if isinstance(got, VideoError):
                skipped.add(rec.line, rec.video, got.stage, type(got).__name__, got.message)
                continue
            try:  # tokenised here, not in the pool: a fast tokenizer is not safe to share between threads
                model.prompt(rec.messages, video_timestamps(got, cfg.frames), max_length=limit)
            except ValueError as err:
                skipped.add(rec.line, rec.video, "tokenize", type(err).__name__, str(err))
                continue
            usable.append(rec)
    return usable


def _checkpointed_records(records: list[VideoRecord], state: dict, path: Path) -> list[VideoRecord]:
    """The records the checkpoint's run trained on (its sample order depends on them), by line.
    A checkpoint written before usable records were counted trained on every parsed record."""
    lines = state.get("records")
    if lines is None:
        return records
    by_line = {r.line: r for r in records}
    missing = [n for n in lines if n not in by_line]
    if missing:
        raise FinetuneError(f"--resume: lines {missing[:5]} of {path}'s records no longer parse; "
                            "use a new --output for different data")
    return [by_line[n] for n in lines]


def _check_finite(model: VideoLLM, what: str) -> None:
    """Refuse to save trained weights that are not finite (a diverged step made them so)."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteError(f"{len(bad)} trained weights are not finite (e.g. {bad[0]}): {what} not written")


def _rng_states() -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return rng


def resume(path: Path, model: VideoLLM, opt, sched, cfg: FinetuneConfig) -> tuple[int, Position, dict]:
    """Restore a checkpoint of the same run (refuses one whose run-defining settings differ).
    Returns (step, data position, non-finite step counters)."""
    state, rng = checkpoint.load(path, TrainableWeights(model), opt)
    now = to_dict(cfg)
    changed = [k for k in _RUN_DEFINING if state["config"].get(k) != now.get(k)]
    if changed:
        raise FinetuneError(f"--resume: {', '.join(changed)} differ from checkpoint {path}; "
                         "use a new --output for a different run")
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    nonfinite = state.get("nonfinite", {"total": 0, "in_a_row": 0})
    return state["step"], Position(state["loader"]["epoch"], state["loader"]["cursor"]), nonfinite


def _examples(model: VideoLLM, stream: Iterator, cfg: FinetuneConfig, skipped: SkipLog):
    """(example, frames) pairs; a conversation that cannot be tokenised is skipped like a bad video."""
    for rec, frames, timestamps in stream:
        try:
            limit = cfg.max_length or getattr(model.llm.config, "max_position_embeddings", None)
            example = model.prompt(rec.messages, timestamps, max_length=limit)
        except ValueError as err:
            skipped.add(rec.line, rec.video, "tokenize", type(err).__name__, str(err))
            continue
        yield example, frames


def _micro_batch(model: VideoLLM, items: list[tuple[Example, np.ndarray]]) -> dict:
    batch = collate([ex for ex, _ in items], model.tokenizer.pad_token_id or 0)
    batch["visual"] = torch.cat([model.visual_embeds(frames).flatten(0, 1) for _, frames in items])
    return batch


def finetune(cfg: FinetuneConfig) -> Path:
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    skipped = SkipLog(output / "skipped.jsonl")
    records, errors = read_records(cfg.data, max_line_bytes=cfg.max_record_bytes)
    for err in errors:
        skipped.add(err.line, err.video, "parse", type(err).__name__, err.message)
    if not records:
        raise FinetuneError(f"{cfg.data}: no usable record ({len(errors)} skipped, see {skipped.path})")
    log.info("%d records, %d malformed lines skipped", len(records), len(errors))

    model = VideoLLM.build(cfg.student, cfg.llm, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                           lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets,
                           projector=cfg.projector, train_student=cfg.train_student, frames=cfg.frames,
                           device=device)
    ckpt_dir = output / "checkpoints"
    last = checkpoint.latest(ckpt_dir) if cfg.resume else None
    if last is not None:
        records = _checkpointed_records(records, json.loads((last / "state.json").read_text()), last)
    else:
        records = usable_records(records, model, cfg, skipped)
    if not records:
        raise FinetuneError(f"{cfg.data}: no usable record ({len(skipped.lines)} skipped, see {skipped.path})")
    log.info("%d usable records", len(records))
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.max_steps or math.ceil(cfg.epochs * len(records) / per_step)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)

    step, start, nonfinite = 0, Position(), {"total": 0, "in_a_row": 0}
    if last is not None:
        step, start, nonfinite = resume(last, model, opt, sched, cfg)
        log.info("resumed from %s (step %d)", last, step)
    elif cfg.resume:
        log.info("--resume: no checkpoint in %s, starting fresh", ckpt_dir)
    metrics = MetricsLog(output, True, total, step)
    (output / "finetune_config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    stream = VideoStream(records, cfg, model.config.image_size, skipped, start)
    examples = _examples(model, iter(stream), cfg, skipped)
    model.train()
    try:
        while step < total:
            t0, wait = time.perf_counter(), 0.0
            opt.zero_grad(set_to_none=True)
            loss_sum, visual_tokens, text_tokens = 0.0, 0, 0
            for _ in range(cfg.grad_accum):
                t_data = time.perf_counter()
                items = [next(examples) for _ in range(cfg.batch_size)]
                wait += time.perf_counter() - t_data
                batch = _micro_batch(model, items)
                out = model(**batch)
                (out.loss / cfg.grad_accum).backward()
                loss_sum += float(out.loss.detach())
                visual_tokens += int(batch["visual_mask"].sum())
                text_tokens += int(batch["attention_mask"].sum()) - int(batch["visual_mask"].sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            finite = math.isfinite(loss_sum) and bool(torch.isfinite(grad_norm))
            if finite:
                opt.step()
                nonfinite["in_a_row"] = 0
            else:  # not applied: a NaN/inf update would poison the weights and Adam's moments for good
                nonfinite["total"] += 1
                nonfinite["in_a_row"] += 1
            sched.step()
            step += 1
            took = time.perf_counter() - t0
            row = {"epoch": stream.position.epoch, "loss": loss_sum / cfg.grad_accum,
                   "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0],
                   "videos_per_s": per_step / took, "data_wait_frac": wait / took,
                   "visual_tokens": visual_tokens, "text_tokens": text_tokens, "skipped": len(skipped.lines),
                   "applied": finite, "nonfinite_steps": nonfinite["total"]}
            metrics.log(step, row)
            log.info("step %d/%d loss %.4f lr %.2e%s", step, total, row["loss"], row["lr"],
                     "" if finite else " (non-finite: not applied)")
            if not finite and nonfinite["in_a_row"] >= cfg.max_nonfinite_steps:
                raise NonFiniteError(f"{nonfinite['in_a_row']} steps in a row had a non-finite loss or gradient "
                                     f"(last at step {step}); stopping (--max-nonfinite-steps)")
            if step % cfg.save_every == 0 or step == total:
                _check_finite(model, f"checkpoint of step {step}")
                pos = stream.position
                checkpoint.save(ckpt_dir, step, TrainableWeights(model), opt, {
                    "step": step, "loader": {"epoch": pos.epoch, "cursor": pos.cursor},
                    "scheduler": sched.state_dict(), "config": to_dict(cfg),
                    "records": [r.line for r in records], "nonfinite": dict(nonfinite)},
                    _rng_states(), cfg.keep_checkpoints)
    finally:
        stream.close()
        metrics.close()
    _check_finite(model, "model")
    model.save_pretrained(output, merge=cfg.merge)
    log.info("saved %s (%s)", output, "merged LLM" if cfg.merge else "LoRA adapter")
    return output


def main(argv: list[str] | None = None) -> None:
    log_to_stderr()
    try:
        finetune(parse_config(FinetuneConfig, argv))
    except FinetuneError as e:   # a run that cannot start: a clear message, not a traceback
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
