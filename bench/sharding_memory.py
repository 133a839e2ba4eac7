"""What a rank holds with DDP against FSDP, what activation checkpointing saves, and what
sharding costs in tokens/s: a 125M-parameter model on CPU, 1, 2 and 4 gloo ranks.

1. Memory per rank. `ostinato train` under torchrun for each rank count and strategy, a few
   steps each: `state_bytes_per_rank` (parameters, gradients and AdamW state, measured from the
   tensors' storage by the trainer) and the peak resident memory of every rank (VmHWM).
   Target: FSDP's state per rank <= 1.1 x DDP's / N.
2. Tokens/s, FSDP against DDP on 2 ranks, from the same runs (median step after the first
   two). Target >= 0.9.
3. Activation checkpointing, one process per mode: the activations a step holds for its
   backward pass (resident memory at the end of the forward pass above the resident memory
   before it; glibc is told to hand large blocks back to the system on free, so a freed
   temporary does not linger), the resident peak of the whole step above the same base (which
   adds the backward pass's temporaries, among them the embedding's and the head's gradients),
   and the step time. Targets: full recomputation cuts activation memory >= 3x for <= 1.4x time.

    .venv/bin/python bench/sharding_memory.py [--ranks 1 2 4] [--steps 6] [--no-activations]
        [--reshard default|always|never]  (parallel.reshard_after_forward of the fsdp runs)
    (`--ranks` with no count: the activation table alone)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# 12 layers of 768, a 32k vocabulary, untied: 125M parameters
MODEL = [
    "model.size=small",
    "model.dim=768",
    "model.n_layers=12",
    "model.n_heads=12",
    "model.n_kv_heads=4",
    "model.ffn_dim=2048",
    "model.vocab_size=32768",
    "model.max_seq_len=256",
]
RECIPE = [
    "data.source=reasoning",
    "data.problems=2000",
    "data.seq_len=128",
    "train.batch_size=2",
    "train.threads=1",
    "train.eval_problems=0",
    "train.samples=0",
    "train.eval_every=0",
    "checkpoint.every=0",
    "checkpoint.async_save=false",
]
# glibc: blocks of 128 KiB and more are mapped and unmapped one by one, never pooled
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS


def train_worker(out: Path, overrides: list[str]) -> None:
    """One rank (under torchrun) or the only process: train, then write what it held."""
    from ostinato.config import load_config
    from ostinato.train.trainer import train

    result = train(load_config(None, overrides), out, "none", show_progress=False)
    rank = os.environ.get("RANK", "0")
    held = {"state_bytes": result.state_bytes, "peak_rss": peak_rss_bytes()}
    (out / f"rank{rank}.json").write_text(json.dumps(held | {"strategy": result.strategy}))


def activation_worker(mode: str, steps: int, out: Path) -> None:
    """Steps of one process with activation checkpointing `mode`: activation bytes, step s."""
    import torch

    from ostinato.checkpoint.state import init_optimizer_state
    from ostinato.config import load_config
    from ostinato.hardware import Placement
    from ostinato.train.memory import activation_bytes_per_rank
    from ostinato.train.parallel import build_model
    from ostinato.train.state import make_optimizer

    cfg = load_config(None, [*MODEL, *RECIPE, f"parallel.activation_checkpointing={mode}"])
    torch.set_num_threads(2)
    place = Placement(torch.device("cpu"), "gloo")
    model = build_model(cfg.parallel, cfg.model, 0, place, "single")
    optimizer = make_optimizer(model, cfg.train)
    init_optimizer_state(model, optimizer)
    shape = (4, cfg.data.seq_len + 1)
    tokens = torch.randint(
        0, cfg.model.vocab_size, shape, generator=torch.Generator().manual_seed(0)
    )
    held, peaks, times = [], [], []
    for _ in range(steps):
        before = rss_bytes()  # parameters, moments and (after the first step) gradients
        reset_peak_rss()
        started = time.perf_counter()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        held.append(rss_bytes() - before)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay: part of `before` next time
        times.append(time.perf_counter() - started)
        peaks.append(peak_rss_bytes() - before)
    # the first step also allocates the gradients: count from the second
    result = {
        "activation_bytes": min(held[1:]),
        "step_peak_bytes": min(peaks[1:]),
        "step_s": statistics.median(times[1:]),
    }
    m = cfg.model  # what the planner would say (train/memory.py), in fp32 as on this CPU
    tokens = shape[0] * cfg.data.seq_len
    result["formula_bytes"] = activation_bytes_per_rank(
        m.n_layers, m.dim, tokens, mode, m.vocab_size, value_bytes=4
    )
    out.write_text(json.dumps(result))


def launch(ranks: int, args: list[str]) -> None:
    env = {**os.environ, **ALLOCATOR, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        command = [sys.executable, __file__, *args]
    else:
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*runner, f"--nproc_per_node={ranks}", __file__, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def memory_run(ranks: int, strategy: str, steps: int, root: Path, reshard: str) -> dict:
    out = root / f"{strategy}-{ranks}"
    overrides = [*MODEL, *RECIPE, f"train.steps={steps}", f"parallel.strategy={strategy}"]
    overrides.append(f"parallel.reshard_after_forward={reshard}")
    launch(ranks, ["--train-worker", str(out), *overrides])
    held = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(r["step_s"] for r in records[2:])
    tokens = records[-1]["tokens"]
    return {
        "ranks": ranks,
        "strategy": held[0]["strategy"],
        "state_bytes": held[0]["state_bytes"],
        "peak_rss": max(h["peak_rss"] for h in held),
        "tokens_per_s": tokens / step_s,
    }


def memory_table(ranks: list[int], steps: int, reshard: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for n in ranks:
            for strategy in ("ddp", "fsdp") if n > 1 else ("ddp",):
                rows.append(memory_run(n, strategy, steps, Path(root), reshard))
                row = rows[-1]
                print(
                    f"{n} rank(s) {row['strategy']:6} state/rank {row['state_bytes'] / 2**20:8.1f} "
                    f"MiB  peak RSS/rank {row['peak_rss'] / 2**20:8.1f} MiB  "
                    f"{row['tokens_per_s']:7.1f} tok/s",
                    flush=True,
                )
    return rows


def activation_table(steps: int) -> dict[str, dict]:
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for mode in ("none", "selective", "full"):
            out = Path(root) / f"{mode}.json"
            launch(1, ["--activation-worker", mode, str(steps), str(out)])
            results[mode] = json.loads(out.read_text())
            r = results[mode]
            print(
                f"activation checkpointing {mode:9} activations {r['activation_bytes'] / 2**20:7.1f}"
                f" MiB (formula {r['formula_bytes'] / 2**20:.1f}), step peak "
                f"{r['step_peak_bytes'] / 2**20:.1f} MiB, step {r['step_s']:.2f} s",
                flush=True,
            )
    return results


def report(rows: list[dict], activations: dict[str, dict] | None) -> None:
    if rows:
        memory_report(rows)
    if activations:
        none, full = activations["none"], activations["full"]
        cut = none["activation_bytes"] / max(1, full["activation_bytes"])
        peak_cut = none["step_peak_bytes"] / max(1, full["step_peak_bytes"])
        cost = full["step_s"] / none["step_s"]
        print(
            f"full activation checkpointing: activation memory / {cut:.2f} (target >= 3), "
            f"step peak / {peak_cut:.2f}, step time x {cost:.2f} (target <= 1.4)"
        )


def memory_report(rows: list[dict]) -> None:
    ddp = {r["ranks"]: r for r in rows if r["strategy"] in ("ddp", "single")}
    one = ddp[1]["state_bytes"] if 1 in ddp else None
    print(
        "\n| ranks | strategy | state / rank MiB | / (1-rank state / N) | peak RSS / rank MiB | tok/s |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        share = f"{r['state_bytes'] / (one / r['ranks']):.3f}" if one else "-"
        print(
            f"| {r['ranks']} | {r['strategy']} | {r['state_bytes'] / 2**20:.1f} | {share} | "
            f"{r['peak_rss'] / 2**20:.1f} | {r['tokens_per_s']:.1f} |"
        )
    for n in sorted({r["ranks"] for r in rows if r["ranks"] > 1}):
        sharded = next(r for r in rows if r["ranks"] == n and r["strategy"] == "fsdp")
        ratio = sharded["state_bytes"] / (ddp[n]["state_bytes"] / n)
        speed = sharded["tokens_per_s"] / ddp[n]["tokens_per_s"]
        print(
            f"{n} ranks: FSDP state / (DDP state / {n}) = {ratio:.3f} (target <= 1.1); "
            f"FSDP / DDP tokens/s = {speed:.3f} (target >= 0.9)"
        )


def main() -> None:
    if sys.argv[1:2] == ["--train-worker"]:
        return train_worker(Path(sys.argv[2]), sys.argv[3:])
    if sys.argv[1:2] == ["--activation-worker"]:
        return activation_worker(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-activations", action="store_true")
    parser.add_argument(
        "--reshard",
        choices=("default", "always", "never"),
        default="default",
        help="parallel.reshard_after_forward of the fsdp runs",
    )
    args = parser.parse_args()
    rows = memory_table(args.ranks, args.steps, args.reshard)
    activations = None if args.no_activations else activation_table(args.steps)
    report(rows, activations)


if __name__ == "__main__":
    main()
