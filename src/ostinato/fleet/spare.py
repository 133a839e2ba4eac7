"""A warm spare: a process that has already imported the trainer and waits to become whichever
island dies next, so a restart does not pay for its imports again.

Most of a cold restart on a small model is imports: torch, DCP (to read the checkpoint) and the
compiler hooks that the optimizer pulls in when it is first built (torch._dynamo), about 4 s of
a 2-core machine's time and more when it is loaded (bench/recovery.py). `fleet local` keeps one
spare: it starts `python -m ostinato.warm`, which imports all that and then blocks on one
line of its standard input; when an island dies, the supervisor writes that island's command
line there and the spare runs it, exactly as `python -m ostinato ...` would. A new spare is
started a little later, so its imports do not compete with the restart it just made quick.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

SPARE_DELAY_S = 5.0  # after a spare is taken, before the next one starts warming


class Spare:
    """The supervisor's side: at most one warm spare, started when none is and the last one
    was taken (or the fleet started) at least SPARE_DELAY_S ago."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.process: subprocess.Popen | None = None
        self.taken_at = time.monotonic()  # the first spare, too, waits: the islands start now

    def keep_warm(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        if time.monotonic() - self.taken_at < SPARE_DELAY_S:
            return
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ostinato.warm"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            bufsize=1,
        )

    def take(self, command: list[str]) -> subprocess.Popen | None:
        """The spare, now running `command` (`python -m ostinato ARGS`); None if there is none."""
        spare, self.process = self.process, None
        if spare is None or spare.poll() is not None or command[1:3] != ["-m", "ostinato"]:
            return None
        try:
            spare.stdin.write(json.dumps({"argv": command[3:]}) + "\n")
            spare.stdin.close()
        except OSError:
            spare.kill()
            return None
        self.taken_at = time.monotonic()
        return spare

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
