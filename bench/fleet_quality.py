"""`bench/fleet_vs_ddp.py --quality`: does a fleet train as good a model as synchronous training?

The demo model (configs/demo.toml, ~1M parameters) on the reasoning corpus, every arm with the
same total batch (16 sequences of 128 tokens per inner step, split over the ranks or islands),
the same steps, tokens, schedule, tokenizer and init, one thread per process:

- DDP, 2 ranks of 8 sequences: the reference;
- fleets of 1, 2 and 4 islands (16, 8, 4 sequences each), H = 30, fp32 pseudo-gradients and the
  auto outer rate ("Scaling Laws for DiLoCo", Table 4's regime);
- 2 islands with DiLoCo's 0.7 outer rate, and 2 islands in int4 (against the fp32 one);
- 2 islands at H = 100 and H = 500, each after a synchronous warm start of
  fleet.warm_start_steps steps, to show the trade between traffic and loss;
- one island of 2 threads against two of 1 thread for the same wall-clock: the 2-island arm's
  compute time, at the 2-thread island's speed (measured on a short probe first).

Each arm's validation loss (island a's: every island ends on the same parameters), its held-out
accuracy (train.eval_problems on island a or rank 0) and bytes across islands. The paper's
regime is 20 tokens per parameter (--tokens-per-param 20: ~21M tokens, ~25 min an arm on 2
cores); pass less for a shorter run and say so.

    .venv/bin/python bench/fleet_vs_ddp.py --quality [--tokens-per-param 20] [--out DIR] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import fleet_vs_ddp as base

from ostinato.config import load_config
from ostinato.model.llama import Llama

DEMO = base.ROOT / "configs" / "demo.toml"
TOTAL_BATCH = 16  # sequences per inner step, all ranks or islands together
TOKENS_PER_PROBLEM = 78  # the demo corpus's train split: 1.56M tokens for 20,000 problems
QUALITY_MODEL = [
    "train.threads=1",
    "train.eval_every=0",
    "train.samples=0",
    "train.eval_problems=0",
    "checkpoint.every=0",
]


def parameters() -> int:
    return sum(p.numel() for p in Llama(load_config(DEMO).model).parameters())


def plan_steps(tokens_per_param: float, seq_len: int = 128) -> int:
    """Inner steps for the token budget, rounded up to a multiple of 1,500, so that every arm
    trains them all: H = 30 divides it, and H = 100 and 500 divide what follows a warm start of
    500 steps."""
    steps = tokens_per_param * parameters() / (TOTAL_BATCH * seq_len)
    return 1500 * max(1, math.ceil(steps / 1500))


def eval_on_a(problems: int) -> list[str]:
    return [f"a:train.eval_problems={problems}"]


def accuracy(run_dir: Path) -> float | None:
    return json.loads((run_dir / "summary.json").read_text()).get("accuracy")


def run_arms(out: Path, args: argparse.Namespace) -> list[tuple[base.Run, float | None]]:
    steps = plan_steps(args.tokens_per_param)
    problems = int(steps * TOTAL_BATCH * 128 / TOKENS_PER_PROBLEM * 1.1)  # one epoch, no repeats
    common = [f"train.steps={steps}", f"data.problems={problems}"]
    common.append(f"data.tokenizer={base.shared_tokenizer(out, common)}")
    print(
        f"model: {parameters():,} parameters; {steps} inner steps x {TOTAL_BATCH} x 128 tokens "
        f"= {steps * TOTAL_BATCH * 128 / 1e6:.1f}M tokens "
        f"({steps * TOTAL_BATCH * 128 / parameters():.1f} per parameter); {problems:,} problems",
        flush=True,
    )
    evals = args.eval_problems
    arms: list[tuple[base.Run, Path]] = []

    def fleet(name, directory, islands, extra, per_island=()):
        batch = TOTAL_BATCH // islands
        options = [*common, f"train.batch_size={batch}", f"fleet.expect={islands}", *extra]
        per_island = [*eval_on_a(evals), *per_island]
        run = base.run_fleet(name, out / directory, islands, options, per_island)
        arms.append((run, out / directory / "a"))
        print(f"  {name}: val loss {run.val_loss:.4f}", flush=True)
        return run

    started = time.perf_counter()
    h30 = ["fleet.budget=steps:30", "fleet.compression=fp32"]
    # first, on a quiet box: the two arms whose wall-clock is compared
    fleet("fleet 2, H=30, auto", "fleet2", 2, h30)
    one = one_island_two_threads(out, common, evals)
    ddp_options = [*common, f"train.batch_size={TOTAL_BATCH // 2}", f"train.eval_problems={evals}"]
    ddp_options.append("parallel.strategy=ddp")  # not the auto default for 2 ranks (fsdp)
    ddp = base.run_ddp(out / "ddp", ddp_options)
    arms.insert(0, (ddp, out / "ddp"))
    print(f"  DDP: val loss {ddp.val_loss:.4f}", flush=True)
    # one island alone has both cores' worth of work: give it both threads
    fleet("fleet 1, H=30, auto", "fleet1", 1, [*h30, "train.threads=2"])
    fleet("fleet 4, H=30, auto", "fleet4", 4, h30)
    fleet("fleet 2, H=30, outer lr 0.7", "fleet2_07", 2, [*h30, "fleet.outer_lr=0.7"])
    fleet("fleet 2, H=30, int4", "fleet2_int4", 2, ["fleet.budget=steps:30", "fleet.compression=int4"])  # fmt: skip
    warm = [f"fleet.warm_start_steps={args.warm_steps}", "fleet.compression=fp32"]
    fleet(f"fleet 2, H=100, warm {args.warm_steps}", "fleet2_h100", 2, ["fleet.budget=steps:100", *warm])  # fmt: skip
    fleet(f"fleet 2, H=500, warm {args.warm_steps}", "fleet2_h500", 2, ["fleet.budget=steps:500", *warm])  # fmt: skip
    arms.append((one, out / "one_2threads"))
    print(f"arms done in {time.perf_counter() - started:.0f} s", flush=True)
    return [(run, accuracy(path)) for run, path in arms]


def one_island_two_threads(out: Path, common: list[str], evals: int) -> base.Run:
    """`ostinato train` with 2 threads and the whole batch, for as many steps as fit in the
    2-island arm's training time (training_wall) at its probed speed."""
    probe_dir = out / "probe_2threads"
    options = [*common, f"train.batch_size={TOTAL_BATCH}", "train.threads=2"]
    if not base.finished(probe_dir):
        probe = [*options, "train.steps=40"]
        base.run_logged(train_command(probe_dir, probe), base.fresh(probe_dir).with_suffix(".log"))
    rows = base.read_jsonl(probe_dir / "metrics.jsonl")[5:]  # past allocator warm-up
    speed = sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows)
    wall = training_wall([out / "fleet2" / name for name in "ab"])
    steps = int(wall * speed / (TOTAL_BATCH * 128))
    print(f"  1 island x 2 threads: {speed:,.0f} tokens/s probed, {steps} steps in {wall:.0f} s")
    run_dir = out / "one_2threads"
    options = [*options, f"train.steps={steps}", f"train.eval_problems={evals}"]
    if not base.finished(run_dir):
        base.run_logged(train_command(run_dir, options), base.fresh(run_dir).with_suffix(".log"))
    tokens, done = base.trained_tokens(run_dir)
    run = base.Run("1 island x 2 threads, same wall", tokens, base.span_wall([run_dir]),
                   base.val_loss(run_dir), steps=done)  # fmt: skip
    print(f"  {run.name}: val loss {run.val_loss:.4f}", flush=True)
    return run


def training_wall(run_dirs: list[Path]) -> float:
    """Seconds from the first inner step's start to the last one's end, any island: the
    exchanges in between count, the start-up and the final evaluation do not."""
    spans = [e for d in run_dirs for e in base.read_jsonl(d / "events.jsonl")]
    compute = [e for e in spans if e.get("type") == "span" and e["kind"] == "compute"]
    return max(e["end"] for e in compute) - min(e["start"] for e in compute)


def train_command(run_dir: Path, options: list[str]) -> list[str]:
    command = [base.PYTHON, "-m", "ostinato", "train", "--config", str(DEMO)]
    return [*command, "--out", str(run_dir), "--resume", "none", *base.overrides(options)]


def report(results: list[tuple[base.Run, float | None]]) -> None:
    ddp = results[0][0]
    grad_bytes = 4 * parameters()
    print()
    print("| arm | inner steps | tokens | MB across islands | bytes, DDP / arm | val loss | vs DDP | held-out accuracy |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run, acc in results:
        n = max(run.islands, 2)
        ddp_bytes = ddp.steps * 2 * (n - 1) * grad_bytes  # a ring all-reduce over n ranks
        ratio = f"{ddp_bytes / run.bytes_sent:,.0f}x" if run.bytes_sent else "-"
        diff = (run.val_loss - ddp.val_loss) / ddp.val_loss
        acc_text = "-" if acc is None else f"{acc:.1%}"
        print(
            f"| {run.name} | {run.steps:,} | {run.tokens:,} | {run.bytes_sent / 1e6:,.1f} | "
            f"{ratio} | {run.val_loss:.4f} | {diff:+.2%} | {acc_text} |"
        )
    by_name = {run.name: run for run, _ in results}
    rows = []
    for name, target in (("fleet 2, H=30, auto", 0.01), ("fleet 4, H=30, auto", 0.02)):
        diff = (by_name[name].val_loss - ddp.val_loss) / ddp.val_loss
        rows.append((f"val loss, {name} vs DDP", f"{diff:+.2%}", f"within {target:.0%}", diff <= target))  # fmt: skip
    fp32, int4 = by_name["fleet 2, H=30, auto"], by_name["fleet 2, H=30, int4"]
    diff = (int4.val_loss - fp32.val_loss) / fp32.val_loss
    rows.append(
        ("val loss, int4 vs fp32 (2 islands)", f"{diff:+.2%}", "within 0.5%", diff <= 0.005)
    )
    for run, _ in results:  # every fleet's traffic against DDP's over as many ranks
        if run.islands >= 2:
            ratio = 2 * (run.islands - 1) * ddp.steps * grad_bytes / run.bytes_sent
            rows.append((f"bytes, DDP / {run.name}", f"{ratio:,.0f}x", ">= 500x", ratio >= 500))
    base.print_table(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quality", action="store_true", help="the quality arms (this module)")
    parser.add_argument("--tokens-per-param", type=float, default=20.0, help="--quality's budget")
    parser.add_argument("--warm-steps", type=int, default=500, help="--quality's warm start")
    parser.add_argument("--eval-problems", type=int, default=100, help="held-out problems")


def main(args: argparse.Namespace, out: Path) -> None:
    base.RECIPE, base.MODEL = DEMO, QUALITY_MODEL
    started = time.perf_counter()
    print(f"runs in {out}", flush=True)
    report(run_arms(out, args))
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")
