"""Healing a restarted island at once, mid-round, instead of at the next commit.

A joiner admitted while the fleet's members train (the round is collecting) is healed by a member
that is still training: the coordinator asks it (`healnow/DONOR`); the donor serves the heal at
its next inner step, from a copy of its fleet state, in the background (fleet/joining.py), and
writes the joiner's heal order as it starts. Seeing that order, the coordinator counts the joiner
a member of the last committed round, *fresh*: it trains from there, and once every other member
is ready for the round it is told to end its round early (`hurry/ROUND`); its pseudo-gradient
holds fewer inner steps and weighs in the average by its tokens. A donor that gets ready or dies
first leaves the joiner to be healed at the next commit, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ostinato.fleet import wire
from ostinato.fleet.membership import IslandView

log = logging.getLogger("ostinato")


@dataclass
class Asked:
    nonce: str  # the joiner's admission
    donor: str
    round: int  # the committed round whose state the donor is to send


class PromptHeals:
    def __init__(self, keys: wire.Keys, islands: dict[str, IslandView]):
        self.keys, self.islands = keys, islands
        self.asked: dict[str, Asked] = {}  # joiner -> its heal asked of a donor
        self.hurried: set[int] = set()  # rounds whose fresh members were told to end early

    def ask(self, joiner: IslandView, donors: list[str], committed: int) -> None:
        """Ask the first of `donors` (members of round `committed` still training) to heal
        `joiner` now."""
        if not donors or committed < 1:
            return  # nobody to ask, or no committed state yet: healed at the next commit
        donor = donors[0]
        order = {"island": joiner.name, "nonce": joiner.nonce, "round": committed}
        self.keys.put(f"healnow/{donor}", order)
        self.asked[joiner.name] = Asked(joiner.nonce, donor, committed)
        log.info("coordinator: island %s is healed now by %s", joiner.name, donor)

    def confirm(self, alive: Callable[[str], bool], committed: int) -> None:
        """A joiner whose donor has started its heal counts as a fresh member; a request whose
        donor died, or whose round was overtaken by a commit, is dropped."""
        for name, asked in list(self.asked.items()):
            view = self.islands.get(name)
            order = self.keys.get(f"heal/{name}/{asked.nonce}")
            served = order and order.get("round") == asked.round and order["donor"] == asked.donor
            current = view is not None and view.nonce == asked.nonce and view.role == "joiner"
            waiting = current and alive(asked.donor) and committed == asked.round
            if served and waiting:
                view.role, view.have, view.fresh = "member", asked.round, True
            elif waiting:
                continue  # the donor has not reached its next inner step yet
            # else overtaken by a commit (which heals it), or the joiner or the donor is gone
            del self.asked[name]
            self.keys.delete(f"healnow/{asked.donor}")

    def hurry(self, number: int, live: list[str], ready: list[str]) -> None:
        """Every member but the fresh ones is ready for round `number`: tell those to end their
        round at their next inner step, so the others do not wait out the grace window."""
        fresh = [m for m in live if self.islands[m].fresh and m not in ready]
        others_ready = all(m in ready for m in live if m not in fresh)
        if fresh and others_ready and number not in self.hurried:
            self.keys.put(f"hurry/{number}", {"islands": fresh})
            self.hurried.add(number)

    def committed(self, number: int, members: list[str]) -> None:
        """Round `number` committed: its members are fresh no more; heals asked for joiners that
        the commit itself heals are moot."""
        for name in members:
            self.islands[name].fresh = False
        for name, asked in list(self.asked.items()):
            self.keys.delete(f"healnow/{asked.donor}")
            del self.asked[name]
        if number in self.hurried:
            self.hurried.discard(number)
            self.keys.delete(f"hurry/{number}")
