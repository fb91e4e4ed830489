"""The index code of sample videos: reads back through scaling and noise, refuses wrong orientations."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.samples import code_grid, frame_index, frame_times


def render(index: int, side: int, rng) -> np.ndarray:
    cells = np.kron(code_grid(index), np.ones((side // 5, side // 5), np.uint8)) * 235 + 16
    noisy = cells.astype(np.int16) + rng.integers(-40, 40, cells.shape)
    return np.repeat(np.clip(noisy, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


@pytest.mark.parametrize("index", [0, 1, 5, 1799, 2**19 - 1])
def test_index_round_trip(index):
    rng = np.random.default_rng(index)
    assert frame_index(render(index, 40, rng)) == index
    wide = np.zeros((40, 70, 3), np.uint8)
    wide[:, 15:55] = render(index, 40, rng)
    assert frame_index(wide) == index  # the code sits in the central square


def test_every_rotation_and_flip_is_refused():
    frame = render(12345, 40, np.random.default_rng(0))
    turned = [np.rot90(frame, k) for k in (1, 2, 3)] + [frame[:, ::-1], frame[::-1], np.transpose(frame, (1, 0, 2)),
                                                       np.rot90(frame, 1)[::-1]]
    for t in turned:
        with pytest.raises(ValueError):
            frame_index(np.ascontiguousarray(t))
    with pytest.raises(ValueError):
        code_grid(2**19)


def test_frame_times():
    np.testing.assert_allclose(frame_times(1.0, 4), [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(frame_times(1.5, 4, vfr=True), [0, 0.25, 0.375, 0.75, 1.0, 1.125])
