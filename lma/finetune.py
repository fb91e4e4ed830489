"""Language Model Adaptation: LoRA fine-tuning of a causal LLM on the student's video tokens.

    python -m lma.finetune --student STUDENT_DIR --llm Qwen/Qwen2.5-7B-Instruct \\
        --data train.jsonl --output runs/lma [--frames 256] [--grad-accum 128] [--resume]
    torchrun --nproc-per-node 8 -m lma.finetune ... --grad-accum 16     # the same run, data-parallel

Data-parallel (torchrun, or jobs.lma_finetune --ray-workers N): DDP over the trained weights only
(LoRA, projector, an unfrozen student; NCCL on GPU, gloo on CPU), each rank holding the whole model.
An optimizer step takes the next `effective batch` = ranks x --batch-size x --grad-accum records of
one global sample order, rank r the r-th slice of them, so the updates equal one process's with
ranks x --grad-accum (up to float summation order). Rank 0 writes checkpoints, metrics and the
model; every rank's skipped records reach rank 0's skipped.jsonl.

Bad JSONL lines and unusable videos go to `<output>/skipped.jsonl` with their line number and
are skipped; the run goes on. Before training every record's video is probed (and its prompt
measured), so `--epochs` counts passes over the records that can really be trained on. Sample order
is a pure function of (seed, epoch) over those records and a checkpoint holds the global position
in it, so `--resume` continues from the last checkpoint exactly (same batches, same dropout masks,
same schedule), also on another number of ranks as long as the effective batch is the same (e.g.
2 ranks x --grad-accum 4 resumed on 1 rank with --grad-accum 8: the same micro-batches, other
dropout masks).

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
from contextlib import nullcontext
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from lma.data import (TIME_MARKER_SCHEMES, Example, VideoRecord, collate, epoch_order, load_frames, read_records,
                      video_timestamps)
from lma.modeling import DEFAULT_LORA_TARGETS, VideoLLM
from pipeline.config import log_to_stderr, parse_config, to_dict
from pipeline.errors import VideoError
from pipeline.training import checkpoint, rng
from pipeline.training.checkpoint import NonFiniteWeightsError
from pipeline.training.distributed import (Dist, barrier, broadcast_from_main, gather_int_lists, gather_json,
                                           max_over_ranks, setup_distributed, sum_over_ranks)
from pipeline.training.guards import NonFiniteGuard, NonFiniteTrainingError, all_finite
from pipeline.training.metrics import MetricsLog
from pipeline.training.resume import ResumeMismatchError, check_unchanged
from pipeline.training.schedule import warmup_cosine

log = logging.getLogger("lma.finetune")

# Changing these between a checkpoint and its resume would not continue the same run.
# (max_steps and epochs shape the cosine schedule, so they count too.) The effective batch is, not
# how ranks, --batch-size and --grad-accum make it.
_RUN_DEFINING = ("student", "llm", "data", "frames", "max_steps", "epochs", "effective_batch", "lr",
                 "warmup_ratio", "weight_decay", "grad_clip", "lora_r", "lora_alpha", "lora_dropout",
                 "lora_targets", "projector", "train_student", "seed", "max_length", "time_markers", "marker_every")


@dataclass
class FinetuneConfig:
    """LoRA fine-tuning of an LLM on LiteFrame student tokens (data-parallel under torchrun: each optimizer
    step sees ranks x --batch-size x --grad-accum videos)."""

    student: str = field(metadata={"help": "student model dir (LiteFrameModel.save_pretrained)"})
    llm: str = field(metadata={"help": "causal LM name or dir (AutoModelForCausalLM)"})
    data: str = field(metadata={"help": "JSONL file, local or fsspec URL (s3://...)"})
    output: str = field(metadata={"help": "output dir: model, checkpoints, metrics, skipped records"})
    frames: int = field(default=64, metadata={"min": 1, "max": 4096, "help": "frames sampled uniformly per video (up to 512)"})
    max_steps: int = field(default=0, metadata={"min": 0, "help": "optimizer steps; 0 = epochs over the data"})
    epochs: int = field(default=1, metadata={"min": 1, "help": "passes over the data when max_steps is 0"})
    batch_size: int = field(default=1, metadata={"min": 1, "help": "videos per micro-batch (per rank)"})
    grad_accum: int = field(default=1, metadata={"min": 1, "help":
        "micro-batches per optimizer step on each rank: an update sees ranks x batch-size x grad-accum videos"})
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
    time_markers: str = field(default="text", metadata={"choices": TIME_MARKER_SCHEMES, "help":
        "how clip times reach the LLM: text (a <t=..s> marker per clip) | text-every-n | embedding (no text)"})
    marker_every: int = field(default=8, metadata={"min": 1, "max": 4096,
                                                   "help": "clips per marker under text-every-n"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for LLM memory"})
    max_length: int | None = field(default=None, metadata={"min": 1, 
        "help": "skip samples longer than this many tokens; default: the LLM's max_position_embeddings"})
    seed: int = field(default=0, metadata={"min": 0})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N (under torchrun: cuda, "
                                                          "each rank the GPU of its LOCAL_RANK)"})
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
    """A run that cannot start or continue as asked (no usable record, a checkpoint's records gone)."""


class SkipLog:
    """`skipped.jsonl`: one row per unusable record (line, video, stage, error_type, message),
    each line once, also across resumes. Any rank may find one; `sync` (a collective: all ranks call
    it) shares the new rows, so every rank knows every skipped line, and rank 0 alone writes them."""

    def __init__(self, path: Path, env: Dist):
        self.path, self.env = path, env
        self.lines: set[int] = set()        # every skipped line this rank knows of
        self.pending: list[dict] = []       # found here since the last sync
        if path.exists():
            self.lines = {json.loads(t)["line"] for t in path.read_text().splitlines() if t.strip()}
        self.synced = set(self.lines)

    def add(self, line: int, video: str | None, stage: str, error_type: str, message: str) -> None:
        if line in self.lines:
            return
        self.lines.add(line)
        self.pending.append({"line": line, "video": video, "stage": stage, "error_type": error_type,
                             "message": message})

    def sync(self) -> int:
        """Share and write the rows found since the last sync; returns how many lines are new."""
        rows, self.pending = gather_json(self.pending, self.env), []
        new = []
        for row in rows:        # a line several ranks found (a parse error: all of them) counts once
            if row["line"] not in self.synced:
                self.synced.add(row["line"])
                new.append(row)
        self.lines |= self.synced
        if new and self.env.main:
            for row in new:
                log.warning("skipping line %d (%s, %s): %s", row["line"], row["video"], row["error_type"],
                            row["message"])
            with self.path.open("a") as f:
                f.write("".join(json.dumps(row) + "\n" for row in new))
        return len(new)


class VideoStream:
    """This rank's videos, decoded `prefetch` ahead in threads (ffmpeg is a subprocess) so the
    accelerator is not kept waiting.

    The run's sample order is one global sequence: epoch after epoch, each a pure function of
    (seed, epoch) over the usable records. Optimizer step k takes the next ranks x batch_size x
    grad_accum positions of it, and rank r the r-th slice of those, micro-batch after micro-batch.
    So a position (one integer, in the checkpoint) says where a run is on any number of ranks."""

    def __init__(self, records: list[VideoRecord], cfg: FinetuneConfig, image_size, skipped: SkipLog,
                 start: int, env: Dist):
        self.records, self.cfg, self.size, self.skipped = records, cfg, image_size, skipped
        self.start, self.rank = start, env.rank
        self.per_rank = cfg.batch_size * cfg.grad_accum
        self.per_step = self.per_rank * env.world_size
        self.pool = ThreadPoolExecutor(max(1, cfg.prefetch))
        self._order: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))

    def record(self, position: int) -> VideoRecord:
        epoch, cursor = divmod(position, len(self.records))
        if self._order[0] != epoch:         # positions only grow: one epoch's order at a time
            self._order = (epoch, epoch_order(len(self.records), self.cfg.seed, epoch))
        return self.records[self._order[1][cursor]]

    def _positions(self) -> Iterator[int]:
        first = self.start + self.rank * self.per_rank
        while True:
            yield from range(first, first + self.per_rank)
            first += self.per_step

    def _decode(self, record: VideoRecord):
        size = tuple(self.size) if isinstance(self.size, (list, tuple)) else self.size
        return load_frames(record.video, self.cfg.frames, size, timeout=self.cfg.decode_timeout,
                           policy=input_policy(self.cfg))

    def __iter__(self) -> Iterator[tuple[VideoRecord, np.ndarray, np.ndarray] | None]:
        """One item per position of this rank: (record, frames, timestamps), or None for a record
        that is skipped (known bad, or failing to decode now: then it goes to the skip log)."""
        pending: deque = deque()
        positions = self._positions()
        while True:
            while len(pending) < max(1, self.cfg.prefetch):
                rec = self.record(next(positions))
                bad = rec.line in self.skipped.lines
                pending.append((rec, None if bad else self.pool.submit(self._decode, rec)))
            rec, future = pending.popleft()
            if future is None:
                yield None
                continue
            try:
                frames, timestamps = future.result()
            except VideoError as err:
                self.skipped.add(rec.line, rec.video, err.stage, type(err).__name__, err.message)
                yield None
                continue
            yield rec, frames, timestamps

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class TrainableWeights(nn.Module):
    """The checkpoint view of a VideoLLM: only the weights training changes (LoRA, projector, an
    unfrozen student), so a checkpoint stays small instead of copying a frozen 7B LLM."""

    def __init__(self, model: VideoLLM):
        super().__init__()
        self.__dict__["model"] = model      # not a submodule: its frozen weights must stay out

    def state_dict(self, *args, **kwargs):
        return self.model.trainable_state_dict()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.model.load_trainable_state_dict(state_dict)
        return nn.modules.module._IncompatibleKeys([], [])

    def named_parameters(self, *args, **kwargs):
        """The trained parameters by name (how checkpoint.check_finite names the optimizer's state)."""
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)


class MicroBatchLoss(nn.Module):
    """What DDP wraps: the whole trained path of a micro-batch (student → projector → LLM), so its
    gradient hooks see every trained weight, whichever of them an option unfreezes."""

    def __init__(self, model: VideoLLM):
        super().__init__()
        self.model = model

    def forward(self, frames: list[np.ndarray], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        visual = torch.cat([self.model.visual_embeds(f).flatten(0, 1) for f in frames])
        return self.model(**batch, visual=visual).loss


def input_policy(cfg: FinetuneConfig):
    """The extraction job's rules for the records' videos (pipeline.video.InputPolicy)."""
    from pipeline.video import InputPolicy

    return InputPolicy(allow_schemes=cfg.allow_schemes)


def usable_records(records: list[VideoRecord], model: VideoLLM, cfg: FinetuneConfig,
                   skipped: SkipLog, env: Dist) -> list[VideoRecord]:
    """The records a run trains on: video accepted and probed (`prefetch` at a time), conversation
    within max_length with the frames it will get; every other one goes to the skip log. Epochs and
    the schedule count these, not the parsed lines. A video that probes but fails to decode later is
    still skipped then. Each rank probes every world_size-th record; the usable ones are combined
    by index, the same list on every rank."""
    from pipeline.video import probe

    policy = input_policy(cfg)
    limit = cfg.max_length or getattr(model.llm.config, "max_position_embeddings", None)

    def check(rec: VideoRecord):
        try:
            return probe(rec.video, timeout=cfg.decode_timeout, policy=policy)
        except VideoError as err:
            return err

    todo = [r for r in records if r.line not in skipped.lines]
    mine = range(env.rank, len(todo), env.world_size)
    log.info("rank %d probes %d of %d records", env.rank, len(mine), len(todo))
    usable = []
    with ThreadPoolExecutor(max(1, cfg.prefetch)) as pool:
        for i, got in zip(mine, pool.map(check, [todo[i] for i in mine])):
            rec = todo[i]
            if isinstance(got, VideoError):
                skipped.add(rec.line, rec.video, got.stage, type(got).__name__, got.message)
                continue
            try:  # tokenised here, not in the pool: a fast tokenizer is not safe to share between threads
                model.prompt(rec.messages, video_timestamps(got, cfg.frames), max_length=limit)
            except ValueError as err:
                skipped.add(rec.line, rec.video, "tokenize", type(err).__name__, str(err))
                continue
            usable.append(i)
    return [todo[i] for i in sorted(i for part in gather_int_lists(usable, env) for i in part)]


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


def effective_batch(config: dict, world_size: int) -> int:
    """Records per optimizer step, over all ranks."""
    return world_size * config["batch_size"] * config["grad_accum"]


def resume(path: Path, model: VideoLLM, opt, sched, cfg: FinetuneConfig, env: Dist,
           num_records: int) -> tuple[int, int, dict]:
    """Restore a checkpoint of the same run (refuses one whose run-defining settings differ).
    Returns (step, global data position, non-finite step counters)."""
    # The settings first: a changed time-marker scheme also changes which weights exist.
    state = checkpoint.read_state(path)
    # A checkpoint from before a run-defining field existed ran with that field's default.
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(FinetuneConfig) if f.default is not MISSING}))
    saved = {**defaults, **state["config"],
             "effective_batch": effective_batch(state["config"], state.get("world_size", 1))}
    now = {**to_dict(cfg), "effective_batch": effective_batch(to_dict(cfg), env.world_size)}
    check_unchanged(saved, now, _RUN_DEFINING, str(path))
    state, rng_states = checkpoint.load(path, TrainableWeights(model), opt)
    sched.load_state_dict(state["scheduler"])
    rng.restore(rng_states, env)
    nonfinite = state.get("nonfinite", {"total": 0, "in_a_row": 0})
    position = state["loader"]["epoch"] * num_records + state["loader"]["cursor"]
    return state["step"], position, nonfinite


def _examples(model: VideoLLM, stream: Iterator, cfg: FinetuneConfig, skipped: SkipLog):
    """(example, frames) per position of the stream, None for a skipped one; a conversation that
    cannot be tokenised is skipped like a bad video."""
    limit = cfg.max_length or getattr(model.llm.config, "max_position_embeddings", None)
    for item in stream:
        if item is None:
            yield None
            continue
        rec, frames, timestamps = item
        try:
            example = model.prompt(rec.messages, timestamps, max_length=limit)
        except ValueError as err:
            skipped.add(rec.line, rec.video, "tokenize", type(err).__name__, str(err))
            yield None
            continue
        yield example, frames


def _placeholder(model: VideoLLM, record: VideoRecord) -> tuple[Example, np.ndarray]:
    """One black clip under a usable record's conversation: what a rank whose micro-batch lost every
    video runs, with zero weight, so it still takes part in the step (DDP needs every rank's backward)."""
    size = model.config.image_size
    h, w = (size, size) if isinstance(size, int) else size
    frames = np.zeros((model.config.clip_frames, h, w, 3), np.uint8)
    return model.prompt(record.messages, [0.0] * len(frames)), frames


def finetune(cfg: FinetuneConfig) -> Path:
    """The whole run, on this process's rank (one process, or each of torchrun's or Ray Train's)."""
    env = setup_distributed(cfg.device)
    device = env.device
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)         # the same new weights (LoRA, projector) on every rank
    skipped = SkipLog(output / "skipped.jsonl", env)
    records, errors = read_records(cfg.data, max_line_bytes=cfg.max_record_bytes)
    for err in errors:
        skipped.add(err.line, err.video, "parse", type(err).__name__, err.message)
    if not records:
        raise FinetuneError(f"{cfg.data}: no usable record ({len(errors)} skipped, see {skipped.path})")
    if env.main:
        log.info("%d records, %d malformed lines skipped", len(records), len(errors))

    model = VideoLLM.build(cfg.student, cfg.llm, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                           lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets,
                           projector=cfg.projector, train_student=cfg.train_student, frames=cfg.frames,
                           time_markers=cfg.time_markers, marker_every=cfg.marker_every, device=device)
    ckpt_dir = output / "checkpoints"
    last = checkpoint.latest(ckpt_dir) if cfg.resume else None
    if last is not None:
        records = _checkpointed_records(records, json.loads((last / "state.json").read_text()), last)
    else:
        records = usable_records(records, model, cfg, skipped, env)
    skipped.sync()
    if not records:
        raise FinetuneError(f"{cfg.data}: no usable record ({len(skipped.lines)} skipped, see {skipped.path})")
    if cfg.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_step = effective_batch(to_dict(cfg), env.world_size)
    total = cfg.max_steps or math.ceil(cfg.epochs * len(records) / per_step)
    sched = warmup_cosine(opt, int(cfg.warmup_ratio * total), total)
    if env.main:
        log.info("%d usable records; effective batch %d = %d ranks x --batch-size %d x --grad-accum %d; %d steps",
                 len(records), per_step, env.world_size, cfg.batch_size, cfg.grad_accum, total)

    step, position = 0, 0       # position: records of the global sample order consumed (see VideoStream)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, f"as many as --max-nonfinite-steps {cfg.max_nonfinite_steps}")
    if last is not None:
        step, position, nonfinite = resume(last, model, opt, sched, cfg, env, len(records))
        guard.total, guard.in_row = nonfinite["total"], nonfinite["in_a_row"]
        if env.main:
            log.info("resumed from %s (step %d)", last, step)
    else:
        if cfg.resume and env.main:
            log.info("--resume: no checkpoint in %s, starting fresh", ckpt_dir)
        # dropout masks differ between ranks (a resume restores every rank's state instead)
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, env.rank]).generate_state(1)[0]))
    loss_of = MicroBatchLoss(model)
    if env.world_size > 1:
        broadcast_from_main(params, env)     # the trained weights only: DDP's own sync would send the frozen LLM
        loss_of = nn.parallel.DistributedDataParallel(
            loss_of, device_ids=[device.index] if device.type == "cuda" else None, init_sync=False)
    metrics = MetricsLog(output, env.main, total, step)
    if env.main:
        (output / "finetune_config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    weights = TrainableWeights(model)
    stream = VideoStream(records, cfg, model.config.image_size, skipped, position, env)
    examples = _examples(model, iter(stream), cfg, skipped)
    placeholder = _placeholder(model, records[0])
    model.train()
    try:
        while step < total:
            t0, wait = time.perf_counter(), 0.0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            micro, videos, visual_tokens, text_tokens = 0, 0, 0, 0
            for m in range(cfg.grad_accum):
                t_data = time.perf_counter()
                items = [x for x in (next(examples) for _ in range(cfg.batch_size)) if x is not None]
                wait += time.perf_counter() - t_data
                weight = 1.0 if items else 0.0
                batch = collate([ex for ex, _ in items or [placeholder]], model.tokenizer.pad_token_id or 0)
                last_micro = m == cfg.grad_accum - 1
                # gradients are all-reduced once per step, in the last micro-batch's backward
                with nullcontext() if last_micro or env.world_size == 1 else loss_of.no_sync():
                    loss = loss_of([f for _, f in items or [placeholder]], batch)
                    (loss * (weight / cfg.grad_accum)).backward()
                if items:
                    loss_sum += loss.detach().float()
                    micro += 1
                    videos += len(items)
                    visual_tokens += int(batch["visual_mask"].sum())
                    text_tokens += int(batch["attention_mask"].sum()) - int(batch["visual_mask"].sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            # not applied anywhere unless finite everywhere: a NaN/inf update would poison the weights
            # and Adam's moments for good
            applied = all_finite(env, loss_sum, grad_norm)
            if applied:
                opt.step()
            guard.record(applied)
            sched.step()
            step += 1
            position += per_step
            if skipped.sync() and all(r.line in skipped.lines for r in records):
                raise FinetuneError(f"no record of {cfg.data} could be used; see {skipped.path}")
            took = time.perf_counter() - t0
            sums = sum_over_ranks([loss_sum.item(), micro, videos, visual_tokens, text_tokens, wait], env)
            row = {"epoch": position // len(records), "loss": sums[0] / sums[1] if sums[1] else math.nan,
                   "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0], "step_s": took,
                   "videos_per_s": sums[2] / took, "data_wait_frac": sums[5] / env.world_size / took,
                   "visual_tokens": int(sums[3]), "text_tokens": int(sums[4]), "skipped": len(skipped.lines),
                   "applied": applied, "nonfinite_steps": guard.total}
            if device.type == "cuda":   # the most any rank's GPU held during the step
                row["gpu_peak_gib"] = max_over_ranks(torch.cuda.max_memory_allocated(device) / 2**30, env)
            metrics.log(step, row)
            if env.main:
                log.info("step %d/%d loss %.4f lr %.2e%s", step, total, row["loss"], row["lr"],
                         "" if applied else " (non-finite on some rank: not applied)")
            guard.check(step, str(ckpt_dir))
            if step % cfg.save_every == 0 or step == total:
                # every rank checks (the weights are the same on all), so all stop together
                checkpoint.check_finite(weights, opt, f"checkpoint of step {step}")
                rng_states = rng.capture(env)
                if env.main:
                    epoch, cursor = divmod(position, len(records))
                    checkpoint.save(ckpt_dir, step, weights, opt, {
                        "step": step, "loader": {"epoch": epoch, "cursor": cursor},
                        "scheduler": sched.state_dict(), "config": to_dict(cfg), "world_size": env.world_size,
                        "records": [r.line for r in records],
                        "nonfinite": {"total": guard.total, "in_a_row": guard.in_row}},
                        rng_states, cfg.keep_checkpoints)
                barrier(env)
    finally:
        stream.close()
        metrics.close()
    checkpoint.check_finite(weights, None, "final model")
    if env.main:
        model.save_pretrained(output, merge=cfg.merge)
        log.info("saved %s (%s)", output, "merged LLM" if cfg.merge else "LoRA adapter")
    barrier(env)
    return output


def main(argv: list[str] | None = None) -> None:
    log_to_stderr()
    try:
        finetune(parse_config(FinetuneConfig, argv))
    except (FinetuneError, ResumeMismatchError, NonFiniteTrainingError, NonFiniteWeightsError) as e:
        raise SystemExit(str(e)) from None      # a run that cannot start or go on: a message, not a traceback
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
