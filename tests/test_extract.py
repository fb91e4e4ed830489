"""The extraction job end to end on a real Ray cluster (started and stopped here), real ffmpeg,
tiny random teachers of two families loaded with from_pretrained, and the official readers."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.store import decode_frame, decode_target, open_store
from tests.support import stop_group

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "videos"
SHARED_PICKS = ("again.mkv", "video_90.mov", "corrupted.mp4")
BIN = Path(sys.executable).parent
FAMILIES = ("internvl", "siglip")
T, SIZE, TOKENS, DIM = 4, 64, 8, 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    from pipeline.testing import make_tiny_teacher

    root = tmp_path_factory.mktemp("teachers")
    return {f: str(make_tiny_teacher(root / f, f, image_size=56, hidden_size=DIM)) for f in FAMILIES}


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """Generated videos, one input that is not a video, and a few real ones when ../shared is there."""
    from pipeline.samples import make_video

    root = tmp_path_factory.mktemp("videos")
    make_video(root / "a.mp4", seconds=2.0, fps=10, size=(96, 64))
    make_video(root / "b.mp4", seconds=1.5, fps=12, size=(64, 112))
    (root / "sub").mkdir()
    make_video(root / "sub" / "c.mp4", seconds=1.0, fps=8, size=(80, 80))
    (root / "bad.mp4").write_bytes(b"this is not a video\n" * 10)
    for name in SHARED_PICKS:
        if (SHARED / name).exists():
            shutil.copy(SHARED / name, root / name)
    return root


def args(videos, out, teacher, address, *extra):
    return ["--input", str(videos), "--output", str(out), "--teacher", teacher, "--size", str(SIZE),
            "--clip-frames", str(T), "--views", "2", "--fps", "1-4", "--factors", "2,2,2",
            "--batch-size", "4", "--teacher-cpus", "0.5", "--decode-cpus", "0.5",
            "--shard-bytes", "40KB", "--zarr-shard-clips", "4", "--ray-address", address, *extra]


def run_job(argv) -> dict:
    from jobs.extract import ExtractConfig, extract
    from pipeline.config import parse_config

    return extract(parse_config(ExtractConfig, argv))


@pytest.fixture(scope="session")
def stores(ray_driver, teachers, videos, tmp_path_factory):
    """One uninterrupted extraction per teacher family."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"store-{family}")
        out[family] = (root, run_job(args(videos, root, teachers[family], ray_driver.address)))
    return out


def expected_failures(videos) -> set[str]:
    bad = {str(videos / "bad.mp4")}
    if (videos / "corrupted.mp4").exists():
        bad.add(str(videos / "corrupted.mp4"))
    return bad


def clips_before_damage(path: Path, damage_at: float, margin: float = 0.1) -> tuple[set[str], set[str]]:
    """Clip ids of the video's plan (as `args` extracts it) in decode order up to the first clip that
    reaches `damage_at` s: those that may be kept, and those clear of the damage by `margin` that must be."""
    from pipeline.clips import ClipSpec, plan_clips
    from pipeline.video import probe, video_id

    plans = sorted(plan_clips(video_id(str(path)), probe(str(path)), ClipSpec(frames=T, views=2, fps_range=(1.0, 4.0)), 0),
                   key=lambda p: (p.timestamps[0], p.view, p.index))
    before, sure = set(), set()
    for plan in plans:
        if max(plan.timestamps) >= damage_at + margin:
            break
        before.add(plan.clip_id)
        if max(plan.timestamps) < damage_at - margin and len(sure) == len(before) - 1:
            sure.add(plan.clip_id)
    return before, sure


def read_tar_samples(store) -> dict[str, dict]:
    import webdataset as wds

    samples = {}
    for sample in wds.WebDataset(store.shard_urls("webdataset"), shardshuffle=False):
        assert sample["__key__"] not in samples, f"clip {sample['__key__']} twice in the webdataset shards"
        samples[sample["__key__"]] = sample
    return samples


@pytest.mark.parametrize("family", FAMILIES)
def test_store_is_complete_and_readable(stores, videos, family):
    import zarr

    root, summary = stores[family]
    store = open_store(str(root))
    index = store.read_index().to_pylist()
    ids = [r["clip_id"] for r in index]
    assert len(ids) == len(set(ids)) > 0
    assert summary["store_clips"] == summary["clips_written"] == len(ids)
    assert summary["teacher_busy_fraction"] is not None and 0 < summary["teacher_busy_fraction"] <= 1
    assert summary["clips_per_second_teacher_ready"] >= summary["clips_per_second"] > 0   # start-up excluded
    # no GPU here: --decode-device auto decodes in CPU tasks, and every clip says so
    assert summary["decode"] == "CPU tasks" and summary["clips_by_decoder"] == {"ffmpeg": len(ids)}
    assert {r["decoder"] for r in index} == {"ffmpeg"}

    # every generated video has clips; the failures are recorded, not raised
    uris = {r["video_uri"] for r in index}
    for name in ("a.mp4", "b.mp4", "sub/c.mp4"):
        assert str(videos / name) in uris
    errors = {e["video_uri"]: e for e in store.read_errors().to_pylist()}
    assert set(errors) == expected_failures(videos)
    assert errors[str(videos / "bad.mp4")]["error_type"] == "NotAVideoError"
    assert all(e["message"] and e["stage"] for e in errors.values())
    if (videos / "corrupted.mp4").exists():
        # decodable up to 2.8 s: its clips before the damage are kept, and the error recorded
        assert errors[str(videos / "corrupted.mp4")]["error_type"] == "CorruptVideoError"
        kept = {r["clip_id"] for r in index if r["video_uri"] == str(videos / "corrupted.mp4")}
        before, sure = clips_before_damage(videos / "corrupted.mp4", damage_at=2.8)
        # its clips are sampled from a hash of the path, so the first may already reach the damage
        assert sure <= kept <= before and (kept or not sure)
        assert summary["videos_partial"] == (1 if kept else 0)
    assert summary["videos_failed"] == len(errors)

    schema = store.schema
    assert schema["target"] == {"tokens": TOKENS, "grid": [2, 2, 2], "dim": DIM, "dtype": "float16"}
    assert schema["teacher"]["family"] in ("internvl_vision", "siglip_vision_model")
    assert len(schema["target_stats"]["mean"]) == DIM and schema["target_stats"]["count"] == len(ids) * TOKENS
    assert all(s > 0 for s in schema["target_stats"]["std"])

    # webdataset reader: each index clip exactly once, finite targets of the declared shape
    samples = read_tar_samples(store)
    assert sorted(samples) == sorted(ids)
    by_id = {r["clip_id"]: r for r in index}
    for key, sample in samples.items():
        target = decode_target(np.load(io.BytesIO(sample["target.npy"]), allow_pickle=False), "float16")
        assert target.shape == (TOKENS, DIM) and np.isfinite(target).all()
        assert json.loads(sample["json"])["timestamps"] == by_id[key]["timestamps"]
        assert decode_frame(sample["f00.jpg"], "jpg").shape == (SIZE, SIZE, 3)

    # zarr reader: the index row points at the same clip and target
    for r in index:
        group = zarr.open_group(str(root / "zarr" / r["shard"]), mode="r")
        assert group["clip_id"][r["row"]] == r["clip_id"]
        stored = np.load(io.BytesIO(samples[r["clip_id"]]["target.npy"]), allow_pickle=False)
        np.testing.assert_array_equal(group["targets"][r["row"]], stored)
        assert group["frames"].shape[1:] == (T, SIZE, SIZE, 3)
    # the README's readers: Zarr's root group, and the partitioned index through pyarrow and DuckDB
    assert sorted(zarr.open_group(str(root / "zarr"), mode="r").group_keys()) == store.shards()
    assert sorted(pads.dataset(str(root / "index")).to_table().column("clip_id").to_pylist()) == sorted(ids)
    con = duckdb.connect()
    assert con.execute(f"select count(*), count(distinct clip_id) from read_parquet('{root}/index/*.parquet')"
                       ).fetchone() == (len(ids), len(ids))
    assert con.execute(f"select sum(clips) from read_parquet('{root}/manifest.parquet')").fetchone()[0] == len(ids)
    assert {r[0] for r in con.execute(f"select video_uri from read_parquet('{root}/errors/*.parquet')").fetchall()} \
        == expected_failures(videos)


def test_ray_data_reads_the_shards_and_the_index(stores, ray_driver):
    import ray.data

    store = open_store(str(stores["internvl"][0]))
    rows = ray.data.read_webdataset(store.shard_urls("webdataset")).take_all()
    keys = [r["__key__"] for r in rows]
    ids = ray.data.read_parquet(f"{store.root}/index").select_columns(["clip_id"]).take_all()
    assert sorted(keys) == sorted(r["clip_id"] for r in ids) == sorted(store.read_index().column("clip_id").to_pylist())
    for r in rows[:3]:
        assert np.asarray(r["target.npy"]).shape == (TOKENS, DIM)
        assert np.asarray(r["f03.jpg"]).shape == (SIZE, SIZE, 3)


def test_targets_match_the_teacher_run_in_process(stores, teachers):
    """The stored target of a clip is the teacher + WAP of that clip's stored input frames."""
    import zarr

    from pipeline.compress import Compression
    from pipeline.stages import TeacherStage

    root, _ = stores["siglip"]
    store = open_store(str(root))
    row = store.shard_index(store.shards()[0]).to_pylist()[0]
    group = zarr.open_group(str(root / "zarr" / row["shard"]), mode="r")
    teacher = TeacherStage(teachers["siglip"], compression=Compression("wap", (2, 2, 2)), device="cpu",
                           dtype="float32")
    # the teacher saw the raw decoded frames; zarr holds their JPEG round trip: compare loosely
    got = teacher({"frames": group["frames"][row["row"]][None]})["target"][0].astype(np.float32)
    want = decode_target(group["targets"][row["row"]], "float16")
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.98


def test_rerun_does_no_work_and_duplicates_nothing(stores, teachers, videos, ray_driver):
    root, first = stores["internvl"]
    before = {p.name: p.read_bytes() for p in (root / "index").iterdir()}
    manifest = pq.read_table(root / "manifest.parquet")
    commits = sorted(os.listdir(root / "_commits"))
    summary = run_job(args(videos, root, teachers["internvl"], ray_driver.address))
    assert summary["clips_written"] == 0 and summary["shards_written"] == 0
    assert summary["videos_skipped_done"] == summary["videos_in_input"]
    assert sorted(os.listdir(root / "_commits")) == commits
    assert {p.name: p.read_bytes() for p in (root / "index").iterdir()} == before
    assert pq.read_table(root / "manifest.parquet").equals(manifest)


def test_config_mismatch_is_a_clear_error(stores, teachers, videos, ray_driver, capsys):
    from jobs.extract import main

    root, _ = stores["internvl"]
    manifest = (root / "manifest.parquet").read_bytes()
    assert main(args(videos, root, teachers["internvl"], ray_driver.address, "--compression", "avg")) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "compression" in err
    assert main(args(videos, root, teachers["siglip"], ray_driver.address)) == 2
    assert "teacher" in capsys.readouterr().err
    assert main(args(videos, root, teachers["internvl"], ray_driver.address, "--max-clips-per-view", "0")) == 2
    assert "--max-clips-per-view" in capsys.readouterr().err
    assert (root / "manifest.parquet").read_bytes() == manifest, "a refused job must leave the store untouched"


def wait_for_job_workers_to_stop(dashboard: str, driver_pid: int, timeout: float = 90.0) -> None:
    """What an operator does after killing a job: wait until Ray has reaped the job's actors and
    tasks (they outlive a SIGKILLed driver for a moment)."""
    from ray.util.state import list_actors, list_jobs, list_tasks

    jobs = [j.job_id for j in list_jobs(address=dashboard)
            if j.driver_info and str(j.driver_info.pid) == str(driver_pid)]
    assert jobs, "the killed driver's job is not known to the cluster"
    deadline = time.time() + timeout
    while (list_actors(address=dashboard, filters=[("job_id", "=", jobs[0]), ("state", "=", "ALIVE")])
           or list_tasks(address=dashboard, filters=[("job_id", "=", jobs[0]), ("state", "=", "RUNNING")])):
        assert time.time() < deadline, "the killed job's workers are still running"
        time.sleep(0.5)


def test_kill_9_then_resume_gives_the_uninterrupted_store(stores, teachers, videos, ray_driver, tmp_path):
    reference_root, _ = stores["internvl"]
    reference = open_store(str(reference_root))
    root = tmp_path / "killed"
    argv = args(videos, root, teachers["internvl"], ray_driver.address, "--chunk-clips", "1", "--batch-size", "1",
                "--shard-bytes", "1")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.extract", *argv], cwd=REPO, env=ray_driver.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not any(p.name.startswith("shard-") for p in (root / "_commits").glob("*.json")):
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.time() < deadline, "no shard committed in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        stop_group(proc, grace=5)
    wait_for_job_workers_to_stop(ray_driver.dashboard, proc.pid)
    assert not (root / "manifest.parquet").exists()
    committed = sum(json.loads(p.read_text())["clips"] for p in (root / "_commits").glob("shard-*.json"))

    summary = run_job(argv)
    assert summary["clips_written"] == summary["store_clips"] - committed   # the rerun redid no committed clip
    store = open_store(str(root))
    index = store.read_index()
    ids = index.column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)), "a clip is twice in the index"
    assert read_tar_samples(store).keys() == set(ids)
    got = {r["clip_id"]: r for r in index.to_pylist()}
    want = {r["clip_id"]: r for r in reference.read_index().to_pylist()}
    assert got.keys() == want.keys()
    assert {e["video_uri"] for e in store.read_errors().to_pylist()} == \
        {e["video_uri"] for e in reference.read_errors().to_pylist()}
    shardless = [{k: v for k, v in s.schema["summary"].items() if k != "shards"} for s in (store, reference)]
    assert shardless[0] == shardless[1]     # the killed run rolled shards of 1 byte
    np.testing.assert_allclose(store.schema["target_stats"]["mean"], reference.schema["target_stats"]["mean"],
                               rtol=1e-3, atol=1e-3)
    for cid in want:
        assert got[cid]["timestamps"] == want[cid]["timestamps"]
    # same targets (teacher batches differ in size, so allow float16 rounding differences)
    got_t = {k: s["target.npy"] for k, s in read_tar_samples(store).items()}
    want_t = {k: s["target.npy"] for k, s in read_tar_samples(reference).items()}
    for cid in want:
        a = np.load(io.BytesIO(got_t[cid]), allow_pickle=False).astype(np.float32)
        b = np.load(io.BytesIO(want_t[cid]), allow_pickle=False).astype(np.float32)
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)
    # crash leftovers are gone: every data object on disk belongs to a committed shard
    shards = set(store.shards())
    assert {p.name.removesuffix(".tar") for p in (root / "webdataset").iterdir()} == shards
    assert {p.name for p in (root / "zarr").iterdir()} == shards | {"zarr.json"}
    assert {p.name.removesuffix(".parquet") for p in (root / "index").iterdir()} == shards
    assert not (root / "_tmp").exists() or not any((root / "_tmp").iterdir())


def test_ray_job_submit(ray_cluster, teachers, videos, tmp_path):
    """The same command under `ray job submit --working-dir .` against the session cluster, which
    runs with token authentication (Ray 2.60's default): refused without the token or with another
    one, accepted with RAY_AUTH_MODE=token and the token file in RAY_AUTH_TOKEN_PATH (README)."""
    submit = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard]
    home = tmp_path / "home"          # no ~/.ray/auth_token to fall back on
    home.mkdir()
    anonymous = {k: v for k, v in ray_cluster.env.items() if not k.startswith("RAY_AUTH_")} | {"HOME": str(home)}
    for env, refusal in ((anonymous, "no authentication token was found"),
                         (anonymous | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
                          "token is invalid")):
        result = subprocess.run([*submit, "--", "python", "-c", "pass"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and refusal in result.stdout + result.stderr, \
            result.stdout[-2000:] + result.stderr[-2000:]
    assert ray_cluster.env["RAY_AUTH_MODE"] == "token" and Path(ray_cluster.env["RAY_AUTH_TOKEN_PATH"]).is_file()

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.mp4", "bad.mp4"):
        shutil.copy(videos / name, inputs / name)
    out = tmp_path / "submitted"
    job_args = [a for a in args(inputs, out, teachers["siglip"], "auto")]
    deadline = time.time() + 180
    while True:   # the dashboard answers before its job agent is up: Ray says "try again later"
        result = subprocess.run(
            [*submit, "--working-dir", str(REPO), "--", "python", "-m", "jobs.extract", *job_args],
            cwd=REPO, env=ray_cluster.env, capture_output=True, text=True, timeout=400)
        if "No available agent to submit job" not in result.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "extraction complete" in result.stdout
    store = open_store(str(out))
    assert set(store.read_index().column("video_uri").to_pylist()) == {str(inputs / "a.mp4")}
    assert store.read_errors().column("video_uri").to_pylist() == [str(inputs / "bad.mp4")]


def test_s3_round_trip(s3_env, ray_cluster, teachers, videos):
    """Videos in a bucket, store in a bucket; the driver's AWS_* environment reaches the workers."""
    import s3fs

    env = s3_env
    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="testing", secret="testing")
    fs.mkdir("bucket")
    for name in ("a.mp4", "bad.mp4"):
        fs.put_file(str(videos / name), f"bucket/videos/{name}")
    # a separate driver process, like a user's: only its environment knows the endpoint
    argv = args("s3://bucket/videos/", "s3://bucket/store", teachers["internvl"], ray_cluster.address)
    result = subprocess.run([sys.executable, "-m", "jobs.extract", *argv], cwd=REPO,
                            env={**ray_cluster.env, **env}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    store = open_store("s3://bucket/store")
    index = store.read_index()
    assert set(index.column("video_uri").to_pylist()) == {"s3://bucket/videos/a.mp4"}
    assert store.read_errors().column("video_uri").to_pylist() == ["s3://bucket/videos/bad.mp4"]
    keys = []
    for url in store.shard_urls("webdataset"):
        with store.fs.open(url, "rb") as f, tarfile.open(fileobj=f) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".target.npy")]
    assert sorted(keys) == sorted(index.column("clip_id").to_pylist())
    row = index.to_pylist()[0]
    group = store.zarr_group(row["shard"])
    assert group["clip_id"][row["row"]] == row["clip_id"]
    assert np.isfinite(store.decode_target(group["targets"][row["row"]])).all()


def test_append_more_videos_to_a_complete_store(teachers, videos, ray_driver, tmp_path):
    """The same job with more inputs: only the new videos are extracted, the existing shards and
    their index files stay byte for byte, and a Parquet input list works like a folder."""
    import pyarrow as pa

    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(videos / "a.mp4", inputs / "a.mp4")
    out = tmp_path / "store"
    first = run_job(args(inputs, out, teachers["siglip"], ray_driver.address))
    before = {p: p.read_bytes() for d in ("index", "webdataset") for p in (out / d).iterdir()}
    listing = tmp_path / "videos.parquet"
    pq.write_table(pa.table({"video_uri": [str(inputs / "a.mp4"), str(videos / "b.mp4"), str(inputs / "a.mp4")]}),
                   listing)
    second = run_job(args(listing, out, teachers["siglip"], ray_driver.address))
    assert second["videos_in_input"] == 2 and second["videos_skipped_done"] == 1
    assert {p: p.read_bytes() for p in before} == before
    store = open_store(str(out))
    index = store.read_index()
    new = [r for r in index.to_pylist() if r["video_uri"] == str(videos / "b.mp4")]
    assert len(new) == second["clips_written"] > 0 and index.num_rows == first["store_clips"] + len(new)
    assert store.schema["summary"]["videos"] == 2 and store.num_clips == index.num_rows


def test_all_inputs_bad_or_none_gives_a_complete_empty_store(teachers, ray_driver, tmp_path):
    from jobs.extract import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.mp4", "b.mkv"):
        (inputs / name).write_bytes(b"not a video at all\n" * 20)
    for folder in (inputs, tmp_path / "empty"):
        folder.mkdir(exist_ok=True)
        out = tmp_path / f"store-{folder.name}"
        assert main(args(folder, out, teachers["siglip"], ray_driver.address)) == 0
        store = open_store(str(out))
        assert store.num_clips == 0 and store.shards() == [] and store.read_index().num_rows == 0
        assert sorted(store.read_errors().column("video_uri").to_pylist()) == \
            sorted(str(p) for p in folder.iterdir())
        assert store.schema["summary"]["failed_videos"] == len(list(folder.iterdir()))
        assert not (out / "_lease.json").exists()
