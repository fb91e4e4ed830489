"""The extraction stages as plain Python: decode (+ encode frames) -> teacher + compression -> write.

jobs.extract wraps each in a Ray Data operator; here they are callable without Ray so that tests,
benchmarks (the same stages in one process) and small datasets need no cluster. Batches are dicts of
numpy columns, Ray Data's "numpy" batch format. A clip row carries compact data only: its frames at
the store's size (never the whole decoded video), encoded for the store as soon as they are decoded,
and after the teacher only those bytes and its compressed target (the raw frames, ten times larger,
stop at the teacher).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import DecodeTimeoutError, VideoError
from pipeline.store import (TARGET_DTYPES, StoreError, StoreWriter, encode_frame, filesystem, frame_column,
                            roll_shards)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".ts", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                    ".3gp", ".ogv")
URI_COLUMNS = ("video_uri", "uri", "url", "path")

log = logging.getLogger("pipeline.stages")


# ---------------------------------------------------------------- inputs

def list_videos(input: str, storage_options: Mapping | None = None) -> pa.Array:
    """PATH (a video or a folder, searched recursively), GLOB, or LIST.parquet -> sorted, unique video URIs.

    An Arrow string array, not a Python list: a list of 10^7 URIs stays about 70 bytes a URI in
    the driver. URIs keep their scheme (s3://...), so error rows and the index name inputs as the
    user did."""
    input = str(input)
    fs, path = filesystem(input, storage_options)
    scheme = input.split("://", 1)[0] + "://" if "://" in input and not input.startswith("file://") else ""

    def full(p: str) -> str:
        return scheme + p if scheme else p

    if input.endswith(".parquet"):
        import pyarrow.parquet as pq

        names = pq.read_schema(fs.open(path, "rb")).names
        column = next((c for c in URI_COLUMNS if c in names), None)
        if column is None:
            raise ValueError(f"{input}: no video column (expected one of {', '.join(URI_COLUMNS)})")
        uris = pq.read_table(path, filesystem=fs, columns=[column]).column(column).cast(pa.string())
        uris = pc.unique(pc.drop_null(uris).combine_chunks())
        uris = uris.filter(pc.not_equal(uris, ""))
    elif any(ch in path for ch in "*?["):
        uris = pa.array([full(p) for p in fs.glob(path) if fs.isfile(p)], pa.string())
    elif fs.isdir(path):
        uris = pa.array([full(p) for p in fs.find(path) if p.lower().endswith(VIDEO_EXTENSIONS)], pa.string())
    elif fs.exists(path):
        uris = pa.array([input], pa.string())
    else:
        raise FileNotFoundError(f"--input {input}: no such file, folder or matching glob")
    return uris.take(pc.sort_indices(uris))


# ---------------------------------------------------------------- decode

@dataclass(frozen=True)
class DecodeOptions:
    """How a video becomes clips; everything a decode worker needs, picklable."""

    clip_spec: Any                     # pipeline.clips.ClipSpec
    size: int = 448
    resize: str = "shorter_center_crop"
    seed: int = 0
    timeout: float | None = 120.0
    chunk_clips: int = 8               # clips decoded (and held in memory) at once per video
    policy: Any = None                 # pipeline.video.InputPolicy: what an input may make us do; None: defaults
    threads: int = 1                   # ffmpeg threads per decode: the CPUs the task reserves
    decoder: str = "ffmpeg"            # "ffmpeg" (CPU) or "nvdec": tried first, ffmpeg for what NVDEC cannot take
    gpu: int = 0                       # the CUDA device NVDEC decodes on
    # Encode each clip's frames for the store here (jpg, png, npy; None: leave that to the caller),
    # beside the raw frames the teacher reads: the rows after the teacher then carry the encoded
    # bytes only, about a tenth of the raw frames, through the object store to the writer.
    frame_encoding: str | None = None
    quality: int = 90


def _nothing() -> None:
    pass


def decode_video(uri: str, options: DecodeOptions, skip: Iterable[str] = (),
                 on_cpu: Callable[[], None] = _nothing) -> Iterator[dict[str, np.ndarray]]:
    """Yield batches of at most `chunk_clips` clips of one video, leaving out the clip ids in `skip`.

    Clips go in time order (sequential reads). Raises VideoError for a bad input, after yielding
    every clip that precedes the first clip that fails: a partly corrupt video keeps the same clips
    whatever the chunking and whichever clips an interrupted run already committed. `video_clips`
    (clips planned for the whole video) goes with every clip so the store can tell complete
    videos from partial ones.

    With options.decoder "nvdec", a video NVDEC cannot decode exactly (pipeline.nvdec) is decoded
    by ffmpeg from that chunk on, with ffmpeg's typed errors; each clip row names its decoder, and
    `on_cpu` is called when that happens (the caller hands its NVDEC session to the next video)."""
    from pipeline.clips import decode_clips, plan_clips
    from pipeline.video import DEFAULT_POLICY, probe, video_id

    policy = options.policy or DEFAULT_POLICY
    info = probe(uri, timeout=options.timeout or 30.0, policy=policy)
    plans = plan_clips(video_id(uri), info, options.clip_spec, options.seed)
    skip = set(skip)
    todo = sorted((p for p in plans if p.clip_id not in skip), key=lambda p: (p.timestamps[0], p.view, p.index))
    decoder = options.decoder
    if decoder == "nvdec":
        from pipeline.nvdec import unsupported_reason

        reason = unsupported_reason(info)
        if reason is not None:
            log.info("%s: decoded on the CPU: %s", uri, reason)
            decoder = "ffmpeg"
            on_cpu()

    def decode(chunk):
        nonlocal decoder
        kw = {"threads": options.threads} if decoder == "ffmpeg" else {"gpu": options.gpu}
        try:
            pairs = decode_clips(uri, chunk, size=options.size, resize=options.resize, timeout=options.timeout,
                                 info=info, policy=policy, decoder=decoder, **kw)
            return [(plan, frames, decoder) for plan, frames in pairs]
        except VideoError:
            raise
        except Exception as e:           # NvdecFallback, or the GPU decoder's own failure: not the input's fault
            if decoder != "nvdec":
                raise
            log.warning("%s: NVDEC failed (%s: %s); decoding it on the CPU", uri, type(e).__name__, e)
            decoder = "ffmpeg"
            on_cpu()
            return decode(chunk)

    for i in range(0, len(todo), options.chunk_clips):
        chunk = todo[i:i + options.chunk_clips]
        try:
            pairs, error = decode(chunk), None
        except DecodeTimeoutError as e:       # a hanging input: one timeout per video, not one per clip
            pairs, error = [], e
        except VideoError as e:
            pairs, error = [], e
            for plan in chunk:                 # salvage the clips before the first bad one
                try:
                    pairs.extend(decode([plan]))
                except VideoError as e_one:
                    error = e_one
                    break
        if pairs:
            yield clip_batch(uri, len(plans), pairs)
        if error is not None:
            raise error


def clip_batch(uri: str, video_clips: int, decoded: Sequence[tuple[Any, Any, str]]) -> dict[str, np.ndarray]:
    """(ClipPlan, Frames, decoder) of one video's clips -> a numpy batch of clip rows."""
    pairs = [(plan, frames) for plan, frames, _ in decoded]
    return {
        "clip_id": np.array([p.clip_id for p, _ in pairs]),
        "video_id": np.array([p.video_id for p, _ in pairs]),
        "video_uri": np.array([uri] * len(pairs)),
        "view": np.array([p.view for p, _ in pairs], dtype=np.int32),
        "clip_index": np.array([p.index for p, _ in pairs], dtype=np.int32),
        "fps": np.array([p.fps for p, _ in pairs], dtype=np.float64),
        "start": np.array([p.start for p, _ in pairs], dtype=np.float64),
        # the presentation times actually decoded, not the requested ones
        "timestamps": np.stack([np.asarray(f.timestamps, dtype=np.float64) for _, f in pairs]),
        "crop_box": np.array([f.crop_box for _, f in pairs], dtype=np.int32),
        "padded": np.array([p.padded for p, _ in pairs], dtype=np.int32),
        "video_clips": np.full(len(pairs), video_clips, dtype=np.int32),
        "decoder": np.array([decoder for _, _, decoder in decoded]),
        "decoded_at": np.full(len(pairs), time.time()),      # unix time: the job's decode rate per window
        "frames": np.stack([f.frames for _, f in pairs]),
    }


def error_row(error: VideoError, good_clips: Iterable[str] = ()) -> dict[str, Any]:
    return {"video_uri": error.uri, "stage": error.stage, "error_type": type(error).__name__,
            "message": error.message, "good_clips": list(good_clips)}


def decode_videos(batch: Mapping[str, Sequence], *, options: DecodeOptions, store: StoreWriter,
                  on_cpu: Callable[[], None] = _nothing) -> Iterator[dict[str, np.ndarray]]:
    """Decode stage over a batch of {video_uri, skip}: clip batches out; a bad video becomes a
    committed error row (recorded once, never raised) and the stage goes on with the next one."""
    for uri, skip in zip(batch["video_uri"], batch["skip"]):
        good = [str(s) for s in skip]
        try:
            for clips in decode_video(str(uri), options, list(good), on_cpu):
                good.extend(clips["clip_id"].tolist())
                if options.frame_encoding is not None:
                    clips.update(encoded_frames(clips["frames"], options.frame_encoding, options.quality))
                yield clips
        except VideoError as e:
            store.commit_errors([error_row(e, good)])


class GpuDecodeStage:
    """The decode stage of one GPU: a Ray actor beside its node's teachers, decoding on a GPU of the
    node that no other decode actor there has claimed (`pipeline.nvdec.claim_gpu`).

    Up to `sessions` calls (one video each) decode on NVDEC at once; with `cpu_slots` > 0 further calls
    run at the same time on the actor's CPUs through ffmpeg, so a node's NVDEC engines and its cores
    both work: a call takes a free NVDEC session if there is one, else decodes on the CPU. Videos
    NVDEC cannot take fall back to ffmpeg inside the call (`decode_video`). Without a usable NVDEC
    (no PyNvVideoCodec on the node) the actor decodes on its CPUs, or refuses to start when
    `require_nvdec`."""

    def __init__(self, *, options: DecodeOptions, store: StoreWriter, sessions: int, cpu_slots: int,
                 require_nvdec: bool):
        import torch

        from pipeline.nvdec import NvdecUnavailableError, claim_gpu, unavailable_reason

        gpus = torch.cuda.device_count() if sessions else 0
        gpu, self._claim = claim_gpu(gpus) if gpus else (0, None)
        reason = unavailable_reason(gpu) if sessions else None
        if reason is not None:
            if require_nvdec:
                raise NvdecUnavailableError(f"--decode-device gpu: {reason}")
            log.warning("NVDEC unavailable on this node (%s): decoding on %d CPUs", reason, cpu_slots)
            sessions = 0
        self.options, self.store, self.cpu_slots = replace(options, gpu=gpu), store, cpu_slots
        self.sessions = threading.BoundedSemaphore(sessions) if sessions else None

    def __call__(self, batch: Mapping[str, Sequence]) -> Iterator[dict[str, np.ndarray]]:
        """One video at a time, each with an NVDEC session if one is free; a video that falls back to
        ffmpeg hands its session back at once (its thread goes on decoding on the CPU, so the actor
        never runs more calls than its sessions and slots)."""
        for uri, skip in zip(batch["video_uri"], batch["skip"]):
            held = self.sessions is not None and self.sessions.acquire(blocking=self.cpu_slots == 0)

            def hand_back() -> None:
                nonlocal held
                if held:
                    held = False
                    self.sessions.release()

            options = replace(self.options, decoder="nvdec" if held else "ffmpeg")
            try:
                yield from decode_videos({"video_uri": [uri], "skip": [skip]}, options=options, store=self.store,
                                         on_cpu=hand_back)
            finally:
                hand_back()


# ---------------------------------------------------------------- teacher + compression

def stored_target(target: Any, dtype: str) -> np.ndarray:
    """Target tensor (any device) -> the store's array, with the bytes pipeline.store.encode_target gives.

    Cast on the device first (torch rounds to nearest even, as encode_target does), so half the
    bytes cross to the host, into pinned memory: a float32 copy plus a numpy cast cost the GPU
    stage a fifth of its time. bfloat16 leaves as its uint16 bit pattern (npy/zarr lack bf16)."""
    import torch

    if dtype not in TARGET_DTYPES:
        raise StoreError(f"unknown target dtype {dtype!r} (known: {', '.join(TARGET_DTYPES)})")
    cast = target.to(getattr(torch, dtype))
    if cast.is_cuda:
        host = torch.empty(cast.shape, dtype=cast.dtype, pin_memory=True)
        host.copy_(cast)
    else:
        host = cast.contiguous()
    return host.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else host.numpy()


class BusyClock:
    """Wall time with at least one call in flight: the union of the calls' intervals, so calls that
    overlap in one actor (max_concurrency > 1) are not counted twice."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._since = 0.0
        self._unreported = 0.0

    def _advance(self, change: int) -> None:
        now = self.clock()
        if self._in_flight:
            self._unreported += now - self._since
        self._since = now
        self._in_flight += change

    def start(self) -> None:
        with self._lock:
            self._advance(+1)

    def stop(self) -> float:
        """End one call; returns the busy seconds not reported yet (those of calls still in flight too)."""
        with self._lock:
            self._advance(-1)
            busy, self._unreported = self._unreported, 0.0
            return busy


class TeacherStage:
    """Teacher + compression over batches of clips. One instance per GPU (a Ray actor), or in-process.

    Thread-safe: the job runs two calls per actor at once, so one call's frame upload and target
    copy hide behind the other's forward. Adds `target` (stored dtype, [B, N, D]) and the timing
    columns the job's summary turns into the teacher busy fraction: wall time with a call in flight
    / wall time since the actor was ready."""

    def __init__(self, teacher: str, *, compression: Any, target_dtype: str = "float16", layer: int = -1,
                 head: str = "none", revision: str | None = None, image_size: int | None = None,
                 device: str | None = None, dtype: str | None = None, frames_per_forward: int = 256,
                 compile: bool = False, expect: Mapping | None = None, store: StoreWriter | None = None,
                 keep_frames: bool = True):
        """keep_frames=False: the output rows leave the raw frames out (the job's decode stage has
        already encoded them for the store)."""
        from pipeline.teacher import Teacher

        if target_dtype not in TARGET_DTYPES:
            raise StoreError(f"unknown target dtype {target_dtype!r} (known: {', '.join(TARGET_DTYPES)})")
        self.teacher = Teacher.from_pretrained(teacher, layer=layer, head=head, revision=revision, device=device,
                                               dtype=dtype, image_size=image_size, batch_size=frames_per_forward,
                                               compile=compile)
        if expect is not None and self.teacher.describe() != dict(expect):
            raise StoreError(f"teacher {teacher} on this worker describes itself as {self.teacher.describe()}, "
                             f"the store expects {dict(expect)}")
        if compile:
            self._warm_up(frames_per_forward)
        self.compression = compression
        self.target_dtype = target_dtype
        self.store = store
        self.keep_frames = keep_frames
        self.actor = uuid.uuid4().hex[:12]
        self.busy = BusyClock()
        self.ready = time.time()

    def _warm_up(self, frames_per_forward: int) -> None:
        """Compile before the actor counts as ready: a full forward, then a smaller one, after which
        torch.compile's graph takes any batch size (the short last batches of a stream) without
        compiling again mid-run."""
        import torch

        size = self.teacher.image_size
        with torch.inference_mode():   # as in __call__: the compiled graph guards on the grad mode
            for n in (frames_per_forward, min(8, frames_per_forward // 2)):
                if n >= 2:
                    self.teacher.encode(np.zeros((1, n, size, size, 3), dtype=np.uint8))

    def _reject(self, batch: Mapping[str, np.ndarray], bad: np.ndarray) -> None:
        """Clips whose targets overflow or are NaN become error rows of their own, never shard data:
        one such clip must not fail its shard, nor its video's other clips."""
        rows = [{"video_uri": uri, "stage": "teacher", "error_type": "NonFiniteTargetError", "clip_id": cid,
                 "video_clips": int(planned),
                 "message": f"clip {cid}: the teacher's compressed tokens are not finite in {self.target_dtype}"}
                for uri, cid, planned in zip(batch["video_uri"][bad], batch["clip_id"][bad], batch["video_clips"][bad])]
        if self.store is None:
            raise StoreError("; ".join(r["message"] for r in rows))
        self.store.commit_errors(rows)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from pipeline.compress import compress_tokens

        self.busy.start()
        try:
            with torch.inference_mode():
                tokens = self.teacher.encode(batch["frames"])
                target = compress_tokens(tokens, self.compression).to(getattr(torch, self.target_dtype))
                finite = torch.isfinite(target).flatten(1).all(1).cpu().numpy()
                target = stored_target(target, self.target_dtype)
        finally:
            busy = self.busy.stop()
        if not finite.all():
            self._reject(batch, ~finite)
            batch = {k: v[finite] for k, v in batch.items()}
            target = target[finite]
        if not self.keep_frames:
            del batch["frames"]
        n = len(target)
        batch["target"] = target
        batch["teacher_actor"] = np.array([self.actor] * n)
        batch["teacher_busy"] = np.full(n, busy / max(n, 1))
        batch["teacher_ready"] = np.full(n, self.ready)
        batch["teacher_done"] = np.full(n, time.time())
        return batch


# ---------------------------------------------------------------- frame encoding

def encoded_frames(frames: np.ndarray, encoding: str = "jpg", quality: int = 90) -> dict[str, np.ndarray]:
    """Clips' raw frames [clips, T, H, W, 3] -> one column of encoded bytes per frame position."""
    return {frame_column(i): np.array([encode_frame(f, encoding, quality) for f in frames[:, i]], dtype=object)
            for i in range(frames.shape[1])}


# ---------------------------------------------------------------- writing

BUSY_WINDOW_S = 30.0


class Rates(NamedTuple):
    """The teachers' work and decode's output from `since` to `until` (unix times)."""

    since: float
    until: float
    busy: float
    clips_per_s: float
    decoded_per_s: float


@dataclass(frozen=True)
class TeacherTimeline:
    """What the teachers did per window of `width` seconds, from `start` (the first actor ready, unix
    time) to `end` (the last target): their busy fraction, the clips/s they finished, and the clips/s
    decode finished in the same windows."""

    start: float
    end: float
    width: float
    busy: list[float]
    clips_per_s: list[float]
    decoded_per_s: list[float]
    spans: list[float]          # seconds of each window inside [start, end]

    def text(self, values: list[float]) -> str:
        return f"per {self.width:g} s: " + " ".join(f"{v:.2f}" if v < 10 else f"{v:.0f}" for v in values)

    def while_decoding(self) -> Rates | None:
        """The steady state: the windows after the first (the teachers' start, fed by decode's head
        start) and before the last one in which decode still finished clips (after it the teachers
        only drain what was decoded ahead, with the decoders idle). None when no such window exists."""
        decoding = [i for i, d in enumerate(self.decoded_per_s) if d > 0]
        steady = range(1, decoding[-1]) if decoding else range(0)
        seconds = sum(self.spans[i] for i in steady)
        if not seconds:
            return None
        weigh = lambda values: sum(values[i] * self.spans[i] for i in steady) / seconds  # noqa: E731
        since = self.start + sum(self.spans[:steady.start])
        return Rates(since, since + seconds, weigh(self.busy), weigh(self.clips_per_s), weigh(self.decoded_per_s))


@dataclass
class WriteSummary:
    """What one writer did; summed over writers for the job's summary."""

    shards: list[str] = field(default_factory=list)
    clips: int = 0
    bytes: int = 0
    teacher: dict[str, list[float]] = field(default_factory=dict)   # actor -> [busy s, ready, last done]
    decoders: dict[str, int] = field(default_factory=dict)          # clips per decoder (ffmpeg, nvdec)
    # [teacher busy seconds, clips, clips decoded] (all actors) by BUSY_WINDOW_S window (of the
    # teacher call's end; of the decode): the timeline shows a starved teacher that the whole-job
    # numbers hide behind decode's head start
    windows: dict[int, list[float]] = field(default_factory=dict)

    def add(self, other: "WriteSummary") -> "WriteSummary":
        self.shards += other.shards
        self.clips += other.clips
        self.bytes += other.bytes
        for decoder, clips in other.decoders.items():
            self.decoders[decoder] = self.decoders.get(decoder, 0) + clips
        for actor, (busy, ready, done) in other.teacher.items():
            self._add_actor(actor, busy, ready, done)
        for window, (busy, clips, decoded) in other.windows.items():
            self._add_window(window, busy, clips, decoded)
        return self

    def add_teacher_call(self, actor: str, busy: float, ready: float, done: float, clips: int = 1) -> None:
        """One teacher call's share (`clips` of its clips): the writer's per-row update, in place."""
        self._add_actor(actor, busy, ready, done)
        self._add_window(int(done // BUSY_WINDOW_S), busy, clips)

    def _add_actor(self, actor: str, busy: float, ready: float, done: float) -> None:
        mine = self.teacher.setdefault(actor, [0.0, ready, done])
        mine[0] += busy
        mine[1] = min(mine[1], ready)
        mine[2] = max(mine[2], done)

    def add_decoded(self, at: float, clips: int = 1) -> None:
        """Clips decode finished at unix time `at`."""
        self._add_window(int(at // BUSY_WINDOW_S), 0.0, 0, clips)

    def _add_window(self, window: int, busy: float, clips: int, decoded: int = 0) -> None:
        mine = self.windows.setdefault(window, [0.0, 0, 0])
        mine[0] += busy
        mine[1] += clips
        mine[2] += decoded

    def timeline(self, max_points: int = 48) -> TeacherTimeline:
        """The teacher's busy fraction and clips/s per window, from the first actor's start to the last
        target (the first and last windows count only their part of that span): windows double in
        width until at most `max_points` remain, so a day-long job's stays short. Each call counts in
        the window it ended in, so a window can read slightly above 1."""
        if not self.teacher:
            return TeacherTimeline(0.0, 0.0, BUSY_WINDOW_S, [], [], [], [])
        start = min(r for _, r, _ in self.teacher.values())
        end = max(d for _, _, d in self.teacher.values())
        first, last = int(start // BUSY_WINDOW_S), int(end // BUSY_WINDOW_S)
        sums = [self.windows.get(w, [0.0, 0, 0]) for w in range(first, last + 1)]
        busy, clips, decoded = ([v[k] for v in sums] for k in range(3))
        span = [min(end, (w + 1) * BUSY_WINDOW_S) - max(start, w * BUSY_WINDOW_S) for w in range(first, last + 1)]
        width = BUSY_WINDOW_S
        while len(busy) > max_points:
            busy, clips, decoded, span = ([sum(v[i:i + 2]) for i in range(0, len(v), 2)]
                                          for v in (busy, clips, decoded, span))
            width *= 2
        actors = len(self.teacher)
        return TeacherTimeline(start, end, width, [b / (s * actors) if s > 0 else 0.0 for b, s in zip(busy, span)],
                               [c / s if s > 0 else 0.0 for c, s in zip(clips, span)],
                               [d / s if s > 0 else 0.0 for d, s in zip(decoded, span)], span)

    def busy_fraction(self) -> float | None:
        wall = sum(done - ready for _, ready, done in self.teacher.values())
        return sum(b for b, _, _ in self.teacher.values()) / wall if wall > 0 else None

    def teacher_seconds(self) -> float | None:
        """From the first teacher actor being ready (weights loaded, compiled) to the last target:
        the job's rate over this span is what a long run sustains, without the start-up."""
        if not self.teacher:
            return None
        return max(d for _, _, d in self.teacher.values()) - min(r for _, r, _ in self.teacher.values())


def batch_rows(batch: Mapping[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    """Rows of a numpy batch; an empty block (every video of it failed) has no columns at all."""
    keys = list(batch)
    for i in range(len(batch[keys[0]]) if keys else 0):
        yield {k: batch[k][i] for k in keys}


def write_shards(store: StoreWriter, batches: Iterable[Mapping[str, np.ndarray]], *, shard_bytes: int,
                 zarr_shard_clips: int = 32) -> WriteSummary:
    """Write stage: clips into shards rolled at about `shard_bytes`, each published then committed."""
    summary = WriteSummary()

    def clips() -> Iterator[dict[str, Any]]:
        for batch in batches:
            for row in batch_rows(batch):
                if row.get("decoder") is not None:
                    summary.decoders[str(row["decoder"])] = summary.decoders.get(str(row["decoder"]), 0) + 1
                if "decoded_at" in row:
                    summary.add_decoded(float(row["decoded_at"]))
                if "teacher_actor" in row:
                    summary.add_teacher_call(str(row["teacher_actor"]), float(row["teacher_busy"]),
                                             float(row["teacher_ready"]), float(row["teacher_done"]))
                yield row

    for record in roll_shards(store, clips(), shard_bytes, zarr_shard_clips):
        summary.shards.append(record.shard)
        summary.clips += record.clips
        summary.bytes += sum(record.bytes.values())
    return summary
