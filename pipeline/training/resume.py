"""Refusing a resume that would not continue the stopped run: one error naming every setting that
changed, instead of a run that silently sees other samples or follows another schedule."""

from __future__ import annotations

from typing import Any, Iterable, Mapping


class ResumeMismatchError(ValueError):
    """A checkpoint's run-defining settings differ from this run's."""


def check_unchanged(saved: Mapping[str, Any], now: Mapping[str, Any], fields: Iterable[str], checkpoint: str,
                    also: Iterable[str] = ()) -> None:
    """Raise ResumeMismatchError listing `field: saved -> now` for each field that differs (and the
    caller's own findings in `also`, e.g. a store that holds other clips)."""
    changed = [f"{f}: {saved.get(f)!r} -> {now.get(f)!r}" for f in fields if saved.get(f) != now.get(f)]
    changed += list(also)
    if changed:
        raise ResumeMismatchError(f"cannot resume {checkpoint} exactly, the samples or the schedule would change ("
                                  + "; ".join(changed) + "): restore these settings or use a new --output")
