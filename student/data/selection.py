"""Which clips of each shard a pass reads: all of them, or one side of the held-out split.

Held-out split: by a hash of the video id (`pipeline.store.heldout_score`) at one of the levels
whose per-shard counts the manifest holds (`HELDOUT_LEVELS`), so the views of one video never
straddle the split and the split never depends on the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from student.data.store import StoreInfo


@dataclass(frozen=True, eq=False)
class Selection:
    """Which clips of each shard a pass reads, known by count from the manifest; which rows they are
    is read from a shard's index file when a worker opens the shard (and checked against the count)."""

    counts: np.ndarray              # int64 [shards]: clips read per shard
    cut: float | None = None        # clips whose video's heldout_score <= cut are held out; None: no split
    heldout: bool = False           # read the held-out clips (evaluation) rather than the others (training)

    def pick(self, video_ids: list[str]) -> np.ndarray:
        """The rows of one shard this pass reads, ascending."""
        if self.cut is None:
            return np.arange(len(video_ids))
        from pipeline.store import heldout_score

        scores = {v: heldout_score(v) for v in set(video_ids)}
        held = np.array([scores[v] <= self.cut for v in video_ids], dtype=bool)
        return np.flatnonzero(held if self.heldout else ~held)


def heldout_split(info: StoreInfo, fraction: float) -> tuple[Selection, Selection]:
    """(training clips, held-out clips) for holding out `fraction` (one of HELDOUT_LEVELS) of the
    videos, from the manifest's counts alone. At least one video is held out, so a small store still
    gets an evaluation: when none scores under the level, the lowest-scoring video is."""
    from pipeline.store import HELDOUT_LEVELS

    if fraction not in HELDOUT_LEVELS:
        raise ValueError(f"held-out fraction must be one of {', '.join(map(str, HELDOUT_LEVELS))}, got {fraction}")
    cut, held = float(fraction), info.heldout_clips[:, HELDOUT_LEVELS.index(fraction)]
    if held.sum() == 0 and len(info.shards):
        cut = float(info.first_video_score.min())
        held = np.where(info.first_video_score == cut, info.first_video_clips, 0)
    return Selection(info.counts - held, cut), Selection(held, cut, heldout=True)
