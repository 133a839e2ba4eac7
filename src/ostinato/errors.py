"""The kinds of failure a command can end with, one exit code each.

A supervisor (``fleet local``, ``chaos``, torchrun) reads the code to decide: bad input and a
refusal will fail the same way again, so the fleet stops; an unreachable peer or a detected
fault is transient, so the island is restarted.
"""

from __future__ import annotations

OK = 0
INTERNAL = 1  # a bug: an exception nobody expected (the traceback is printed)
BAD_INPUT = 2  # a wrong config field, a corrupt or hostile file, a malformed request
REFUSED = 3  # the fleet refused this island: another recipe, a failed challenge, a bad MAC
UNREACHABLE = 4  # a peer or the coordinator could not be reached in time: try again

# Codes after which restarting the same command cannot help.
PERMANENT = (BAD_INPUT, REFUSED)

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 internal error (a bug); 2 bad input (config, file, request); "
    "3 refused by the fleet; 4 a peer was unreachable (transient: restart)."
)


class BadInput(ValueError):
    """Input from the user or from a file that cannot be used; the message names what."""


class Refused(ValueError):
    """The fleet will not admit this island (another recipe, a failed challenge)."""


class Unreachable(ValueError):
    """A peer or the coordinator did not answer in time; a later attempt may succeed."""


def exit_code_of(exc: BaseException) -> int:
    """The exit code for an error that reached the command line."""
    if isinstance(exc, Refused):
        return REFUSED
    if isinstance(exc, Unreachable):
        return UNREACHABLE
    if isinstance(exc, ValueError):
        return BAD_INPUT
    return INTERNAL
