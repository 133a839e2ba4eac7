"""`ostinato fleet status`: the coordinator's view of the fleet, as a table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ostinato.fleet import wire


def print_status(address: str, token: str) -> None:
    token = wire.fleet_token(token)
    keys = wire.Keys(wire.connect(address, 10.0), wire.namespace(token))
    status = keys.get("status")
    if status is None:
        raise ValueError(
            f"no fleet status at {address}: wrong token, or the coordinator just started"
        )
    table = Table(title=f"fleet at {address}")
    for column in ("island", "state", "role", "step", "tokens/s", "round"):
        table.add_column(column)
    for island in status["islands"]:
        speed = island.get("tokens_per_s")
        table.add_row(
            island["island"],
            island["state"],
            island["role"],
            str(island.get("step") or "-"),
            f"{speed:,.0f}" if speed else "-",
            str(island.get("round") or "-"),
        )
    console = Console()
    console.print(table)
    console.print(
        f"last committed round {status['last_committed']} of {status['total_rounds'] or '?'}; "
        f"round {status['round']} attempt {status['attempt']} ({status['phase']})"
        + ("; finished" if status["finished"] else "")
    )
