"""lmms-eval evaluates a LiteFrame Video LLM, as `lma.finetune` saves it, through lmms-eval's own
plugin mechanism and CLI, on the small video QA task shipped in `lma/lmms_eval/tasks`, with nothing
downloaded (HF offline; the task's videos are generated here).

lmms-eval lives in its own environment, `.venv-eval` (`make eval-venv`; `make test` creates it):
it declares torchvision, which has no build for our torch, so it is installed with --no-deps beside
what it imports (lma/lmms_eval/requirements.txt). The Video LLM is built and trained in the test
environment; everything that imports lmms-eval runs in .venv-eval, in subprocesses (its editable
install of this checkout is what they import). Without .venv-eval those tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from lma.lmms_eval import TASKS_DIR, videoqa

REPO = Path(__file__).resolve().parents[1]
EVAL_VENV = Path(os.environ.get("LITEFRAME_EVAL_VENV", REPO / ".venv-eval"))
TRAIN_FRAMES = 16
# The shipped records' videos have 16, 32, 36 and 512 frames: at --frames 512 each is read whole.
VIDEO_FRAMES = {"v02s.mp4": 16, "v04s.mp4": 32, "v06s.mp4": 36, "v32s.mp4": 512}
CHAT_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                 "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def eval_venv() -> Path:
    """The eval environment; skips when there is none, fails when it runs another checkout's code."""
    if not (EVAL_VENV / "bin" / "lmms-eval").exists():
        pytest.skip(f"lmms-eval environment absent ({EVAL_VENV}/bin/lmms-eval missing): `make eval-venv` "
                    f"creates {EVAL_VENV.name} (`make test` does it first)")
    origin = subprocess.run([str(EVAL_VENV / "bin" / "python"), "-c",
                             "import importlib.util as u; print(u.find_spec('lma').origin)"],
                            cwd="/", capture_output=True, text=True, timeout=60).stdout.strip()
    assert Path(origin).resolve().parent.parent == REPO, (
        f"{EVAL_VENV} imports lma from {origin}, not from this checkout: rerun `make eval-venv`")
    return EVAL_VENV


# ---- the shipped task's pieces, in this environment (no lmms-eval needed) ----------------------
def test_task_records_videos_and_scoring(tmp_path):
    docs = videoqa.read_records()
    assert len(docs) == 8 and {d["video"] for d in docs} == set(VIDEO_FRAMES)
    for d in docs:
        assert d["answer"] in videoqa.doc_to_choice(d)
        assert videoqa.doc_to_choice(d)[videoqa.doc_to_target(d)] == d["answer"]
    text = videoqa.doc_to_text(docs[0])
    assert text.startswith(docs[0]["question"]) and "\nD. about 32 seconds\n" in text
    assert text.endswith("letter from the given choices directly.")

    for answer, letter in [("B", "B"), ("(C) about 6 seconds", "C"), ("D.", "D"), ("Answer: A", "A"),
                           ("the answer is b", None), ("", None), ("E", None)]:
        assert videoqa.extract_letter(answer, 4) == letter, answer
    assert videoqa.process_results(docs[0], ["A. about 2 seconds"]) == {"accuracy": 1.0}
    assert videoqa.process_results(docs[0], ["B"]) == {"accuracy": 0.0}

    from pipeline.video import probe

    doc = dict(docs[0])
    path = videoqa.ensure_video(doc, tmp_path)
    info = probe(str(path))
    assert info.num_frames == VIDEO_FRAMES[doc["video"]] and abs(info.duration - doc["seconds"]) < 0.2
    stamp = path.stat().st_mtime_ns
    assert videoqa.ensure_video(doc, tmp_path) == path and path.stat().st_mtime_ns == stamp   # reused
    doc["seconds"] = 1
    videoqa.ensure_video(doc, tmp_path)                                                       # spec changed
    assert probe(str(path)).num_frames == 8


# ---- a Video LLM as lma.finetune saves it --------------------------------------------------------
@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videoqa_videos")
    videoqa.ensure_all(root)
    return root


@pytest.fixture(scope="module")
def video_llm(eval_venv, tmp_path_factory, videos) -> Path:
    """Tiny random student + tiny random Qwen2 (Qwen2.5's chat template), LoRA-tuned for a few
    steps by `lma.finetune` on the task's own questions."""
    import torch
    from transformers import AutoTokenizer

    from lma import finetune
    from lma.testing import CORPUS, make_tiny_llm
    from student import LiteFrameModel, preset_config

    root = tmp_path_factory.mktemp("lmms_eval_model")
    docs = videoqa.read_records()
    corpus = (*CORPUS, "you are a helpful assistant", *{videoqa.doc_to_text(d) for d in docs})
    llm = make_tiny_llm(root / "llm", corpus)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(llm)
    torch.manual_seed(0)
    LiteFrameModel(preset_config("tiny")).save_pretrained(root / "student")
    with (root / "train.jsonl").open("w") as f:
        for d in docs:
            f.write(json.dumps({"video": str(videos / d["video"]), "conversations": [
                {"from": "human", "value": f"<video>\n{videoqa.doc_to_text(d)}"},
                {"from": "gpt", "value": d["answer"]}]}) + "\n")
    finetune.main(["--student", str(root / "student"), "--llm", str(llm), "--data", str(root / "train.jsonl"),
                   "--output", str(root / "lma"), "--frames", str(TRAIN_FRAMES), "--max-steps", "4",
                   "--lr", "1e-3", "--device", "cpu"])
    assert (root / "lma" / "config.json").is_file() and (root / "lma" / "adapter").is_dir()
    return root / "lma"


def _env(work: Path, videos: Path) -> dict[str, str]:
    """Offline; lmms-eval's deprecated LMMS_EVAL_PLUGINS unset, so the model can only come from the
    `lmms_eval.models` entry point."""
    env = {k: v for k, v in os.environ.items() if k not in ("LMMS_EVAL_PLUGINS", "PYTHONPATH")}
    env.update(HF_HOME=str(work / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               LITEFRAME_VIDEOQA_DIR=str(videos), TOKENIZERS_PARALLELISM="false")
    return env


# ---- lmms-eval's real CLI ------------------------------------------------------------------------
@pytest.mark.slow
def test_lmms_eval_cli_scores_the_shipped_task_at_512_frames(eval_venv, tmp_path, video_llm, videos):
    """`lmms-eval --model liteframe` (found through the entry point) runs both the generation task
    and the multiple-choice (log-likelihood) task, batched, at 512 frames per video, and writes the
    results JSON with each task's metric."""
    cli = eval_venv / "bin" / "lmms-eval"
    out = tmp_path / "out"
    cmd = [str(cli), "--model", "liteframe", "--model_args", f"pretrained={video_llm},frames=512",
           "--include_path", str(TASKS_DIR), "--tasks", "liteframe_videoqa,liteframe_videoqa_mc",
           "--batch_size", "3", "--output_path", str(out), "--log_samples"]
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path, videos), capture_output=True, text=True, timeout=500)
    log = res.stdout + res.stderr
    # lmms-eval 0.7.3 logs a failed evaluation and still exits 0: the results file is the evidence.
    assert res.returncode == 0 and "Error during evaluation" not in log, log[-6000:]
    results_files = list(out.rglob("*_results.json"))
    assert len(results_files) == 1, log[-3000:]
    data = json.loads(results_files[0].read_text())
    assert data["config"]["model"] == "liteframe"
    gen, mc = data["results"]["liteframe_videoqa"], data["results"]["liteframe_videoqa_mc"]
    assert 0.0 <= gen["accuracy,none"] <= 1.0 and 0.0 <= mc["acc,none"] <= 1.0
    assert data["n-samples"]["liteframe_videoqa"]["effective"] == 8
    assert data["n-samples"]["liteframe_videoqa_mc"]["effective"] == 8

    docs = {i: d for i, d in enumerate(videoqa.read_records())}
    samples = {task: [json.loads(line) for line in next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()]
               for task in ("liteframe_videoqa", "liteframe_videoqa_mc")}
    assert sorted(s["doc_id"] for s in samples["liteframe_videoqa"]) == list(range(8))
    for s in samples["liteframe_videoqa"]:
        assert isinstance(s["filtered_resps"], str) and s["accuracy"] in (0.0, 1.0)
    for s in samples["liteframe_videoqa_mc"]:
        scores = s["filtered_resps"]     # per option: [loss, is_greedy], as lmms-eval logs them
        assert len(scores) == len(docs[s["doc_id"]]["options"])
        assert all(0.0 < float(loss) < 50.0 and greedy in ("True", "False", True, False) for loss, greedy in scores)
        assert s["acc"] in (0.0, 1.0)

    stats = re.findall(r"liteframe after generate_until: requests=(\d+) videos_encoded=(\d+) reused=(\d+) "
                       r"frames=(\d+) visual_tokens=(\d+)", log)
    assert stats, log[-3000:]
    requests, encoded, reused, frames, tokens = map(int, stats[-1])
    assert requests == 8 * 3 + 8              # 24 options scored, 8 answers generated
    assert encoded == 4 and reused == requests - 4    # each video decoded and encoded once
    assert frames == sum(VIDEO_FRAMES.values())   # the 32 s video at 512 frames, the others whole
    assert tokens > 0


# ---- the model class, in-process in the eval environment -----------------------------------------
CHECKS = textwrap.dedent('''
    import json, math, sys, torch
    from PIL import Image
    from lmms_eval.api.instance import GenerationResult, Instance
    from lma.generate import answer
    from lma.lmms_eval import videoqa
    from lma.lmms_eval.model import LiteFrameVideoLLM, VideoDecodeError

    model_dir, junk = sys.argv[1], sys.argv[2]
    docs = videoqa.read_records()
    out = {}

    def make(**kw):
        m = LiteFrameVideoLLM(pretrained=model_dir, **kw)
        m.task_dict = {"t": {"test": docs}}
        return m

    def inst(kind, i, second, visual=videoqa.doc_to_visual):
        return Instance(kind, (videoqa.doc_to_text(docs[i]), second, visual, i, "t", "test"), idx=0,
                        metadata={"task": "t", "doc_id": i, "repeats": 1})

    gen = {"max_new_tokens": 8, "temperature": 0, "do_sample": False, "until": ["\\n\\n"]}
    one, three = make(frames=16, batch_size=1), make(frames=16, batch_size=3, video_cache=1, decode_workers=2)
    a1 = one.generate_until([inst("generate_until", i, dict(gen)) for i in range(8)])
    a3 = three.generate_until([inst("generate_until", i, dict(gen)) for i in range(8)])
    ref = [answer(one.model, str(videoqa.ensure_video(d)), videoqa.doc_to_text(d), 16, 8)[0].split("\\n\\n")[0].strip()
           for d in docs]
    out["generate"] = {"unbatched": a1, "batched": a3, "lma_generate": ref}

    def options():
        return [inst("loglikelihood", i, " " + c) for i in range(8) for c in videoqa.doc_to_choice(docs[i])]

    mc = options()
    l1, l3 = one.loglikelihood(mc), three.loglikelihood(options())
    assert all(isinstance(r, GenerationResult) for r in l1)
    with torch.inference_mode():      # the loss by hand: one unpadded forward over prompt + continuation
        manual = []
        for r in mc[:6]:
            vis = next(one._visuals([r]))
            ex, c = one._example(r.args[0], vis, r.args[1])
            logits = one.model.llm(inputs_embeds=one._embeds(ex, vis)[None]).logits[0].float()
            manual.append(-torch.log_softmax(logits[-c - 1:-1], -1).gather(-1, ex.input_ids[-c:, None]).mean().item())
    out["loglikelihood"] = {"unbatched": [list(r.text) for r in l1], "batched": [list(r.text) for r in l3],
                            "manual": manual}

    # visuals that are not one video: frames as images, one still image, two videos
    imgs = [Image.new("RGB", (160, 120), (i * 20, 0, 0)) for i in range(10)]
    frames, times = one._decode(imgs)
    still, still_times = one._decode(imgs[:1])
    out["images"] = {"frames": list(frames.shape), "times": times, "still": list(still.shape),
                     "still_times": still_times}
    try:
        one._decode([str(videoqa.ensure_video(docs[0])), str(videoqa.ensure_video(docs[2]))])
        out["two_videos"] = "accepted"
    except VideoDecodeError as err:
        out["two_videos"] = str(err)

    # an unreadable video: stops the run by default, naming it; video_errors=empty answers ""
    bad = lambda doc: [junk]
    try:
        one.generate_until([inst("generate_until", 0, dict(gen), bad)])
        out["raise"] = "no error"
    except VideoDecodeError as err:
        out["raise"] = str(err)
    lenient = make(frames=16, video_errors="empty")
    out["empty"] = {"generate": lenient.generate_until([inst("generate_until", 0, dict(gen), bad),
                                                        inst("generate_until", 1, dict(gen))]),
                    "loglikelihood": [list(r.text) for r in
                                      lenient.loglikelihood([inst("loglikelihood", 0, " A", bad)])],
                    "errors": lenient.stats["video_errors"]}

    # model_args are checked
    for kwargs in ({"frame": 8}, {"batch_size": "auto"}, {"dtype": "int8"}, {"video_errors": "skip"},
                   {"decode_device": "nvdec"}, {"decode_device": "gpu", "device": "cpu"}):
        try:
            LiteFrameVideoLLM(pretrained=model_dir, **kwargs)
            out.setdefault("bad_args", []).append("accepted")
        except (TypeError, ValueError, RuntimeError) as err:
            out.setdefault("bad_args", []).append(str(err))
    print("CHECKS " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def checks(eval_venv, tmp_path_factory, video_llm, videos) -> dict:
    python = eval_venv / "bin" / "python"
    work = tmp_path_factory.mktemp("lmms_eval_checks")
    (work / "checks.py").write_text(CHECKS)
    junk = work / "junk.mp4"
    junk.write_bytes(b"not a video " * 100)
    res = subprocess.run([str(python), str(work / "checks.py"), str(video_llm), str(junk)], cwd=work,
                         env=_env(work, videos), capture_output=True, text=True, timeout=500)
    line = next((x for x in res.stdout.splitlines() if x.startswith("CHECKS ")), None)
    assert res.returncode == 0 and line, (res.stdout + res.stderr)[-6000:]
    return json.loads(line[len("CHECKS "):])


@pytest.mark.slow
def test_generation_is_lma_generate_batched_or_not(checks):
    """Greedy answers equal `lma.generate.answer`'s for the same video, question and frames, and
    left-padded batches of 3 (with a 1-video cache and decode ahead) change nothing."""
    gen = checks["generate"]
    assert gen["unbatched"] == gen["lma_generate"]
    assert gen["batched"] == gen["unbatched"]


@pytest.mark.slow
def test_loglikelihood_is_the_continuations_loss(checks):
    """Per option: the mean negative log-likelihood of its tokens after the prompt (what lmms-eval
    0.7.3's multiple-choice scoring minimises), batched or not, equal to an unpadded forward."""
    ll = checks["loglikelihood"]
    assert len(ll["unbatched"]) == 24
    for (a, greedy_a), (b, greedy_b) in zip(ll["unbatched"], ll["batched"]):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b and a > 0
    for (a, _), m in zip(ll["unbatched"], ll["manual"]):
        assert abs(a - m) < 1e-5


@pytest.mark.slow
def test_frames_given_as_images_and_unsupported_visuals(checks):
    img = checks["images"]
    assert img["frames"] == [10, 112, 112, 3] and img["times"] == [float(i) for i in range(10)]
    assert img["still"] == [4, 112, 112, 3] and img["still_times"] == [0.0] * 4   # one image held for a clip
    assert "one video (a path) or a list of images" in checks["two_videos"]


@pytest.mark.slow
def test_unreadable_video_stops_the_run_or_answers_empty(checks):
    assert "doc 0" in checks["raise"] and "NotAVideoError" in checks["raise"]
    empty = checks["empty"]
    assert empty["generate"][0] == "" and isinstance(empty["generate"][1], str)
    assert empty["loglikelihood"] == [[float("inf"), False]] and empty["errors"] == 2


@pytest.mark.slow
def test_bad_model_args_are_refused(checks):
    frame, auto, dtype, errors, decoder, nvdec = checks["bad_args"]
    assert "unknown model_args frame" in frame
    assert "batch_size auto" in auto
    assert "dtype" in dtype and "video_errors" in errors
    assert "decode device 'nvdec': one of auto, cpu, gpu" in decoder
    assert nvdec == "--decode-device gpu: the model is on the CPU"     # NVDEC decodes on the model's GPU


def test_entry_point_and_task_files_ship_with_the_package():
    """pyproject.toml declares the lmms_eval.models entry point and ships the task files."""
    tomllib = pytest.importorskip("tomllib")   # Python >= 3.11

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["lmms_eval.models"]["liteframe"] == "lma.lmms_eval:manifests"
    data = project["tool"]["setuptools"]["package-data"]["lma.lmms_eval"]
    shipped = {p.relative_to(TASKS_DIR.parent).as_posix() for p in TASKS_DIR.rglob("*") if p.is_file()
               and "__pycache__" not in p.parts}
    assert shipped and all(any(Path(f).match(g) for g in data) for f in shipped), (shipped, data)
