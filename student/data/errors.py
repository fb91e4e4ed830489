"""How a damaged store is reported: typed errors, and a clip that could not be read as a value
(`BadClip`) rather than as zeros or NaN passed off as data.

Damaged stores: every clip read is checked (its key against the index, every member present and
decodable, the target's bytes against the index's checksum, shapes against the schema, the target
finite; zarr: the stored objects holding its row exist, since zarr reads a missing object as zeros).
A clip that fails is a `BadClip` (shard, clip id, reason), never zeros or NaN passed off as data: a
training batch keeps its place and size, the bad clip's row filled with zeros and marked invalid
(`batch["valid"]`, the loss leaves it out), so the sample order stays a pure function of (seed,
epoch, position), shapes stay fixed (no recompiles) and every rank takes the same number of steps;
an evaluation batch drops it. A shard that
cannot be opened (index file, tar, zarr group or array missing or inconsistent) makes all the clips
a pass wants of it bad; a tar that breaks off (truncated, unreadable) makes the clips after the
break bad. The batch lists them under `"skipped"`; the loader's `BadClipBudget` logs each one and
raises `TooManyBadClipsError`, naming the shard, past `max_bad_clips` per rank (default 0 here,
the trainer's `--max-bad-clips` 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class StoreContentError(ValueError):
    """A shard disagrees with the store's manifest or index (keys, clip count or array shapes), or its
    data is damaged (undecodable, non-finite, missing)."""


class TooManyBadClipsError(StoreContentError):
    """More bad clips than the budget allows (`--max-bad-clips`): the message names the shard of the
    last one and why it was bad."""

    def __init__(self, message: str, shard: str | None = None, count: int = 0, limit: int = 0):
        super().__init__(message)
        self.shard, self.count, self.limit = shard, count, limit


@dataclass(frozen=True)
class BadClip:
    """A clip that could not be read: its shard, its id (None when the shard's index is unreadable) and
    why. Stray tar samples that are none of the index's clips are reported the same way."""

    shard: str
    clip_id: str | None
    reason: str

    def record(self) -> dict[str, Any]:
        return {"clip_id": self.clip_id, "shard": self.shard, "reason": self.reason}


def reason_of(e: BaseException) -> str:
    """An exception as one line: ours carry their context, others get their type name."""
    from pipeline.store import StoreError

    if len(e.args) > 1 and isinstance(e.args[0], str) and not isinstance(e, OSError):
        # webdataset re-raises a tar error as (message + " @ <stream repr>", stream, url)
        text = e.args[0].split(" @ <", 1)[0]
    else:
        text = str(e)
    text = text.strip().splitlines()[0] if text.strip() else ""
    return text if isinstance(e, (StoreContentError, StoreError)) else f"{type(e).__name__}: {text}"
