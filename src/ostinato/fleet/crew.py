"""The ranks of one island acting as one fleet member (fleet/shards.py).

Only the island's leader (rank 0) speaks the fleet protocol with the coordinator; but each rank
holds its own fleet shards, so every step of the protocol that touches fleet state (open the
round's payloads, step, commit, abort, heal, restore) is an operation every rank runs on its
shards. The leader names the operation and its arguments; the other ranks, following, run it
too; the leader gets back each rank's result. Messages are JSON over a gloo group of the island's
own (nothing unpickled), used by nothing else, so an exchange can follow in the background while
the island trains on its other groups (fleet.overlap).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

Handler = Callable[[str, dict[str, Any]], dict[str, Any]]
END = "end"


class CrewError(RuntimeError):
    """An operation failed on one of the island's ranks."""


def _send(value: Any, group: dist.ProcessGroup) -> None:
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    dist.broadcast(torch.tensor([data.numel()], dtype=torch.int64), 0, group=group)
    dist.broadcast(data, 0, group=group)


def _receive(group: dist.ProcessGroup) -> Any:
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, 0, group=group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, 0, group=group)
    return json.loads(bytes(data.numpy()).decode())


def _gather(value: Any, group: dist.ProcessGroup, ranks: int) -> list[Any]:
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(ranks)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64), group=group)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: data.numel()] = data
    gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(ranks)]
    dist.all_gather(gathered, padded, group=group)
    return [
        json.loads(bytes(g[: int(s.item())].numpy()).decode())
        for g, s in zip(gathered, sizes, strict=True)
    ]


class Crew:
    """One island's ranks running fleet-state operations together. With one rank, `run` just
    runs the operation here."""

    def __init__(self, rank: int, ranks: int, handler: Handler, timeout_s: float = 3600.0):
        self.rank, self.ranks, self.handler = rank, ranks, handler
        # A long timeout: a follower waits for the leader's next operation for a whole round;
        # a rank that dies takes its island down with it (torchrun restarts all of its ranks).
        self.group = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
            if ranks > 1
            else None
        )

    def run(self, op: str, **args: Any) -> list[dict[str, Any]]:
        """The leader: every rank runs `op`; each rank's result, in rank order."""
        if self.group is None:
            return [self._handle(op, args)]
        _send({"op": op, "args": args}, self.group)
        results = _gather(self._handle(op, args), self.group, self.ranks)
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            raise CrewError(f"fleet: {op} failed on a rank of this island: {failed[0]}")
        return results

    def end(self, value: dict[str, Any] | None = None) -> None:
        """The leader: release the followers, giving them `value` (what the round came to)."""
        if self.group is not None:
            _send({"op": END, "args": value or {}}, self.group)

    def follow(self) -> dict[str, Any]:
        """A follower: run the leader's operations until it ends; returns what it ended with."""
        while True:
            order = _receive(self.group)
            if order["op"] == END:
                return order["args"]
            _gather(self._handle(order["op"], order["args"]), self.group, self.ranks)

    def gathered(self, value: int) -> list[int]:
        """Every rank calls: each rank's `value`, in rank order."""
        if self.group is None:
            return [value]
        values = [torch.zeros(1, dtype=torch.int64) for _ in range(self.ranks)]
        dist.all_gather(values, torch.tensor([value], dtype=torch.int64), group=self.group)
        return [int(v.item()) for v in values]

    def agree(self, ok: bool) -> bool:
        """Inside an operation: whether every rank's `ok` holds."""
        if self.group is None:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def _handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.handler(op, args)
        except RuntimeError as exc:  # reported to the leader, which fails the step with it
            if self.group is None:
                raise
            return {"error": f"rank {self.rank}: {exc}"[:400]}
