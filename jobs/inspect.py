"""Look at a store, and at what a student learned from it: one self-contained HTML page.

    python -m jobs.inspect STORE --html report.html [--student DIR] [--samples 12] [--seed 0]

The page holds the store's summary (clips, videos, failed inputs by error type, bytes per format,
the teacher/compression/clip specs), a grid of sample clips with a PCA-RGB picture of their teacher
tokens beside each group of frames, the target statistics and, with `--student`, the student's
predicted tokens in the same colours with per-clip cosine and R². Images are PNG data: URIs and
plots inline SVG, so the file opens anywhere with no server and no network.

Only store.json, the manifest, the error rows and the shards holding the sampled clips are read:
the cost does not grow with the store. Every string that comes from the store is escaped.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.store import Store, StoreError, decode_frame, frame_column, open_store

PALETTE = ("#1f77b4", "#d62728", "#2ca02c")


# ---------------------------------------------------------------- reading samples


@dataclass
class Sample:
    """One sampled clip: its index row, frames and teacher target (float32, teacher space)."""

    row: dict
    frames: np.ndarray      # uint8 [T, H, W, 3]
    target: np.ndarray      # float32 [N, D]


def pick_clips(store: Store, count: int, seed: int) -> list[tuple[str, int]]:
    """(shard, row) of `count` clips drawn uniformly over the whole store from the manifest's clip
    counts alone, so only the shards holding them are ever opened."""
    clips = np.asarray(store.manifest.column("clips"), dtype=np.int64)
    total = int(clips.sum())
    positions = np.sort(np.random.default_rng(seed).choice(total, size=min(count, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(clips)])
    shard = np.searchsorted(starts, positions, side="right") - 1
    names = store.shards()
    return [(names[s], int(p - starts[s])) for s, p in zip(shard, positions)]


def read_samples(store: Store, picks: Sequence[tuple[str, int]], fmt: str) -> list[Sample]:
    """The picked clips, shard by shard: zarr reads each clip's own chunks, a tar is read up to the
    last wanted member (headers and wanted members only)."""
    wanted: dict[str, list[int]] = {}
    for shard, row in picks:
        wanted.setdefault(shard, []).append(row)
    samples = []
    for shard, rows in wanted.items():
        index = {r["row"]: r for r in store.shard_index(shard).to_pylist()}
        chosen = [index[r] for r in rows]
        reader = _zarr_clips if fmt == "zarr" else _tar_clips
        samples += [Sample(row, frames, target) for row, (frames, target) in zip(chosen, reader(store, shard, chosen))]
    return samples


def _zarr_clips(store: Store, shard: str, rows: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    group = store.zarr_group(shard)
    ids = group["clip_id"][:]
    out = []
    for r in rows:
        if str(ids[r["row"]]) != r["clip_id"]:
            raise StoreError(f"{store.root}: zarr shard {shard} row {r['row']} holds {ids[r['row']]!r}, "
                             f"its index says {r['clip_id']!r}")
        out.append((np.asarray(group["frames"][r["row"]]), store.decode_target(group["targets"][r["row"]])))
    return out


def _tar_clips(store: Store, shard: str, rows: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    encoding = store.schema["frames"]["encoding"]
    n_frames = int(store.schema["clip"]["frames"])
    names = {f"{r['clip_id']}.{frame_column(i)}.{encoding}" for r in rows for i in range(n_frames)}
    names |= {f"{r['clip_id']}.target.npy" for r in rows}
    members: dict[str, bytes] = {}
    with store.fs.open(store.layout.tar(shard), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        while len(members) < len(names) and (info := tar.next()) is not None:
            if info.name in names:
                members[info.name] = tar.extractfile(info).read()
    missing = sorted(names - set(members))
    if missing:
        raise StoreError(f"{store.root}: webdataset shard {shard} lacks {missing[:3]}")
    return [(np.stack([decode_frame(members[f"{r['clip_id']}.{frame_column(i)}.{encoding}"], encoding)
                       for i in range(n_frames)]),
             store.decode_target(np.load(io.BytesIO(members[f"{r['clip_id']}.target.npy"]), allow_pickle=False)))
            for r in rows]


# ---------------------------------------------------------------- PCA colours and the student


@dataclass
class Pca:
    """The first three principal components of the sampled teacher tokens and their ranges over
    those tokens: teacher and student tokens are coloured by the same map, so colours compare."""

    mean: np.ndarray        # [D]
    axes: np.ndarray        # [3, D]
    low: np.ndarray         # [3]
    high: np.ndarray        # [3]

    @classmethod
    def fit(cls, tokens: np.ndarray) -> "Pca":
        mean = tokens.mean(0)
        _, _, vt = np.linalg.svd(tokens - mean, full_matrices=False)
        axes = np.zeros((3, tokens.shape[1]), dtype=np.float32)
        axes[: min(3, len(vt))] = vt[:3]
        # An eigenvector's sign is arbitrary: fix it (largest loading positive) so colours are stable.
        signs = np.sign(axes[np.arange(3), np.abs(axes).argmax(1)])
        axes *= np.where(signs == 0, 1, signs)[:, None]
        projected = (tokens - mean) @ axes.T
        return cls(mean, axes, projected.min(0), projected.max(0))

    def rgb(self, tokens: np.ndarray) -> np.ndarray:
        """[M, D] -> uint8 [M, 3]: each component min-max scaled over the fitted tokens (clipped)."""
        scaled = ((tokens - self.mean) @ self.axes.T - self.low) / np.maximum(self.high - self.low, 1e-12)
        return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


@dataclass
class Fidelity:
    """The student's predictions of the sampled clips and how close they are to the teacher's.

    cosine: mean per-token cosine in the teacher's space (as student.evaluate). r2: 1 - SSE/SST in
    space standardised with the store's statistics, SST taken around the store's mean, so the
    mean-target predictor scores 0 on every clip."""

    predictions: np.ndarray     # float32 [clips, N, D], teacher space
    cosine: np.ndarray          # [clips]
    r2: np.ndarray              # [clips]
    r2_all: float               # over all sampled tokens
    trivial_cosine: float       # the mean-target predictor's cosine over the sampled tokens


def run_student(model_dir: str, samples: Sequence[Sample], schema: dict, batch_size: int = 4) -> Fidelity:
    """Predict each clip alone, exactly as in training (encode_video without span_clips)."""
    import torch

    from student import LiteFrameModel

    model = LiteFrameModel.from_pretrained(model_dir).eval().to("cuda" if torch.cuda.is_available() else "cpu")
    cfg, target = model.config, schema["target"]
    wanted = (int(schema["clip"]["frames"]), int(target["tokens"]), int(target["dim"]))
    if (cfg.clip_frames, cfg.target_tokens, cfg.target_dim) != wanted:
        raise StoreError(f"student {model_dir} maps {cfg.clip_frames}-frame clips to {cfg.target_tokens} x "
                         f"{cfg.target_dim} tokens; the store has {wanted[0]}-frame clips of "
                         f"{wanted[1]} x {wanted[2]}")
    frames = np.concatenate([s.frames for s in samples])
    with torch.inference_mode():
        predictions = model.encode_video(frames, chunk_frames=batch_size * cfg.clip_frames, span_clips=False)
    predictions = predictions.cpu().numpy()
    targets = np.stack([s.target for s in samples])
    stats = schema["target_stats"]
    mean = np.asarray(stats["mean"], dtype=np.float32)
    std = np.maximum(np.asarray(stats["std"], dtype=np.float32), 1e-6)
    sse = (((predictions - targets) / std) ** 2).sum((1, 2))
    sst = (((targets - mean) / std) ** 2).sum((1, 2))
    return Fidelity(predictions, _cosine(predictions, targets).mean(1), 1 - sse / np.maximum(sst, 1e-12),
                    float(1 - sse.sum() / max(sst.sum(), 1e-12)), float(_cosine(mean, targets).mean()))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = (a * b).sum(-1)
    return dot / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-8)


# ---------------------------------------------------------------- pictures


def png_uri(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def shown_size(height: int, width: int, largest: int) -> tuple[int, int]:
    """(width, height) frames are shown at: at most `largest` pixels a side, never enlarged."""
    scale = min(1.0, largest / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def frame_picture(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(frame, "RGB")
    return np.asarray(image if image.size == size else image.resize(size, Image.Resampling.LANCZOS))


def token_picture(colours: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [h, w, 3] token colours -> the frame's size, nearest neighbour (one block per token)."""
    return np.asarray(Image.fromarray(colours, "RGB").resize(size, Image.Resampling.NEAREST))


# ---------------------------------------------------------------- plots (inline SVG)


@dataclass
class Series:
    """The values one histogram shows, under the name its legend gives them."""

    name: str
    values: np.ndarray


_W, _H, _L, _R, _T, _B = 440, 230, 56, 24, 26, 40


def _ticks(lo: float, hi: float, integer: bool) -> np.ndarray:
    ticks = np.linspace(lo, hi, 5)
    return np.unique(np.round(ticks)) if integer else ticks


def _axes(title: str, xlabel: str, x: tuple[float, float], y: tuple[float, float], x_integer: bool = False,
          y_integer: bool = False) -> tuple[list[str], Callable, Callable]:
    """An SVG frame with ticks; returns its parts and the data -> pixel maps."""
    def px(v):
        return _L + (np.asarray(v, dtype=float) - x[0]) / (x[1] - x[0]) * (_W - _L - _R)

    def py(v):
        return _H - _B - (np.asarray(v, dtype=float) - y[0]) / (y[1] - y[0]) * (_H - _T - _B)

    parts = [f'<rect x="{_L}" y="{_T}" width="{_W - _L - _R}" height="{_H - _T - _B}" class="frame"/>',
             f'<text x="{_W / 2}" y="16" class="title">{html.escape(title)}</text>',
             f'<text x="{(_L + _W - _R) / 2}" y="{_H - 6}" class="label">{html.escape(xlabel)}</text>']
    for v in _ticks(*x, x_integer):
        parts.append(f'<text x="{px(v):.1f}" y="{_H - _B + 14}" class="tick">{v:.3g}</text>')
    for v in _ticks(*y, y_integer):
        parts.append(f'<text x="{_L - 4}" y="{py(v) + 4:.1f}" class="tick y">{v:.3g}</text>')
    return parts, px, py


def _svg(parts: list[str], legend: Sequence[str] = ()) -> str:
    for i, name in enumerate(legend if len(legend) > 1 else ()):
        parts.append(f'<rect x="{_W - _R - 120}" y="{_T + 6 + 16 * i}" width="10" height="10" '
                     f'fill="{PALETTE[i]}" fill-opacity="0.6"/>'
                     f'<text x="{_W - _R - 106}" y="{_T + 15 + 16 * i}" class="legend">{html.escape(name)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}">'
            f'{"".join(parts)}</svg>')


def _span(values: np.ndarray) -> tuple[float, float]:
    lo, hi = float(np.min(values)), float(np.max(values))
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)


def svg_histogram(title: str, xlabel: str, series: Sequence[Series], bins: int = 24) -> str:
    """Overlaid histograms of one or more series over shared bins."""
    x = _span(np.concatenate([s.values for s in series]))
    edges = np.linspace(*x, bins + 1)
    counts = [np.histogram(s.values, edges)[0] for s in series]
    parts, px, py = _axes(title, xlabel, x, (0, max(int(max(c.max() for c in counts)), 1)), y_integer=True)
    for colour, c in zip(PALETTE, counts):
        for left, right, n in zip(edges[:-1], edges[1:], c):
            if n:
                parts.append(f'<rect x="{px(left):.1f}" y="{py(n):.1f}" '
                             f'width="{max(px(right) - px(left) - 1, 1):.1f}" height="{py(0) - py(n):.1f}" '
                             f'fill="{colour}" fill-opacity="0.55"/>')
    return _svg(parts, [s.name for s in series])


def svg_channels(title: str, values: np.ndarray) -> str:
    """One value per channel, as a line over the channel index."""
    x = (0.0, max(len(values) - 1, 1.0))
    parts, px, py = _axes(title, "channel", x, _span(values), x_integer=True)
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px(np.arange(len(values))), py(values)))
    parts.append(f'<polyline points="{points}" fill="none" stroke="{PALETTE[0]}" stroke-width="1"/>')
    return _svg(parts)


# ---------------------------------------------------------------- the page


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:13px;margin:0 0 2px;font-family:monospace;word-break:break-all}
code{font-family:monospace;word-break:break-all}.sub{color:#666;margin:0}
table{border-collapse:collapse;margin:4px 16px 12px 0;background:#fff}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f0f0f0}
.row{display:flex;flex-wrap:wrap;align-items:flex-start;gap:8px}
.specs table{font-size:12px}.specs caption{font-weight:600;text-align:left}
.clips{display:flex;flex-wrap:wrap;gap:12px}
.clip{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.meta{color:#555;font-size:12px;margin:0 0 6px;word-break:break-all}
.fid{font-size:12px;margin:0 0 6px}
.slice{display:flex;gap:4px;align-items:flex-start}.slice+.slice{margin-top:6px}
figure{margin:0;text-align:center;font-size:11px;color:#555}
figure img{display:block;image-rendering:pixelated}
figure.tokens figcaption{font-weight:600}figure.tokens{margin-left:4px}
svg{background:#fff;border:1px solid #ddd;margin:0 12px 12px 0}
svg .frame{fill:none;stroke:#999}svg text{font:11px system-ui,sans-serif;fill:#333}
svg .title{text-anchor:middle;font-weight:600}svg .label{text-anchor:middle}
svg .tick{text-anchor:middle;fill:#666}svg .tick.y{text-anchor:end}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence], caption: str = "", numeric: Sequence[int] = ()) -> str:
    cells = "".join("<tr>" + "".join(f'<td class="n">{_e(v)}</td>' if i in numeric else f"<td>{_e(v)}</td>"
                                     for i, v in enumerate(r)) + "</tr>" for r in rows)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table>{f'<caption>{_e(caption)}</caption>' if caption else ''}<tr>{head}</tr>{cells}</table>"


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def errors_html(errors: pa.Table, listed: int = 50) -> str:
    """Failed inputs and clips counted per (error type, stage) with one example each, then the
    first `listed` rows; grouped in Arrow, so a store with many failures stays cheap."""
    if not errors.num_rows:
        return "<h4>Failed inputs</h4><p>None.</p>"
    keys = ["error_type", "stage"]
    marked = errors.append_column("is_clip", pc.not_equal(errors.column("clip_id"), ""))
    counts = {(r["error_type"], r["stage"], r["is_clip"]): r["count_all"] for r in
              marked.group_by([*keys, "is_clip"], use_threads=False).aggregate([([], "count_all")]).to_pylist()}
    examples = errors.group_by(keys, use_threads=False).aggregate([("video_uri", "first"), ("message", "first")])
    rows = sorted((r["error_type"], r["stage"], counts.get((r["error_type"], r["stage"], False), 0),
                   counts.get((r["error_type"], r["stage"], True), 0), r["video_uri_first"], _clip(r["message_first"]))
                  for r in examples.to_pylist())
    first = [(r["video_uri"], r["clip_id"], r["stage"], r["error_type"], _clip(r["message"]))
             for r in errors.slice(0, listed).to_pylist()]
    plural = "" if errors.num_rows == 1 else "s"
    header = ["error type", "stage", "failed inputs", "failed clips", "example input", "its message"]
    shown = f"the first {listed}" if errors.num_rows > listed else "all"
    return (f"<h4>Failed inputs by error type ({errors.num_rows} error row{plural})</h4>"
            f"{_table(header, rows, numeric=(2, 3))}<details><summary>{shown} error rows</summary>"
            f'{_table(["input", "clip", "stage", "error type", "message"], first)}</details>')


def summary_html(store: Store) -> str:
    summary = store.schema.get("summary", {})
    counts = [(k.replace("_", " "), summary.get(k, "")) for k in ("clips", "videos", "failed_videos", "partial_videos",
                                                                   "shards")]
    manifest = store.manifest
    shard_formats = manifest.column("formats").to_pylist()
    formats = []
    for fmt in store.schema["formats"]:
        total = int(np.asarray(manifest.column(f"bytes_{fmt}")).sum())
        formats.append((fmt, sum(fmt in f for f in shard_formats), _size(total),
                        _size(total / max(store.num_clips, 1))))
    return (f'<section id="summary"><h2>Summary</h2><div class="row">'
            f'{_table(["", "count"], counts, numeric=(1,))}'
            f'{_table(["format", "shards", "bytes", "per clip"], formats, numeric=(1, 2, 3))}</div>'
            f'{errors_html(store.read_errors())}</section>')


def specs_html(schema: dict) -> str:
    tables = "".join(_table(["field", "value"], [(k, v if isinstance(v, str) else json.dumps(v))
                                                 for k, v in schema[section].items()], caption=section)
                     for section in ("teacher", "compression", "clip", "frames", "target") if section in schema)
    return (f'<section id="specs" class="specs"><h2>Teacher, compression and clip specs</h2>'
            f'<div class="row">{tables}</div></section>')


def clip_html(k: int, sample: Sample, schema: dict, pca: Pca, size: tuple[int, int], fidelity: Fidelity | None) -> str:
    """One clip: per temporal slice of the target grid, its frames then the token pictures."""
    row = sample.row
    t, h, w = (int(g) for g in schema["target"]["grid"])
    n_frames = len(sample.frames)
    pictures = [("teacher", sample.target)] + ([("student", fidelity.predictions[k])] if fidelity else [])
    colours = [(name, pca.rgb(tokens).reshape(t, h, w, 3)) for name, tokens in pictures]
    slices = []
    for s in range(t):
        figures = []
        for i in range(s * n_frames // t, (s + 1) * n_frames // t):
            padded = " (pad)" if i >= n_frames - int(row["padded"]) else ""
            figures.append(f'<figure><img src="{png_uri(frame_picture(sample.frames[i], size))}" width="{size[0]}" '
                           f'height="{size[1]}" alt="frame {i}"><figcaption>t={row["timestamps"][i]:.2f} s'
                           f'{padded}</figcaption></figure>')
        for name, grid in colours:
            figures.append(f'<figure class="tokens"><img src="{png_uri(token_picture(grid[s], size))}" '
                           f'width="{size[0]}" height="{size[1]}" alt="{name} tokens"><figcaption>{name}'
                           f'{f" t{s}" if t > 1 else ""}</figcaption></figure>')
        slices.append(f'<div class="slice">{"".join(figures)}</div>')
    fid = (f'<p class="fid">cosine <b>{fidelity.cosine[k]:.3f}</b> · R² <b>{fidelity.r2[k]:.3f}</b></p>'
           if fidelity else "")
    return (f'<section class="clip" id="clip-{k}"><h3>{_e(row["clip_id"])}</h3>'
            f'<p class="meta">{_e(row["video_uri"])}<br>view {row["view"]} · {row["fps"]:.2f} fps · start '
            f'{row["start"]:.2f} s · shard {_e(row["shard"])} row {row["row"]}</p>{fid}{"".join(slices)}</section>')


def samples_html(samples: Sequence[Sample], schema: dict, pca: Pca, fidelity: Fidelity | None, seed: int,
                 largest: int) -> str:
    height, width = (int(v) for v in schema["frames"]["size"])
    size = shown_size(height, width, largest)
    cards = "".join(clip_html(i, s, schema, pca, size, fidelity) for i, s in enumerate(samples))
    grid = "x".join(str(g) for g in schema["target"]["grid"])
    student = ", and the student's predictions in the same colours" if fidelity else ""
    return (f'<section id="samples"><h2>{len(samples)} sample clips</h2>'
            f'<p class="sub">Drawn uniformly over the store with seed {seed}. Beside each group of frames, its '
            f'target tokens ({grid} grid, t x h x w) coloured by their first three principal components '
            f"(fitted on these clips' teacher tokens, each scaled to 0-255 over them){student}."
            f'</p><div class="clips">{cards}</div></section>')


def student_html(model_dir: str, fidelity: Fidelity) -> str:
    text = (f"Over the sampled clips: cosine <b>{fidelity.cosine.mean():.3f}</b> (the mean-target predictor: "
            f"{fidelity.trivial_cosine:.3f}), R² <b>{fidelity.r2_all:.3f}</b> (0 for the mean-target predictor; "
            f"in space standardised with the store's statistics).")
    plots = (svg_histogram("per-clip cosine", "mean token cosine", [Series("clips", fidelity.cosine)], bins=12)
             + svg_histogram("per-clip R²", "R²", [Series("clips", fidelity.r2)], bins=12))
    return (f'<section id="student"><h2>Student <code>{_e(model_dir)}</code></h2><p>{text}</p>'
            f'<div class="row">{plots}</div></section>')


def stats_html(schema: dict, samples: Sequence[Sample], fidelity: Fidelity | None) -> str:
    stats = schema["target_stats"]
    norms = [Series("teacher", np.concatenate([np.linalg.norm(s.target, axis=-1) for s in samples]))]
    if fidelity is not None:
        norms.append(Series("student", np.linalg.norm(fidelity.predictions, axis=-1).ravel()))
    plots = [svg_channels("per-channel mean", np.asarray(stats["mean"])),
             svg_channels("per-channel std", np.asarray(stats["std"])),
             svg_histogram(f"token norm ({len(samples)} sampled clips)", "L2 norm", norms)]
    return (f'<section id="stats"><h2>Target statistics</h2><p class="sub">Per-channel mean and std over all '
            f'{stats["count"]} stored tokens (store.json target_stats).</p>'
            f'<div class="row">{"".join(plots)}</div></section>')


def report(store: Store, samples: Sequence[Sample], fidelity: Fidelity | None, model_dir: str | None, seed: int,
           largest: int) -> str:
    schema = store.schema
    pca = Pca.fit(np.concatenate([s.target for s in samples]))
    body = [summary_html(store), specs_html(schema)]
    if fidelity is not None:
        body.append(student_html(model_dir, fidelity))
    body += [stats_html(schema, samples, fidelity), samples_html(samples, schema, pca, fidelity, seed, largest)]
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<title>LiteFrame store {_e(store.root)}</title><style>{STYLE}</style></head>'
            f'<body><h1>LiteFrame store <code>{_e(store.root)}</code></h1>'
            f'<p class="sub">schema_version {_e(schema["schema_version"])} · config_hash {_e(schema["config_hash"])}'
            f'</p>{"".join(body)}</body></html>')


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write one self-contained HTML page about a store "
                                                 "(and what a student learned from it).")
    parser.add_argument("store", help="store root: a local path or an fsspec URL (s3://...)")
    parser.add_argument("--html", required=True, type=Path, help="the page to write")
    parser.add_argument("--student", help="a save_pretrained student directory: its predictions beside the teacher's")
    parser.add_argument("--samples", type=int, default=12, help="sample clips to show (default: 12)")
    parser.add_argument("--seed", type=int, default=0, help="which clips are sampled (default: 0)")
    parser.add_argument("--format", choices=("zarr", "webdataset"),
                        help="read samples from this format (default: zarr when the store has it)")
    parser.add_argument("--thumb", type=int, default=192, help="largest side of a shown frame, px (default: 192)")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.thumb < 8:
        parser.error("--samples must be >= 1 and --thumb >= 8")
    try:
        store = open_store(args.store)
        fmt = args.format or ("zarr" if "zarr" in store.schema["formats"] else "webdataset")
        if fmt not in store.schema["formats"]:
            raise StoreError(f"{args.store}: no {fmt} shards (store formats: {store.schema['formats']})")
        if store.num_clips == 0:
            raise StoreError(f"{args.store}: the store holds no clips")
        samples = read_samples(store, pick_clips(store, args.samples, args.seed), fmt)
        fidelity = run_student(args.student, samples, store.schema) if args.student else None
    except (StoreError, OSError) as e:     # not a store, an unreadable shard, no student there
        print(f"jobs.inspect: error: {e}", file=sys.stderr)
        return 2
    page = report(store, samples, fidelity, args.student, args.seed, args.thumb)
    args.html.parent.mkdir(parents=True, exist_ok=True)
    args.html.write_text(page, encoding="utf-8")
    print(f"wrote {args.html} ({len(samples)} sample clips, {_size(len(page.encode()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
