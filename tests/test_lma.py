"""Language Model Adaptation (lma): data, the Video LLM, fine-tuning, resume and generation,
with a tiny random Qwen2 + a locally trained BPE tokenizer + the tiny random student, all loaded
back through `from_pretrained(dir)`, over videos generated with ffmpeg."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lma.data import (IGNORE_INDEX, RecordError, clip_start_times, parse_record, read_records,
                      sample_timestamps, tokenize_conversation)
from lma.finetune import FinetuneConfig, finetune
from lma.modeling import VideoLLM, VideoProjector
from lma.testing import CORPUS as TINY_CORPUS
from pipeline import errors
from pipeline.config import parse_config

REPO = Path(__file__).resolve().parents[1]
# Qwen2.5's template without tools: a default system turn when the conversation has none.
CHAT_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                 "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ("you are a helpful assistant", *TINY_CORPUS)
FRAMES = 8
STEPS = 8


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory) -> Path:
    """lma.testing's tiny random Qwen2 + trained BPE, with Qwen2.5's default-system chat template."""
    from transformers import AutoTokenizer

    from lma.testing import make_tiny_llm

    out = make_tiny_llm(tmp_path_factory.mktemp("llm"), CORPUS)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory) -> Path:
    from lma.testing import make_tiny_student

    return make_tiny_student(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    """4 good records over 2 generated videos (relative and absolute paths, both formats), plus
    bad lines: 2 not JSON, 3 no video, 5 a file that is not a video, 7 a missing video, 10 longer
    than the trained run's --max-length."""
    from pipeline.samples import make_video

    root = tmp_path_factory.mktemp("lma_data")
    make_video(root / "a.mp4", seconds=2.0, fps=8, size=(128, 96))
    make_video(root / "b.mp4", seconds=1.5, fps=10, size=(96, 128))
    (root / "junk.mp4").write_bytes(b"this is not a video" * 50)
    q = "what colour is the square"
    lines = [
        json.dumps({"video": "a.mp4", "conversations": [{"from": "human", "value": f"<video>\n{q}"},
                                                         {"from": "gpt", "value": "the square is red"}]}),
        '{"video": "a.mp4", "conversations": [',
        json.dumps({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "red"}]}),
        json.dumps({"video": str(root / "b.mp4"), "messages": [{"role": "user", "content": q},
                                                               {"role": "assistant", "content": "the square is blue"}]}),
        json.dumps({"video": "junk.mp4", "conversations": [{"from": "human", "value": q},
                                                            {"from": "gpt", "value": "red"}]}),
        json.dumps({"video": "b.mp4", "messages": [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": " how many squares are there"}]},
            {"role": "assistant", "content": "one square"}]}),
        json.dumps({"video": "missing.mp4", "conversations": [{"from": "human", "value": q},
                                                               {"from": "gpt", "value": "red"}]}),
        "",
        json.dumps({"video": "a.mp4", "conversations": [{"from": "human", "value": "describe the video"},
                                                         {"from": "gpt", "value": "the video shows a moving square"}]}),
        json.dumps({"video": "a.mp4", "conversations": [{"from": "human", "value": "describe the video"},
                                                         {"from": "gpt", "value": "the square is red " * 100}]}),
    ]
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(student_dir, llm_dir, data_file, output, *extra) -> FinetuneConfig:
    return parse_config(FinetuneConfig, [
        "--student", str(student_dir), "--llm", str(llm_dir), "--data", str(data_file), "--output", str(output),
        "--frames", str(FRAMES), "--max-steps", str(STEPS), "--batch-size", "2", "--lr", "1e-2", "--warmup-ratio", "0",
        "--save-every", str(STEPS // 2), "--seed", "1", "--max-length", "200", *extra])


@pytest.fixture(scope="session")
def trained(tmp_path_factory, student_dir, llm_dir, data_file) -> Path:
    output = tmp_path_factory.mktemp("lma_run") / "out"
    finetune(_config(student_dir, llm_dir, data_file, output))
    return output


# ---- data ---------------------------------------------------------------------------------------
def test_records_both_formats_and_bad_lines_with_line_numbers(data_file):
    records, errors = read_records(str(data_file))
    assert [r.line for r in records] == [1, 4, 5, 6, 7, 9, 10]   # bad videos and lengths fail later
    assert {e.line for e in errors} == {2, 3}
    assert "not JSON" in str(next(e for e in errors if e.line == 2))
    assert records[0].video == str(data_file.parent / "a.mp4")
    assert records[1].messages[0]["content"].startswith("<video>\n")        # placeholder added when absent
    assert records[3].messages[0]["content"] == "<video> how many squares are there"
    assert [m["role"] for m in records[0].messages] == ["user", "assistant"]
    with pytest.raises(RecordError, match="line 7: 2 <video> placeholders"):
        parse_record({"video": "x", "conversations": [{"from": "human", "value": "<video><video>"},
                                                      {"from": "gpt", "value": "a"}]}, 7)
    with pytest.raises(RecordError, match="no assistant answer"):
        parse_record({"video": "x", "messages": [{"role": "user", "content": "hi"}]}, 1)
    with pytest.raises(RecordError, match="no known"):
        parse_record({"video": "x", "conversations": [{"from": "robot", "value": "hi"}]}, 1)


def test_uniform_sampling_covers_video_and_caps_at_available_frames():
    ts = sample_timestamps(8.0, 4)
    assert ts == [1.0, 3.0, 5.0, 7.0]
    assert len(sample_timestamps(2.0, 512, available=20)) == 20
    assert clip_start_times([0.1 * i for i in range(10)], 4) == pytest.approx([0.0, 0.4, 0.8])


def test_labels_cover_answers_only_and_visual_slots_follow_time_markers(llm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir)
    messages = [{"role": "user", "content": "<video>\nwhat colour is the square"},
                {"role": "assistant", "content": "the square is red"},
                {"role": "user", "content": "how many squares are there"},
                {"role": "assistant", "content": "one square"}]
    ex = tokenize_conversation(tok, messages, [0.0, 1.5, 3.0], tokens_per_clip=5)
    assert int(ex.visual_mask.sum()) == 15
    assert (ex.labels[ex.visual_mask] == IGNORE_INDEX).all()
    answer = tok.decode(ex.labels[ex.labels != IGNORE_INDEX])
    assert answer == "the square is red<|im_end|>\none square<|im_end|>\n"
    text = tok.decode(ex.input_ids[~ex.visual_mask])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<t=0.0s>")
    assert text.index("<t=0.0s>") < text.index("<t=1.5s>") < text.index("<t=3.0s>") < text.index("what colour")
    # the visual slots sit right after each marker: 5 slots between consecutive markers
    slots = ex.visual_mask.int().tolist()
    runs = [len(r) for r in "".join(map(str, slots)).split("0") if r]
    assert runs == [5, 5, 5]
    prompt = tokenize_conversation(tok, messages[:1], [0.0], 5, add_generation_prompt=True)
    assert tok.decode(prompt.input_ids[~prompt.visual_mask]).endswith("<|im_start|>assistant\n")
    assert (prompt.labels == IGNORE_INDEX).all()


# ---- model --------------------------------------------------------------------------------------
def test_residual_projector_starts_as_identity_and_mlp_maps_dims():
    x = torch.randn(2, 4, 16)
    assert torch.equal(VideoProjector(16, 16)(x), x)
    assert VideoProjector(16, 16).kind == "residual"
    mlp = VideoProjector(16, 24)
    assert mlp.kind == "mlp" and mlp(x).shape == (2, 4, 24)
    with pytest.raises(ValueError):
        VideoProjector(16, 24, "residual")


def _batch(model: VideoLLM, frames):
    from lma.data import collate

    timestamps = [0.25 * i for i in range(len(frames))]
    ex = model.prompt([{"role": "user", "content": "<video>\nwhat colour is the square"},
                       {"role": "assistant", "content": "the square is red"}], timestamps)
    return collate([ex], model.tokenizer.pad_token_id)


def test_adapter_save_load_round_trip_gives_identical_logits(tmp_path, student_dir, llm_dir):
    torch.manual_seed(0)
    model = VideoLLM.build(student_dir, str(llm_dir))
    with torch.no_grad():   # a trained adapter: LoRA B is zero at init, which would make any load look right
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    frames = torch.randint(0, 256, (6, 112, 112, 3), dtype=torch.uint8)
    batch = _batch(model, frames)
    with torch.no_grad():
        before = model(**batch, visual=model.visual_embeds(frames)).logits
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "adapter" / "adapter_config.json").exists()
    loaded = VideoLLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        after = loaded(**batch, visual=loaded.visual_embeds(frames)).logits
        base = loaded.llm.get_base_model()
        with loaded.llm.disable_adapter():
            no_adapter = loaded(**batch, visual=loaded.visual_embeds(frames)).logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, no_adapter, atol=1e-4), "the adapter must change the logits"
    assert base is not None

    model.save_pretrained(tmp_path / "merged", merge=True)
    merged = VideoLLM.from_pretrained(tmp_path / "merged")
    assert merged.config.merged and (tmp_path / "merged" / "llm" / "config.json").exists()
    with torch.no_grad():
        out = merged(**batch, visual=merged.visual_embeds(frames)).logits
    torch.testing.assert_close(out, before, atol=1e-4, rtol=1e-4)


# ---- fine-tuning ----------------------------------------------------------------------------------
def _dataset_loss(model: VideoLLM, data_file: Path) -> float:
    from lma.data import collate, load_frames

    records, _ = read_records(str(data_file))
    losses = []
    with torch.no_grad():
        for rec in records:
            if rec.line in (5, 7, 10):        # skipped in training: bad video, missing video, too long
                continue
            frames, ts = load_frames(rec.video, FRAMES, model.config.image_size)
            batch = collate([model.prompt(rec.messages, ts)], model.tokenizer.pad_token_id)
            losses.append(float(model(**batch, visual=model.visual_embeds(frames)).loss))
    return sum(losses) / len(losses)


def test_finetune_lowers_loss_and_skips_bad_records_by_line(trained, student_dir, llm_dir, data_file):
    skipped = [json.loads(t) for t in (trained / "skipped.jsonl").read_text().splitlines()]
    by_line = {row["line"]: row for row in skipped}
    assert sorted(by_line) == [2, 3, 5, 7, 10]
    assert by_line[2]["stage"] == "parse" and by_line[3]["stage"] == "parse"
    assert issubclass(getattr(errors, by_line[5]["error_type"]), errors.VideoError)   # A's classification
    assert by_line[5]["video"].endswith("junk.mp4")
    assert by_line[7]["error_type"] == "InputNotFoundError"
    assert by_line[10]["stage"] == "tokenize" and "max_length 200" in by_line[10]["message"]

    rows = [json.loads(t) for t in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["visual_tokens"] == 2 * (FRAMES // 4) * 4 for r in rows)   # 2 videos x 2 clips x 4 tokens
    assert {"loss", "lr", "grad_norm", "epoch", "skipped", "videos_per_s", "data_wait_frac"} <= set(rows[0])

    torch.manual_seed(0)
    fresh = VideoLLM.build(student_dir, str(llm_dir), frames=FRAMES).eval()
    tuned = VideoLLM.from_pretrained(trained)
    assert tuned.config.frames == FRAMES
    before, after = _dataset_loss(fresh, data_file), _dataset_loss(tuned, data_file)
    assert after < 0.8 * before, (before, after)


def test_resume_continues_exactly(tmp_path, trained, student_dir, llm_dir, data_file):
    """Cut the run back to its mid-run checkpoint and resume: later steps and the weights match."""
    run = tmp_path / "out"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:08d}")
    for name in ("adapter", "student", "projector.safetensors", "config.json"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    finetune(_config(student_dir, llm_dir, data_file, run, "--resume"))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "step_s", "videos_per_s", "data_wait_frac")}
                          for r in rows]
    read = lambda d: [json.loads(t) for t in (d / "metrics.jsonl").read_text().splitlines()]
    assert strip(read(run)) == strip(read(trained))
    from safetensors.torch import load_file

    a = load_file(trained / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")
    b = load_file(run / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lr"):
        finetune(_config(student_dir, llm_dir, data_file, run, "--resume", "--lr", "1e-3"))


def _nvdec_ready() -> bool:
    from pipeline.nvdec import unavailable_reason

    return torch.cuda.is_available() and unavailable_reason(0) is None


def test_generate_cli_end_to_end(trained, data_file):
    cmd = [sys.executable, "-m", "lma.generate", "--model", str(trained), "--video", str(data_file.parent / "a.mp4"),
           "--question", "what colour is the square", "--max-new-tokens", "6"]
    done = subprocess.run(cmd + ["--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report["time_ms"]) == {"decode", "student", "projector", "prefill", "generation"}
    assert all(v > 0 for v in report["time_ms"].values())
    assert report["frames"] == FRAMES and report["visual_tokens"] == (FRAMES // 4) * 4
    assert 0 < report["new_tokens"] <= 6 and isinstance(report["answer"], str)
    assert report["decoder"] == ("nvdec" if _nvdec_ready() else "ffmpeg")     # --decode-device auto

    if not _nvdec_ready():     # NVDEC asked for where it cannot run: one clear line, before any decode
        refused = subprocess.run(cmd + ["--decode-device", "gpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "--decode-device gpu:" in refused.stderr

    bad = subprocess.run(cmd[:6] + [str(data_file.parent / "junk.mp4")] + cmd[7:], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "cannot read video" in bad.stderr


@pytest.mark.slow
def test_ray_job_runs_finetune_data_parallel_on_ray_train(tmp_path, ray_driver, student_dir, llm_dir, data_file,
                                                           capsys):
    """On the session's Ray cluster: 2 Ray Train workers (gloo), grad-accum and gradient checkpointing."""
    from jobs.lma_finetune import main

    out = tmp_path / "ray_out"
    main(["--student", str(student_dir), "--llm", str(llm_dir), "--data", str(data_file), "--output", str(out),
          "--frames", str(FRAMES), "--max-steps", "2", "--grad-accum", "2", "--gradient-checkpointing",
          "--address", ray_driver.address, "--ray-workers", "2", "--num-cpus", "1", "--max-failures", "1"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"output": str(out.resolve())}
    rows = [json.loads(t) for t in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["visual_tokens"] == 2 * 2 * (FRAMES // 4) * 4 for r in rows)   # 2 ranks x 2 micro-batches
    state = json.loads((out / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["resume"]     # --max-failures turns --resume on
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert {2, 3, 5, 7} <= {json.loads(t)["line"] for t in (out / "skipped.jsonl").read_text().splitlines()}


@pytest.mark.shared_videos
def test_answer_on_real_videos(trained, shared_videos):
    """Real containers through the whole inference path; a 3-frame video gives one padded clip."""
    from lma.generate import answer

    model = VideoLLM.from_pretrained(trained)
    text, report = answer(model, str(shared_videos / "video_90.mov"), "what happens", FRAMES, 3)
    assert report["frames"] == 3 and report["visual_tokens"] == model.config.tokens_per_clip
    text, report = answer(model, str(shared_videos / "flipping_a_pancake.mkv"), "what happens", FRAMES, 3)
    assert report["frames"] == FRAMES and report["visual_tokens"] == 2 * model.config.tokens_per_clip
    with pytest.raises(errors.VideoError):
        answer(model, str(shared_videos / "corrupted.mp4"), "what happens", FRAMES, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 GPU path needs a CUDA device")
def test_bf16_cuda_train_step_and_greedy(student_dir, llm_dir):
    model = VideoLLM.build(student_dir, str(llm_dir), device="cuda")
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.projector.fc1.weight.dtype == torch.float32
    frames = torch.randint(0, 256, (8, 112, 112, 3), dtype=torch.uint8)
    batch = _batch(model, frames)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    loss = model(**batch, visual=model.visual_embeds(frames)).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    model.eval()
    with torch.no_grad():
        prompt = model.prompt([{"role": "user", "content": "<video>\nwhat colour"}], [0.0] * 8,
                              add_generation_prompt=True)
        mask = torch.ones_like(prompt.input_ids)[None]
        out = model(prompt.input_ids[None], mask, prompt.visual_mask[None], model.visual_embeds(frames), use_cache=True)
        tokens = model.greedy(out.logits, out.past_key_values, mask, 5)
    assert len(tokens) <= 5


@pytest.mark.slow
def test_finetune_reads_jsonl_and_videos_from_s3(tmp_path, monkeypatch, s3_env, student_dir, llm_dir, data_file):
    """`--data s3://...` against the session's moto S3 server; relative video paths resolve in the bucket."""
    import s3fs

    monkeypatch.setenv("LITEFRAME_VIDEO_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    fs.mkdir("lma")
    for name in ("train.jsonl", "a.mp4", "junk.mp4"):
        fs.put(str(data_file.parent / name), f"lma/set/{name}")
    records, _ = read_records("s3://lma/set/train.jsonl")
    assert records[0].video == "s3://lma/set/a.mp4"
    out = tmp_path / "out"
    finetune(parse_config(FinetuneConfig, [
        "--student", str(student_dir), "--llm", str(llm_dir), "--data", "s3://lma/set/train.jsonl",
        "--output", str(out), "--frames", str(FRAMES), "--max-steps", "1", "--batch-size", "2"]))
    assert json.loads((out / "metrics.jsonl").read_text())["visual_tokens"] == 2 * (FRAMES // 4) * 4


def test_unfrozen_student_gets_gradients_and_is_saved(tmp_path, student_dir, llm_dir):
    model = VideoLLM.build(student_dir, str(llm_dir), train_student=True)
    frames = torch.randint(0, 256, (8, 112, 112, 3), dtype=torch.uint8)
    model(**_batch(model, frames), visual=model.visual_embeds(frames)).loss.backward()
    grads = [p.grad for p in model.student.parameters() if p.requires_grad]
    assert grads and sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    with torch.no_grad():
        model.student.patch_embed.weight.add_(1.0)
    model.save_pretrained(tmp_path / "m")
    loaded = VideoLLM.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.student.patch_embed.weight, model.student.patch_embed.weight)
    assert not any(p.requires_grad for p in loaded.student.parameters())


def test_latency_bench_tiny_smoke(tmp_path):
    """bench/latency.py --tiny runs the table's code paths at tiny shapes (times are not checked)."""
    out = tmp_path / "latency.json"
    done = subprocess.run([sys.executable, "bench/latency.py", "--tiny", "--reps", "1", "--warmup", "0",
                           "--baseline-frames", "32,8", "--student-frames", "8", "--json-out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    tokens = {(r["model"].split()[0], r["frames"]): r["visual_tokens"] for r in rows}
    # tiny ViT: 112 px / 14 = 8x8 patches, pixel shuffle 0.5 -> 16 per frame; tiny student: 4 per 4-frame clip
    assert tokens == {("InternVL3-8B", 32): 512, ("InternVL3-8B", 8): 128, ("LiteFrame", 8): 8}
    assert all(r["prefill_ms"] > 0 and r["vit_ms"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0 and "| LiteFrame student (tiny) | eager | 8 |" in done.stdout
