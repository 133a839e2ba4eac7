"""The serving engine: token ids in, token ids out, many sequences decoded together.

Continuous batching: every sequence owns a slot of a preallocated KV cache, and each engine
step first prefills the requests that arrived since the last step (together, padded), then
advances every running sequence by one token in one batched forward pass. A request that
arrives mid-generation joins at the next step instead of waiting for the batch to drain.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ostinato.model.generate import sample_token
from ostinato.model.llama import Llama

log = logging.getLogger("ostinato")
# emit(token, finish_reason): a token (or None) and, on the last call, "stop", "length" or "error".
Emit = Callable[[int | None, str | None], None]


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)


@dataclass
class Sequence:
    prompt: list[int]
    sampling: Sampling
    emit: Emit
    slot: int = -1
    length: int = 0  # positions held in the KV cache
    generated: int = 0
    last_token: int = 0
    cancelled: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)


class SlotCache:
    """One layer's keys and values for every slot, (S, T_max, K, E); used like `KVCache`.

    Before each forward pass the engine binds the rows (slots) and positions being computed;
    `extend` writes the new keys and values there and returns each row's first `length`.
    """

    def __init__(self, slots: int, max_len: int, n_kv: int, head_dim: int, dtype, device):
        self.k = torch.zeros(slots, max_len, n_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.rows = self.positions = None
        self.length = 0

    def bind(self, rows: torch.Tensor, positions: torch.Tensor, length: int) -> None:
        self.rows, self.positions, self.length = rows, positions, length

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, K, T, E) at `positions` (B, T); returns (B, K, length, E) each."""
        at = (self.rows[:, None], self.positions)
        self.k[at], self.v[at] = k.transpose(1, 2), v.transpose(1, 2)
        k_all, v_all = self.k[self.rows, : self.length], self.v[self.rows, : self.length]
        return k_all.transpose(1, 2), v_all.transpose(1, 2)


class Engine:
    """Runs `model` for submitted sequences in a background thread (or step by step in tests)."""

    def __init__(self, model: Llama, eos_id: int, max_batch: int = 16):
        self.model, self.eos_id, self.max_batch = model, eos_id, max_batch
        cfg, param = model.cfg, next(model.parameters())
        self.device = param.device
        self.caches = [
            SlotCache(
                max_batch, cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim, param.dtype, self.device
            )
            for _ in range(cfg.n_layers)
        ]
        self.free_slots = list(range(max_batch - 1, -1, -1))
        self.running: dict[int, Sequence] = {}
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.stats = collections.Counter()

    @property
    def max_seq_len(self) -> int:
        return self.model.cfg.max_seq_len

    def load(self) -> int:
        """Sequences accepted and not finished: running plus waiting."""
        with self.cond:
            return len(self.running) + len(self.waiting)

    def submit(self, prompt: list[int], sampling: Sampling, emit: Emit) -> Sequence:
        assert 0 < len(prompt) < self.max_seq_len, "the API checks prompt lengths"
        seq = Sequence(list(prompt), sampling, emit)
        if sampling.temperature > 0 and sampling.seed is not None:
            seq.generator = torch.Generator().manual_seed(sampling.seed)
        with self.cond:
            self.waiting.append(seq)
            self.cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True  # the engine thread frees its slot at its next step

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="ostinato-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.waiting or self.running or self.stopping):
                    self.cond.wait()
                if self.stopping:
                    return
            self.step()

    @torch.no_grad()
    def step(self) -> None:
        """Admit and prefill new sequences, then decode one token for every running one."""
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            self._isolated(self._prefill, admitted)
        if self.running:
            self._isolated(self._decode, list(self.running.values()))

    def _isolated(self, run: Callable[[list[Sequence]], None], seqs: list[Sequence]) -> None:
        """Run one batched pass; if it fails, run each sequence alone, so a failure ends only the
        sequence that causes it, never the others that happened to share its batch.

        Retrying is safe: a failed pass has advanced no sequence (sampling failures are caught
        per sequence in `_advance`), and rerunning it rewrites the same KV-cache positions.
        """
        try:
            run(seqs)
        except Exception:
            if len(seqs) == 1:
                log.exception("engine pass failed; ending its one sequence")
                self._finish(seqs[0], None, "error")
                return
            log.warning("batched pass of %d sequences failed; retrying one by one", len(seqs))
            for seq in seqs:
                self._isolated(run, [seq])

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.running.values() if s.cancelled]:
            self._release(seq)
        with self.cond:
            self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)

    def _admit(self) -> list[Sequence]:
        admitted = []
        with self.cond:
            while self.waiting and self.free_slots:
                seq = self.waiting.popleft()
                seq.slot = self.free_slots.pop()
                self.running[seq.slot] = seq
                admitted.append(seq)
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> None:
        """All new prompts in one pass, right-padded: causal attention never sees the padding."""
        longest = max(len(s.prompt) for s in seqs)
        tokens = torch.zeros(len(seqs), longest, dtype=torch.long)
        for row, seq in enumerate(seqs):
            tokens[row, : len(seq.prompt)] = torch.tensor(seq.prompt)
        positions = torch.arange(longest, device=self.device).expand(len(seqs), longest)
        self._bind(seqs, positions, longest)
        logits = self.model(tokens.to(self.device), positions=positions, caches=self.caches)
        last = torch.tensor([len(s.prompt) - 1 for s in seqs], device=self.device)
        for seq in seqs:
            seq.length = len(seq.prompt)
        self.stats["prompt_tokens"] += sum(len(s.prompt) for s in seqs)
        self.stats["prefill_steps"] += 1
        self._advance(seqs, logits[torch.arange(len(seqs), device=self.device), last])

    def _decode(self, seqs: list[Sequence]) -> None:
        tokens = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        positions = torch.tensor([[s.length] for s in seqs], device=self.device)  # (B, 1)
        length = int(positions.max()) + 1
        self._bind(seqs, positions, length)
        # Row b attends to its own positions 0..length_b; the rest of its slot is stale.
        mask = torch.arange(length, device=self.device)[None, :] <= positions
        logits = self.model(
            tokens, positions=positions, caches=self.caches, mask=mask[:, None, None, :]
        )
        for seq in seqs:
            seq.length += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(seqs)
        self._advance(seqs, logits[:, -1])

    def _bind(self, seqs: list[Sequence], positions: torch.Tensor, length: int) -> None:
        rows = torch.tensor([s.slot for s in seqs], device=self.device)
        for cache in self.caches:
            cache.bind(rows, positions, length)

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Pick each sequence's next token from its logits (B, V) and emit it or finish.

        Each sequence is picked and emitted on its own: one whose sampling (or client) fails
        ends with "error" alone, and the rest of the batch carries on.
        """
        greedy = logits.argmax(dim=-1).tolist()  # one batched call for every greedy row
        for row, seq in enumerate(seqs):
            try:
                params = seq.sampling
                token = greedy[row]
                if params.temperature > 0:
                    token = sample_token(
                        logits[row], params.temperature, params.top_p, seq.generator
                    )
                self._accept(seq, token)
            except Exception:
                log.exception("sampling failed for one sequence; ending it alone")
                self._finish(seq, None, "error")

    def _accept(self, seq: Sequence, token: int) -> None:
        if token == self.eos_id and not seq.sampling.ignore_eos:
            self._finish(seq, None, "stop")
            return
        seq.generated += 1
        seq.last_token = token
        self.stats["generated_tokens"] += 1
        out_of_room = seq.length + 1 >= self.max_seq_len
        if seq.generated >= seq.sampling.max_tokens or out_of_room:
            self._finish(seq, token, "length")
        else:
            seq.emit(token, None)

    def _finish(self, seq: Sequence, token: int | None, reason: str) -> None:
        self._release(seq)
        self.stats[f"finished_{reason}"] += 1
        try:
            seq.emit(token, reason)
        except Exception:  # its client is gone (e.g. the event loop closed): nothing to tell
            log.warning("could not deliver the end of a sequence", exc_info=True)

    def _release(self, seq: Sequence) -> None:
        with self.cond:
            if self.running.pop(seq.slot, None) is not None:
                self.free_slots.append(seq.slot)
