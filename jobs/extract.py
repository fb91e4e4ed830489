"""Extract teacher targets into a sharded store, on Ray Data.

    python -m jobs.extract --input videos/ --output store/ --teacher /models/internvit [--config job.yaml]
    ray job submit --working-dir . -- python -m jobs.extract --input s3://b/videos --output s3://b/store ...

Streaming: video URIs -> decode (compact clips out: frames at --size, not whole videos, and their
JPEG bytes for the store) in CPU tasks, or with --decode-device auto|gpu on a GPU cluster in one
decode actor per GPU (NVDEC sessions and ffmpeg slots, see GpuDecodeStage) -> teacher + compression
in an actor pool (one actor per GPU; the raw frames end here) -> a Datasink whose write tasks roll
shards by bytes and commit them. The driver then finalises the store.
Resume is the same command: committed shards are skipped, partly done videos redo only their
missing clips. Exit 0 when the store is complete (even if some inputs failed, see errors/).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterable

from jobs.cluster import connect
from pipeline.config import ConfigError, check_config, log_to_stderr, parse_bytes, parse_config, to_dict
from pipeline.stages import (DecodeOptions, GpuDecodeStage, TeacherStage, WriteSummary, decode_videos,
                             list_videos, write_shards)
from pipeline.store import StoreError, StoreWriter, make_schema
from pipeline.store.lease import Lease

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("jobs.extract")


@dataclass
class ExtractConfig:
    """Extract teacher targets from videos into a sharded store (webdataset and/or zarr)."""

    input: str = field(metadata={"help": "video file, folder, glob, or a .parquet list (column video_uri/uri/path)"})
    output: str = field(metadata={"help": "store root: a folder or s3://bucket/prefix"})
    teacher: str = field(metadata={"help": "teacher checkpoint dir or hub id (HF transformers vision model or VLM)"})
    layer: int = field(default=-1, metadata={"help": "teacher hidden_states index; -1 = last"})
    head: str = field(default="none", metadata={"choices": ("none", "projector"), "help": "none | projector (InternVL pixel shuffle + MLP)"})
    teacher_revision: str | None = field(default=None, metadata={"help": "hub revision of the teacher"})
    teacher_image_size: int | None = field(default=None, metadata={"min": 14, "help": "override the teacher's input size"})
    compression: str = field(default="wap", metadata={"choices": ("wap", "avg"), "help": "wap | avg"})
    factors: tuple[int, int, int] = field(default=(4, 2, 2), metadata={"min": 1, "help": "pooling window t,h,w"})
    formats: tuple[str, ...] = field(default=("webdataset", "zarr"),
                                     metadata={"choices": ("webdataset", "zarr"), "flag": "format", "help": "webdataset, zarr or both"})
    views: int = field(default=1, metadata={"min": 1, "max": 64, "help": "views (fps/offset draws) per video"})
    fps: tuple[float, float] = field(default=(1.0, 4.0), metadata={"min": 0.01, "max": 240, "help": "clip fps range LOW-HIGH"})
    clip_frames: int = field(default=4, metadata={"min": 1, "max": 256, "help": "frames per clip"})
    max_clips_per_view: int | None = field(default=None, metadata={
        "min": 1, "help": "cap on clips per view (default 10000: an evenly spread subset beyond it)"})
    pad_short: bool = field(default=True, metadata={"help": "pad videos shorter than one clip"})
    size: int = field(default=448, metadata={"min": 14, "max": 4096, "help": "stored frame size (square, shorter side + centre crop)"})
    frame_encoding: str = field(default="jpg", metadata={"choices": ("jpg", "png", "npy"), "help": "jpg | png | npy"})
    jpeg_quality: int = field(default=90, metadata={"min": 1, "max": 100, "help": "JPEG quality of stored frames"})
    target_dtype: str = field(default="float16", metadata={"choices": ("float16", "bfloat16"), "help": "float16 | bfloat16 (stored as uint16)"})
    batch_size: int | None = field(default=None, metadata={"min": 1, 
        "help": "clips per teacher batch; default frames-per-forward / clip-frames (one full forward per call)"})
    frames_per_forward: int = field(default=256, metadata={"min": 1, "help": "frames per teacher forward pass"})
    teacher_compile: bool | None = field(default=None, metadata={
        "help": "torch.compile the teacher (compiled in the actor's start-up); default on with CUDA, off on CPU"})
    teacher_dtype: str = field(default="auto", metadata={
        "choices": ("auto", "bfloat16", "float32", "float8"),
        "help": "auto (bfloat16 on GPU, float32 on CPU), or float8: FP8 matmuls in the teacher's blocks, bf16 "
                "elsewhere (GPUs of compute capability 8.9+); recorded in the store's teacher identity"})
    teacher_concurrency: int = field(default=2, metadata={"min": 1, "max": 16, 
        "help": "calls in flight per teacher actor: one call's frame upload and target copy hide behind the "
                "other's forward"})
    teacher_device: str = field(default="auto", metadata={"choices": ("auto", "cuda", "cpu"), "help": "auto (cuda when the cluster has GPUs now), "
                                                                   "cuda (e.g. GPU nodes still autoscaling up) or cpu"})
    teacher_actors: int | None = field(default=None, metadata={"min": 1, "help": "teacher actors; default one per GPU, or 1"})
    teacher_cpus: float = field(default=1.0, metadata={"min": 0, "help": "CPUs reserved per teacher actor"})
    decode_cpus: float = field(default=1.0, metadata={"min": 0.01, "help": "CPUs per decode task"})
    decode_device: str = field(default="auto", metadata={
        "choices": ("auto", "cpu", "gpu"),
        "help": "cpu: ffmpeg decode tasks; gpu: one decode actor per GPU on its NVDEC engines (ffmpeg for videos "
                "NVDEC cannot take); auto: gpu plus CPU decode slots in that actor where the cluster has GPUs "
                "(ffmpeg alone where PyNvVideoCodec is missing), else cpu"})
    nvdec_sessions: int = field(default=8, metadata={"min": 1, "max": 32, "help": (
        "videos decoded on NVDEC at once per GPU (H200, 1080p at 2 fps: 55 frames/s with 1, 167 with 4, "
        "235 with 8, 258 with 12)")})
    decode_cpu_slots: int | None = field(default=None, metadata={"min": 0, "max": 256, "help": (
        "with --decode-device auto: videos decoded by ffmpeg at once in each GPU's decode actor; default the "
        "cluster's CPUs per GPU less the teacher's and 2 for the write stage, capped by half of a GPU's share of "
        "the memory")})
    decode_memory: str | None = field(default=None, metadata={
        "bytes": True, "min": 1, "help": "memory reserved per decode task; default what one needs at the largest "
                                         "allowed frame (pipeline.video.decode_memory)"})
    allow_schemes: tuple[str, ...] = field(default=(), metadata={
        "help": "URI schemes accepted besides local paths, file:// and s3:// (e.g. gs,https)"})
    max_duration: float = field(default=4 * 3600.0, metadata={
        "min": 1, "help": "seconds of each video considered from its first frame (part of the store's identity)"})
    max_pixels: int = field(default=7680 * 4320, metadata={
        "min": 1, "help": "pixels of a source frame; a larger video is an error row (default 8K)"})
    decode_timeout: float = field(default=120.0, metadata={"min": 1, "help": "seconds per probe/decode call before giving up"})
    chunk_clips: int = field(default=8, metadata={"min": 1, "help": "clips decoded at once per video (bounds memory)"})
    shard_bytes: str = field(default="512MB", metadata={"bytes": True, "min": 1, "help": "target shard size"})
    zarr_shard_clips: int = field(default=32, metadata={"min": 1, "help": "clips per zarr shard object"})
    seed: int = field(default=0, metadata={"help": "seed of clip sampling (part of the store's identity)"})
    limit: int | None = field(default=None, metadata={"min": 0, "help": "only the first N input videos (sorted)"})
    ray_address: str = field(default="auto", metadata={"help": "auto (a reachable cluster, else a local Ray), "
                                                               "local, or ray://... / host:port"})

    def check(self) -> None:
        """Rules across fields (each field's own bounds are in its metadata)."""
        if self.fps[0] > self.fps[1]:
            raise ConfigError(f"--fps: LOW {self.fps[0]} is above HIGH {self.fps[1]}")
        clip_spec(self)


def actor_pool(size: int, concurrency: int = 1):
    """The one place that spells Ray Data's actor-pool API (it moved between releases; pinned 2.60).

    concurrency > 1 also needs enable_true_multi_threading: without it Ray Data runs one UDF call
    per actor at a time and only overlaps the batching around it."""
    import ray.data

    return ray.data.ActorPoolStrategy(size=size, max_concurrent_calls_per_actor=concurrency,
                                      enable_true_multi_threading=concurrency > 1)


def teacher_batch_clips(cfg: ExtractConfig) -> int:
    """Clips per teacher call: by default exactly one forward's worth of frames."""
    return cfg.batch_size or max(1, cfg.frames_per_forward // cfg.clip_frames)


def clip_spec(cfg: ExtractConfig):
    from pipeline.clips import ClipSpec

    try:
        return ClipSpec(frames=cfg.clip_frames, views=cfg.views, fps_range=tuple(cfg.fps),
                        max_clips_per_view=cfg.max_clips_per_view, pad_short=cfg.pad_short)
    except ValueError as e:
        raise ConfigError(f"--clip-frames/--views/--fps/--max-clips-per-view: {e}") from None


def input_policy(cfg: ExtractConfig):
    from pipeline.video import InputPolicy

    return InputPolicy(allow_schemes=tuple(cfg.allow_schemes), max_duration=cfg.max_duration,
                       max_pixels=cfg.max_pixels)


def decode_task_memory(cfg: ExtractConfig, threads: int) -> int:
    """--decode-memory, or what one decode task needs at the largest frame the policy allows."""
    from pipeline.video import decode_memory

    if cfg.decode_memory is not None:
        return parse_bytes(cfg.decode_memory)
    return decode_memory(cfg.size, cfg.chunk_clips * cfg.clip_frames, threads, input_policy(cfg))


def store_schema(cfg: ExtractConfig, teacher: dict) -> dict:
    """store.json for this config and teacher description (see pipeline.store)."""
    from pipeline.compress import Compression

    try:
        compression = Compression(method=cfg.compression, factors=tuple(cfg.factors))
        grid = compression.output_grid((cfg.clip_frames, *teacher["grid"]))
    except ValueError as e:   # a factor that does not divide the clip/token grid, an unknown method
        raise ConfigError(f"--compression/--factors: {e}") from None
    return make_schema(
        teacher=teacher,
        compression={"method": compression.method, "factors": list(compression.factors),
                     "temperature": compression.temperature},
        clip={"frames": cfg.clip_frames, "views": cfg.views, "fps_range": list(cfg.fps),
              "max_clips_per_view": cfg.max_clips_per_view, "pad_short": cfg.pad_short, "seed": cfg.seed,
              "resize": DecodeOptions.resize, **input_policy(cfg).plan_limits()},
        frames={"encoding": cfg.frame_encoding, "size": [cfg.size, cfg.size], "quality": cfg.jpeg_quality},
        target={"tokens": grid[0] * grid[1] * grid[2], "grid": list(grid), "dim": teacher["dim"],
                "dtype": cfg.target_dtype},
        formats=cfg.formats)


def teacher_precision(cfg: ExtractConfig, use_gpu: bool) -> str:
    """--teacher-dtype resolved for the actors: auto is bfloat16 on GPU, float32 on CPU; float8 needs GPUs."""
    if cfg.teacher_dtype == "auto":
        return "bfloat16" if use_gpu else "float32"
    if cfg.teacher_dtype == "float8" and not use_gpu:
        raise ConfigError("--teacher-dtype float8 needs GPU teacher actors (CUDA compute capability 8.9+); "
                          "this job's teacher runs on CPU")
    return cfg.teacher_dtype


def describe_teacher(cfg: ExtractConfig, dtype: str) -> dict:
    """The teacher's identity as the actors will load it (same dtype, float8 included), for store.json."""
    from pipeline.teacher import Teacher

    return Teacher.describe_pretrained(cfg.teacher, dtype=dtype, layer=cfg.layer, head=cfg.head,
                                       revision=cfg.teacher_revision, image_size=cfg.teacher_image_size)


def _datasink(store: StoreWriter, shard_bytes: int, zarr_shard_clips: int):
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class StoreDatasink(Datasink):
        """Write tasks get about one shard of compact (encoded) clips each, and commit it."""

        def __init__(self):
            self.summary = WriteSummary()

        @property
        def min_bytes_per_write(self) -> int:
            return shard_bytes

        def write(self, blocks: Iterable, ctx) -> WriteSummary:
            batches = (BlockAccessor.for_block(b).to_numpy() for b in blocks)
            return write_shards(store, batches, shard_bytes=shard_bytes, zarr_shard_clips=zarr_shard_clips)

        def on_write_complete(self, write_result) -> None:
            for part in write_result.write_returns:
                self.summary.add(part)

    return StoreDatasink()


# Enough input blocks to spread decode over any cluster, few enough for the driver to track; past it a
# decode task takes several videos in turn.
MAX_INPUT_BLOCKS = 10_000


def input_blocks(pending: "pa.Table") -> list["pa.Table"]:
    """The pending videos as Ray Data blocks (one video each for small jobs). Each block is a table
    with buffers of its own (`take` copies), not a slice: a pickled slice can carry its parent's
    whole buffers."""
    import numpy as np

    n = pending.num_rows
    rows = max(1, -(-n // MAX_INPUT_BLOCKS))
    return [pending.take(np.arange(i, min(i + rows, n))) for i in range(0, n, rows)]


# GPU shares. Ray packs fractional shares first-fit: with 0.2 per decode actor and 0.8 per teacher,
# on the H200 x2 both decode actors got GPU 0 and the second teacher could not be placed while they
# ran (one teacher did all the work: bench/RESULTS.md). So a teacher asks for more than half a GPU
# (no two share one, whatever else is placed), and a decode actor for a token share, only to land on
# a GPU node (up to 10 per node fit beside its teachers); it sees all of the node's GPUs (DECODE_ENV)
# and claims one that no other decode actor holds (pipeline.nvdec.claim_gpu).
TEACHER_GPU_SHARE = 0.9
DECODE_GPU_SHARE = 0.01
DECODE_ENV = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}


@dataclass(frozen=True)
class DecodePlan:
    """Where decode runs: CPU tasks, or one decode actor per GPU (NVDEC sessions + CPU slots)."""

    on_gpu: bool
    gpus: int = 0
    sessions: int = 0
    cpu_slots: int = 0
    require_nvdec: bool = False
    memory: int = 0                 # bytes the decode actor reserves


# Of each GPU's share of the cluster's memory, what a decode actor may reserve for its default CPU
# slots: an actor asking for more than a node has is never placed, and the job would wait for it.
DECODE_MEMORY_SHARE = 0.5

# Ray CPUs per GPU the default CPU slots leave to the write stage (a task takes one) and Ray Data's
# own work. With one left, on the H200 x2 the decode actor and teacher held 16 of 16, the encode and
# write stages (encoding has since moved into decode) ran one task at a time, and the teacher did 45-55
# of its 150 clips/s (bench/RESULTS.md).
DOWNSTREAM_CPUS = 2


def decode_plan(cfg: ExtractConfig, resources: dict) -> DecodePlan:
    """--decode-device against the cluster's resources (ray.cluster_resources()). Every call of the
    decode actor reserves one ffmpeg decode's memory: an NVDEC call falls back to ffmpeg for a
    video NVDEC cannot take."""
    gpus = int(resources.get("GPU", 0))
    if cfg.decode_device == "gpu" and not gpus:
        raise ConfigError("--decode-device gpu: the cluster has no GPUs (use cpu or auto)")
    if cfg.decode_device == "cpu" or not gpus:
        return DecodePlan(on_gpu=False)
    call_memory = decode_task_memory(cfg, 1)
    slots = 0
    if cfg.decode_device == "auto":
        slots = cfg.decode_cpu_slots
        if slots is None:      # the CPUs beside the teacher and the later stages, as many as half the memory holds
            by_cpu = int(resources.get("CPU", 0)) // gpus - math.ceil(cfg.teacher_cpus) - DOWNSTREAM_CPUS
            by_memory = int(DECODE_MEMORY_SHARE * resources.get("memory", 0) / gpus // call_memory) - cfg.nvdec_sessions
            slots = max(0, min(by_cpu, by_memory))
    return DecodePlan(on_gpu=True, gpus=gpus, sessions=cfg.nvdec_sessions, cpu_slots=slots,
                      require_nvdec=cfg.decode_device == "gpu", memory=(cfg.nvdec_sessions + slots) * call_memory)


def decode_actor_resources(decode: DecodePlan) -> dict:
    """Ray resources of one decode actor (see TEACHER_GPU_SHARE)."""
    return {"num_gpus": DECODE_GPU_SHARE, "num_cpus": max(1, decode.cpu_slots), "memory": decode.memory,
            "runtime_env": {"env_vars": DECODE_ENV}}


def teacher_resources(cfg: ExtractConfig, decode: DecodePlan, use_gpu: bool) -> dict:
    """Ray resources of one teacher actor: a whole GPU, or more than half of one beside decode actors."""
    return {"num_gpus": (TEACHER_GPU_SHARE if decode.on_gpu else 1) if use_gpu else 0, "num_cpus": cfg.teacher_cpus}


def run_pipeline(cfg: ExtractConfig, store: StoreWriter, pending: "pa.Table", *, use_gpu: bool,
                 teacher_dtype: str, decode: DecodePlan) -> WriteSummary:
    import ray
    import ray.data

    from pipeline.compress import Compression

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    threads = max(1, math.ceil(cfg.decode_cpus))
    options = DecodeOptions(clip_spec=clip_spec(cfg), size=cfg.size, seed=cfg.seed, timeout=cfg.decode_timeout,
                            policy=input_policy(cfg), threads=threads, chunk_clips=cfg.chunk_clips,
                            frame_encoding=cfg.frame_encoding, quality=cfg.jpeg_quality)
    actors = cfg.teacher_actors or (int(ray.cluster_resources().get("GPU", 0)) if use_gpu else 1) or 1
    batch = teacher_batch_clips(cfg)
    compile_teacher = use_gpu if cfg.teacher_compile is None else cfg.teacher_compile
    ds = ray.data.from_arrow(input_blocks(pending))
    # The memory reservation bounds concurrent decodes to what RAM holds; being a resource the teacher
    # actors do not ask for, it also keeps Ray Data from fusing decode into them, so decode scales
    # on its own CPUs instead of stalling the GPU.
    if decode.on_gpu:
        calls = decode.sessions + decode.cpu_slots
        ds = ds.map_batches(
            GpuDecodeStage, batch_size=1, batch_format="numpy", compute=actor_pool(decode.gpus, calls),
            **decode_actor_resources(decode),
            fn_constructor_kwargs={"options": replace(options, threads=1), "store": store, "sessions": decode.sessions,
                                   "cpu_slots": decode.cpu_slots, "require_nvdec": decode.require_nvdec})
    else:
        ds = ds.map_batches(decode_videos, batch_size=1, batch_format="numpy", num_cpus=cfg.decode_cpus,
                            memory=decode_task_memory(cfg, threads), fn_kwargs={"options": options, "store": store})
    ds = ds.map_batches(
        TeacherStage, batch_size=batch, batch_format="numpy", compute=actor_pool(actors, cfg.teacher_concurrency),
        **teacher_resources(cfg, decode, use_gpu),
        fn_constructor_kwargs={
            "teacher": cfg.teacher, "compression": Compression(method=cfg.compression, factors=tuple(cfg.factors)),
            "target_dtype": cfg.target_dtype, "layer": cfg.layer, "head": cfg.head,
            "revision": cfg.teacher_revision, "image_size": cfg.teacher_image_size,
            "device": "cuda" if use_gpu else "cpu", "dtype": teacher_dtype,
            "frames_per_forward": cfg.frames_per_forward, "compile": compile_teacher, "expect": store.schema["teacher"],
            "store": store, "keep_frames": False})
    sink = _datasink(store, parse_bytes(cfg.shard_bytes), cfg.zarr_shard_clips)
    ds.write_datasink(sink)
    return sink.summary


def extract(cfg: ExtractConfig) -> dict:
    """Run the job end to end; returns the summary. Raises on errors of the job itself."""
    import ray

    started = time.time()
    check_config(cfg)            # before anything touches the output
    videos = list_videos(cfg.input)
    if cfg.limit is not None:
        videos = videos.slice(0, cfg.limit)
    lease = Lease(cfg.output).acquire()      # one job per output: a second one stops here
    initialised = False
    try:
        initialised = connect(cfg.ray_address)
        use_gpu = (cfg.teacher_device == "cuda"
                   or (cfg.teacher_device == "auto" and ray.cluster_resources().get("GPU", 0) > 0))
        teacher_dtype = teacher_precision(cfg, use_gpu)
        decode = decode_plan(cfg, ray.cluster_resources())
        schema = store_schema(cfg, describe_teacher(cfg, teacher_dtype))
        schema["job"] = {"config": to_dict(cfg)}
        store = StoreWriter(cfg.output, schema)
        pending = store.prepare().pending(videos)
        done = len(videos) - pending.num_rows
        log.info("%d videos: %d already done, %d to extract", len(videos), done, pending.num_rows)
        summary = WriteSummary()
        t0 = time.time()
        if pending.num_rows:
            store.mark_incomplete()
            summary = run_pipeline(cfg, store, pending, use_gpu=use_gpu, teacher_dtype=teacher_dtype,
                                   decode=decode)
        seconds = time.time() - t0
        final = store.finalise(written=summary.shards)
    finally:
        if initialised:
            ray.shutdown()
        lease.release()
    totals = final["summary"]
    busy, teacher_s = summary.busy_fraction(), summary.teacher_seconds()
    timeline = summary.timeline()
    steady = timeline.while_decoding()
    return {
        "store": cfg.output, "videos_in_input": len(videos), "videos_skipped_done": done,
        "videos_ok": totals["videos"], "videos_failed": totals["failed_videos"],
        "videos_partial": totals["partial_videos"], "store_clips": totals["clips"],
        "store_shards": totals["shards"], "clips_written": summary.clips, "shards_written": len(summary.shards),
        "bytes_written": summary.bytes, "pipeline_seconds": round(seconds, 2),
        "clips_per_second": round(summary.clips / seconds, 3) if summary.clips and seconds > 0 else 0.0,
        "clips_per_second_teacher_ready": round(summary.clips / teacher_s, 3) if teacher_s else None,
        "teacher_actors_seen": len(summary.teacher),
        "decode": (f"{decode.gpus} GPU decode actors ({decode.sessions} NVDEC sessions, {decode.cpu_slots} CPU slots each)"
                   if decode.on_gpu else "CPU tasks"),
        "clips_by_decoder": dict(sorted(summary.decoders.items())),
        "teacher_busy_fraction": round(busy, 3) if busy is not None else None,
        # the first windows include decode's head start while the teachers load and compile
        "teacher_busy_timeline": timeline.text(timeline.busy),
        "clips_per_second_timeline": timeline.text(timeline.clips_per_s),
        "decoded_per_second_timeline": timeline.text(timeline.decoded_per_s),
        # past the teachers' start and while decode still ran: the rates a long run sustains
        "while_decoding": None if steady is None else {
            "from_unix_time": round(steady.since, 1), "to_unix_time": round(steady.until, 1),
            "teacher_busy": round(steady.busy, 3), "clips_per_second": round(steady.clips_per_s, 2),
            "decoded_per_second": round(steady.decoded_per_s, 2)},
        "total_seconds": round(time.time() - started, 2),
    }


def format_summary(summary: dict) -> str:
    width = max(map(len, summary))
    return "\n".join(f"  {k:<{width}} {v}" for k, v in summary.items())


def main(argv: list[str] | None = None) -> int:
    log_to_stderr()
    from pipeline.teacher import TeacherError

    try:
        cfg = parse_config(ExtractConfig, argv)
    except SystemExit as e:      # a bad config: already reported in one line
        return e.code
    try:
        summary = extract(cfg)
    except (StoreError, ConfigError, FileNotFoundError, TeacherError) as e:
        print(f"jobs.extract: error: {e}", file=sys.stderr)
        return 2
    print("extraction complete:\n" + format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
