"""Batches from memory, no store behind them: the data-free baseline of throughput benchmarks."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from student.data.store import StoreInfo


def synthetic_batches(info: StoreInfo, batch_size: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """The same batch forever, from memory: the data-free baseline of throughput benchmarks."""
    g = torch.Generator().manual_seed(seed)
    batch = {
        "clip_id": [f"synthetic-{k}" for k in range(batch_size)],
        "frames": torch.randint(0, 256, (batch_size, info.clip_frames, *info.frame_size, 3),
                                dtype=torch.uint8, generator=g),
        "target": torch.randn(batch_size, info.target_tokens, info.target_dim, generator=g),
    }
    while True:
        yield batch
