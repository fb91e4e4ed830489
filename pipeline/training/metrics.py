"""Training metrics: one JSON object per logged step (DIR/metrics.jsonl; a non-finite value is
written as null), the same scalars to TensorBoard (DIR/tb/), and a progress bar when stderr is a
terminal. Only rank 0 writes."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


class StepTimer:
    """Splits wall time into waiting for the loader and the rest of the step, over a logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.wait = self.total = 0.0
        self.clips = 0
        self._mark = time.perf_counter()

    def batch_ready(self) -> None:
        now = time.perf_counter()
        self.wait += now - self._mark

    def step_done(self, clips: int) -> None:
        now = time.perf_counter()
        self.total += now - self._mark
        self.clips += clips
        self._mark = now

    def exclude(self) -> None:
        """Leave the time since the last step out of both totals (checkpoints, evaluation)."""
        self._mark = time.perf_counter()

    def summary(self) -> dict[str, float]:
        total = max(self.total, 1e-9)
        return {"clips_per_s": self.clips / total, "data_wait_frac": self.wait / total}


class MetricsLog:
    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_after(self.path, start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:      # a bare GPU image without tensorboard still trains, JSONL only
            print(f"metrics: no TensorBoard ({e}); writing {self.path} only", file=sys.stderr)
        else:
            self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # A skipped step's NaN loss is JSON null, not the NaN token strict readers (jq, DuckDB) refuse.
        record = {"step": step, **{k: _finite_or_none(v) for k, v in values.items()}, "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if self.tb is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "lr", "clips_per_s")},
                                 refresh=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def drop_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: forget what the stopped run logged for them
    (JSONL records with a "step" field)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
