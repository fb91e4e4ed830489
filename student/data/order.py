"""The two sample orders computed on positions alone, so a resumed stream replays them without
reading data: a shuffle buffer's output order (webdataset streams) and a keyed Feistel permutation
(the zarr epoch)."""

from __future__ import annotations

import numpy as np


class ShuffleBuffer:
    """The output order of a shuffle buffer of `size` slots fed positions 0..n-1 (webdataset's
    algorithm), drawn as it goes. Output j always comes from the first j + size inputs, so the state
    is at most `size` positions; the draws are the same however the outputs are taken, so a resumed
    stream replays its first outputs (no data) and continues exactly."""

    def __init__(self, n: int, size: int, rng: np.random.Generator):
        self.n, self.size, self.rng = n, max(1, size), rng
        self.buffer: list[int] = list(range(min(self.size - 1, n)))   # fed, not yet output
        self.fed = len(self.buffer)     # positions 0..fed-1 went in
        self.done = 0                   # outputs made

    def take(self, m: int) -> list[int]:
        """The next `m` outputs (fewer at the end)."""
        m = min(m, self.n - self.done)
        if m <= 0:
            return []
        # The buffer's fill level at each draw is known in advance, so a run of draws is made at once.
        fill = np.minimum(self.size, self.n - np.arange(self.done, self.done + m))
        picks = (self.rng.random(m) * fill).astype(np.int64).tolist()
        buf, nxt, n, out = self.buffer, self.fed, self.n, []
        for k in picks:
            if nxt < n:
                buf.append(nxt)
                nxt += 1
            buf[k], buf[-1] = buf[-1], buf[k]
            out.append(buf.pop())
        self.fed, self.done = nxt, self.done + m
        return out

    def skip(self, m: int) -> None:
        """Make the next `m` outputs without keeping them: a resumed stream's replay."""
        m = min(m, self.n - self.done)
        while m > 0:
            m -= len(self.take(min(m, 1 << 16)))


class FeistelPermutation:
    """A keyed permutation of [0, n), evaluated per index in O(1) memory: a balanced Feistel network
    on the smallest even number of bits covering n, cycle-walking values that land past n."""

    ROUNDS = 6

    def __init__(self, n: int, rng: np.random.Generator):
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(k) for k in rng.integers(0, 2**63, self.ROUNDS)]

    @staticmethod
    def _mix(x: np.ndarray) -> np.ndarray:
        """splitmix64's finaliser: every output bit depends on every input bit."""
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (self._mix(right ^ key) & self.mask)
        return (left << half) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        x = np.asarray(i, dtype=np.uint64).copy()
        todo = np.ones(x.shape, dtype=bool)
        while todo.any():      # the domain is < 4n: a few passes on average
            x[todo] = self._encrypt(x[todo])
            todo = x >= self.n
        return x.astype(np.int64)
