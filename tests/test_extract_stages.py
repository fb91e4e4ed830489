"""The extraction stages without Ray: inputs, decode with error rows, the whole chain in one process."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.extract import ExtractConfig, store_schema
from pipeline.clips import ClipSpec
from pipeline.compress import Compression
from pipeline.config import parse_bytes, parse_config
from pipeline.stages import (BUSY_WINDOW_S, BusyClock, DecodeOptions, TeacherStage, WriteSummary, decode_videos,
                             list_videos, stored_target, write_shards)
from pipeline.store import StoreError, StoreWriter, decode_target, encode_target, open_store


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from pipeline.samples import make_video

    root = tmp_path_factory.mktemp("inputs")
    make_video(root / "a.mp4", seconds=1.5, fps=10, size=(96, 64))
    (root / "nested").mkdir()
    make_video(root / "nested" / "b.mkv", seconds=1.0, fps=8, size=(64, 64))
    (root / "notes.txt").write_text("not an input")
    (root / "bad.mp4").write_bytes(b"\0" * 100)
    return root


def test_list_videos_folder_glob_parquet_file(folder, tmp_path):
    assert list_videos(str(folder)).to_pylist() == [str(folder / "a.mp4"), str(folder / "bad.mp4"),
                                        str(folder / "nested" / "b.mkv")]
    assert list_videos(str(folder / "*.mp4")).to_pylist() == [str(folder / "a.mp4"), str(folder / "bad.mp4")]
    assert list_videos(str(folder / "a.mp4")).to_pylist() == [str(folder / "a.mp4")]
    listing = tmp_path / "list.parquet"
    pq.write_table(pa.table({"video_uri": ["s3://b/y.mp4", "s3://b/x.mp4", "s3://b/x.mp4"]}), listing)
    assert list_videos(str(listing)).to_pylist() == ["s3://b/x.mp4", "s3://b/y.mp4"]
    pq.write_table(pa.table({"name": ["x"]}), tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="video column"):
        list_videos(str(tmp_path / "wrong.parquet"))
    with pytest.raises(FileNotFoundError):
        list_videos(str(folder / "missing"))


def test_parse_bytes():
    assert parse_bytes("512MB") == 512 * 10 ** 6
    assert parse_bytes("1GiB") == 1 << 30
    assert parse_bytes("40KB") == 40_000
    assert parse_bytes("4096") == 4096


def test_config_flags():
    cfg = parse_config(ExtractConfig, ["--input", "in", "--output", "out", "--teacher", "t", "--format", "zarr",
                                       "--fps", "1-4", "--factors", "4,2,2", "--views", "3", "--clip-frames", "8"])
    assert cfg.formats == ("zarr",) and cfg.fps == (1.0, 4.0) and cfg.factors == (4, 2, 2)
    assert cfg.views == 3 and cfg.clip_frames == 8
    with pytest.raises(SystemExit):
        parse_config(ExtractConfig, ["--input", "in"])


def test_the_stages_run_in_one_process(folder, tmp_path):
    """decode (+ frame encoding) -> teacher -> write without Ray, as the job chains them; a bad input
    becomes an error row."""
    from pipeline.store import decode_frame, frame_column
    from pipeline.testing import make_tiny_teacher

    teacher = str(make_tiny_teacher(tmp_path / "teacher", "dinov2", image_size=56, hidden_size=32))
    cfg = ExtractConfig(input=str(folder), output=str(tmp_path / "store"), teacher=teacher, size=64,
                        compression="avg", factors=(2, 2, 2), views=2, formats=("webdataset",), frame_encoding="png")
    stage = TeacherStage(teacher, compression=Compression("avg", (2, 2, 2)), device="cpu", dtype="float32",
                         keep_frames=False)
    store = StoreWriter(cfg.output, store_schema(cfg, stage.teacher.describe()))
    store.prepare()
    options = DecodeOptions(clip_spec=ClipSpec(frames=4, views=2), size=64, chunk_clips=2, frame_encoding="png")
    videos = list_videos(cfg.input).to_pylist()
    batches = decode_videos({"video_uri": videos, "skip": [[] for _ in videos]}, options=options, store=store)

    def teacher_stage(batch):
        seen = batch["frames"].copy()
        out = stage(batch)
        assert "frames" not in out       # the raw frames stop at the teacher; the store gets the encoded ones
        for i in range(seen.shape[1]):   # ... which are what the teacher saw (PNG: bit for bit)
            assert all(np.array_equal(decode_frame(b, "png"), f) for b, f in zip(out[frame_column(i)], seen[:, i]))
        return out

    summary = write_shards(store, (teacher_stage(b) for b in batches), shard_bytes=1 << 30)
    schema = store.finalise(written=summary.shards)
    out = open_store(cfg.output)
    assert out.num_clips == summary.clips == schema["summary"]["clips"] > 0
    assert set(out.read_index().column("video_uri").to_pylist()) == {str(folder / "a.mp4"),
                                                                     str(folder / "nested" / "b.mkv")}
    assert out.read_errors().column("video_uri").to_pylist() == [str(folder / "bad.mp4")]
    assert store.prepare().done(str(folder / "bad.mp4"))


def test_partly_committed_video_decodes_only_its_missing_clips(folder):
    from pipeline.stages import decode_video

    options = DecodeOptions(clip_spec=ClipSpec(frames=4, views=2), size=64, chunk_clips=2)
    uri = str(folder / "a.mp4")
    full = [c for b in decode_video(uri, options) for c in b["clip_id"].tolist()]
    assert len(full) >= 2
    rest = [b for b in decode_video(uri, options, skip=full[:1])]
    assert [c for b in rest for c in b["clip_id"].tolist()] == full[1:]
    assert all((b["video_clips"] == len(full)).all() for b in rest)


def _rounding_cases() -> np.ndarray:
    """Random targets plus the values where casts differ: float16 overflow/subnormals and bf16 ties."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, 4084).astype(np.float32)
    ties = (rng.integers(0x3F80, 0x4780, 64, dtype=np.uint32) << 16 | 0x8000).view(np.float32)   # half-way
    special = np.array([0.0, -0.0, 65504.0, 65520.0, 7e4, -7e4, 6e-8, 3e-8, 1e-5, -2.5e-6, 1e-40, 3.0e38],
                       dtype=np.float32)
    return np.concatenate([x, ties, ties + np.float32(1e-3), special]).reshape(-1, 4, 8)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stored_target_bytes_are_encode_targets(dtype):
    """The torch path (cast on the device) stores exactly the bytes the store's numpy encoder gives."""
    x = _rounding_cases()
    got = stored_target(torch.from_numpy(x), dtype)
    with np.errstate(over="ignore"):        # 7e4 overflows float16 to inf, on both paths
        want = encode_target(x, dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()
    bf16 = torch.from_numpy(x).to(torch.bfloat16)        # the teacher's output dtype on a GPU
    with np.errstate(over="ignore"):
        assert stored_target(bf16, dtype).tobytes() == encode_target(bf16.float().numpy(), dtype).tobytes()
    with pytest.raises(StoreError, match="target dtype"):
        stored_target(torch.from_numpy(x), "float8")


def test_busy_clock_counts_overlapping_calls_once():
    now = [0.0]
    clock = BusyClock(clock=lambda: now[0])
    reported = []
    for t, event in [(0, "start"), (1, "start"), (2, "stop"), (5, "stop"), (10, "start"), (11, "stop")]:
        now[0] = float(t)
        if event == "start":
            clock.start()
        else:
            reported.append(clock.stop())
    # calls [0, 2] and [1, 5] overlap: busy 5 s, not 2 + 4; then [10, 11]
    assert reported == [2.0, 3.0, 1.0]


def test_teacher_stage_concurrent_calls(tmp_path):
    """Two calls in flight at once (the job's actor concurrency): each gets its own targets (an
    intermediate layer, captured per thread) and the busy time is no more than the wall time."""
    from pipeline.testing import make_tiny_teacher

    teacher = str(make_tiny_teacher(tmp_path / "teacher", "dinov2", image_size=56, hidden_size=32, num_layers=2))
    stage = TeacherStage(teacher, compression=Compression("wap", (2, 2, 2)), layer=1, device="cpu",
                         dtype="float32", target_dtype="bfloat16")
    rng = np.random.default_rng(1)
    batches = [{"frames": rng.integers(0, 256, (3, 4, 56, 56, 3), dtype=np.uint8)} for _ in range(6)]
    alone = [stage(dict(b))["target"] for b in batches]
    out: dict[int, dict] = {}

    def run(indices):
        for i in indices:
            out[i] = stage(dict(batches[i]))

    threads = [threading.Thread(target=run, args=(range(k, len(batches), 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = WriteSummary()
    for i, b in enumerate(batches):
        assert out[i]["target"].dtype == np.uint16
        np.testing.assert_allclose(decode_target(out[i]["target"], "bfloat16"), decode_target(alone[i], "bfloat16"),
                                   rtol=1e-2, atol=1e-3)
        for busy, ready, done in zip(out[i]["teacher_busy"], out[i]["teacher_ready"], out[i]["teacher_done"]):
            summary.add_teacher_call(str(out[i]["teacher_actor"][0]), busy, ready, done)
    assert 0 < summary.busy_fraction() <= 1.0
    assert sum(b for b, _, _ in summary.windows.values()) == pytest.approx(sum(b for b, _, _ in summary.teacher.values()))
    assert sum(c for _, c, _ in summary.windows.values()) == sum(len(out[i]["target"]) for i in range(len(batches)))


def test_timeline_shows_a_teacher_starved_after_the_head_start():
    """Two actors busy the whole first 90 s (frames decoded during their start-up), then half the
    time: the whole-job fraction averages the two; the timeline shows when the starving began and
    the clips/s that followed, and a long job's timeline stays short (windows double). The steady
    state is taken while decode ran: past the first window, before decode's last."""
    summary = WriteSummary()
    t0 = 1_000_000 * BUSY_WINDOW_S          # a window boundary
    for actor in ("a", "b"):
        for second in range(180):       # one 1-s call per second: 4 clips busy 1 s, then 2 clips in 0.5 s
            summary.add_teacher_call(actor, 1.0 if second < 90 else 0.5, t0, t0 + second + 0.5,
                                     clips=4 if second < 90 else 2)
    for second in range(-20, 165):      # decode: 6 clips/s from before the teachers were ready, done at 165 s
        summary.add_decoded(t0 + second + 0.2, clips=6)
    timeline = summary.timeline()
    assert (timeline.start, timeline.end, timeline.width) == (t0, t0 + 179.5, BUSY_WINDOW_S)
    assert timeline.busy == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5], abs=0.01)
    assert timeline.clips_per_s == pytest.approx([8, 8, 8, 4, 4, 4], abs=0.1)
    assert timeline.decoded_per_s == pytest.approx([6, 6, 6, 6, 6, 90 / 29.5], abs=0.01)   # the last: 15 s of 29.5
    assert timeline.text(timeline.busy).startswith("per 30 s: 1.00 1.00 1.00 0.50")
    steady = timeline.while_decoding()          # windows 1-4: [30 s, 150 s)
    assert (steady.since, steady.until) == (t0 + 30, t0 + 150)
    assert (steady.busy, steady.clips_per_s, steady.decoded_per_s) == (
        pytest.approx(0.75, abs=0.01), pytest.approx(6, abs=0.1), pytest.approx(6, abs=0.01))
    assert WriteSummary().timeline().while_decoding() is None
    assert summary.busy_fraction() == pytest.approx(0.75, abs=0.01)
    coarse = summary.timeline(max_points=4)
    assert coarse.width == 2 * BUSY_WINDOW_S and coarse.busy == pytest.approx([1, 0.75, 0.5], abs=0.01)
    whole = WriteSummary().add(summary).add(WriteSummary())      # merging keeps the windows
    assert whole.timeline() == summary.timeline()
    short = WriteSummary()      # a run shorter than a window: its span, not the window, is the base
    short.add_teacher_call("a", 4.0, t0 + 10, t0 + 15, clips=10)
    assert short.timeline().busy == [pytest.approx(0.8)] and short.timeline().clips_per_s == [pytest.approx(2.0)]


def test_teacher_stage_leaves_grad_mode_alone(tmp_path):
    """The stage runs in-process too (benchmarks, notebooks, these tests): building or calling it
    must not switch autograd off for the rest of the process."""
    from pipeline.compress import Compression
    from pipeline.stages import TeacherStage
    from pipeline.testing import make_tiny_teacher

    teacher = make_tiny_teacher(tmp_path / "t", "siglip", image_size=56)
    stage = TeacherStage(str(teacher), compression=Compression("avg", (2, 2, 2)))
    stage({"frames": np.zeros((1, 2, 56, 56, 3), dtype=np.uint8)})
    assert torch.is_grad_enabled()


def test_non_finite_targets_become_clip_errors_not_shard_data(tmp_path):
    """A clip whose teacher tokens overflow float16 leaves the batch as an error row of its own;
    the rest of the batch goes on to the writer and the video still completes."""
    from pipeline.compress import Compression
    from pipeline.stages import TeacherStage
    from pipeline.store import StoreWriter
    from pipeline.testing import make_tiny_teacher
    from tests.test_store import schema

    teacher = make_tiny_teacher(tmp_path / "t", "siglip", image_size=56)
    writer = StoreWriter(str(tmp_path / "store"), schema())
    writer.prepare()
    stage = TeacherStage(str(teacher), compression=Compression("avg", (2, 2, 2)), store=writer)
    encode = stage.teacher.encode
    scale = torch.tensor([1.0, 1e9, 1.0]).view(3, 1, 1, 1, 1)
    stage.teacher.encode = lambda frames: encode(frames) * scale   # clip 1 far beyond float16's 65504
    ids = np.array(["v-v0-c00000", "v-v0-c00001", "v-v0-c00002"])
    batch = {"frames": np.zeros((3, 2, 56, 56, 3), dtype=np.uint8), "clip_id": ids,
             "video_uri": np.array(["/v.mp4"] * 3), "video_clips": np.array([3, 3, 3])}
    out = stage(batch)
    assert out["clip_id"].tolist() == ["v-v0-c00000", "v-v0-c00002"] and len(out["target"]) == 2
    assert np.isfinite(out["target"]).all()
    errors = writer.read_errors().to_pylist()
    assert [(e["clip_id"], e["error_type"], e["stage"]) for e in errors] == [
        ("v-v0-c00001", "NonFiniteTargetError", "teacher")]
    assert writer.prepare().partial["/v.mp4"] == {"v-v0-c00001"}   # accounted for: never redone


def test_the_job_passes_its_input_limits_to_decode_and_the_store(tmp_path):
    """--allow-schemes / --max-duration / --max-pixels reach every decode; the limits that change
    plans are part of the store's identity; a refused scheme is an error row, never a request."""
    from jobs.extract import decode_task_memory, input_policy
    from pipeline.video import decode_memory

    cfg = parse_config(ExtractConfig, ["--input", "in", "--output", str(tmp_path / "s"), "--teacher", "t",
                                       "--max-duration", "60", "--max-pixels", "1000000", "--allow-schemes", "gs,https"])
    policy = input_policy(cfg)
    assert (policy.allow_schemes, policy.max_duration, policy.max_pixels) == (("gs", "https"), 60.0, 1_000_000)
    teacher = {"name_or_path": "t", "dim": 8, "grid": [4, 4]}
    assert store_schema(cfg, teacher)["clip"]["max_duration"] == 60.0
    other = parse_config(ExtractConfig, ["--input", "in", "--output", "o", "--teacher", "t"])
    assert store_schema(cfg, teacher)["config_hash"] != store_schema(other, teacher)["config_hash"]
    assert decode_task_memory(cfg, 2) == decode_memory(cfg.size, cfg.chunk_clips * cfg.clip_frames, 2, policy)
    assert decode_task_memory(parse_config(ExtractConfig, ["--input", "i", "--output", "o", "--teacher", "t",
                                                           "--decode-memory", "3GB"]), 1) == 3 * 10 ** 9

    store = StoreWriter(str(tmp_path / "s"), store_schema(cfg, teacher))
    store.prepare()
    options = DecodeOptions(clip_spec=ClipSpec(frames=4), size=64, policy=policy)
    out = list(decode_videos({"video_uri": ["ftp://host/a.mp4", "memory://a.mp4"], "skip": [[], []]},
                             options=options, store=store))
    assert out == []
    rows = store.read_errors().to_pylist()
    assert sorted((r["video_uri"], r["error_type"]) for r in rows) == [
        ("ftp://host/a.mp4", "InputNotAllowedError"), ("memory://a.mp4", "InputNotAllowedError")]


def test_input_blocks_cover_the_inputs_and_own_their_buffers(monkeypatch):
    """Every pending video in exactly one block, in order; a block pickles to its own rows only (a
    slice would carry the whole input column to every decode task)."""
    import pickle

    import pyarrow as pa

    from jobs import extract

    monkeypatch.setattr(extract, "MAX_INPUT_BLOCKS", 1000)
    pending = pa.table({"video_uri": [f"s3://bucket/{'x' * 200}/{i:06d}.mp4" for i in range(10_000)],
                        "skip": [[] for _ in range(10_000)]})
    blocks = extract.input_blocks(pending)
    assert len(blocks) == 1000 and all(b.num_rows == 10 for b in blocks)
    assert pa.concat_tables(blocks).equals(pending)
    assert len(pickle.dumps(blocks[0])) < 16_000 < len(pickle.dumps(pending.slice(0, 10)))
