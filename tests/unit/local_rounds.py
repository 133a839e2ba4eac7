"""A fleet round without the network: the members' own exchange code (FleetMember's crew
operations `open` and `step`, fleet/shard_ops.py), with the all-gather of each shard replaced
by a rendezvous of threads in this process. Everything else is what an island runs."""

from __future__ import annotations

import threading
from typing import Any

import torch

from ostinato.fleet.member import FleetMember, RoundOutcome, keep
from ostinato.fleet.shard_ops import average, open_payloads


def local_round(
    members: list[FleetMember],
    models: list[torch.nn.Module],
    number: int,
    tokens: tuple[int, ...] = (100, 300, 500, 700),
    tamper=None,
    commit: bool = True,
) -> list[dict[str, Any]]:
    """Round `number` (attempt 0) among `members`: each prepares its pseudo-gradient from its
    model, opens the gathered payloads and takes the tentative outer step; then, if `commit`,
    commits and its model takes the result. `tamper(raw, sender, shard)` may change a payload
    in transit. Returns each member's result (digest, excluded, refused)."""
    names = [m.island for m in members]
    for member, model in zip(members, models, strict=True):
        member.prepare(model)
    posted: dict[tuple[int, str], torch.Tensor] = {}
    barriers: dict[int, threading.Barrier] = {}
    lock = threading.Lock()

    def gather(member: FleetMember):
        def fake(mine, number, attempt, members, shard):
            with lock:
                barrier = barriers.setdefault(shard, threading.Barrier(len(members)))
                posted[(shard, member.island)] = mine
            barrier.wait(timeout=30)
            out = [posted[(shard, name)].clone() for name in members]
            if tamper is not None:
                out = [tamper(raw, name, shard) for raw, name in zip(out, members, strict=True)]
            return out

        return fake

    reports: dict[str, list[dict[str, Any]]] = {}

    def open_one(member: FleetMember, count: int) -> None:
        member._all_gather_unless_aborted = gather(member)
        args = {"number": number, "attempt": 0, "members": names, "tokens": count}
        reports[member.island] = member.crew.run("open", **args)

    threads = [
        threading.Thread(target=open_one, args=(m, t))
        for m, t in zip(members, tokens[: len(members)], strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = []
    for member, model in zip(members, models, strict=True):
        result = member._step_on(reports[member.island], names, number)
        results.append(result)
        if commit:
            excluded = result["excluded"] + result["refused"]
            member.crew.run("commit", keep_error=member.island not in excluded)
            member.round_have = number
            fragment = member.fragment(number)
            member.take(
                model, RoundOutcome(True, False, number, fragment=fragment, reload="fragment")
            )
    return results


def average_of(member: FleetMember, gathered, members, fragment=None, kind=None):
    """The average a member takes of payloads as gathered (unsealed: packed bytes then the
    token count), and the members it leaves out: the same functions its exchange uses."""
    kind = kind or member.cfg.compression
    numel = member.shards.fragment_size(0, fragment)
    peers, _, squares = open_payloads(
        gathered, members, numel, kind, member.cfg.block, lambda raw, sender: raw
    )
    report = {"refused": [], "squares": squares}
    use, excluded, _ = keep([report], members, member.guards.outlier_ratio)
    return average(peers, use, numel), excluded
