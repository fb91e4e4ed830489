"""Store metadata at scale: what opening, training from and appending to a store cost as it grows to 10^8 clips.

    python bench/scale.py --clips 1e4,1e5,1e6,1e7,1e8 --json scale.json   # issue 8: ~22 GB of stores, ~45 min
    python bench/scale.py --clips 1e4,1e5 --json /tmp/s.json --plot /tmp/s.png

Stores are fabricated, metadata only (store.json, manifest, index files, commit records, statistics files;
no tar or zarr data), as an extraction job of 448 px JPEG clips with LLM-space targets (64 tokens x 3584,
float16) leaves them: ~1,000 clips per 512 MB shard, 30 clips per video over 1-4 views, ids as
pipeline.video.video_id and pipeline.clips make them. Fabrication is vectorised per shard and spread over
--jobs processes; stores are cached in --workdir, so a rerun measures without fabricating again.

Measured per size, each in a fresh subprocess (v2: the median of --repeat runs): wall and CPU time, and peak
RSS above the process's RSS right before the measured call (imports done and inputs loaded; the kernel's peak
is reset there via /proc/self/clear_refs):
  open_store     pipeline.store.open_store
  trainer start  student.data.read_store + TrainData(...).plan(0) + the first batch's (shard, row) positions,
                 opening that batch's shards (index files) as a loader worker does: all but decoding data
  extract        prepare = StoreWriter.prepare().pending(every video of the store) (an append run with
                 nothing left to do); finalise = mark_incomplete + one more shard committed +
                 finalise(written=[that shard]); peak RSS of both above the same baseline
and the same in layout v1 (one index.parquet, commit records holding every clip row; the code of commit
0379a17 loaded from git) up to --v1-max clips, skipping a v1 measurement projected (linearly from the size
before) past --cap-gb or --timeout, and killing one that gets there. Last, the first real batch drawn from a
small store of real JPEG frames written with pipeline.store.write_store. Prints a markdown table and the
goals, writes --json and a log-log plot (--plot).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
import contextlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.store import (ERRORS_SCHEMA, HELDOUT_LEVELS, INDEX_SCHEMA, MANIFEST_SCHEMA,  # noqa: E402
                            ShardCommit, TargetStats, heldout_score, make_schema, video_key)
from pipeline.store.records import VideoCounts  # noqa: E402
from pipeline.store.shard import digest  # noqa: E402
from pipeline.store.writer import STATS_KEY  # noqa: E402
from pipeline.video import video_id  # noqa: E402

V1_COMMIT = "0379a17"           # the last commit with layout v1 (pipeline/store.py, student/data.py)
CLIP_FRAMES, SIZE, TOKENS, DIM = 4, 448, 64, 3584
CLIPS_PER_VIDEO, MAX_VIEWS = 30, 4
FORMATS = ("webdataset", "zarr")
# Bytes a clip takes in each format (4 JPEG frames at quality 90 + a float16 [64, 3584] target; zarr holds
# decoded frames): only the manifest's byte columns, never written.
CLIP_BYTES = {"webdataset": 560_000, "zarr": 1_400_000}
# Per-channel target mean and std every fabricated clip has, so a shard's sums follow from its clip count.
_rng0 = np.random.default_rng(0)
TARGET_MEAN, TARGET_STD = _rng0.normal(0, 0.5, DIM), _rng0.uniform(0.5, 2.0, DIM)
GOALS = {"trainer_start_s": 10.0, "trainer_start_rss_mb": 1024.0, "extract_peak_rss_mb": 2048.0}


def store_schema(version: int) -> dict:
    """store.json before statistics: InternVL3-8B's projector output (LLM space), 4-frame clips, WAP 4x2x2."""
    spec = dict(
        teacher={"name_or_path": "OpenGVLab/InternVL3-8B", "revision": None, "layer": -1, "head": "projector",
                 "dim": DIM, "grid": [16, 16], "family": "internvl", "dtype": "bfloat16", "image_size": 448,
                 "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "patch_size": 14,
                 "num_layers": 24},
        compression={"method": "wap", "factors": [4, 2, 2], "temperature": 1.0},
        clip={"frames": CLIP_FRAMES, "views": MAX_VIEWS, "fps_range": [1.0, 4.0], "max_clips_per_view": None,
              "pad_short": True, "seed": 0, "resize": "shorter_center_crop"},
        frames={"encoding": "jpg", "size": [SIZE, SIZE], "quality": 90},
        target={"tokens": TOKENS, "grid": [1, 8, 8], "dim": DIM, "dtype": "float16"},
        formats=list(FORMATS))
    schema = make_schema(**spec)
    # v1's make_schema differs only in the version it writes (the config hash leaves the version out)
    return schema if version == 2 else {**schema, "schema_version": 1}


# ---------------------------------------------------------------------------------------------- fabrication

@dataclass(frozen=True)
class StoreSpec:
    """A fabricated store: `clips` clips in shards of `clips_per_shard` (the last one short)."""

    clips: int
    clips_per_shard: int = 1000

    @property
    def shards(self) -> int:
        return math.ceil(self.clips / self.clips_per_shard)

    @property
    def videos(self) -> int:
        return math.ceil(self.clips / CLIPS_PER_VIDEO)

    def clip_range(self, shard: int) -> tuple[int, int, int]:
        """(first clip, stop, clips in the store) of one shard; shard == self.shards is the extra shard
        an extract measurement commits: the clips of the next videos."""
        if shard == self.shards:
            first = self.videos * CLIPS_PER_VIDEO
            return first, first + self.clips_per_shard, first + self.clips_per_shard
        first = shard * self.clips_per_shard
        return first, min(first + self.clips_per_shard, self.clips), self.clips

    def name(self, version: int) -> str:
        return f"v{version}-{self.clips}-{self.clips_per_shard}"


def video_uri(number: int) -> str:
    return f"s3://videos/part-{number // 100_000:04d}/video_{number:09d}.mp4"


@dataclass
class FakeShard:
    """One shard's index rows and what its commit record needs, made without a per-clip Python object."""

    name: str
    index: pa.Table                 # INDEX_SCHEMA, in row order
    uris: list[str]                 # its videos, in order of first appearance
    video_ids: list[str]
    video_of_row: np.ndarray        # int64 [rows]: each row's position in `uris`
    planned: np.ndarray             # int64 [videos]: clips planned for each whole video

    @property
    def rows(self) -> int:
        return self.index.num_rows

    def commit(self) -> ShardCommit:
        """The v2 commit record ShardCommit.of_rows would make, from per-video arrays."""
        scores = np.array([heldout_score(v) for v in self.video_ids])[self.video_of_row]
        lowest = float(scores.min())
        clips = np.bincount(self.video_of_row, minlength=len(self.uris))
        return ShardCommit(
            shard=self.name, clips=self.rows, formats=FORMATS,
            bytes={f: self.rows * CLIP_BYTES[f] for f in FORMATS}, stats_count=self.rows * TOKENS,
            videos=VideoCounts(tuple(video_key(u) for u in self.uris), tuple(clips.tolist()),
                               tuple(self.planned.tolist())),
            heldout_clips=tuple(int((scores <= level).sum()) for level in HELDOUT_LEVELS),
            first_video_score=lowest, first_video_clips=int((scores == lowest).sum()))

    def commit_v1(self) -> bytes:
        """The v1 commit record: every clip row, and the statistics as JSON lists."""
        sums = shard_stats(self.rows)
        return json.dumps({"shard": self.name, "formats": list(FORMATS), "clips": self.index.to_pylist(),
                           "errors": [], "bytes": {f: self.rows * CLIP_BYTES[f] for f in FORMATS},
                           "stats": {"sum": sums[0].tolist(), "sumsq": sums[1].tolist(), "count": self.rows * TOKENS}},
                          separators=(",", ":")).encode()


def shard_stats(clips: int) -> np.ndarray:
    """[2, D] target sums (sum, sum of squares) over the tokens of `clips` fabricated clips."""
    count = clips * TOKENS
    return np.stack([count * TARGET_MEAN, count * (TARGET_MEAN ** 2 + TARGET_STD ** 2)])


def make_shard(first: int, stop: int, total: int) -> FakeShard:
    """The shard of global clips first..stop-1 of a store of `total` clips. Clip n is clip n % 30 of video
    n // 30, which has 1-4 views (clips dealt round-robin over them), so videos straddle shards as they do
    when a job rolls shards by bytes."""
    n = np.arange(first, stop, dtype=np.int64)
    video, j = n // CLIPS_PER_VIDEO, n % CLIPS_PER_VIDEO
    videos = np.arange(video[0], video[-1] + 1)
    local = video - video[0]
    uris = [video_uri(v) for v in videos.tolist()]
    ids = [video_id(u) for u in uris]
    views = (1 + videos % MAX_VIEWS)[local]
    view, index = j % views, j // views
    fps = 1.0 + ((video * 7919 + view * 104729) % 3001) / 1000.0
    start = index * CLIP_FRAMES / fps
    rows = len(n)
    video_ids = pa.array(ids).take(pa.array(local))
    clip_ids = pc.binary_join_element_wise(video_ids, "-v", pc.cast(pa.array(view), pa.string()), "-c",
                                           pc.utf8_lpad(pc.cast(pa.array(index), pa.string()), 5, padding="0"), "")
    name = "shard-" + digest(clip_ids.to_pylist())
    offsets = pa.array(np.arange(0, CLIP_FRAMES * rows + 1, CLIP_FRAMES, dtype=np.int32))
    timestamps = start[:, None] + np.arange(CLIP_FRAMES) / fps[:, None]
    checksums = np.frombuffer(np.random.default_rng(first).bytes(8 * rows).hex().encode(), dtype="S16")
    planned = np.minimum(CLIPS_PER_VIDEO, total - videos * CLIPS_PER_VIDEO)
    index_table = pa.table({
        "clip_id": clip_ids, "video_id": video_ids, "video_uri": pa.array(uris).take(pa.array(local)),
        "view": view.astype(np.int32), "clip_index": index.astype(np.int32), "fps": fps, "start": start,
        "timestamps": pa.ListArray.from_arrays(offsets, pa.array(timestamps.ravel())),
        "crop_box": pa.ListArray.from_arrays(offsets, pa.array(np.tile(np.int32([240, 0, 1680, 1080]), rows))),
        "padded": np.zeros(rows, np.int32), "video_clips": planned[local].astype(np.int32),
        "decoder": pa.array(np.full(rows, "ffmpeg", dtype=object), pa.string()),
        "shard": pa.array(np.full(rows, name, dtype=object), pa.string()), "row": np.arange(rows, dtype=np.int32),
        "checksum": pa.array(checksums).cast(pa.string())}, schema=INDEX_SCHEMA)
    return FakeShard(name, index_table, uris, ids, local, planned)


def write_v2_shard(root: Path, shard: FakeShard) -> tuple[dict, int]:
    """Index file, statistics file, then commit record, as ShardWriter.commit publishes them; returns the
    manifest row and the bytes written."""
    paths = [root / "index" / f"{shard.name}.parquet", root / "_commits" / f"{shard.name}.stats.npy",
             root / "_commits" / f"{shard.name}.json"]
    pq.write_table(shard.index, paths[0])
    np.save(paths[1], shard_stats(shard.rows))
    commit = shard.commit()
    paths[2].write_bytes(commit.to_json())
    return commit.manifest_row(), sum(p.stat().st_size for p in paths)


def write_v1_shard(root: Path, shard: FakeShard) -> int:
    path = root / "_commits" / f"{shard.name}.json"
    path.write_bytes(shard.commit_v1())
    return path.stat().st_size


def _fabricate_part(task: tuple[int, dict, str, int, int]) -> tuple[list, int]:
    """Pool task: shards start..stop-1 of one store. v2: (manifest rows, bytes); v1: (index tables, bytes)."""
    version, spec, root, start, stop = task
    spec, root, out, nbytes = StoreSpec(**spec), Path(root), [], 0
    for s in range(start, stop):
        shard = make_shard(*spec.clip_range(s))
        if version == 2:
            row, size = write_v2_shard(root, shard)
            out.append(row)
        else:
            size = write_v1_shard(root, shard)
            out.append(shard.index)
        nbytes += size
    return out, nbytes


def fabricate(spec: StoreSpec, version: int, root: Path, jobs: int) -> dict:
    """Write a metadata-only store shard by shard (cached: a `fabricated.json` marks it done); returns
    what the marker holds (seconds, bytes)."""
    marker = root / "fabricated.json"
    if marker.exists():
        return json.loads(marker.read_text())
    shutil.rmtree(root, ignore_errors=True)
    for d in ("index", "_commits", "zarr") if version == 2 else ("_commits",):
        (root / d).mkdir(parents=True)
    schema = store_schema(version)
    t0 = time.time()
    step = max(1, min(500, spec.shards // (8 * jobs)))
    tasks = [(version, asdict(spec), str(root), a, min(a + step, spec.shards)) for a in range(0, spec.shards, step)]
    manifest_rows, nbytes, done, last_print = [], 0, 0, t0
    index_writer = pq.ParquetWriter(root / "index.parquet", INDEX_SCHEMA) if version == 1 else None
    with mp.get_context("fork").Pool(jobs) as pool:
        for out, size in pool.imap(_fabricate_part, tasks):
            nbytes += size
            if index_writer is not None:
                index_writer.write_table(pa.concat_tables(out))
            else:
                manifest_rows.extend(out)
            done += len(out)
            if time.time() - last_print > 30 or done == spec.shards:
                rate = done / (time.time() - t0)
                print(f"  fabricating {spec.name(version)}: {done}/{spec.shards} shards, {time.time() - t0:.0f} s, "
                      f"ETA {(spec.shards - done) / rate:.0f} s", flush=True)
                last_print = time.time()
    stats = TargetStats.zeros(DIM)
    for s in range(spec.shards):                         # the sums the shards' statistics files hold
        first, stop, _ = spec.clip_range(s)
        stats.add(shard_stats(stop - first), (stop - first) * TOKENS)
    schema["target_stats"] = stats.to_schema()
    schema["summary"] = {"clips": spec.clips, "videos": spec.videos, "failed_videos": 0, "partial_videos": 0,
                         "shards": spec.shards}
    if version == 2:
        manifest = pa.Table.from_pylist(sorted(manifest_rows, key=lambda r: r["shard"]), schema=MANIFEST_SCHEMA)
        pq.write_table(manifest.replace_schema_metadata({STATS_KEY: stats.to_metadata()}), root / "manifest.parquet")
        (root / "zarr" / "zarr.json").write_text(json.dumps(
            {"zarr_format": 3, "node_type": "group", "attributes": {"config_hash": schema["config_hash"]}}))
    else:
        index_writer.close()
        pq.write_table(pa.schema(list(ERRORS_SCHEMA)[:5]).empty_table(), root / "errors.parquet")   # v1's 5 columns
    (root / "store.json").write_text(json.dumps(schema, indent=1))
    info = {"spec": asdict(spec), "version": version, "seconds": round(time.time() - t0, 1),
            "bytes": nbytes + sum(p.stat().st_size for p in root.glob("*") if p.is_file())}
    os.sync()       # so measurements do not compete with the writeback of what was just written
    marker.write_text(json.dumps(info))
    return info


def write_inputs(spec: StoreSpec, path: Path) -> None:
    """The job's input list: every video URI of the store, as a Parquet `video_uri` column."""
    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, pa.schema([("video_uri", pa.string())])) as writer:
        for a in range(0, spec.videos, 1_000_000):
            chunk = range(a, min(a + 1_000_000, spec.videos))
            writer.write_table(pa.table({"video_uri": [video_uri(v) for v in chunk]}))
    tmp.rename(path)


def write_real_store(root: Path, clips: int, shard_bytes: int) -> str:
    """A small complete store of real JPEG frames and real-shaped targets, written by the real writer."""
    from pipeline.store import encode_target, write_store

    if (root / "manifest.parquet").exists():
        return str(root)
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, SIZE, dtype=np.float32)

    def clip_rows() -> Iterator[dict]:
        for c, row in enumerate(make_shard(0, clips, clips).index.to_pylist()):
            base = ramp[None, :, None] + ramp[:, None, None] * 0.2 + np.float32([0, 20, 40]) + 5 * (c % 7)
            frames = np.clip(base[None] + rng.integers(-8, 9, (CLIP_FRAMES, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            target = encode_target(rng.normal(size=(TOKENS, DIM)).astype(np.float32), "float16")
            yield {**row, "frames": frames, "target": target}

    write_store(str(root), store_schema(2), clip_rows(), shard_bytes=shard_bytes)
    return str(root)


# ---------------------------------------------------------------------------------------------- v1 code

def load_v1(directory: Path) -> tuple[Any, Any]:
    """(v1_store, v1_data): layout v1's pipeline/store.py and student/data.py from git, written to
    `directory` with their `from pipeline.store import` pointed at v1_store, and imported."""
    if "v1_store" not in sys.modules:
        directory.mkdir(parents=True, exist_ok=True)
        for source, target in (("pipeline/store.py", "v1_store.py"), ("student/data.py", "v1_data.py")):
            if not (directory / target).exists():
                text = subprocess.run(["git", "show", f"{V1_COMMIT}:{source}"], cwd=REPO, check=True,
                                      capture_output=True, text=True).stdout
                (directory / target).write_text(text.replace("from pipeline.store import", "from v1_store import"))
        sys.path.insert(0, str(directory))
    import v1_data
    import v1_store

    return v1_store, v1_data


# ---------------------------------------------------------------------------------------------- measuring (child)

class Meter:
    """Wall and CPU time and peak RSS of a block, above `base` (default: the RSS right before the block).
    The kernel's peak (VmHWM) is reset to the current RSS at entry, so imports and earlier work do not count."""

    def __init__(self, base: int | None = None):
        self.base = base

    def __enter__(self) -> "Meter":
        gc.collect()
        rss = _status_kb("VmRSS")
        self.base = rss if self.base is None else self.base
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.cpu0
        self.peak_mb = (_status_kb("VmHWM") - self.base) / 1024

    def result(self) -> dict:
        return {"s": round(self.seconds, 4), "cpu_s": round(self.cpu, 4), "rss_mb": round(self.peak_mb, 1)}


def _status_kb(key: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def first_batch_rows(sd: Any, info: Any, plan: Any, rank: int) -> list[tuple[int, int]]:
    """(shard, row) of each clip of the rank's first batch, opening its shards as a loader worker does."""
    from student.data.shards import Shards

    stream, first = sd.rank_batches(plan, rank, 0)
    order = plan.order(stream)
    order.skip(first)
    shards, ks = plan.locate(stream, order.take(plan.batch_size))
    opened = Shards(info, plan.rows)
    return [(int(s), int(opened.open(int(s)).rows[int(k)])) for s, k in zip(shards, ks)]


def measure(job: dict) -> dict:
    """One measurement, in this (fresh) process."""
    kind, root, loader = job["kind"], job["root"], job.get("loader", {})
    if kind == "open_store":
        from pipeline.store import open_store

        with Meter() as m:
            store = open_store(root)
        return {"open_store": m.result(), "clips": store.num_clips}
    if kind in ("trainer", "trainer_v1"):
        sd = load_v1(Path(job["v1_dir"]))[1] if kind == "trainer_v1" else importlib.import_module("student.data")
        rank = loader["rank"]
        with Meter() as m:
            info = sd.read_store(root)
            data = sd.TrainData(info, fmt="webdataset", batch_size=loader["batch_size"], rank=rank,
                                world_size=loader["world_size"], num_workers=loader["num_workers"])
            plan = data.plan(0)
            if kind == "trainer":
                rows = first_batch_rows(sd, info, plan, rank)
            else:   # v1 holds every clip id in memory already
                stream, first = sd.rank_batches(plan, rank, 0)
                positions = plan.order(stream)[first:first + plan.batch_size]
                rows = [(int(s), int(r)) for s, r in plan.rows[stream, positions]]
        return {"trainer": m.result(), "first_batch_shards": len({s for s, _ in rows})}
    if kind in ("extract", "extract_v1"):
        spec = StoreSpec(**job["spec"])
        uris = pq.read_table(job["inputs"]).column("video_uri").combine_chunks()
        if kind == "extract":
            from pipeline.store import StoreWriter

            writer = StoreWriter(root, store_schema(2), storage_options={})
            with Meter() as prep:
                pending = writer.prepare().pending(uris).num_rows
        else:
            v1_store = load_v1(Path(job["v1_dir"]))[0]
            uris = uris.to_pylist()     # v1's list_videos gave the job a Python list
            writer = v1_store.StoreWriter(root, store_schema(1), storage_options={})
            with Meter() as prep:
                progress = writer.prepare()
                pending = len([u for u in uris if not progress.done(u)])
        with Meter(base=prep.base) as fin:
            writer.mark_incomplete()
            extra = make_shard(*spec.clip_range(spec.shards))
            write_v2_shard(Path(root), extra) if kind == "extract" else write_v1_shard(Path(root), extra)
            summary = writer.finalise(written=[extra.name])["summary"]
        return {"prepare": prep.result(), "finalise": fin.result(), "pending": pending, "summary": summary}
    if kind == "first_batch":
        import student.data as sd

        with Meter() as start:
            info = sd.read_store(root)
            batches = sd.TrainData(info, fmt="webdataset", batch_size=loader["batch_size"], num_workers=0).epoch(0)
        with Meter(base=start.base) as batch:
            got = next(iter(batches))
        return {"start": start.result(), "batch": batch.result(), "clips": len(got["clip_id"]),
                "frames": list(got["frames"].shape), "target": list(got["target"].shape)}
    raise ValueError(f"unknown measurement {kind!r}")


# ---------------------------------------------------------------------------------------------- running (parent)

@dataclass
class Bench:
    workdir: Path
    clips_per_shard: int = 1000
    v1_max: int = 10 ** 7
    cap_gb: float = 16.0
    timeout_s: float = 600.0
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    repeat: int = 3     # v2 measurements: the median of this many runs (the box is shared and noisy)
    loader: dict = field(default_factory=lambda: {"world_size": 64, "rank": 0, "num_workers": 8, "batch_size": 32})

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)

    def child(self, label: str, job: dict, may_kill: bool = False) -> dict:
        """Run `measure(job)` in a fresh interpreter; kill it past cap_gb of RSS or timeout_s: then
        {"killed": why} if `may_kill` (v1), else an error."""
        result, log = self.workdir / "logs" / f"{label}.json", self.workdir / "logs" / f"{label}.log"
        result.unlink(missing_ok=True)
        job = {**job, "result": str(result), "v1_dir": str(self.workdir / "v1-code"), "loader": self.loader}
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--measure", json.dumps(job)],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        t0 = time.time()
        while proc.poll() is None:
            try:
                rss = _status_kb("VmRSS", str(proc.pid)) * 1024
            except (FileNotFoundError, KeyError):     # exiting
                rss = 0
            if rss > self.cap_gb * 2 ** 30 or time.time() - t0 > self.timeout_s:
                proc.kill()
                proc.wait()
                why = f"killed at {rss / 2 ** 30:.1f} GB RSS after {time.time() - t0:.0f} s"
                if not may_kill:
                    raise RuntimeError(f"{label}: {why}")
                return {"killed": why}
            time.sleep(0.05)
        if proc.returncode:
            raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        return json.loads(result.read_text())

    def median(self, label: str, job: dict, restore: tuple | None = None) -> dict:
        """The median of `repeat` runs of a measurement, number by number."""
        runs = []
        for i in range(self.repeat):
            with self.restored(*restore) if restore else contextlib.nullcontext():
                runs.append(self.child(f"{label}-{i}", job))
        return _median(runs)

    @contextmanager
    def restored(self, root: Path, spec: StoreSpec, version: int) -> Iterator[None]:
        """An extract measurement commits a shard and rewrites the top-level files: afterwards the cached
        store is put back as fabricated (hard links keep the originals, since writes replace files)."""
        backup = root.with_name(root.name + ".top")
        shutil.rmtree(backup, ignore_errors=True)
        backup.mkdir()
        top = ["store.json", "manifest.parquet"] if version == 2 else ["store.json", "index.parquet", "errors.parquet"]
        for name in top:
            os.link(root / name, backup / name)
        try:
            yield
        finally:
            extra = make_shard(*spec.clip_range(spec.shards)).name
            for path in (root / "index" / f"{extra}.parquet", root / "_commits" / f"{extra}.json",
                         root / "_commits" / f"{extra}.stats.npy", root / "_commits" / "manifest.parquet"):
                path.unlink(missing_ok=True)
            shutil.rmtree(root / "_tmp", ignore_errors=True)
            for name in top:
                os.replace(backup / name, root / name)
            backup.rmdir()

    def measure_size(self, clips: int, v1_before: dict | None = None) -> dict:
        """One table row. `v1_before`: the row of the size before, to project v1's cost from."""
        spec = StoreSpec(clips, self.clips_per_shard)
        print(f"\n== {size(clips)} clips, {spec.shards} shards, {spec.videos} videos", flush=True)
        inputs = self.workdir / f"inputs-{clips}.parquet"
        write_inputs(spec, inputs)
        root = self.workdir / spec.name(2)
        made = fabricate(spec, 2, root, self.jobs)
        row: dict[str, Any] = {"clips": clips, "shards": spec.shards, "videos": spec.videos,
                               "store_mb": round(made["bytes"] / 1e6, 1), "fabricate_s": made["seconds"]}
        label = spec.name(2)
        opened = self.median(f"{label}-open_store", {"kind": "open_store", "root": str(root)})
        assert opened["clips"] == clips, opened
        row.update(_columns("open_store", opened["open_store"]))
        trainer = self.median(f"{label}-trainer", {"kind": "trainer", "root": str(root)})
        row.update(_columns("trainer_start", trainer["trainer"]))
        extract = self.median(f"{label}-extract", {"kind": "extract", "root": str(root), "inputs": str(inputs),
                                                   "spec": asdict(spec)}, restore=(root, spec, 2))
        assert extract["pending"] == 0 and extract["summary"]["clips"] == clips + spec.clips_per_shard, extract
        row.update(_extract_columns("", extract))
        row.update(self.measure_v1(spec, inputs, v1_before))
        print("  " + json.dumps(row), flush=True)
        return row

    def measure_v1(self, spec: StoreSpec, inputs: Path, before: dict | None) -> dict:
        """v1 columns (None where skipped, with the reason in v1_note)."""
        cols: dict[str, Any] = {k: None for k in V1_COLUMNS}
        if spec.clips > self.v1_max:
            return {**cols, "v1_note": f"v1 skipped: above --v1-max {size(self.v1_max)}"}
        skip = {part: self.v1_projection(spec, before, part) for part in ("trainer", "extract")}
        notes = [f"v1 {part} {why}" for part, why in skip.items() if why]
        if all(skip.values()):
            return {**cols, "v1_note": "; ".join(notes)}
        root = self.workdir / spec.name(1)
        fabricate(spec, 1, root, self.jobs)
        label = spec.name(1)
        if not skip["trainer"]:
            got = self.child(f"{label}-trainer", {"kind": "trainer_v1", "root": str(root)}, may_kill=True)
            if "killed" in got:
                notes.append(f"v1 trainer {got['killed']}")
            else:
                cols.update(_columns("v1_trainer_start", got["trainer"]))
        if not skip["extract"]:
            with self.restored(root, spec, 1):
                got = self.child(f"{label}-extract", {"kind": "extract_v1", "root": str(root), "inputs": str(inputs),
                                                      "spec": asdict(spec)}, may_kill=True)
            if "killed" in got:
                notes.append(f"v1 extract {got['killed']}")
            else:
                cols.update(_extract_columns("v1_", got))
        return {**cols, "v1_note": "; ".join(notes) or None}

    def v1_projection(self, spec: StoreSpec, before: dict | None, part: str) -> str | None:
        """Why to skip a v1 measurement: the size before was killed, or linear growth from it passes
        cap_gb or timeout_s."""
        if before is None:
            return None
        s_key, rss_key = (("v1_trainer_start_s", "v1_trainer_start_rss_mb") if part == "trainer"
                          else ("v1_extract_prepare_finalise_s", "v1_extract_peak_rss_mb"))
        if before.get(s_key) is None:
            return f"skipped: not measured at {size(before['clips'])}"
        scale = spec.clips / before["clips"]
        s, gb = before[s_key] * scale, before[rss_key] * scale / 1024
        if gb > self.cap_gb or s > self.timeout_s:
            return f"skipped: projected {gb:.0f} GB / {s:.0f} s from {size(before['clips'])}"
        return None

    def first_batch(self, clips: int = 32, batch_size: int = 8) -> dict:
        root = write_real_store(self.workdir / "real-store", clips, shard_bytes=8 << 20)
        got = self.child("real-first_batch", {"kind": "first_batch", "root": root,
                                              "loader": {**self.loader, "batch_size": batch_size}})
        return {"store_clips": clips, "batch_size": batch_size, **got}


V1_COLUMNS = [f"v1_{part}_{unit}" for part in ("trainer_start", "extract_prepare", "extract_finalise")
              for unit in ("s", "cpu_s", "rss_mb")]
V1_COLUMNS += ["v1_extract_prepare_finalise_s", "v1_extract_prepare_finalise_cpu_s", "v1_extract_peak_rss_mb"]


def _columns(name: str, meter: dict) -> dict:
    return {f"{name}_s": meter["s"], f"{name}_cpu_s": meter["cpu_s"], f"{name}_rss_mb": meter["rss_mb"]}


def _extract_columns(prefix: str, got: dict) -> dict:
    p, f = got["prepare"], got["finalise"]
    return {**_columns(f"{prefix}extract_prepare", p), **_columns(f"{prefix}extract_finalise", f),
            f"{prefix}extract_prepare_finalise_s": round(p["s"] + f["s"], 4),
            f"{prefix}extract_prepare_finalise_cpu_s": round(p["cpu_s"] + f["cpu_s"], 4),
            f"{prefix}extract_peak_rss_mb": max(p["rss_mb"], f["rss_mb"])}


def _median(runs: list[Any]) -> Any:
    if isinstance(runs[0], dict):
        return {k: _median([r[k] for r in runs]) for k in runs[0]}
    if isinstance(runs[0], (int, float)) and not isinstance(runs[0], bool):
        return float(np.median(runs)) if isinstance(runs[0], float) else int(np.median(runs))
    return runs[0]


# ---------------------------------------------------------------------------------------------- reporting

TABLE = [("clips", "clips", None), ("shards", "shards", None),
         ("trainer start s (CPU)", "trainer_start_s", "trainer_start_cpu_s"), ("MB", "trainer_start_rss_mb", None),
         ("open_store s (CPU)", "open_store_s", "open_store_cpu_s"), ("MB", "open_store_rss_mb", None),
         ("prepare s (CPU)", "extract_prepare_s", "extract_prepare_cpu_s"), ("MB", "extract_prepare_rss_mb", None),
         ("finalise s (CPU)", "extract_finalise_s", "extract_finalise_cpu_s"), ("MB", "extract_finalise_rss_mb", None),
         ("v1 trainer start s (CPU)", "v1_trainer_start_s", "v1_trainer_start_cpu_s"),
         ("MB", "v1_trainer_start_rss_mb", None),
         ("v1 prepare+finalise s (CPU)", "v1_extract_prepare_finalise_s", "v1_extract_prepare_finalise_cpu_s"),
         ("MB", "v1_extract_peak_rss_mb", None)]
# What must stay flat or grow at most as the shards do: (time in CPU seconds, robust on a shared box; RSS)
SCALING = [("trainer start", "trainer_start_cpu_s", "trainer_start_rss_mb"),
           ("open_store", "open_store_cpu_s", "open_store_rss_mb"),
           ("extract prepare", "extract_prepare_cpu_s", "extract_prepare_rss_mb"),
           ("extract finalise", "extract_finalise_cpu_s", "extract_finalise_rss_mb")]


def size(n: int) -> str:
    """1e7 for 10000000; small or uneven numbers as they are."""
    exponent = round(math.log10(n)) if n > 0 else 0
    return f"1e{exponent}" if n == 10 ** exponent and n >= 10_000 else str(n)


def markdown(rows: list[dict]) -> str:
    def number(value: float) -> str:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"

    def cell(key: str, cpu: str | None, row: dict) -> str:
        if row.get(key) is None:
            return "–"
        if key in ("clips", "shards"):
            return size(row[key])
        return number(row[key]) + (f" ({number(row[cpu])})" if cpu else "")

    lines = ["| " + " | ".join(h for h, *_ in TABLE) + " |", "|" + "---:|" * len(TABLE)]
    lines += ["| " + " | ".join(cell(k, cpu, r) for _, k, cpu in TABLE) + " |" for r in rows]
    notes = [f"- {size(r['clips'])}: {r['v1_note']}" for r in rows if r.get("v1_note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def goals(rows: list[dict]) -> list[dict]:
    """The issue's goals: the trainer's at the largest size, extraction's at every size, and over the last
    factor of sizes measured, each cost's log-log slope against the shard count (flat: 0; O(shards): 1)
    and its cost per added shard."""
    last = rows[-1]
    out = [{"goal": f"trainer rank start at {size(last['clips'])} clips <= {GOALS['trainer_start_s']:g} s",
            "value": last["trainer_start_s"], "met": last["trainer_start_s"] <= GOALS["trainer_start_s"]},
           {"goal": f"trainer rank start at {size(last['clips'])} clips <= 1 GB above baseline (MB)",
            "value": last["trainer_start_rss_mb"],
            "met": last["trainer_start_rss_mb"] <= GOALS["trainer_start_rss_mb"]},
           {"goal": "extraction prepare+finalise peak RSS <= 2 GB at every size (MB)",
            "value": max(r["extract_peak_rss_mb"] for r in rows),
            "met": all(r["extract_peak_rss_mb"] <= GOALS["extract_peak_rss_mb"] for r in rows)}]
    if len(rows) > 1:
        before = rows[-2]
        span = f"{size(before['clips'])} -> {size(last['clips'])}"
        added = last["shards"] - before["shards"]
        for name, cpu, rss in SCALING:
            for key, unit, scale in ((cpu, "ms CPU", 1000), (rss, "KB", 1024)):
                growth = max(last[key], 1e-3) / max(before[key], 1e-3)
                slope = math.log(growth) / math.log(last["shards"] / before["shards"])
                # 1.2: room for noise; a cost growing faster than the shards is what this is here to catch
                out.append({"goal": f"{name} {'time' if key == cpu else 'RSS'} flat or O(shards), {span}",
                            "value": f"slope {slope:.2f}, {(last[key] - before[key]) / added * scale:.3g} {unit}/shard",
                            "met": slope <= 1.2})
    return out


def plot(rows: list[dict], path: Path, per_shard: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=90)
    series = [("trainer rank start", "trainer_start_s", "trainer_start_rss_mb", "C0"),
              ("open_store", "open_store_s", "open_store_rss_mb", "C2"),
              ("extract prepare+finalise", "extract_prepare_finalise_s", "extract_peak_rss_mb", "C1")]
    for ax, what in zip(axes, ("s", "rss")):
        for label, s_col, rss_col, colour in series:
            for version, style in (("v2", "-o"), ("v1", "--s")):
                col = s_col if what == "s" else rss_col
                col = col if version == "v2" else f"v1_{col}"
                # floored for the log axis: RSS deltas can be ~0 (or below when the allocator returns memory)
                pts = [(r["clips"], max(r[col], 1e-3 if what == "s" else 0.1)) for r in rows if r.get(col) is not None]
                if pts:
                    ax.plot(*zip(*pts), style, color=colour, label=f"{version} {label}", ms=4)
        lines = ([(GOALS["trainer_start_s"], "trainer goal 10 s")] if what == "s" else
                 [(GOALS["trainer_start_rss_mb"], "trainer goal 1 GB"),
                  (GOALS["extract_peak_rss_mb"], "extract goal 2 GB")])
        for y, text in lines:
            ax.axhline(y, color="grey", lw=0.8, ls=":")
            ax.text(rows[0]["clips"], y * 1.08, text, fontsize=7, color="grey")
        ax.set(xscale="log", yscale="log", xlabel=f"clips in the store ({per_shard:,} per shard)",
               ylabel="wall seconds" if what == "s" else "peak RSS above baseline, MB",
               title="time" if what == "s" else "memory")
        ax.grid(True, which="major", lw=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", default="1e4,1e5,1e6", help="store sizes, comma-separated (1e4,1e5,...)")
    p.add_argument("--json", required=True, help="write the rows, the first real batch and the goals here")
    p.add_argument("--workdir", default="/tmp/liteframe-scale", help="cache of fabricated stores")
    p.add_argument("--plot", default=str(REPO / "bench" / "scale.png"), help="log-log PNG")
    p.add_argument("--v1-max", default="1e7", help="largest size measured with layout v1")
    p.add_argument("--clips-per-shard", type=int, default=1000)
    p.add_argument("--cap-gb", type=float, default=16.0, help="kill (v1) measurements past this RSS")
    p.add_argument("--timeout", type=float, default=600.0, help="kill measurements past this many seconds")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes fabricating stores")
    p.add_argument("--repeat", type=int, default=3, help="v2 measurements: median of this many runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bench = Bench(Path(args.workdir), args.clips_per_shard, int(float(args.v1_max)), args.cap_gb, args.timeout,
                  args.jobs, args.repeat)
    rows: list[dict] = []
    for clips in sorted(int(float(c)) for c in args.clips.split(",")):
        rows.append(bench.measure_size(clips, rows[-1] if rows else None))
    first = bench.first_batch()
    checked = goals(rows)
    report = {"rows": rows, "first_real_batch": first, "goals": checked, "loader": bench.loader,
              "clips_per_video": CLIPS_PER_VIDEO, "clips_per_shard": args.clips_per_shard,
              "target": [TOKENS, DIM, "float16"]}
    Path(args.json).write_text(json.dumps(report, indent=1))
    print("\n" + markdown(rows))
    start, batch = first["start"], first["batch"]
    print(f"\nfirst real batch ({first['store_clips']}-clip store of 448 px JPEG clips, batch {first['batch_size']}): "
          f"rank start {start['s']:.3f} s ({start['cpu_s']:.3f} CPU), then the batch {batch['s']:.3f} s "
          f"({batch['cpu_s']:.3f} CPU), peak {max(start['rss_mb'], batch['rss_mb']):.0f} MB above baseline")
    for g in checked:
        mark = "" if g["met"] is None else (" ✔" if g["met"] else " ✘")
        print(f"  {g['goal']}: {g['value']}{mark}")
    if args.plot:
        plot(rows, Path(args.plot), args.clips_per_shard)
        print(f"plot: {args.plot} ({Path(args.plot).stat().st_size / 1e3:.0f} KB)")
    return report


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        job = json.loads(sys.argv[2])
        Path(job["result"]).write_text(json.dumps(measure(job)))
        sys.stdout.flush()
        # skip interpreter teardown: pyarrow's thread pools abort it now and then here ("terminate called
        # without an active exception", apache/arrow#34314), after the result is written
        os._exit(0)
    else:
        main()
