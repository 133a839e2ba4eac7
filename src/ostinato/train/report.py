"""What the user reads at the end of a run, and what `ostinato doctor` prints."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from ostinato import hardware
from ostinato.config import HardwareConfig
from ostinato.goodput import render_table
from ostinato.train.trainer import TrainResult

console = Console()


def print_result(result: TrainResult) -> None:
    ev = result.evaluation
    summary = {
        "step": result.step,
        "final_loss": result.final_loss,
        "val_loss": ev.val_loss,
        "accuracy": ev.accuracy,
        "digest": result.parameter_digest,
        "strategy": result.strategy,
        "world_size": result.world_size,
        "state_bytes_per_rank": result.state_bytes,  # rank 0's, from its tensors' storage
    }
    if result.fleet_state_bytes is not None:  # each rank's share of the fleet state
        summary["fleet_state_bytes_per_rank"] = result.fleet_state_bytes
    (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if result.goodput is not None:
        render_table(result.goodput, console)
        summary["goodput"] = result.goodput.goodput
        (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    console.rule("[bold]result")
    console.print(f"run directory   {result.run_dir}")
    console.print(f"steps           {result.step}")
    if result.final_loss is not None:
        console.print(f"final loss      {result.final_loss:.4f}")
    if ev.val_loss is not None:
        console.print(f"validation loss {ev.val_loss:.4f}")
    if ev.accuracy is not None:
        console.print(f"accuracy        {ev.accuracy:.1%} on held-out problems")
    for sample in ev.samples:
        mark = "[green]right[/]" if sample.correct else "[red]wrong[/]"
        console.print(f"\n[bold]Q:[/] {sample.question}", highlight=False)
        console.print(
            f"[bold]A:[/] {sample.answer}  ({mark}, expected {sample.expected})", highlight=False
        )


def print_doctor() -> None:
    found = hardware.available_devices()
    device = hardware.choose_device_type(HardwareConfig())
    table = Table(title="ostinato doctor", show_header=False)
    for name, version in hardware.stack_versions().items():
        table.add_row(name, version)
    table.add_row("devices", ", ".join(f"{d} x{n}" for d, n in found.items()))
    backends = [b for b in ("gloo", "nccl", "hccl") if _backend_available(b)]
    table.add_row("backends", ", ".join(backends))
    table.add_row("cpu threads", str(torch.get_num_threads()))
    table.add_row("would use", f"device {device}, backend {hardware.BACKEND_FOR_DEVICE[device]}")
    console.print(table)


def _backend_available(name: str) -> bool:
    if name == "hccl":
        return "npu" in hardware.available_devices()
    return getattr(dist, f"is_{name}_available", lambda: False)()
