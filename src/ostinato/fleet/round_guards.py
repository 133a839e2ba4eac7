"""The guards the coordinator runs on a round's results, before it commits: payloads refused
for a bad MAC, pseudo-gradients left out as outliers, digests that disagree, slow links.

Each firing goes to the fleet's guard log, naming the island at fault (for a bad MAC: the
sender, whose payload was changed on its way)."""

from __future__ import annotations

import time
from typing import Any, Protocol

from ostinato.config import GuardsConfig
from ostinato.fleet.guards import GuardLog, fleet_digest, outliers_above_median

Results = dict[str, dict[str, Any]]  # member -> what it reported for the attempt


class PlannedRound(Protocol):
    number: int
    members: list[str]


class RoundGuards:
    def __init__(self, guards: GuardsConfig, guard_log: GuardLog, planned: PlannedRound):
        self.guards, self.guard_log, self.round = guards, guard_log, planned

    def judge(self, results: Results, last_members: list[str]) -> list[str]:
        """The members whose global digest is the fleet's; the others are quarantined."""
        refused = self.mac(results)
        excluded = sorted({m for r in results.values() for m in r.get("excluded", [])})
        suspects = sorted({*excluded, *refused})
        for name in excluded:
            self.guard_log.fire(
                "pseudo_gradient",
                name,
                "left out of the average",
                f"round {self.round.number}: island {name}'s pseudo-gradient norm is an outlier",
                round=self.round.number,
            )
        digests = {m: r["digest"] for m, r in results.items()}
        if len(set(digests.values())) == 1 or not self.guards.fleet_digest:
            return list(results)  # without the guard a disagreement goes unnoticed
        order = [*last_members, *sorted(results)]
        kept = fleet_digest(digests, order, suspects)
        keeper = next(m for m in order if digests.get(m) == kept)
        for name, digest in digests.items():
            if digest != kept:
                shards = differing_shards(results[name], results[keeper])
                where = f" (fleet shards {shards})" if shards else ""
                self.guard_log.fire(
                    "digest",
                    name,
                    "quarantined and healed from a donor",
                    f"round {self.round.number}: island {name}'s global digest {digest} is not "
                    f"the fleet's {kept}{where}",
                    round=self.round.number,
                    shards=shards,
                )
        return [m for m in self.round.members if digests[m] == kept]

    def mac(self, results: Results) -> list[str]:
        """Senders whose pseudo-gradient failed its MAC at some member (changed in transit): a
        fault of the sender, which every such member left out of its average."""
        refused_by: dict[str, list[str]] = {}
        for receiver, result in sorted(results.items()):
            for sender in result.get("refused", []):
                refused_by.setdefault(sender, []).append(receiver)
        for sender, receivers in sorted(refused_by.items()):
            self.guard_log.fire(
                "mac",
                sender,
                "left out of the average",
                f"round {self.round.number}: island {sender}'s pseudo-gradient failed its MAC "
                f"at {', '.join(receivers)} (changed in transit)",
                round=self.round.number,
                receivers=receivers,
            )
        return sorted(refused_by)

    def link(self, results: Results) -> None:
        exchange = {m: r["exchange_s"] for m, r in results.items()}
        for name, times in outliers_above_median(exchange, self.guards.link_ratio, 0.5).items():
            self.guard_log.fire(
                "link",
                name,
                "reported",
                f"round {self.round.number}: island {name}'s exchange took "
                f"{exchange[name]:.2f} s, {times:.1f}x the others' median",
                round=self.round.number,
                factor=times,
            )


def differing_shards(result: dict[str, Any], reference: dict[str, Any]) -> list[int]:
    """The fleet shards whose digests differ between two members' results (empty when the
    fleet state is not cut, or a result does not say)."""
    mine, theirs = result.get("shard_digests") or [], reference.get("shard_digests") or []
    if len(mine) != len(theirs):
        return []
    return [k for k, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b]


def round_record(
    number: int,
    attempt: int,
    members: list[str],
    results: dict[str, dict[str, Any]],
    quarantined: list[str],
) -> dict[str, Any]:
    """What rounds.jsonl says of a committed round, from its members' results (the first
    member's digest is the round's: the guards kept only members that agree with it)."""
    return {
        "round": number,
        "attempt": attempt,
        "members": members,
        "bytes_sent": {m: r["bytes_sent"] for m, r in results.items()},
        "exchange_s": max(r["exchange_s"] for r in results.values()),
        "tokens": {m: r["tokens"] for m, r in results.items()},
        "digest": results[members[0]]["digest"],
        "excluded": sorted({m for r in results.values() for m in r.get("excluded", [])}),
        "refused": sorted({m for r in results.values() for m in r.get("refused", [])}),
        "quarantined": quarantined,
        "shards": len(results[members[0]].get("shard_digests") or [0]),
        "time": time.time(),
    }
