"""The extraction stages without Ray: inputs, decode with error rows, the whole chain in one process."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.extract import ExtractConfig, store_schema
from pipeline.clips import ClipSpec
from pipeline.compress import Compression
from pipeline.config import parse_config
from pipeline.stages import (DecodeOptions, TeacherStage, decode_videos, encode_frames, list_videos, parse_bytes,
                             write_shards)
from pipeline.store import StoreWriter, open_store


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
    assert list_videos(str(folder)) == [str(folder / "a.mp4"), str(folder / "bad.mp4"),
                                        str(folder / "nested" / "b.mkv")]
    assert list_videos(str(folder / "*.mp4")) == [str(folder / "a.mp4"), str(folder / "bad.mp4")]
    assert list_videos(str(folder / "a.mp4")) == [str(folder / "a.mp4")]
    listing = tmp_path / "list.parquet"
    pq.write_table(pa.table({"video_uri": ["s3://b/y.mp4", "s3://b/x.mp4", "s3://b/x.mp4"]}), listing)
    assert list_videos(str(listing)) == ["s3://b/x.mp4", "s3://b/y.mp4"]
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
    """decode -> teacher -> encode -> write without Ray; a bad input becomes an error row."""
    from pipeline.testing import make_tiny_teacher

    teacher = str(make_tiny_teacher(tmp_path / "teacher", "dinov2", image_size=56, hidden_size=32))
    cfg = ExtractConfig(input=str(folder), output=str(tmp_path / "store"), teacher=teacher, size=64,
                        compression="avg", factors=(2, 2, 2), views=2, formats=("webdataset",))
    stage = TeacherStage(teacher, compression=Compression("avg", (2, 2, 2)), device="cpu", dtype="float32")
    store = StoreWriter(cfg.output, store_schema(cfg, stage.teacher.describe()))
    store.prepare()
    options = DecodeOptions(clip_spec=ClipSpec(frames=4, views=2), size=64, chunk_clips=2)
    videos = list_videos(cfg.input)
    batches = decode_videos({"video_uri": videos, "skip": [[] for _ in videos]}, options=options, store=store)
    summary = write_shards(store, (encode_frames(stage(b)) for b in batches), shard_bytes=1 << 30)
    schema = store.finalise(written=summary.shards)
    out = open_store(cfg.output)
    assert out.index.num_rows == summary.clips == schema["summary"]["clips"] > 0
    assert {r["video_uri"] for r in out.index.to_pylist()} == {str(folder / "a.mp4"), str(folder / "nested" / "b.mkv")}
    assert out.errors.column("video_uri").to_pylist() == [str(folder / "bad.mp4")]
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
