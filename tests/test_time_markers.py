"""Time-marker schemes (issue 13): what each costs in prompt tokens, that the original `text` scheme
(and a config saved before schemes existed) is unchanged, that the `embedding` scheme's time
embedding starts at zero and is trained, saved and loaded with the projector, and that generation,
the lmms-eval plugin, the latency bench and a resumed fine-tune all follow the saved scheme. Tiny
random Qwen2 + locally trained BPE + tiny student, loaded through `from_pretrained(dir)`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lma.data import (TIME_MARKER, TimeMarkers, clip_start_times, collate, marker_tokens, sample_timestamps,
                      tokenize_conversation)
from lma.finetune import FinetuneConfig, finetune
from lma.modeling import VideoLLM
from pipeline.config import parse_config
from pipeline.training.resume import ResumeMismatchError

REPO = Path(__file__).resolve().parents[1]
EVAL_VENV = Path(os.environ.get("LITEFRAME_EVAL_VENV", REPO / ".venv-eval"))
FRAMES = 8
QUESTION = [{"role": "user", "content": "<video>\nwhat colour is the square"}]
CONVERSATION = [*QUESTION, {"role": "assistant", "content": "the square is red"}]
SCHEMES = {"text": {}, "text-every-n": {"marker_every": 2}, "embedding": {}}


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    from lma.testing import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def tokenizer(llm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm_dir)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    from lma.testing import make_tiny_student

    return make_tiny_student(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """Two short videos (12 frames each: 3 clips at --frames 12) and a record about each."""
    from pipeline.samples import make_video

    root = tmp_path_factory.mktemp("tm_data")
    make_video(root / "a.mp4", seconds=1.5, fps=8, size=(64, 64))
    make_video(root / "b.mp4", seconds=1.5, fps=8, size=(64, 64))
    with (root / "train.jsonl").open("w") as f:
        for video, answer in (("a.mp4", "the square is red"), ("b.mp4", "the square is blue")):
            turns = [{"from": "human", "value": "<video>\nwhat colour is the square"}, {"from": "gpt", "value": answer}]
            f.write(json.dumps({"video": video, "conversations": turns}) + "\n")
    return root / "train.jsonl"


def _frames(n: int = FRAMES) -> torch.Tensor:
    return torch.randint(0, 256, (n, 112, 112, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def _times(n: int = FRAMES, seconds: float = 30.0) -> list[float]:
    return sample_timestamps(seconds, n)


def _reference_text_ids(tok, messages, clip_times, tokens_per_clip, add_generation_prompt=False) -> list[int]:
    """The ids the original one-marker-per-clip tokenisation gives, built independently: the rendered
    chat split at the placeholder, then a marker and the pad slots for every clip."""
    full = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    before, after = full.split("<video>")
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    out = ids(before)
    for t in clip_times:
        out += ids(TIME_MARKER.format(t)) + [tok.pad_token_id] * tokens_per_clip
    return out + ids(after)


def _visual_runs(mask: torch.Tensor) -> list[int]:
    return [len(r) for r in "".join(str(int(v)) for v in mask).split("0") if r]


# ---- what the markers cost ------------------------------------------------------------------------
@pytest.mark.parametrize("clips", [1, 7, 8, 9, 64, 128])
def test_marker_counts_and_tokens_per_scheme(tokenizer, clips):
    """text: a marker per clip; text-every-n: ceil(clips / n); embedding: none. `marker_tokens` is
    exactly what the markers add to a real prompt (prompt length less visual slots less the prompt
    without any clip)."""
    times = [1.5 * i for i in range(clips)]
    bare = len(tokenize_conversation(tokenizer, QUESTION, [], 4, add_generation_prompt=True).input_ids)
    for markers, expected in ((TimeMarkers("text"), clips), (TimeMarkers("text-every-n", 8), math.ceil(clips / 8)),
                              (TimeMarkers("text-every-n", 3), math.ceil(clips / 3)), (TimeMarkers("embedding"), 0)):
        assert sum(markers.marked(i) for i in range(clips)) == expected
        ex = tokenize_conversation(tokenizer, QUESTION, times, 4, add_generation_prompt=True, markers=markers)
        cost = marker_tokens(tokenizer, times, markers)
        assert len(ex.input_ids) - int(ex.visual_mask.sum()) - bare == cost
        assert (cost == 0) == (expected == 0) and int(ex.visual_mask.sum()) == 4 * clips
        assert torch.equal(ex.visual_times, torch.tensor(times, dtype=torch.float32).repeat_interleave(4))
        text = tokenizer.decode(ex.input_ids[~ex.visual_mask])
        assert text.count("<t=") == expected


def test_sparse_markers_sit_before_every_nth_clip(tokenizer):
    times = [0.5 * i for i in range(9)]
    ex = tokenize_conversation(tokenizer, QUESTION, times, 2, markers=TimeMarkers("text-every-n", 4))
    assert _visual_runs(ex.visual_mask) == [8, 8, 2]          # clips 0-3, 4-7, 8: a marker before each run
    text = tokenizer.decode(ex.input_ids[~ex.visual_mask])
    assert text.index("<t=0.0s>") < text.index("<t=2.0s>") < text.index("<t=4.0s>") < text.index("what colour")
    assert "<t=0.5s>" not in text
    embedded = tokenize_conversation(tokenizer, QUESTION, times, 2, markers=TimeMarkers("embedding"))
    assert _visual_runs(embedded.visual_mask) == [18]


def test_bad_schemes_are_refused(student_dir, llm_dir, data_file, tmp_path, capsys):
    with pytest.raises(ValueError, match="time markers must be one of"):
        TimeMarkers("sparse")
    with pytest.raises(ValueError, match="marker_every"):
        TimeMarkers("text-every-n", 0)
    with pytest.raises(ValueError, match="time markers"):
        VideoLLM.build(student_dir, str(llm_dir), time_markers="none")
    base = ["--student", str(student_dir), "--llm", str(llm_dir), "--data", str(data_file), "--output", str(tmp_path)]
    for flags, message in ((["--time-markers", "sparse"], "--time-markers: 'sparse' is not one of text, "),
                           (["--marker-every", "0"], "--marker-every: 0 is below its minimum 1")):
        with pytest.raises(SystemExit) as exit_:
            parse_config(FinetuneConfig, [*base, *flags])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_marker_table_and_bench_rows_follow_the_scheme(tmp_path, llm_dir, tokenizer):
    """bench/latency.py counts LiteFrame's markers with a tokenizer through lma.data, per scheme."""
    done = subprocess.run([sys.executable, "bench/latency.py", "--marker-table", "--tokenizer", str(llm_dir),
                           "--student-frames", "8,36", "--marker-every", "4", "--video-seconds", "90"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in done.stdout.splitlines()
            if line.startswith("| ") and "scheme" not in line}
    for scheme, name in (("text", "text"), ("text-every-n", "text-every-4"), ("embedding", "embedding")):
        for frames in (8, 36):
            times = clip_start_times(sample_timestamps(90.0, frames), 4)
            markers = TimeMarkers(scheme, 4)
            count = sum(markers.marked(i) for i in range(len(times)))
            expected = f"| {name} | {frames} | {len(times)} | {count} | {marker_tokens(tokenizer, times, markers)} |"
            assert rows[(name, str(frames))] == expected
    assert rows[("text-every-4", "36")].startswith("| text-every-4 | 36 | 9 | 3 |")

    out = tmp_path / "latency.json"
    done = subprocess.run([sys.executable, "bench/latency.py", "--tiny", "--reps", "1", "--warmup", "0",
                           "--baseline-frames", "8", "--student-frames", "8", "--time-markers", "embedding",
                           "--prompt-tokens", "10", "--json-out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    student = next(r for r in data["rows"] if r["model"].startswith("LiteFrame"))
    assert (student["time_markers"], student["markers"], student["text_tokens"]) == ("embedding", 0, 10)
    base = next(r for r in data["rows"] if r["model"].startswith("InternVL"))
    assert base["text_tokens"] == 10 + 6 * 8                     # --marker-tokens per frame
    assert data["env"]["time_markers"]["scheme"] == "embedding"


# ---- the text scheme is what it was ---------------------------------------------------------------
def test_text_scheme_ids_unchanged_and_old_configs_load_as_text(tmp_path, tokenizer, student_dir, llm_dir):
    times = [0.0, 1.5, 3.0, 12.25]
    for markers in (TimeMarkers(), TimeMarkers("text", every=3)):          # `every` means nothing to text
        for messages, gen in ((CONVERSATION, False), (QUESTION, True)):
            ex = tokenize_conversation(tokenizer, messages, times, 5, add_generation_prompt=gen, markers=markers)
            assert ex.input_ids.tolist() == _reference_text_ids(tokenizer, messages, times, 5, gen)
    default = tokenize_conversation(tokenizer, CONVERSATION, times, 5)
    assert default.input_ids.tolist() == _reference_text_ids(tokenizer, CONVERSATION, times, 5)

    torch.manual_seed(0)
    model = VideoLLM.build(student_dir, str(llm_dir)).eval()
    assert model.markers == TimeMarkers("text", 8) and model.projector.time is None
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["time_markers"], config["marker_every"]) == ("text", 8)
    for key in ("time_markers", "marker_every"):                         # as saved before schemes existed
        del config[key]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    old = VideoLLM.from_pretrained(tmp_path / "m")
    assert old.markers == TimeMarkers("text") and old.projector.time is None
    frames = _frames()
    ex = old.prompt(QUESTION, _times(), add_generation_prompt=True)
    assert ex.input_ids.tolist() == _reference_text_ids(tokenizer, QUESTION, clip_start_times(_times(), 4),
                                                        model.config.tokens_per_clip, True)
    batch = collate([model.prompt(CONVERSATION, _times())], model.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(old(**batch, visual=old.visual_embeds(frames)).logits,
                           model(**batch, visual=model.visual_embeds(frames)).logits)


# ---- the embedding scheme -------------------------------------------------------------------------
def _no_time_logits(model: VideoLLM, batch: dict, visual: torch.Tensor) -> torch.Tensor:
    """The same weights given no time at all: the visual slots filled with the projector's output only."""
    embeds = model.llm.get_input_embeddings()(batch["input_ids"])
    embeds = embeds.masked_scatter(batch["visual_mask"][..., None], visual.reshape(-1, embeds.shape[-1]))
    return model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits


def test_time_embedding_starts_at_zero_and_training_changes_it(student_dir, llm_dir):
    torch.manual_seed(0)
    model = VideoLLM.build(student_dir, str(llm_dir), time_markers="embedding")
    assert torch.count_nonzero(model.projector.time.proj.weight) == 0
    assert "projector.time.proj.weight" in model.trainable_state_dict()
    frames = _frames()
    batch = collate([model.prompt(CONVERSATION, _times())], model.tokenizer.pad_token_id)
    assert model.tokenizer.decode(batch["input_ids"][0]).count("<t=") == 0
    shifted = {**batch, "visual_times": batch["visual_times"] + 100.0}
    model.eval()
    with torch.no_grad():
        visual = model.visual_embeds(frames)
        at_init = model(**batch, visual=visual).logits
        assert torch.equal(at_init, _no_time_logits(model, batch, visual))
        assert torch.equal(model(**shifted, visual=visual).logits, at_init)
    with pytest.raises(ValueError, match="visual_times"):
        model(**{k: v for k, v in batch.items() if k != "visual_times"}, visual=visual)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss = model(**batch, visual=model.visual_embeds(frames)).loss
        loss.backward()
        assert float(model.projector.time.proj.weight.grad.abs().sum()) > 0
        opt.step()
    model.eval()
    with torch.no_grad():
        visual = model.visual_embeds(frames)
        trained = model(**batch, visual=visual).logits
        assert not torch.allclose(trained, _no_time_logits(model, batch, visual), atol=1e-4)
        assert not torch.allclose(trained, model(**shifted, visual=visual).logits, atol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_load_round_trip_keeps_scheme_and_weights(tmp_path, student_dir, llm_dir, scheme):
    torch.manual_seed(0)
    model = VideoLLM.build(student_dir, str(llm_dir), time_markers=scheme, **SCHEMES[scheme])
    with torch.no_grad():   # trained weights: zero-initialised ones (LoRA B, the time embedding) would load trivially
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    frames = _frames()
    batch = collate([model.prompt(CONVERSATION, _times())], model.tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(**batch, visual=model.visual_embeds(frames)).logits
    model.save_pretrained(tmp_path / "m")
    loaded = VideoLLM.from_pretrained(tmp_path / "m")
    assert loaded.markers == model.markers == TimeMarkers(scheme, SCHEMES[scheme].get("marker_every", 8))
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "m" / "projector.safetensors")
    assert ("time.proj.weight" in saved) == (scheme == "embedding")
    if scheme == "embedding":
        assert torch.equal(loaded.projector.time.proj.weight, model.projector.time.proj.weight)
    assert torch.equal(loaded.prompt(CONVERSATION, _times()).input_ids, batch["input_ids"][0])
    with torch.no_grad():
        assert torch.equal(loaded(**batch, visual=loaded.visual_embeds(frames)).logits, before)

    config = json.loads((tmp_path / "m" / "config.json").read_text())   # a config that lies about the weights
    config["time_markers"] = "text" if scheme == "embedding" else "embedding"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="time.proj.weight"):
        VideoLLM.from_pretrained(tmp_path / "m")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 GPU path needs a CUDA device")
def test_bf16_cuda_time_embedding_trains_in_fp32_and_runs_in_bf16(tmp_path, student_dir, llm_dir):
    """On GPU the LLM is bf16 and the projector (time embedding included) trains in fp32; loaded for
    inference it runs in bf16, its features still computed in fp32 (an hour into a video)."""
    model = VideoLLM.build(student_dir, str(llm_dir), time_markers="embedding", device="cuda")
    assert model.projector.time.proj.weight.dtype == torch.float32
    frames, times = _frames(), _times(seconds=3600.0)
    batch = collate([model.prompt(CONVERSATION, times)], model.tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch, visual=model.visual_embeds(frames)).loss.backward()
    grad = model.projector.time.proj.weight.grad
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    opt.step()
    model.save_pretrained(tmp_path / "m")
    loaded = VideoLLM.from_pretrained(tmp_path / "m", device="cuda")
    assert loaded.projector.time.proj.weight.dtype == torch.bfloat16
    seconds = torch.tensor([3599.75, 3600.25], device="cuda")
    torch.testing.assert_close(loaded.projector.time(seconds).float(), model.projector.time(seconds).detach(),
                               atol=0.05, rtol=0.05)
    with torch.no_grad():
        prompt = loaded.prompt(QUESTION, times, add_generation_prompt=True)
        mask = torch.ones_like(prompt.input_ids)[None]
        out = loaded(prompt.input_ids[None], mask, prompt.visual_mask[None], loaded.visual_embeds(frames),
                     visual_times=prompt.visual_times, use_cache=True)
        assert len(loaded.greedy(out.logits, out.past_key_values, mask, 4)) <= 4


# ---- fine-tuning, generation and evaluation follow the saved scheme ----------------------------------
def _finetune_args(student_dir, llm_dir, data_file, output, *extra) -> list[str]:
    return ["--student", str(student_dir), "--llm", str(llm_dir), "--data", str(data_file), "--output", str(output),
            "--frames", "12", "--max-steps", "4", "--batch-size", "2", "--lr", "1e-2", "--warmup-ratio", "0",
            "--save-every", "2", "--device", "cpu", "--prefetch", "2", *extra]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, student_dir, llm_dir, data_file) -> dict[str, Path]:
    """A model fine-tuned by lma.finetune with each scheme."""
    root = tmp_path_factory.mktemp("tm_runs")
    out = {}
    for scheme, extra in (("text", ()), ("text-every-n", ("--marker-every", "2")), ("embedding", ())):
        out[scheme] = root / scheme
        finetune(parse_config(FinetuneConfig, _finetune_args(student_dir, llm_dir, data_file, out[scheme],
                                                              "--time-markers", scheme, *extra)))
    return out


def test_finetune_saves_the_scheme_and_trains_the_time_embedding(tuned):
    from safetensors.torch import load_file

    text_tokens = {}
    for scheme, run in tuned.items():
        config = json.loads((run / "config.json").read_text())
        assert config["time_markers"] == scheme
        rows = [json.loads(t) for t in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(r["visual_tokens"] == 2 * 3 * 4 for r in rows)   # 2 videos x 3 clips x 4
        text_tokens[scheme] = rows[0]["text_tokens"]
    assert text_tokens["text"] > text_tokens["text-every-n"] > text_tokens["embedding"]
    assert float(load_file(tuned["embedding"] / "projector.safetensors")["time.proj.weight"].abs().sum()) > 0


def test_resume_with_another_scheme_is_refused(tmp_path, tuned, student_dir, llm_dir, data_file):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tuned["text-every-n"], run)
    args = lambda *extra: parse_config(FinetuneConfig, _finetune_args(
        student_dir, llm_dir, data_file, run, "--resume", "--time-markers", "text-every-n", "--marker-every", "2",
        *extra))
    with pytest.raises(ValueError, match="marker_every"):
        finetune(args("--marker-every", "3"))
    with pytest.raises(ValueError, match="time_markers"):
        finetune(args("--time-markers", "text"))
    # the embedding scheme has weights the checkpoint lacks: the settings are checked before any weight
    with pytest.raises(ResumeMismatchError, match="time_markers"):
        finetune(args("--time-markers", "embedding"))


def test_a_checkpoint_from_before_the_schemes_resumes(tmp_path, tuned, student_dir, llm_dir, data_file):
    """Checkpoints written before time_markers/marker_every existed ran with their defaults: they resume."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tuned["text"], run)
    for state_file in run.glob("checkpoints/*/state.json"):
        state = json.loads(state_file.read_text())
        del state["config"]["time_markers"], state["config"]["marker_every"]
        state_file.write_text(json.dumps(state))
    assert finetune(parse_config(FinetuneConfig, _finetune_args(student_dir, llm_dir, data_file, run, "--resume")))
    with pytest.raises(ResumeMismatchError, match="time_markers"):
        finetune(parse_config(FinetuneConfig, _finetune_args(student_dir, llm_dir, data_file, run, "--resume",
                                                             "--time-markers", "embedding")))


def test_generate_uses_each_saved_scheme(tuned, data_file, tokenizer):
    from lma.data import load_frames
    from lma.generate import answer

    video = str(data_file.parent / "a.mp4")
    reports = {}
    for scheme, run in tuned.items():
        model = VideoLLM.from_pretrained(run)
        assert model.markers.scheme == scheme
        text, reports[scheme] = answer(model, video, "what colour is the square", 12, 4)
        assert isinstance(text, str) and reports[scheme]["time_markers"] == scheme
        assert reports[scheme]["visual_tokens"] == 3 * model.config.tokens_per_clip
    times = clip_start_times(load_frames(video, 12, model.config.image_size)[1], 4)   # what answer() decodes
    for scheme, markers in (("text", TimeMarkers("text")), ("text-every-n", TimeMarkers("text-every-n", 2))):
        extra = reports[scheme]["prompt_tokens"] - reports["embedding"]["prompt_tokens"]
        assert extra == marker_tokens(tokenizer, times, markers) > 0

    cli = subprocess.run([sys.executable, "-m", "lma.generate", "--model", str(tuned["embedding"]), "--video", video,
                          "--question", "what colour is the square", "--max-new-tokens", "3", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr[-2000:]
    report = json.loads(cli.stdout.strip().splitlines()[-1])
    assert report["time_markers"] == "embedding" and report["prompt_tokens"] == reports["embedding"]["prompt_tokens"]


PLUGIN_CHECK = '''
import json, sys
from lmms_eval.api.instance import Instance
from lma.generate import answer
from lma.lmms_eval.model import LiteFrameVideoLLM

model_dir, video = sys.argv[1], sys.argv[2]
doc = {"question": "what colour is the square", "video": video}
m = LiteFrameVideoLLM(pretrained=model_dir, frames=12, batch_size=2)
m.task_dict = {"t": {"test": [doc]}}
inst = lambda kind, second: Instance(kind, (doc["question"], second, lambda d: [d["video"]], 0, "t", "test"),
                                     idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})
gen = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": ["\\n\\n"]}
got = m.generate_until([inst("generate_until", dict(gen))])
ll = m.loglikelihood([inst("loglikelihood", " red"), inst("loglikelihood", " blue")])
print("CHECK " + json.dumps({"scheme": m.model.markers.scheme, "plugin": got[0],
                             "generate": answer(m.model, video, doc["question"], 12, 4)[0],
                             "losses": [r.text[0] for r in ll]}))
'''


@pytest.mark.slow
def test_lmms_eval_plugin_follows_the_saved_scheme(tuned, data_file, tmp_path):
    """The plugin's answers equal lma.generate's for the same model, video and question, and
    multiple-choice scoring runs, for every scheme (in .venv-eval, where lmms-eval lives)."""
    if not (EVAL_VENV / "bin" / "python").exists():
        pytest.skip(f"lmms-eval environment absent ({EVAL_VENV}): `make eval-venv` creates it")
    (tmp_path / "check.py").write_text(PLUGIN_CHECK)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for scheme, run in tuned.items():
        res = subprocess.run([str(EVAL_VENV / "bin" / "python"), str(tmp_path / "check.py"), str(run),
                              str(data_file.parent / "a.mp4")], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        line = next((x for x in res.stdout.splitlines() if x.startswith("CHECK ")), None)
        assert res.returncode == 0 and line, (res.stdout + res.stderr)[-4000:]
        check = json.loads(line[len("CHECK "):])
        assert check["scheme"] == scheme
        assert check["plugin"] == check["generate"].split("\n\n")[0].strip()
        assert all(0 < loss < 50 for loss in check["losses"])
