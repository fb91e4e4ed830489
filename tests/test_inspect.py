"""`python -m jobs.inspect`: the page a user opens to see a store, checked as the real CLI writes it
(numbers against the store, pictures decoded, the student's numbers recomputed independently) and as
a real browser shows it (headless Chromium: every image decodes, nothing is fetched, no errors)."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import student
from jobs import inspect as ins
from pipeline import store as st
from tests.test_student_data import SIZE, T, write_tiny_store

REPO = Path(__file__).resolve().parents[1]
SAMPLES, SEED = 5, 3
HOSTILE = '/videos/<img src=x onerror="alert(1)">&co.mp4'
ERRORS = [
    {"video_uri": HOSTILE, "stage": "decode", "error_type": "NotAVideoError",
     "message": "not a video: <b>bold</b> & more"},
    {"video_uri": "/videos/missing-a.mp4", "stage": "decode", "error_type": "InputNotFoundError", "message": "gone"},
    {"video_uri": "/videos/missing-b.mp4", "stage": "decode", "error_type": "InputNotFoundError", "message": "gone"},
    {"video_uri": "/videos/vid3.mp4", "stage": "decode", "error_type": "CorruptVideoError", "message": "cut short",
     "good_clips": [f"vid3-v0-c{c:05d}" for c in range(3)]},
    {"video_uri": "/videos/vid5.mp4", "stage": "teacher", "error_type": "NonFiniteTargetError", "message": "inf",
     "clip_id": "vid5-v0-c00003", "video_clips": 4},
]


def run_inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.inspect", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> str:
    """The trainer tests' tiny store (several shards, both formats), plus failed inputs committed the
    way an extraction job commits them."""
    root = write_tiny_store(tmp_path_factory.mktemp("inspect") / "store")
    writer = st.StoreWriter(root, st.open_store(root).schema)
    writer.prepare()
    writer.mark_incomplete()
    writer.commit_errors(ERRORS)
    writer.finalise()
    return root


@pytest.fixture(scope="module")
def student_dir(store_root, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("student") / "tiny"
    student.LiteFrameModel(student.config_for_store("tiny", st.open_store(store_root).schema)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def plain_page(store_root, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("page") / "report.html"
    got = run_inspect(store_root, "--html", out, "--samples", SAMPLES, "--seed", SEED)
    assert got.returncode == 0, got.stderr
    return out.read_text()


@pytest.fixture(scope="module")
def student_page(store_root, student_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "student.html"
    got = run_inspect(store_root, "--html", out, "--samples", SAMPLES, "--seed", SEED, "--student", student_dir)
    assert got.returncode == 0, got.stderr
    return out


def _section(page: str, name: str) -> str:
    return re.search(rf'<section id="{name}".*?</section>(?=<section id=|</body>)', page, re.S).group(0)


def _cards(page: str) -> list[str]:
    return re.findall(r'<section class="clip".*?</section>', page, re.S)


def _images(fragment: str) -> list[tuple[str, Image.Image]]:
    """(alt, decoded PNG) of every <img>, checking each source is an embedded PNG."""
    out = []
    for src, alt in re.findall(r'<img src="([^"]*)"[^>]*alt="([^"]*)"', fragment):
        assert src.startswith("data:image/png;base64,"), src[:40]
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG"
        out.append((alt, image))
    return out


def _clip_arrays(store: st.Store, clip_id: str) -> tuple[np.ndarray, np.ndarray]:
    """A clip's frames and target straight from its zarr shard, found through the whole index."""
    row = [r for r in store.read_index(["clip_id", "shard", "row"]).to_pylist() if r["clip_id"] == clip_id][0]
    group = store.zarr_group(row["shard"])
    return np.asarray(group["frames"][row["row"]]), store.decode_target(group["targets"][row["row"]])


def test_summary_errors_and_specs_are_the_stores(store_root, plain_page):
    store = st.open_store(store_root)
    summary = _section(plain_page, "summary")
    for key, value in store.schema["summary"].items():
        assert f'<tr><td>{key.replace("_", " ")}</td><td class="n">{value}</td></tr>' in summary
    assert store.schema["summary"]["failed_videos"] == 4 and store.schema["summary"]["partial_videos"] == 1
    for fmt in ("webdataset", "zarr"):
        total = int(np.asarray(store.manifest.column(f"bytes_{fmt}")).sum())
        assert (f'<tr><td>{fmt}</td><td class="n">{len(store.shards())}</td><td class="n">{ins._size(total)}</td>'
                in summary)
    assert len(store.shards()) > 3
    # One row per (error type, stage): failed inputs and failed clips counted apart.
    rows = re.findall(r"<tr><td>(\w+)</td><td>(\w+)</td><td class=\"n\">(\d+)</td><td class=\"n\">(\d+)</td>", summary)
    errors = store.read_errors().to_pylist()
    expected = Counter((e["error_type"], e["stage"], bool(e["clip_id"])) for e in errors)
    assert sorted((t, s, int(v), int(c)) for t, s, v, c in rows) == sorted(
        {(t, s, expected[(t, s, False)], expected[(t, s, True)]) for t, s, _ in expected})
    assert len(rows) == 4
    listed = re.search(r"<details><summary>all error rows</summary>(.*?)</details>", summary, re.S).group(1)
    assert listed.count("<tr>") == 1 + len(errors)
    # Store strings are data, never markup.
    assert "<img src=x" not in plain_page and "<b>bold</b>" not in plain_page
    assert html.escape(HOSTILE) in summary and html.escape("not a video: <b>bold</b> & more") in summary
    specs = _section(plain_page, "specs")
    assert "<td>factors</td><td>[4, 1, 1]</td>" in specs and "<td>grid</td><td>[1, 2, 2]</td>" in specs
    # Target statistics: per-channel lines over D channels, and the sampled tokens' norms.
    stats = _section(plain_page, "stats")
    lines = re.findall(r'<polyline points="([^"]*)"', stats)
    assert [len(p.split()) for p in lines] == [len(store.schema["target_stats"]["mean"])] * 2
    assert "token norm (5 sampled clips)" in stats
    assert "<script" not in plain_page and "http://" not in plain_page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_sample_clips_frames_and_token_pictures(store_root, plain_page):
    store = st.open_store(store_root)
    cards = _cards(plain_page)
    assert len(cards) == SAMPLES
    ids = [re.search(r"<h3>([^<]*)</h3>", c).group(1) for c in cards]
    assert len(set(ids)) == SAMPLES and len({ins.pick_clips(store, SAMPLES, SEED)[i][0] for i in range(SAMPLES)}) > 1
    teacher_colours, targets = [], []
    for clip_id, card in zip(ids, cards):
        frames, target = _clip_arrays(store, clip_id)
        images = _images(card)
        assert [alt for alt, _ in images] == [f"frame {i}" for i in range(T)] + ["teacher tokens"]
        assert all(image.size == (SIZE, SIZE) for _, image in images)
        for i in range(T):      # lossless and shown at the stored size (smaller than --thumb)
            assert np.array_equal(np.asarray(images[i][1].convert("RGB")), frames[i])
        row = [r for r in store.read_index().to_pylist() if r["clip_id"] == clip_id][0]
        assert [f"t={t:.2f} s" for t in row["timestamps"]] == re.findall(r"t=[\d.]+ s", card)
        # The 2x2 token grid upsampled by nearest neighbour: four flat blocks.
        picture = np.asarray(images[-1][1].convert("RGB"))
        blocks = picture.reshape(2, SIZE // 2, 2, SIZE // 2, 3).transpose(0, 2, 1, 3, 4).reshape(4, -1, 3)
        assert (blocks == blocks[:, :1]).all()
        teacher_colours.append(blocks[:, 0])
        targets.append(target)
    # Each colour channel is one principal component of these clips' tokens, min-max scaled.
    colours, tokens = np.concatenate(teacher_colours).astype(float), np.concatenate(targets)
    _, _, vt = np.linalg.svd(tokens - tokens.mean(0), full_matrices=False)
    for c in range(3):
        assert colours[:, c].min() == 0 and colours[:, c].max() == 255
        assert abs(np.corrcoef(colours[:, c], (tokens - tokens.mean(0)) @ vt[c])[0, 1]) > 0.999


def test_samples_are_seeded_and_read_only_their_shards(store_root, plain_page, tmp_path):
    """The same seed, the same clips, from either format, even with every unsampled shard's data and
    index deleted; another seed, other clips."""
    store = st.open_store(store_root)
    picked = {shard for shard, _ in ins.pick_clips(store, SAMPLES, SEED)}
    assert picked != set(store.shards())
    pruned = Path(shutil.copytree(store_root, tmp_path / "pruned"))
    for shard in set(store.shards()) - picked:
        (pruned / "webdataset" / f"{shard}.tar").unlink()
        (pruned / "index" / f"{shard}.parquet").unlink()
        shutil.rmtree(pruned / "zarr" / shard)
    for fmt in ("zarr", "webdataset"):
        got = run_inspect(pruned, "--html", tmp_path / f"{fmt}.html", "--samples", SAMPLES, "--seed", SEED,
                          "--format", fmt)
        assert got.returncode == 0, got.stderr
        assert _section((tmp_path / f"{fmt}.html").read_text(), "samples") == _section(plain_page, "samples")
    got = run_inspect(store_root, "--html", tmp_path / "other.html", "--samples", SAMPLES, "--seed", SEED + 1,
                      "--thumb", 28)
    assert got.returncode == 0, got.stderr
    other = (tmp_path / "other.html").read_text()
    assert _cards(other) != _cards(plain_page)
    assert {image.size for _, image in _images(other)} == {(28, 28)}      # frames larger than --thumb shrink


def test_student_predictions_and_fidelity(store_root, student_dir, student_page, plain_page):
    store = st.open_store(store_root)
    page = student_page.read_text()
    cards = _cards(page)
    assert len(cards) == SAMPLES
    model = student.LiteFrameModel.from_pretrained(student_dir).eval()
    stats = store.schema["target_stats"]
    mean, std = torch.tensor(stats["mean"]), torch.tensor(stats["std"]).clamp_min(1e-6)
    for card, plain in zip(cards, _cards(plain_page)):
        images = _images(card)
        assert [alt for alt, _ in images][-2:] == ["teacher tokens", "student tokens"]
        assert all(image.size == (SIZE, SIZE) for _, image in images)
        # The teacher's picture does not change when a student is shown beside it (same PCA basis).
        assert images[-2][1].tobytes() == _images(plain)[-1][1].tobytes()
    # One clip's numbers, recomputed the way the trainer feeds and scores the student.
    clip_id = re.search(r"<h3>([^<]*)</h3>", cards[0]).group(1)
    frames, target = _clip_arrays(store, clip_id)
    with torch.no_grad():
        pixels = model.preprocess(torch.from_numpy(frames)).unsqueeze(0)
        pred = model(pixels)[0] * torch.tensor(model.config.target_std) + torch.tensor(model.config.target_mean)
    target = torch.from_numpy(target)
    cosine = F.cosine_similarity(pred, target, dim=-1).mean().item()
    r2 = 1 - (((pred - target) / std) ** 2).sum().item() / (((target - mean) / std) ** 2).sum().item()
    shown = re.search(r"cosine <b>(-?[\d.]+)</b> · R² <b>(-?[\d.]+)</b>", cards[0]).groups()
    assert float(shown[0]) == pytest.approx(cosine, abs=1.5e-3) and float(shown[1]) == pytest.approx(r2, abs=1.5e-3)
    section = _section(page, "student")
    assert html.escape(str(student_dir)) in section and "per-clip cosine" in section and "per-clip R²" in section
    assert section.count("<svg") == 2


def test_grid_with_several_time_steps_shows_each_slice_beside_its_frames():
    """A [2, 1, 2] target grid over 4 frames: two slices, each with its two frames and its own tokens."""
    rng = np.random.default_rng(0)
    schema = {"target": {"grid": [2, 1, 2]}}
    sample = ins.Sample({"clip_id": "c", "video_uri": "v", "view": 0, "fps": 1.0, "start": 0.0, "shard": "s", "row": 0,
                         "padded": 1, "timestamps": [0.0, 1.0, 2.0, 3.0]},
                        rng.integers(0, 255, (4, 6, 8, 3), dtype=np.uint8), rng.normal(size=(4, 5)).astype(np.float32))
    pca = ins.Pca.fit(sample.target)
    card = ins.clip_html(0, sample, schema, pca, (8, 6), None)
    slices = re.findall(r'<div class="slice">(.*?)</div>', card)
    assert len(slices) == 2 and "t=3.00 s (pad)" in slices[1]
    for s, fragment in enumerate(slices):
        images = _images(fragment)
        assert [alt for alt, _ in images] == [f"frame {2 * s}", f"frame {2 * s + 1}", "teacher tokens"]
        picture = np.asarray(images[-1][1].convert("RGB"))
        assert picture.shape == (6, 8, 3)
        colours = pca.rgb(sample.target[2 * s: 2 * s + 2])
        assert (picture[:, :4] == colours[0]).all() and (picture[:, 4:] == colours[1]).all()


def test_not_a_store_is_one_line_and_status_2(tmp_path):
    got = run_inspect(tmp_path, "--html", tmp_path / "x.html")
    assert got.returncode == 2 and "not a store" in got.stderr and not (tmp_path / "x.html").exists()


CHECKER = """<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:;
style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<script>
const problems = [];
window.addEventListener("error", e => problems.push(String(e.message || (e.target && e.target.outerHTML))), true);
document.addEventListener("securitypolicyviolation", e => problems.push("blocked " + e.blockedURI));
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete, natural: i.naturalWidth,
                                                 shown: i.width}));
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({images, problems, svgs: document.querySelectorAll("svg").length});
  document.body.appendChild(out);
});
</script>"""


def test_page_renders_in_headless_chromium(request, tmp_path):
    """The page as a browser shows it: a copy with a checker script (and a policy that blocks any
    fetch from outside the page) is loaded from file:// and its DOM dumped after load."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")
    page = request.getfixturevalue("student_page").read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("<head>", "<head>" + CHECKER, 1))
    got = subprocess.run([browser, "--headless=new", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path}/p",
                          "--virtual-time-budget=5000", "--dump-dom", checked.as_uri()],
                         capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="check">(.*?)</pre>', got.stdout, re.S)
    assert found, got.stderr[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result["problems"] == []
    assert len(result["images"]) == page.count("<img ") == SAMPLES * (T + 2)
    assert all(i["complete"] and i["natural"] == i["shown"] == SIZE for i in result["images"])
    assert result["svgs"] == 5
