"""The `spike` fault: poisoned training data, addressed by position in the data stream.

`spike@step=N,window=W` replaces the batches that steps N..N+W-1 read in an undisturbed run with
uniformly random token ids. Random tokens carry no signal, so the loss jumps to about ln(vocab).
The poison sits in the stream, not in the step: an island that skips past that stretch of its
data (the loss-spike guard's remedy) skips the poison too.
"""

from __future__ import annotations

import torch


class DataPoison:
    """Which stream positions are poisoned, and the random batches served there."""

    def __init__(
        self, spikes: list[tuple[int, int]], sequences_per_step: int, vocab_size: int, seed: int
    ):
        """spikes: (first step, steps) pairs; sequences_per_step: global, across the island."""
        self.ranges = [
            ((step - 1) * sequences_per_step, (step - 1 + window) * sequences_per_step)
            for step, window in spikes
        ]
        self.vocab_size, self.seed = vocab_size, seed

    def covers(self, position: int) -> bool:
        """Whether the batch that starts at global sequence `position` is poisoned."""
        return any(start <= position < end for start, end in self.ranges)

    def batch(
        self, position: int, rank: int, batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random inputs and targets, (batch_size, seq_len), the same for a position every time."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + position * 1009 + rank)
        rows = torch.randint(self.vocab_size, (batch_size, seq_len + 1), generator=generator)
        return rows[:, :-1], rows[:, 1:]
