"""The small local video QA task shipped for lmms-eval (`tasks/liteframe_videoqa`), whose videos are
generated on first use: nothing is downloaded.

Each record of `tasks/liteframe_videoqa/videoqa.jsonl` names a video and how to make it
(`pipeline.samples.make_video`: seconds, fps, width, height) with a multiple-choice question about
what the frames and their time markers show (the video's length). Videos are written to
$LITEFRAME_VIDEOQA_DIR (default ~/.cache/liteframe/videoqa) and reused while their spec matches.
Two tasks read the same records: `liteframe_videoqa` (generate_until, the letter in the answer is
scored) and `liteframe_videoqa_mc` (multiple_choice: log-likelihood of each letter).
"""

from __future__ import annotations

import json
import os
import re
import string
import threading
from pathlib import Path

RECORDS = Path(__file__).resolve().parent / "tasks" / "liteframe_videoqa" / "videoqa.jsonl"
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
_lock = threading.Lock()


def video_dir() -> Path:
    env = os.environ.get("LITEFRAME_VIDEOQA_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "liteframe" / "videoqa"


def spec(doc: dict) -> dict:
    return {"seconds": float(doc["seconds"]), "fps": float(doc["fps"]), "size": (int(doc["width"]), int(doc["height"]))}


def ensure_video(doc: dict, root: Path | None = None) -> Path:
    """The record's video, generated (atomically, so parallel ranks may race) unless already there
    with the same spec."""
    from pipeline.samples import make_video

    root = Path(root or video_dir())
    path = root / doc["video"]
    stamp = path.with_name(path.name + ".json")
    want = json.dumps(spec(doc), sort_keys=True)
    with _lock:
        if path.is_file() and stamp.is_file() and stamp.read_text() == want:
            return path
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
        s = spec(doc)
        make_video(tmp, seconds=s["seconds"], fps=s["fps"], size=s["size"])
        os.replace(tmp, path)
        stamp.write_text(want)
    return path


def read_records(path: Path = RECORDS) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def ensure_all(root: Path | None = None) -> list[Path]:
    """Every video the shipped records use (to prepare them before a run)."""
    seen, out = set(), []
    for doc in read_records():
        if doc["video"] not in seen:
            seen.add(doc["video"])
            out.append(ensure_video(doc, root))
    return out


# ---- the task's functions (tasks/liteframe_videoqa/utils.py re-exports them) --------------------
def doc_to_visual(doc: dict) -> list[str]:
    return [str(ensure_video(doc))]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    options = "\n".join(f"{letter}. {option}" for letter, option in zip(string.ascii_uppercase, doc["options"]))
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}\n{options}{kwargs.get('post_prompt', POST_PROMPT)}"


def doc_to_choice(doc: dict) -> list[str]:
    return list(string.ascii_uppercase[: len(doc["options"])])


def doc_to_target(doc: dict) -> int:
    return string.ascii_uppercase.index(doc["answer"])


def extract_letter(response: str, count: int) -> str | None:
    """The option letter an answer gives: a bare letter, "B.", "(B)", "Answer: B", ... or None."""
    letters = string.ascii_uppercase[:count]
    text = response.strip()
    match = re.match(rf"^\(?([{letters}])(?:[\).:\s]|$)", text) or re.search(rf"\b([{letters}])\b", text)
    return match.group(1) if match else None


def process_results(doc: dict, results: list[str]) -> dict:
    letter = extract_letter(results[0] if results else "", len(doc["options"]))
    return {"accuracy": float(letter == doc["answer"])}
