"""Shared test fixtures. Keep small: each area's own fixtures live in its test files."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "videos"


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """../shared/videos next to the repository (real clips); skips the test when absent."""
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"real test videos not present at {SHARED_VIDEOS}")
    return SHARED_VIDEOS
