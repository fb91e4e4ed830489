"""Training checkpoints: DIR/checkpoints/step-XXXXXXXX/ holding

    model.safetensors    the trained weights (the whole student for CTD; LoRA, projector and an
                         unfrozen student for LMA)
    optimizer.pt         AdamW state dict (tensors and numbers only: loaded with weights_only=True)
    rng.pt               every rank's torch (and CUDA) RNG state, stacked by rank (pipeline.training.rng)
    state.json           step, LR-scheduler state, the run's config, and the trainer's own loader
                         position and health counters (student.train, lma.finetune say what)

A checkpoint is written into a temporary sibling, fsynced, then renamed into place, so a crash
leaves either the old set or the new one, never a torn directory; the last `keep` are kept (0: all).
Non-finite weights or optimizer state are never written: `save` raises NonFiniteWeightsError first.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

PREFIX = "step-"


class NonFiniteWeightsError(RuntimeError):
    """A model (or its optimizer state) holds NaN or inf: it is not saved."""


def nonfinite_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of the model's parameters and buffers, and of the optimizer's state tensors, that hold a
    NaN or an inf (floating point only)."""
    named = [(f"model {k}", t) for k, t in model.state_dict().items()]
    if optimizer is not None:
        names = {id(p): k for k, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, t in optimizer.state.get(p, {}).items():
                    named.append((f"optimizer {key} of {names.get(id(p), '?')}", t))
    with torch.no_grad():
        bad = [(name, t) for name, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not bad:
            return []
        # One sync: the flags gathered on one device (AdamW keeps its `step` on the CPU, the rest on the GPU).
        device = bad[0][1].device
        flags = torch.stack([torch.isfinite(t).all().to(device) for _, t in bad]).cpu().tolist()
    return [name for (name, _), ok in zip(bad, flags) if not ok]


def check_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, what: str = "checkpoint"
                 ) -> None:
    """Raise NonFiniteWeightsError naming the first non-finite tensors of the model or the optimizer."""
    bad = nonfinite_tensors(model, optimizer)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteWeightsError(f"not writing the {what}: NaN or inf in {', '.join(bad[:5])}{more}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         state: dict[str, Any], rng: dict[str, torch.Tensor], keep: int) -> Path:
    check_finite(model, optimizer, f"checkpoint of step {step}")     # before anything is written
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    if final.exists():          # a resumed run re-reaching a step it already saved
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries of a crashed save are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest(root: str | Path) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def read_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state.json alone: to check that it belongs to this run before loading weights."""
    return json.loads((Path(path) / "state.json").read_text())


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
         ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model (and optimizer) in place; returns (state.json, rng states)."""
    path = Path(path)
    load_model(model, str(path / "model.safetensors"), strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    rng = torch.load(path / "rng.pt", weights_only=True)
    return json.loads((path / "state.json").read_text()), rng
