"""A deterministic, resumable stream of training sequences.

Documents are tokenised once and joined with EOS into one flat token array, cut into windows of
seq_len + 1 tokens. The order of windows in each epoch is a permutation seeded from
(seed, epoch), so the whole stream is a pure function of one integer: how many sequences the
island has consumed. That integer is the stream's checkpoint state, and because it counts
global sequences, a run saved on N ranks resumes on M ranks at the same place.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from ostinato.data.tokenizer import eos_id


def tokenize(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one int64 token array, each document followed by EOS."""
    eos = eos_id(tokenizer)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


class TokenStream:
    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.num_sequences = (len(tokens) - 1) // seq_len
        if self.num_sequences < 1:
            raise ValueError(
                f"the corpus has {len(tokens)} tokens, fewer than one sequence of "
                f"data.seq_len + 1 = {seq_len + 1}. Add text or lower --data.seq_len."
            )
        self.consumed = 0  # global sequences handed out so far, across all ranks
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.int64)

    def _window(self, index: int) -> torch.Tensor:
        epoch, position = divmod(index, self.num_sequences)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = (
                epoch,
                torch.randperm(self.num_sequences, generator=generator),
            )
        start = int(self._order[position]) * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch: inputs and targets, (batch_size, seq_len)."""
        first = self.consumed + self.rank * batch_size
        rows = torch.stack([self._window(first + i) for i in range(batch_size)])
        self.consumed += batch_size * self.world_size
        return rows[:, :-1], rows[:, 1:]

    def skip(self, sequences: int) -> None:
        """Move past `sequences` global sequences without reading them (after a loss spike)."""
        self.consumed += sequences

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "num_sequences": self.num_sequences, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_sequences"] != self.num_sequences or state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data stream had {state['num_sequences']} sequences (seed "
                f"{state['seed']}), this corpus has {self.num_sequences} (seed {self.seed}): the "
                f"data or data.seq_len changed. Resume with the same data, or --resume none."
            )
        self.consumed = int(state["consumed"])
