"""A warm spare island process (fleet/spare.py says why): `python -m ostinato.warm` imports what
an island's first step needs, then waits for the command line of the island it is to become."""

from __future__ import annotations

import json
import sys


def warm() -> None:
    """Import what an island's first step needs, and build an optimizer once (the first one
    imports torch._dynamo)."""
    import torch
    import torch.distributed.checkpoint  # noqa: F401

    import ostinato.cli  # noqa: F401
    import ostinato.faults.inject  # noqa: F401
    import ostinato.train.trainer  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


def main() -> None:
    """The spare itself: warm up, wait for a command line (JSON: {"argv": [...]}, the arguments
    after `python -m ostinato`), run it. A closed input (the supervisor left) ends it quietly."""
    warm()
    line = sys.stdin.readline()
    if not line.strip():
        return
    argv = [str(arg) for arg in json.loads(line)["argv"]]
    sys.argv = ["ostinato", *argv]
    from ostinato.cli import main as run
    from ostinato.startup import taken_as_spare

    taken_as_spare()
    run()


if __name__ == "__main__":
    main()
