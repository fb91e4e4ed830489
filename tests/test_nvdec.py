"""GPU decode (pipeline.nvdec, pipeline.yuv): what NVDEC takes, the CPU-side conversion, the fallback.

Everywhere: which streams go to NVDEC, and `pipeline.yuv` (the stage NVDEC's surfaces go through)
fed with the same 4:2:0 planes from ffmpeg, against `decode_frames` on the real clips. Where a CUDA
GPU and PyNvVideoCodec exist: NVDEC's frames against the CPU path's, frame for frame.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import nvdec
from pipeline.ffmpeg import ffmpeg_exe
from pipeline.video import decode_frames, locate_frames, probe
from pipeline.yuv import split_planes, to_rgb

REPO = Path(__file__).resolve().parents[1]

# 4:2:0 clips of ../shared/videos (cockatoo is 4:4:4, test.avi MPEG-4 Part 2, corrupted.mp4 broken).
CLIPS_420 = ("again.mkv", "bear-vp9.webm", "big_buck_bunny_0_30.webm", "bottle-detection.mp4", "car-detection.mp4",
             "flipping_a_pancake.mkv", "hevc.ts", "nasa_13013.mp4", "sample_with_increasing_timestamps_320w_240h.mp4",
             "video_90.mov")
MIN_PSNR_DB = 35.0   # the bar for GPU vs CPU frames


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def semi_planar(path, info, frames: int, pix_fmt: str) -> np.ndarray:
    """The first `frames` frames as NVDEC hands them over: coded orientation, NV12 or P016 surfaces."""
    w, h = (info.height, info.width) if info.rotation in (90, 270) else (info.width, info.height)
    out = subprocess.run([ffmpeg_exe(), "-v", "error", "-noautorotate", "-i", str(path), "-map", f"0:{info.stream}",
                          "-frames:v", str(frames), "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", pix_fmt,
                          "-"], capture_output=True, check=True, timeout=120).stdout
    dtype = np.uint8 if pix_fmt == "nv12" else np.dtype("<u2")
    return np.frombuffer(out, dtype).reshape(-1, h * 3 // 2, w)


def first_frames(path, count: int = 6):
    """(info, times) of the video's first `count` frames: their own presentation times, from the
    probe's frame table, so each request is exactly that frame."""
    from pipeline.video import _load

    table, info = _load(str(path), 30.0)
    return info, (table.times - table.times[0])[:count]


@pytest.mark.shared_videos
@pytest.mark.parametrize("resize", ["shorter_center_crop", "squash", "pad"])
@pytest.mark.parametrize("name", CLIPS_420)
def test_yuv_stage_matches_the_cpu_path(shared_videos, name, resize):
    """NV12 planes through pipeline.yuv give the CPU path's frames: rotation, crop, resize, matrix, range."""
    path = shared_videos / name
    info, times = first_frames(path)
    cpu = decode_frames(path, times, size=(96, 128), resize=resize, info=info).frames
    w, h = (info.height, info.width) if info.rotation in (90, 270) else (info.width, info.height)
    y, uv = split_planes(torch.from_numpy(semi_planar(path, info, len(times), "nv12").copy()), h, w)
    gpu_stage = to_rgb(y, uv, info, (96, 128), resize).numpy()
    assert gpu_stage.shape == cpu.shape
    assert psnr(gpu_stage, cpu) >= MIN_PSNR_DB, (name, resize, psnr(gpu_stage, cpu))


@pytest.mark.shared_videos
def test_yuv_stage_reads_16_bit_surfaces_as_nvdec_writes_10_bit(shared_videos):
    """P016 (10-bit content in the high bits, NVDEC's output for HEVC/VP9/AV1 Main10) converts like NV12."""
    path = shared_videos / "car-detection.mp4"
    info, times = first_frames(path, 3)
    h, w = info.height, info.width
    eight = to_rgb(*split_planes(torch.from_numpy(semi_planar(path, info, 3, "nv12").copy()), h, w), info, 64)
    p016 = semi_planar(path, info, 3, "p016le").astype(np.int32)
    sixteen = to_rgb(*split_planes(torch.from_numpy(p016).to(torch.uint16), h, w), info, 64)
    assert (eight.int() - sixteen.int()).abs().max() <= 1


def test_color_tags_choose_the_matrix_and_range(shared_videos):
    """BT.709 and full-range tags are read from the stream; the conversion differs when they do."""
    info = probe(shared_videos / "nasa_13013.mp4")
    assert (info.color_range, info.color_matrix) == ("tv", "bt709")
    full = probe(shared_videos / "again.mkv")
    assert (full.pix_fmt, full.color_range) == ("yuvj420p", "pc")
    y = torch.full((1, 1, 4, 4), 100.0)
    uv = torch.stack([torch.full((1, 2, 2), 90.0), torch.full((1, 2, 2), 180.0)], dim=1)
    as_709 = to_rgb(y, uv, info, 4, "squash")
    as_601 = to_rgb(y, uv, dataclasses.replace(info, color_matrix=""), 4, "squash")
    as_full = to_rgb(y, uv, dataclasses.replace(info, color_range="pc"), 4, "squash")
    assert not torch.equal(as_709, as_601) and not torch.equal(as_709, as_full)


@pytest.mark.shared_videos
@pytest.mark.parametrize("name, reason", [
    ("cockatoo.mp4", "4:2:0 only"), ("test.avi", "codec mpeg4"), ("big_buck_bunny_0_30.webm", "codec vp8")])
def test_streams_nvdec_cannot_take_are_named(shared_videos, name, reason):
    assert reason in nvdec.unsupported_reason(probe(shared_videos / name))


def test_size_limits_of_nvdec(shared_videos):
    info = probe(shared_videos / "nasa_13013.mp4")
    assert nvdec.unsupported_reason(dataclasses.replace(info, width=5120, height=2880)) is not None   # H.264 > 4096
    assert nvdec.unsupported_reason(dataclasses.replace(info, codec="hevc", width=5120, height=2880)) is None
    assert "odd" in nvdec.unsupported_reason(dataclasses.replace(info, width=321))
    assert nvdec.unsupported_reason(dataclasses.replace(info, width=32)) is not None


# ---------------------------------------------------------------- on a GPU with NVDEC

def _nvdec_missing() -> str | None:
    return nvdec.unavailable_reason(0)


gpu = pytest.mark.skipif(_nvdec_missing() is not None, reason=f"NVDEC path not runnable here: {_nvdec_missing()}")


# Clips NVDEC hands back to the CPU path, and why (anything else must decode on the GPU).
EXPECTED_FALLBACK = {"nasa_13013.mp4": "demuxes stream"}    # PyNvVideoCodec picks the larger of two streams


@gpu
@pytest.mark.shared_videos
@pytest.mark.parametrize("name", [n for n in CLIPS_420 if n != "big_buck_bunny_0_30.webm"])
def test_nvdec_frames_match_the_cpu_path(shared_videos, name):
    """Same requested times -> the same frames (timestamps equal), PSNR >= 35 dB against ffmpeg's."""
    path = shared_videos / name
    info = probe(path)
    times = np.linspace(0, max(info.duration - 0.05, 0), 12)[[0, 5, 2, 11, 5, 7]]   # unsorted, repeated
    if name in EXPECTED_FALLBACK:
        with pytest.raises(nvdec.NvdecFallback, match=EXPECTED_FALLBACK[name]):
            nvdec.decode_frames(path, times, size=224, info=info)
        return
    cpu = decode_frames(path, times, size=224, info=info)
    got = nvdec.decode_frames(path, times, size=224, info=info)
    np.testing.assert_array_equal(got.timestamps, cpu.timestamps)
    assert got.crop_box == cpu.crop_box
    assert psnr(got.frames, cpu.frames) >= MIN_PSNR_DB, psnr(got.frames, cpu.frames)
    on_gpu = nvdec.decode_frames(path, times, size=224, info=info, device=True)
    assert on_gpu.frames.is_cuda and np.array_equal(on_gpu.frames.cpu().numpy(), got.frames)


@gpu
@pytest.mark.shared_videos
def test_nvdec_refuses_what_it_cannot_decode_exactly(shared_videos):
    for name in ("cockatoo.mp4", "test.avi", "corrupted.mp4"):
        with pytest.raises(nvdec.NvdecFallback):
            nvdec.decode_frames(shared_videos / name, [0.0, 0.5], size=64)


# ---------------------------------------------------------------- the job's decode stage

def test_decode_plan_follows_the_flag_and_the_cluster():
    from jobs.extract import ExtractConfig, decode_plan, decode_task_memory
    from pipeline.config import ConfigError, parse_config

    cfg = parse_config(ExtractConfig, ["--input", "x", "--output", "y", "--teacher", "t"])

    def plan(flags, resources):
        return decode_plan(parse_config(ExtractConfig, ["--input", "x", "--output", "y", "--teacher", "t", *flags]),
                           resources)

    big = {"CPU": 32, "GPU": 2, "memory": 512 * 2**30}
    assert not plan([], {"CPU": 16, "memory": 64 * 2**30}).on_gpu                 # auto without GPUs: CPU tasks
    auto = plan([], big)                           # 16 CPUs a GPU: 1 for the teacher, 2 for the write stage
    assert (auto.on_gpu, auto.gpus, auto.sessions, auto.cpu_slots, auto.require_nvdec) == (True, 2, 8, 13, False)
    call = decode_task_memory(cfg, 1)
    assert auto.memory == (8 + 13) * call          # any call may fall back to ffmpeg
    # a GPU's half of the memory holds fewer ffmpeg slots than it has CPUs: the slots follow the memory
    small = plan([], {**big, "memory": 2 * 2 * 20 * call})      # half a GPU's share: 20 calls
    assert (small.cpu_slots, small.memory) == (20 - 8, 20 * call)
    assert plan(["--decode-cpu-slots", "3"], big).cpu_slots == 3
    gpu = plan(["--decode-device", "gpu", "--nvdec-sessions", "6"], big)
    assert (gpu.sessions, gpu.cpu_slots, gpu.require_nvdec, gpu.memory) == (6, 0, True, 6 * call)
    assert not plan(["--decode-device", "cpu"], big).on_gpu
    with pytest.raises(ConfigError, match="no GPUs"):
        plan(["--decode-device", "gpu"], {"CPU": 8})


def test_claim_gpu_spreads_claims_and_frees_a_dead_claimants(tmp_path):
    first, lock = nvdec.claim_gpu(3, str(tmp_path))
    second, lock2 = nvdec.claim_gpu(3, str(tmp_path))
    assert (first, second) == (0, 1) and lock and lock2
    other = subprocess.run([sys.executable, "-c", "import sys; from pipeline import nvdec; "
                            "print(nvdec.claim_gpu(3, sys.argv[1])[0])", str(tmp_path)],
                           cwd=REPO, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == "2"          # that process has ended: its claim with it
    lock.close()
    again, lock = nvdec.claim_gpu(3, str(tmp_path))
    assert again == 0
    assert nvdec.claim_gpu(2, str(tmp_path))[1] is None     # all claimed: a device anyway, no lock


# Run in a process of its own: it starts a Ray node with 2 logical GPUs (this machine may have none;
# Ray only schedules by them), places the job's decode and teacher actors with the job's resource
# requests, and reports where each landed.
PLACEMENT = """
import glob, json, os, sys, time
import numpy as np, ray, ray.data
from jobs.extract import DecodePlan, ExtractConfig, actor_pool, decode_actor_resources, teacher_resources
from pipeline.config import parse_config
from pipeline.nvdec import claim_gpu

LOCKS = sys.argv[1]        # read here: an actor's sys.argv is its worker's

class Decode:
    def __init__(self):
        self.gpu, self.lock = claim_gpu(2, LOCKS)
        self.seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.both = None

    def __call__(self, batch):
        # Both teachers must be up while the decoders run (with the old shares the second one was
        # placed only once the decoders had finished and let go of their GPU shares).
        deadline = time.time() + (20 if self.both is None else 0)
        while len(glob.glob(os.path.join(LOCKS, "teacher-*"))) < 2 and time.time() < deadline:
            time.sleep(0.1)
        self.both = len(glob.glob(os.path.join(LOCKS, "teacher-*"))) == 2
        return {"decoder": np.array([f"{os.getpid()}:{self.gpu}:{self.seen}:{self.both}"] * len(batch["id"]))}

class Teacher:
    def __init__(self):
        open(os.path.join(LOCKS, f"teacher-{os.getpid()}"), "w").close()

    def __call__(self, batch):
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        return {**batch, "teacher": np.array([f"{os.getpid()}:{gpus}"] * len(batch["decoder"]))}

cfg = parse_config(ExtractConfig, ["--input", "x", "--output", "y", "--teacher", "t"])
plan = DecodePlan(on_gpu=True, gpus=2, sessions=2, cpu_slots=1, memory=64 << 20)
ray.init(num_cpus=6, num_gpus=2, include_dashboard=False)
ds = ray.data.range(64, override_num_blocks=32)
ds = ds.map_batches(Decode, batch_size=1, compute=actor_pool(2, 2), **decode_actor_resources(plan))
ds = ds.map_batches(Teacher, batch_size=2, compute=actor_pool(2), **teacher_resources(cfg, plan, use_gpu=True))
rows = ds.take_all()
ray.shutdown()
print(json.dumps({"decoders": sorted({r["decoder"] for r in rows}), "teachers": sorted({r["teacher"] for r in rows})}))
"""


def test_each_teacher_has_a_gpu_of_its_own_and_decoders_spread(tmp_path):
    """With the job's resource requests on a 2-GPU node, the two teachers run at once on different GPUs
    (with the old 0.2/0.8 shares, Ray packed both decoders onto GPU 0 and the second teacher waited
    for them to finish), and the decode actors see both GPUs and claim one each."""
    proc = subprocess.run([sys.executable, "-c", PLACEMENT, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    teachers = {t.split(":")[1] for t in got["teachers"]}
    assert len(got["teachers"]) == 2 and teachers == {"0", "1"}
    decoders = [d.split(":") for d in got["decoders"]]
    assert all(both == "True" for *_, both in decoders)        # the teachers ran beside the decoders
    assert len(decoders) == 2 and {gpu for _, gpu, _, _ in decoders} == {"0", "1"}
    assert all(seen == "0,1" for _, _, seen, _ in decoders)   # Ray left the node's GPUs visible to them


@pytest.mark.skipif(_nvdec_missing() is None, reason="this machine has NVDEC: the CPU-only behaviour is not reachable")
def test_gpu_decode_stage_without_nvdec(tmp_path):
    """Asked for (gpu): a clear error at start. Under auto: the actor decodes on its CPU slots, rows say ffmpeg."""
    from pipeline.clips import ClipSpec
    from pipeline.samples import make_video
    from pipeline.stages import DecodeOptions, GpuDecodeStage
    from pipeline.store import StoreWriter

    options = DecodeOptions(clip_spec=ClipSpec(frames=4, views=1, fps_range=(2.0, 2.0)), size=32)
    store = StoreWriter(str(tmp_path / "store"), {"teacher": {}})
    with pytest.raises(nvdec.NvdecUnavailableError, match="--decode-device gpu"):
        GpuDecodeStage(options=options, store=store, sessions=2, cpu_slots=0, require_nvdec=True)
    make_video(tmp_path / "v.mp4", seconds=3.0, fps=10, size=(64, 48))
    stage = GpuDecodeStage(options=options, store=store, sessions=2, cpu_slots=1, require_nvdec=False)
    batches = list(stage({"video_uri": [str(tmp_path / "v.mp4")], "skip": [[]]}))
    assert batches and all(set(b["decoder"]) == {"ffmpeg"} for b in batches)


def test_a_video_nvdec_cannot_take_hands_its_session_back(tmp_path):
    """A call that got an NVDEC session for a video NVDEC cannot take (here MPEG-4 Part 2, known
    from the probe alone) decodes it with ffmpeg and frees the session before its first clip, so the
    next video can use NVDEC; the session count is whole again after the call."""
    import threading

    from pipeline.clips import ClipSpec
    from pipeline.samples import make_video
    from pipeline.stages import DecodeOptions, GpuDecodeStage
    from pipeline.store import StoreWriter

    options = DecodeOptions(clip_spec=ClipSpec(frames=4, views=1, fps_range=(2.0, 2.0)), size=32, chunk_clips=1)
    stage = GpuDecodeStage(options=options, store=StoreWriter(str(tmp_path / "store"), {"teacher": {}}), sessions=0,
                           cpu_slots=1, require_nvdec=False)
    stage.sessions = threading.BoundedSemaphore(1)     # one NVDEC session, as on a GPU node
    videos = [make_video(tmp_path / f"{i}.mp4", seconds=3.0, fps=10, size=(64, 48), codec="mpeg4") for i in (0, 1)]
    free_at_each_clip = []
    for clips in stage({"video_uri": [str(v) for v in videos], "skip": [[], []]}):
        assert set(clips["decoder"]) == {"ffmpeg"}
        free_at_each_clip.append(stage.sessions.acquire(blocking=False))
        if free_at_each_clip[-1]:
            stage.sessions.release()
    assert free_at_each_clip == [True, True]             # one clip per video
    assert stage.sessions.acquire(blocking=False) and not stage.sessions.acquire(blocking=False)


@pytest.mark.shared_videos
@pytest.mark.parametrize("name", ["bottle-detection.mp4", "again.mkv", "hevc.ts", "bear-vp9.webm"])
def test_the_packets_located_for_nvdec_decode_the_wanted_frames(shared_videos, name):
    """`locate_frames(...).needed` is all NVDEC is fed: ffmpeg given only those packets (by pts, B-frame
    and Matroska streams included) still outputs every wanted frame."""
    from pipeline.video import _in_ranges

    path = shared_videos / name
    info = probe(path)
    request = locate_frames(path, np.linspace(0.2, max(info.duration - 0.1, 0.2), 5), info=info)
    needed = request.needed
    assert needed is not None and set(request.pts) <= set(needed.tolist())
    keep = _in_ranges("pts", [(int(p), int(p)) for p in needed])
    out = subprocess.run([ffmpeg_exe(), "-v", "error", "-copyts", "-bsf:v", f"noise=drop='not({keep})'", "-i", str(path),
                          "-map", f"0:{info.stream}", "-fps_mode", "passthrough", "-enc_time_base", "demux",
                          "-c:v", "wrapped_avframe", "-f", "framecrc", "-"], capture_output=True, text=True,
                         timeout=120).stdout
    decoded = {int(line.split(",")[2]) for line in out.splitlines() if line[:1].isdigit()}
    assert set(request.pts.tolist()) <= decoded, sorted(set(request.pts.tolist()) - decoded)


def test_nvdec_bench_stage_part_runs_on_cpu(tmp_path):
    """bench/nvdec.py's decode-stage part (the job's GpuDecodeStage with ffmpeg slots) stays runnable
    without a GPU; speed is never asserted."""
    out = tmp_path / "nvdec.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "nvdec.py"), "--only-stage", "--stage", "cpu:2",
                           "--seconds", "3", "--heights", "96", "--stage-videos", "3", "--workdir", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["method"] == "stage cpu:2" and row["clips"] > 0 and row["clips_by_decoder"] == {"ffmpeg": row["clips"]}
    assert row["cpu_s_per_clip"] > 0
