"""CTD training: the student learns to predict the teacher's compressed tokens of each clip.

    python -m student.train --data STORE --output DIR [--preset tiny] [--max-steps N] [--resume]
    torchrun --nproc-per-node 8 -m student.train --data s3://bucket/store --output DIR

DIR ends as a `save_pretrained` directory of the student (with the store's target statistics in
its config) beside checkpoints/, metrics.jsonl, tb/ and eval.json. The loop below is kept flat on
purpose (nanoGPT style): read `train()` top to bottom to see everything one step does.

Bad values never reach a checkpoint:
- the config is checked field by field (`TrainConfig` metadata and `check()`) before anything runs;
- the store's target statistics must be finite (else StoreContentError at start);
- a bad clip (see student.data) is skipped: its row of the batch is masked out of the loss, logged
  with its shard, appended to skipped-clips-rankR.jsonl and counted (`data/skipped_clips`); more
  than --max-bad-clips on a rank raises TooManyBadClipsError naming the shard;
- a step whose loss or gradient norm is not finite on any rank is not applied on any rank (it still
  advances the step count, the LR schedule and the loader; `train/skipped_steps`); more than
  --max-bad-steps in a row raise NonFiniteTrainingError (pipeline.training.guards);
- a checkpoint or final model with a NaN or inf in its weights or optimizer state is not written
  (pipeline.training.checkpoint.NonFiniteWeightsError).
The counts are part of the checkpoint, so a resumed run keeps counting where it stopped.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from pipeline.config import ConfigError, check_config, parse_config, to_dict
from pipeline.training import checkpoint, rng
from pipeline.training.distributed import (Dist, barrier, gather_ints, mean_over_ranks, setup_distributed,
                                           sum_over_ranks)
from pipeline.training.guards import NonFiniteGuard, all_finite
from pipeline.training.metrics import MetricsLog, StepTimer, drop_after
from pipeline.training.resume import check_unchanged
from pipeline.training.schedule import warmup_cosine
from student.data import (FORMATS, PLAN_VERSION, Selection, StoreInfo, TrainData, check_store_matches,
                          eval_batches, heldout_split, jitter_frames, read_store, synthetic_batches)
from student.evaluate import evaluate
from student.loss import LOSSES, distill_loss


def _eval_fractions() -> tuple[float, ...]:
    from pipeline.store import HELDOUT_LEVELS     # the levels whose held-out counts the manifest holds

    return (0.0, *HELDOUT_LEVELS)


def _presets() -> tuple[str, ...]:
    from student.presets import PRESETS

    return tuple(PRESETS)


@dataclass
class TrainConfig:
    """Train the LiteFrame student on a store of teacher targets (CTD)."""

    data: str = field(metadata={"help": "store root written by jobs.extract (local dir or s3://...)"})
    output: str = field(metadata={"help": "local run directory: the trained model, checkpoints/, metrics"})
    preset: str = field(default="vitb", metadata={"choices": _presets(), "help": "student preset (vitb, tiny, ...)"})
    init_from: Optional[str] = field(default=None, metadata={"help": "start from this save_pretrained student"})
    init_from_teacher: Optional[str] = field(default=None, metadata={
        "help": "initialise the preset's student by clipping this teacher checkpoint's weights (the paper's init)"})
    format: str = field(default="webdataset", metadata={"choices": FORMATS,
                                                        "help": f"store format to read: {', '.join(FORMATS)}"})
    max_steps: int = field(default=1000, metadata={"min": 1, "help": "optimizer steps; the LR schedule spans them"})
    stop_after: Optional[int] = field(default=None, metadata={"min": 1,
        "help": "leave after this many steps in this invocation (time-sliced jobs); --resume continues"})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "clips per rank per step"})
    lr: float = field(default=4e-5, metadata={"min": 0, "help": "peak learning rate (AdamW), > 0"})
    min_lr_ratio: float = field(default=0.0, metadata={"min": 0, "max": 1,
                                                       "help": "final LR as a fraction of the peak"})
    warmup_steps: int = field(default=100, metadata={"min": 0, "help": "linear warm-up steps, then cosine decay "
                                                                     "(longer than --max-steps: warm-up only)"})
    weight_decay: float = field(default=0.05, metadata={"min": 0, "help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"min": 0, "help": "gradient-norm clip, > 0"})
    loss: str = field(default="mse_clip", metadata={"choices": LOSSES, "help": f"one of {', '.join(LOSSES)}"})
    clip_sigma: float = field(default=3.0, metadata={"min": 0, "help": "mse_clip: clamp differences beyond this "
                                                                       "many target std (0: plain MSE)"})
    augment: float = field(default=0.2, metadata={"min": 0, "max": 1,
                                                  "help": "photometric jitter strength, below 1 (0 disables)"})
    shuffle_buffer: int = field(default=256, metadata={"min": 0, "help": "webdataset shuffle buffer (clips per "
                                                                         "stream; 0 or 1: no shuffle)"})
    num_workers: int = field(default=2, metadata={"min": 0, "help": "loader worker processes per rank"})
    seed: int = field(default=0, metadata={"min": 0, "max": 2**63 - 1, "help": "seed of the sample order, "
                                                                             "augmentation and initialisation"})
    eval_data: Optional[str] = field(default=None, metadata={"help": "a second store to evaluate on"})
    eval_fraction: float = field(default=0.0, metadata={"choices": _eval_fractions(),
        "help": "hold out this fraction of videos for evaluation: 0 or one of pipeline.store.HELDOUT_LEVELS"})
    eval_every: int = field(default=0, metadata={"min": 0, "help": "evaluate every N steps (0: only at the end)"})
    eval_batches: Optional[int] = field(default=None, metadata={"min": 1, "help": "cap on evaluation batches "
                                                                             "(of --batch-size clips, all ranks)"})
    checkpoint_every: int = field(default=500, metadata={"min": 0,
                                                         "help": "save a checkpoint every N steps (0: never)"})
    keep_checkpoints: int = field(default=3, metadata={"min": 0, "help": "keep the last K checkpoints (0: all)"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in OUTPUT"})
    log_every: int = field(default=10, metadata={"min": 1, "help": "log metrics every N steps"})
    precision: str = field(default="auto", metadata={"choices": ("auto", "bf16", "fp32"),
                                                     "help": "auto (bf16 autocast on GPU), bf16 or fp32"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the student"})
    grad_reduce: str = field(default="fp32", metadata={"choices": ("fp32", "bf16"), "help": (
        "gradient all-reduce precision with several ranks: bf16 sends half the bytes (DDP's bf16_compress_hook; "
        "the optimizer still sees fp32 gradients)")})
    sync_steps: bool = field(default=True, metadata={
        "help": "wait for each step's GPU work before the next batch (exact step times; --no-sync-steps lets the "
                "optimizer update overlap the next batch, and the data wait then includes up to that update)"})
    trace_samples: bool = field(default=False, metadata={"help": "write each step's clip ids to samples-rankR.jsonl"})
    max_bad_clips: int = field(default=16, metadata={"min": 0,
        "help": "bad clips (undecodable, non-finite, missing) each rank skips and logs; one more stops the run"})
    max_bad_steps: int = field(default=5, metadata={"min": 0,
        "help": "steps in a row whose loss or gradients are not finite that are skipped; one more stops the run"})

    def check(self) -> None:
        """Rules the field bounds cannot say: strict bounds, and fields that exclude each other."""
        problems = [f"--{name.replace('_', '-')}: {getattr(self, name)} must be > 0"
                    for name in ("lr", "grad_clip") if not getattr(self, name) > 0]
        if not self.augment < 1:
            problems.append(f"--augment: {self.augment} must be below 1 (1 can scale a clip to black)")
        if self.init_from and self.init_from_teacher:
            problems.append("--init-from and --init-from-teacher exclude each other")
        if problems:
            raise ConfigError("; ".join(problems))


# ---------------------------------------------------------------- set-up


# Settings that decide which clip lands in which step, and the schedule each step's update follows:
# exact resume needs them unchanged. (The store is compared by identity, not path, so a moved or
# copied store still resumes.) The world size and --num-workers may change: the rest of the epoch is
# re-split over the new streams (see `loader_phases`).
ORDER_FIELDS = ("format", "seed", "batch_size", "shuffle_buffer", "augment", "eval_fraction")
SCHEDULE_FIELDS = ("max_steps", "warmup_steps", "lr", "min_lr_ratio")


def store_identity(info: StoreInfo) -> dict[str, Any]:
    return {"config_hash": info.schema.get("config_hash"), "shards": info.shards, "clips": int(info.counts.sum())}


def check_resumable(state: dict[str, Any], cfg: TrainConfig, info: StoreInfo, path: Path) -> None:
    """A resume that would silently see other samples than the stopped run is an error."""
    store = [] if state["store"] == store_identity(info) else [
        f"store: {state['config']['data']} -> {cfg.data} holds other clips"]
    check_unchanged(state["config"], to_dict(cfg), (*ORDER_FIELDS, *SCHEDULE_FIELDS), str(path), also=store)


def loader_phases(loader: dict[str, Any], world_size: int, streams_per_rank: int) -> tuple[list[list[int]], int]:
    """(phases of the epoch already run, batch of the current phase) to resume a checkpoint's loader
    position on `world_size` ranks of `streams_per_rank` streams. With other ranks x streams than the
    stopped run, its phase ends where it stopped and the rest of the epoch is a new phase."""
    phases, batch = [list(p) for p in loader.get("phases", [])], loader["batch"]
    stopped = [loader.get("world_size", world_size), loader.get("streams_per_rank", streams_per_rank)]
    if stopped != [world_size, streams_per_rank] and batch > 0:
        phases, batch = [*phases, [*stopped, batch]], 0
    return phases, batch


def stale_plan(loader: dict[str, Any]) -> str | None:
    """Why a checkpoint's loader position may not resume its epoch exactly, or None: one written by an
    older epoch split stopped mid-epoch with several streams per rank, whose finished phases the
    current split would replay differently (that epoch's rest may then repeat or miss some clips)."""
    phases = [*loader.get("phases", []), [loader.get("world_size"), loader.get("streams_per_rank", 1), loader["batch"]]]
    if loader.get("plan", 1) == PLAN_VERSION or not any(b > 0 and streams > 1 for _, streams, b in phases):
        return None
    return (f"this checkpoint's epoch {loader['epoch']} was split by loader plan {loader.get('plan', 1)}, this code "
            f"splits by plan {PLAN_VERSION}: the rest of that epoch may repeat or miss some clips; later epochs are exact")


def build_student(cfg: TrainConfig, info: StoreInfo) -> torch.nn.Module:
    """The student shaped by the store (or loaded from --init-from), carrying the store's target stats."""
    from student import LiteFrameModel, config_for_store

    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = LiteFrameModel.from_pretrained(cfg.init_from)
    else:
        model = LiteFrameModel(config_for_store(cfg.preset, info.schema))
    if cfg.init_from_teacher:   # also on resume: it sets the teacher's image_mean/std in the config
        from student.init_from_teacher import init_from_teacher

        init_from_teacher(model, cfg.init_from_teacher)
    check_store_matches(model.config, info)
    model.config.target_mean = info.target_mean.tolist()
    model.config.target_std = info.target_std.tolist()
    return model


class Trainer:
    """Model, optimizer and schedule, and the one thing they do together: a training step."""

    def __init__(self, cfg: TrainConfig, info: StoreInfo, env: Dist):
        self.cfg, self.env = cfg, env
        if cfg.grad_reduce == "bf16" and env.world_size > 1 and env.device.type != "cuda":
            raise ConfigError("--grad-reduce bf16: DDP's bf16 all-reduce needs CUDA ranks (NCCL); these run on CPU")
        self.model = build_student(cfg, info).to(env.device)
        self.module = self.model  # unwrapped, for saving and evaluation
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        self.mean = torch.as_tensor(info.target_mean, device=env.device)
        self.std = torch.as_tensor(info.target_std, device=env.device)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                           betas=(0.9, 0.999), fused=env.device.type == "cuda")
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)

    def wrap(self) -> None:
        """DDP and torch.compile go on after weights are loaded."""
        if self.cfg.compile:
            self.model = torch.compile(self.model)
        if self.env.world_size > 1:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            if self.cfg.grad_reduce == "bf16":
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

                self.model.register_comm_hook(None, bf16_compress_hook)

    def pixels(self, batch: dict[str, Any]) -> torch.Tensor:
        """uint8 clips [B, T, H, W, 3] -> jittered (training only), normalised [B, T, 3, H, W]."""
        frames = batch["frames"].to(self.env.device, non_blocking=True)
        if "jitter" in batch:
            frames = jitter_frames(frames, batch["jitter"].to(self.env.device))
        return self.module.preprocess(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])

    def step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One step: (loss, gradient norm, applied). A step whose loss or gradient norm is not finite on
        any rank is not applied (every rank agrees: `all_finite`); it still counts as a step of the
        schedule, so the LR and the loader stay a function of the step number."""
        target = batch["target"].to(self.env.device, non_blocking=True)
        z = (target.float() - self.mean) / self.std          # standardised with the store's statistics
        pixels = self.pixels(batch)                            # float32: jitter and normalisation
        with self.autocast():
            pred = self.model(pixels)
        loss = distill_loss(self.cfg.loss, pred, z, self.cfg.clip_sigma, valid=batch.get("valid"))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        applied = all_finite(self.env, loss, grad_norm)
        if applied:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.detach(), grad_norm.detach(), applied


class Preemption:
    """SIGTERM (a scheduler taking the node back): finish the current step, write a checkpoint and
    leave, so `--resume` loses nothing. Every rank stops at the same step."""

    def __init__(self) -> None:
        self.flag = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():   # Ray Train runs the loop in a thread
            self.previous = signal.signal(signal.SIGTERM, self._set)

    def _set(self, *_: Any) -> None:
        self.flag = True

    def requested(self, env: Dist) -> bool:
        if env.world_size == 1:
            return self.flag
        flag = torch.tensor([float(self.flag)], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# ---------------------------------------------------------------- the run


def train(cfg: TrainConfig, on_log: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The whole run; returns the last logged metrics and the evaluation. `on_log(step, metrics)` is
    called on every rank at each logged step (Ray Train reports through it)."""
    check_config(cfg)
    env = setup_distributed()
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"
    info = read_store(cfg.data)
    rows, heldout = heldout_split(info, cfg.eval_fraction) if cfg.eval_fraction > 0 else (Selection(info.counts), None)
    eval_info = read_store(cfg.eval_data) if cfg.eval_data else (info if heldout is not None else None)

    trainer = Trainer(cfg, info, env)
    if eval_info is not None and eval_info is not info:
        check_store_matches(trainer.module.config, eval_info)
    data = TrainData(info, fmt=cfg.format, batch_size=cfg.batch_size, seed=cfg.seed, rank=env.rank,
                     world_size=env.world_size, num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer,
                     augment=cfg.augment, rows=rows, max_bad_clips=cfg.max_bad_clips)

    step, epoch, batch_in_epoch, phases = 0, 0, 0, []     # phases: of this epoch, run on other ranks x streams
    guard = NonFiniteGuard(cfg.max_bad_steps + 1, f"more than --max-bad-steps {cfg.max_bad_steps}")
    last = checkpoint.latest(ckpt_dir) if cfg.resume else None
    if last is not None:
        state, rng_states = checkpoint.load(last, trainer.module, trainer.optimizer)
        check_resumable(state, cfg, info, last)
        trainer.scheduler.load_state_dict(state["scheduler"])
        rng.restore(rng_states, env)
        step, epoch = state["step"], state["loader"]["epoch"]
        phases, batch_in_epoch = loader_phases(state["loader"], env.world_size, data.streams_per_rank)
        if env.main and (why := stale_plan(state["loader"])):
            print(f"warning: {why}", file=sys.stderr, flush=True)
        health = state.get("health", {})
        # each rank's budget: the counts of the old ranks it stands for (all of them, however many)
        old = health.get("bad_clips", [])
        data.bad_clips.count = sum(int(c) for r, c in enumerate(old) if r % env.world_size == env.rank)
        guard.total, guard.in_row = int(health.get("skipped_steps", 0)), int(health.get("bad_steps_in_row", 0))
        if env.main:
            print(f"resumed from {last} at step {step} (epoch {epoch}, batch {batch_in_epoch})", flush=True)
    elif cfg.resume and env.main:
        print(f"--resume: no checkpoint in {ckpt_dir}, starting from step 0", flush=True)
    trainer.wrap()

    log = MetricsLog(out, env.main, cfg.max_steps, step)
    bad_clips_path = out / f"skipped-clips-rank{env.rank}.jsonl"
    drop_after(bad_clips_path, step)
    bad_clips_file = None
    trace = None
    if cfg.trace_samples:
        out.mkdir(parents=True, exist_ok=True)
        drop_after(out / f"samples-rank{env.rank}.jsonl", step)
        trace = open(out / f"samples-rank{env.rank}.jsonl", "a")
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    timer = StepTimer()
    stop_at = min(cfg.max_steps, step + cfg.stop_after) if cfg.stop_after is not None else cfg.max_steps
    last_metrics: dict[str, Any] = {}
    eval_result: dict[str, Any] = {}
    preemption = Preemption()

    def run_eval() -> dict[str, Any]:
        """Every rank evaluates its slice of the clips; the sums are all-reduced (the same on every rank)."""
        if eval_info is None:
            return {}
        batches = eval_batches(eval_info, batch_size=cfg.batch_size, fmt=cfg.format,
                               rows=heldout if eval_info is info else None, max_bad_clips=cfg.max_bad_clips,
                               rank=env.rank, world_size=env.world_size,
                               max_clips=cfg.eval_batches * cfg.batch_size if cfg.eval_batches else None)
        result = evaluate(trainer.module, batches, to_pixels=trainer.pixels, target_mean=trainer.mean,
                          target_std=trainer.std, device=env.device, autocast=trainer.autocast,
                          all_reduce=dist.all_reduce if env.world_size > 1 else None)
        result["skipped_clips"] = int(sum_over_ranks([batches.budget.count], env)[0])
        log.log(step, {f"eval/{k}": v for k, v in result.items()})
        return result

    plan = data.plan(epoch, phases)
    if batch_in_epoch >= plan.batches_per_rank:     # a remainder that earlier phases read whole
        epoch, batch_in_epoch, phases = epoch + 1, 0, []
        plan = data.plan(epoch)
    batches = iter(data.run(epoch, batch_in_epoch, phases))    # one loader for the run: no restart per epoch
    try:
        timer.reset()
        while step < stop_at:
            batch = next(batches)       # its bad clips already counted, logged (or fatal)
            timer.batch_ready()
            loss, grad_norm, applied = trainer.step(batch)
            if cfg.sync_steps and env.device.type == "cuda":
                torch.cuda.synchronize(env.device)   # honest step times for the data-wait fraction
            step += 1
            batch_in_epoch += 1
            valid = batch["valid"].tolist() if "valid" in batch else [True] * len(batch["clip_id"])
            timer.step_done(sum(valid))
            skipped = batch.get("skipped", [])
            if skipped:
                if bad_clips_file is None:
                    out.mkdir(parents=True, exist_ok=True)
                    bad_clips_file = open(bad_clips_path, "a")
                for rec in skipped:
                    bad_clips_file.write(json.dumps({"step": step, "epoch": epoch, **rec}) + "\n")
                bad_clips_file.flush()
            guard.record(applied)
            if not applied and env.main:
                print(f"step {step}: loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g} (rank 0's): "
                      f"not finite on some rank, update skipped ({guard.in_row} in a row, at most "
                      f"{cfg.max_bad_steps})", file=sys.stderr, flush=True)
            if trace is not None:
                record = {"step": step, "epoch": epoch,
                          "clip_id": [c for c, ok in zip(batch["clip_id"], valid) if ok]}
                if skipped:
                    record["skipped"] = [r["clip_id"] for r in skipped]
                if not applied:
                    record["applied"] = False
                trace.write(json.dumps(record) + "\n")
            fatal = guard.diverged      # the same on every rank: `applied` is agreed
            if step % cfg.log_every == 0 or step == stop_at or fatal:
                speed = timer.summary()
                last_metrics = {"epoch": epoch, "loss": mean_over_ranks(loss, env),
                                "grad_norm": grad_norm.item(), "lr": trainer.scheduler.get_last_lr()[0],
                                "clips_per_s": speed["clips_per_s"] * env.world_size,
                                "data_wait_frac": speed["data_wait_frac"],
                                "data/skipped_clips": int(sum_over_ranks([data.bad_clips.count], env)[0]),
                                "train/skipped_steps": guard.total}
                log.log(step, last_metrics)
                if on_log is not None:
                    on_log(step, last_metrics)
                timer.reset()
            guard.check(step, str(ckpt_dir))
            if batch_in_epoch == plan.batches_per_rank:
                epoch, batch_in_epoch, phases = epoch + 1, 0, []
                plan = data.plan(epoch)
            if preemption.requested(env):
                stop_at = step
                if env.main:
                    print(f"SIGTERM: stopping at step {step} with a checkpoint", flush=True)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == stop_at < cfg.max_steps:
                # every rank checks (the weights are the same on all), so all stop together
                checkpoint.check_finite(trainer.module, trainer.optimizer, f"checkpoint of step {step}")
                rng_states = rng.capture(env)
                health = {"bad_clips": gather_ints(data.bad_clips.count, env), "skipped_steps": guard.total,
                          "bad_steps_in_row": guard.in_row}
                if env.main:
                    checkpoint.save(ckpt_dir, step, trainer.module, trainer.optimizer, {
                        "step": step, "loader": {
                            "epoch": epoch, "batch": batch_in_epoch, "phases": phases, "plan": PLAN_VERSION,
                            "world_size": env.world_size, "streams_per_rank": data.streams_per_rank,
                            # clips of the epoch read by all ranks together
                            "samples": (sum(w * b for w, _, b in phases) + env.world_size * batch_in_epoch)
                            * cfg.batch_size},
                        "scheduler": trainer.scheduler.state_dict(), "config": to_dict(cfg),
                        "world_size": env.world_size, "store": store_identity(info), "health": health},
                        rng_states, cfg.keep_checkpoints)
                barrier(env)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                run_eval()
            timer.exclude()  # checkpointing and evaluation are neither step time nor data wait
    finally:
        batches.close()     # the loader's workers stop now, not at garbage collection
        for f in (trace, bad_clips_file):
            if f is not None:
                f.close()
        preemption.close()

    if step >= cfg.max_steps:
        checkpoint.check_finite(trainer.module, None, "final model")
        if env.main:   # the model first: a failing evaluation must not cost the trained weights
            trainer.module.save_pretrained(out)
        eval_result = run_eval()
        if env.main:
            (out / "eval.json").write_text(json.dumps(eval_result, indent=1))
    barrier(env)
    log.close()
    return {"step": step, **last_metrics, "eval": eval_result, "preempted": preemption.flag and step < cfg.max_steps}


# ---------------------------------------------------------------- throughput


def throughput(cfg: TrainConfig, source: str = "synthetic", steps: int = 20, warmup: int = 3,
               schema: dict | None = None) -> dict[str, float]:
    """Training clips/s and the data-wait fraction, with batches from memory ("synthetic") or streamed
    from cfg.data ("store"), for bench/ scripts. Nothing is saved. `schema` (a store.json dict)
    shapes a synthetic run without any store on disk."""
    check_config(cfg)
    if schema is not None and source != "synthetic":
        raise ValueError("a schema alone has no clips to stream: give cfg.data for source='store'")
    env = setup_distributed()
    info = StoreInfo.from_schema(schema, "(synthetic)") if schema is not None else read_store(cfg.data)
    trainer = Trainer(cfg, info, env)
    trainer.wrap()
    if source == "synthetic":
        batches: Iterator[dict[str, Any]] = synthetic_batches(info, cfg.batch_size, cfg.seed)
    elif source == "store":
        batches = iter(TrainData(info, fmt=cfg.format, batch_size=cfg.batch_size, seed=cfg.seed, rank=env.rank,
                                 world_size=env.world_size, num_workers=cfg.num_workers,
                                 shuffle_buffer=cfg.shuffle_buffer, augment=cfg.augment).run(0))
    else:
        raise ValueError(f"source must be 'synthetic' or 'store', got {source!r}")
    timer = StepTimer()
    for i in range(warmup + steps):
        if i == warmup:
            timer.reset()
        batch = next(batches)
        timer.batch_ready()
        trainer.step(batch)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        timer.step_done(len(batch["clip_id"]))
    result = timer.summary()
    return {"clips_per_s": result["clips_per_s"] * env.world_size, "data_wait_frac": result["data_wait_frac"],
            "step_ms": 1000 * timer.total / steps, "batch_size": cfg.batch_size, "world_size": env.world_size}


def main(argv: Iterable[str] | None = None) -> None:
    cfg = parse_config(TrainConfig, list(argv) if argv is not None else None)
    result = train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result), flush=True)
    if result["preempted"]:
        sys.exit(128 + signal.SIGTERM)      # not finished: schedulers must not take it for success


if __name__ == "__main__":
    main()
