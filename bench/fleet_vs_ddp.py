"""A DiLoCo fleet against synchronous DDP on the same model and data, side by side in one script.

At equal total tokens (every run trains on the standard library's source with one shared
tokenizer, the same init and the same inner schedule):

1. DDP: 2 gloo ranks under torchrun, one thread each; the baseline for bytes and validation loss.
2. fleets of 2 and 4 islands (one rank each), H inner steps per round, int4 pseudo-gradients:
   bytes sent across islands (from rounds.jsonl) and final validation loss.
3. the 2-island fleet with a `link@island=X,latency=50ms,bandwidth=100mbit` fault on every island against
   the same fleet unshaped, and against an *estimate* of DDP on that link.
4. heterogeneous: 2 islands on a time budget, island b 2x slower, against the sum of the islands'
   solo speeds.

    .venv/bin/python bench/fleet_vs_ddp.py [--steps 400] [--h 50] [--out DIR]

Byte counting. Fleet: each member's `bytes_sent` in rounds.jsonl (its packed payload, 8 bytes of
token count included, times the number of peers: the exchange is an all-gather), summed over
members and rounds. DDP: a ring all-reduce over N ranks sends 2(N-1)/N x the fp32 gradient per
rank per step, so N ranks send 2(N-1) x gradient bytes per step in all; if each rank were its own
island, all of it would cross islands. An N-island fleet is compared with N-rank DDP at the same
steps (2 ranks: 2 gradients per step; 4 ranks: 6). Only the 2-rank DDP is run (for its loss and
speed): the bytes of a ring all-reduce are fixed by N and the gradient size.

    --report-only: rebuild the tables from the runs already in --out, training nothing.
    --loss-only: DDP and the 2-island fleet only (bytes and validation loss), for long runs.
    --reuse: keep the runs in --out that finished (a summary.json per island), run the rest.
    --quality: the demo model on the reasoning corpus, DDP against fleets of 1, 2 and 4
      islands and their variants at equal tokens (bench/fleet_quality.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import fleet_quality
from fleet_common import MODEL as FLEET_MODEL

from ostinato.config import load_config
from ostinato.data.sources import load_documents
from ostinato.data.tokenizer import train_tokenizer
from ostinato.fleet.link import Link
from ostinato.model.llama import Llama

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny.toml"
PYTHON = sys.executable
REPORT_ONLY = False  # --report-only: read the runs already in --out instead of running them
REUSE = False  # --reuse: read the runs in --out that finished, run the others


def finished(run_dir: Path, islands: int = 0) -> bool:
    dirs = [run_dir / chr(ord("a") + i) for i in range(islands)] if islands else [run_dir]
    return REPORT_ONLY or (REUSE and all((d / "summary.json").exists() for d in dirs))


SHAPED = "latency=50ms,bandwidth=100mbit"  # the emulated link: a `link` fault on every island
SHAPED_LINK = Link(latency_s=0.050, bits_per_s=100e6)  # the same, for the DDP estimate


def shaped_links(islands: int) -> list[str]:
    """`fleet local --for` items that put every island on the SHAPED link from the start."""
    names = [chr(ord("a") + i) for i in range(islands)]
    return [f"{n}:faults.schedule=link@island={n},{SHAPED}" for n in names]


# only at the end: checkpoint stalls would blur the speeds
MODEL = [*FLEET_MODEL, "checkpoint.every=0"]


@dataclass
class Run:
    name: str
    tokens: int  # trained tokens, all ranks/islands
    wall_s: float  # first compute span to last span, all islands
    val_loss: float | None
    bytes_sent: float = 0.0  # across islands
    rounds: int = 0
    steps: int = 0  # inner steps of the first island (or of DDP)
    steady_tokens_per_s: float = 0.0  # fleets: rounds 2..R only (see steady_speed)
    islands: int = 0  # 0: DDP

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def speed(self) -> float:
        """The speed the targets use: steady state for fleets, first-to-last span for DDP."""
        return self.steady_tokens_per_s or self.tokens_per_s


# --- running things -------------------------------------------------------------------------


def overrides(extra: list[str]) -> list[str]:
    return [f"--{o}" for o in [*MODEL, *extra]]


def fresh(run_dir: Path) -> Path:
    """An empty run directory: events.jsonl is appended to, so a leftover one would skew times."""
    if not REPORT_ONLY:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def run_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run a command with its (chatty) output in a log file; show the log's tail if it fails."""
    if REPORT_ONLY:
        return
    with log.open("w") as f:
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if code != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"{' '.join(command)} failed ({code}):\n" + "\n".join(tail))


def shared_tokenizer(out: Path, extra: list[str]) -> Path:
    """Train the BPE once, so every run (and every island) sees identical token ids and no run
    spends its start-up training one."""
    cfg = load_config(RECIPE, [*MODEL, *extra])
    path = out / "tokenizer.json"
    if REPORT_ONLY or (REUSE and path.exists()):
        return path
    train_tokenizer(load_documents(cfg.data).train, cfg.model.vocab_size).save(str(path))
    return path


def gradient_numel(extra: list[str]) -> int:
    model = Llama(load_config(RECIPE, [*MODEL, *extra]).model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def single_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}


# --- reading results ------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def span_wall(run_dirs: list[Path]) -> float:
    """Seconds from the first compute span to the last span of any island.

    Start-up (imports, tokenizing the corpus, joining the coordinator) is left out: it is the
    same for every run and says nothing about training speed."""
    spans = [e for d in run_dirs for e in read_jsonl(d / "events.jsonl") if e["type"] == "span"]
    start = min(e["start"] for e in spans if e["kind"] == "compute")
    return max(e["end"] for e in spans) - start


def trained_tokens(run_dir: Path) -> tuple[int, int]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return sum(r["tokens"] for r in rows), len(rows)


def steady_speed(rounds: list[dict]) -> float:
    """Fleet tokens/s from the commit of round 1 to the commit of the last round.

    Islands start training as soon as their own process is up, so the first round absorbs the
    difference in start-up times (seconds on a loaded 2-core box): the first island waits for the
    last. That is a property of launching processes, not of the fleet's steady speed."""
    tokens = sum(sum(r["tokens"].values()) for r in rounds[1:])
    return tokens / (rounds[-1]["time"] - rounds[0]["time"])


def val_loss(run_dir: Path) -> float | None:
    return json.loads((run_dir / "summary.json").read_text())["val_loss"]


# --- the runs -------------------------------------------------------------------------------


def run_ddp(out: Path, extra: list[str], ranks: int = 2) -> Run:
    command = [str(Path(PYTHON).parent / "torchrun"), "--standalone", f"--nproc_per_node={ranks}"]
    command += ["-m", "ostinato", "train", "--config", str(RECIPE), "--out", str(out)]
    command += ["--resume", "none", *overrides(extra)]
    if not finished(out):
        run_logged(command, fresh(out).with_suffix(".log"), single_thread_env())
    tokens, steps = trained_tokens(out)
    return Run("ddp", tokens, span_wall([out]), val_loss(out), steps=steps)


def run_fleet(
    name: str, out: Path, islands: int, extra: list[str], per_island: list[str] = ()
) -> Run:
    command = [PYTHON, "-m", "ostinato", "fleet", "local", "--islands", str(islands)]
    command += ["--config", str(RECIPE), "--out", str(out), *overrides(extra)]
    for item in per_island:
        command += ["--for", item]
    if not finished(out, islands):
        run_logged(command, fresh(out).with_suffix(".log"), single_thread_env())
    dirs = [out / chr(ord("a") + i) for i in range(islands)]
    counts = [trained_tokens(d) for d in dirs]
    rounds = read_jsonl(out / "rounds.jsonl")
    sent = sum(sum(r["bytes_sent"].values()) for r in rounds)
    tokens = sum(t for t, _ in counts)
    # every island ends holding the same global parameters, so island a's loss is the fleet's
    run = Run(name, tokens, span_wall(dirs), val_loss(dirs[0]), sent, len(rounds), counts[0][1])
    run.steady_tokens_per_s = steady_speed(rounds)
    run.islands = islands
    return run


def run_solos(out: Path, extra: list[str], slowdowns: list[float]) -> list[float]:
    """Tokens/s of each island training alone (no fleet), all at once.

    They run concurrently because the fleet runs its islands concurrently on the same 2 cores:
    timing each alone would hand it the other core and overstate the sum of solo speeds."""
    procs = []
    for i, slowdown in enumerate(slowdowns):
        run_dir = fresh(out / f"solo{i}")
        if REPORT_ONLY:
            procs.append((None, run_dir))
            continue
        command = [PYTHON, "-m", "ostinato", "train", "--config", str(RECIPE)]
        command += ["--out", str(run_dir), "--resume", "none"]
        slow = [f"faults.schedule=slow@island=a,factor={slowdown}"] if slowdown > 1 else []
        command += overrides([*extra, *slow])
        log = run_dir.with_suffix(".log").open("w")
        procs.append((subprocess.Popen(command, stdout=log, stderr=log, cwd=ROOT), run_dir))
    speeds = []
    for proc, run_dir in procs:
        if proc is not None and proc.wait() != 0:
            raise SystemExit(f"solo run {run_dir} failed; see {run_dir.with_suffix('.log')}")
        rows = read_jsonl(run_dir / "metrics.jsonl")[5:]  # skip allocator/cache warm-up
        speeds.append(sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows))
    return speeds


# --- estimates and the report ---------------------------------------------------------------


def ddp_shaped_estimate(ddp: Run, grad_bytes: int, ranks: int = 2) -> float:
    """DDP's tokens/s if every step's all-reduce crossed the emulated link.

    Same cost model as the fleet's link emulation (ostinato.fleet.link): 2 x latency per exchange
    plus (bytes out + bytes in) / bandwidth; a ring all-reduce moves 2(N-1)/N x gradient bytes each
    way per rank. The real all-reduce time on loopback is already in the measured wall time, so this
    slightly overstates DDP's cost (by the loopback time, a few ms per step)."""
    per_rank = 2 * (ranks - 1) / ranks * grad_bytes
    per_step = SHAPED_LINK.seconds_for(int(per_rank), int(per_rank))
    return ddp.tokens / (ddp.wall_s + ddp.steps * per_step)  # wall_s: compute spans, no start-up


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else "met" if ok else "MISSED"


def print_table(rows: list[tuple[str, str, str, bool | None]]) -> None:
    print()
    print("| comparison | result | target | |")
    print("| --- | ---: | ---: | --- |")
    for name, value, target, ok in rows:
        print(f"| {name} | {value} | {target} | {verdict(ok)} |")


def print_runs(runs: list[Run]) -> None:
    print()
    print(
        "| run | inner steps/island | rounds | tokens | tokens/s first-last span "
        "| tokens/s rounds 2..R | MB across islands | val loss |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        loss = f"{r.val_loss:.4f}" if r.val_loss is not None else "-"
        steady = f"{r.steady_tokens_per_s:,.0f}" if r.steady_tokens_per_s else "-"
        print(
            f"| {r.name} | {r.steps} | {r.rounds or '-'} | {r.tokens:,} | "
            f"{r.tokens_per_s:,.0f} | {steady} | {r.bytes_sent / 1e6:.2f} | {loss} |"
        )


# --- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="inner steps per rank/island")
    parser.add_argument("--h", type=int, default=50, help="inner steps per round")
    parser.add_argument("--long-h", type=int, default=100, help="extra 2-island run (0: skip)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--hetero-seconds", type=float, default=4.0, help="round budget T")
    parser.add_argument("--hetero-rounds", type=int, default=6, help="rounds R of the hetero run")
    parser.add_argument("--solo-steps", type=int, default=60, help="steps of each solo run")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the tables from the runs in --out"
    )
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out")
    parser.add_argument(
        "--loss-only",
        action="store_true",
        help="only DDP and the 2-island fleet at H: bytes and validation loss (long runs)",
    )
    fleet_quality.add_arguments(parser)
    return parser.parse_args()


def main() -> None:
    global REPORT_ONLY, REUSE
    args = parse_args()
    if args.report_only and args.out is None:
        raise SystemExit("--report-only needs --out DIR with the runs")
    REPORT_ONLY, REUSE = args.report_only, args.reuse
    out = args.out or Path(tempfile.mkdtemp(prefix="fleet_vs_ddp_"))
    out.mkdir(parents=True, exist_ok=True)
    if args.quality:
        fleet_quality.main(args, out)
        return
    started = time.perf_counter()
    common = [f"train.steps={args.steps}", f"train.batch_size={args.batch}"]
    common.append(f"data.tokenizer={shared_tokenizer(out, common)}")
    grad_bytes = 4 * gradient_numel(common)
    print(f"model: {grad_bytes // 4:,} parameters, fp32 gradient {grad_bytes / 1e6:.2f} MB")
    print(f"runs in {out}", flush=True)

    ddp = run_ddp(out / "ddp", common)
    if args.loss_only:
        options = [*common, *fleet_options(args.h)]
        fleet = run_fleet(f"fleet 2, H={args.h}", out / "fleet2", 2, options)
        print_runs([ddp, fleet])
        print_table(byte_and_loss_rows(ddp, [fleet], grad_bytes))
        print(f"\ntotal time {time.perf_counter() - started:.0f} s")
        return
    fleets = run_equal_token_fleets(out, common, args)
    shaped = run_fleet(
        f"fleet 2, H={args.h}, shaped link",
        out / "shaped",
        2,
        [*common, *fleet_options(args.h)],
        shaped_links(2),
    )
    hetero, solos = run_hetero(out, common, args)
    print_runs([ddp, *fleets, shaped, hetero])
    print(f"\nsolo tokens/s (run together): a {solos[0]:,.0f}, b (slowdown 2) {solos[1]:,.0f}")
    rows = byte_and_loss_rows(ddp, fleets, grad_bytes)
    rows += speed_rows(ddp, fleets[0], shaped, hetero, solos, grad_bytes)
    print_table(rows)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


def fleet_options(h: int) -> list[str]:
    return [f"fleet.budget=steps:{h}", "fleet.compression=int4"]


def run_equal_token_fleets(out: Path, common: list[str], args: argparse.Namespace) -> list[Run]:
    """2 islands at DDP's per-rank batch, 4 islands at half of it: every run trains the same
    tokens per inner step (2 x batch sequences) for the same steps, on the same schedule."""
    fleets = [
        run_fleet(f"fleet 2, H={args.h}", out / "fleet2", 2, [*common, *fleet_options(args.h)])
    ]
    half = [*common, f"train.batch_size={args.batch // 2}", *fleet_options(args.h)]
    fleets.append(run_fleet(f"fleet 4, H={args.h}", out / "fleet4", 4, half))
    if args.long_h:
        long_h = [*common, *fleet_options(args.long_h)]
        fleets.append(run_fleet(f"fleet 2, H={args.long_h}", out / "fleet2_long", 2, long_h))
    return fleets


def run_hetero(out: Path, common: list[str], args: argparse.Namespace) -> tuple[Run, list[float]]:
    hetero_cfg = [
        *common,
        f"fleet.budget=seconds:{args.hetero_seconds}",
        f"fleet.rounds={args.hetero_rounds}",
        "fleet.compression=int4",
    ]
    hetero = run_fleet(
        f"hetero, T={args.hetero_seconds:g}s, b 2x slower",
        out / "hetero",
        2,
        hetero_cfg,
        ["b:faults.schedule=slow@island=b,factor=2"],
    )
    solo_cfg = [*common, f"train.steps={args.solo_steps}"]
    return hetero, run_solos(out, solo_cfg, [1.0, 2.0])


def byte_and_loss_rows(ddp: Run, fleets: list[Run], grad_bytes: int) -> list[tuple]:
    rows = []
    print()
    for fleet in fleets:
        n = fleet.islands  # N ranks x 2(N-1)/N gradients each, per step
        ddp_bytes = ddp.steps * 2 * (n - 1) * grad_bytes
        print(
            f"DDP bytes across {n} islands: {ddp.steps} steps x {2 * (n - 1)} x {grad_bytes:,} B"
            f" = {ddp_bytes:,} B; {fleet.name}: {fleet.bytes_sent:,.0f} B"
        )
        ratio = ddp_bytes / fleet.bytes_sent
        label = f"bytes, DDP ({n} ranks) / {fleet.name}"
        rows.append((label, f"{ratio:,.0f}x", ">= 500x", ratio >= 500))
    for fleet in fleets:
        diff = (fleet.val_loss - ddp.val_loss) / ddp.val_loss
        ok = abs(diff) <= 0.02
        rows.append((f"val loss, {fleet.name} vs DDP", f"{diff:+.2%}", "within 2%", ok))
    return rows


def speed_rows(ddp, fleet2, shaped, hetero, solos, grad_bytes) -> list[tuple]:
    link = shaped.speed / fleet2.speed
    rows = [("tokens/s, shaped / unshaped fleet", f"{link:.3f}", ">= 0.9", link >= 0.9)]
    ddp_est = ddp_shaped_estimate(ddp, grad_bytes)
    print(f"DDP tokens/s: measured (unshaped) {ddp.speed:,.0f}; on the shaped link, ESTIMATED:")
    print(f"  {ddp_est:,.0f} (measured compute + per-step all-reduce over 100 Mbit/s, 2 x 50 ms)")
    vs_ddp = shaped.speed / ddp_est
    rows.append(("tokens/s, shaped fleet / DDP shaped (estimate)", f"{vs_ddp:.2f}x", "-", None))
    share = hetero.speed / sum(solos)
    rows.append(("tokens/s, hetero fleet / sum of solos", f"{share:.3f}", ">= 0.9", share >= 0.9))
    return rows


if __name__ == "__main__":
    main()
