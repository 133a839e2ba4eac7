"""Tokens/s of `ostinato train` against a plain PyTorch loop, side by side in one process.

Both train the same model (same init, batch, threads) with AdamW and gradient clipping; the
plain loop has its data in memory and does nothing else. ostinato runs its full island trainer,
with checkpoints every 50 steps (asynchronous), metrics and the resumable data stream. Runs
alternate (plain, ostinato, plain, ostinato, ...) so drift on a shared machine hits both.

    .venv/bin/python bench/trainer_overhead.py [--steps 150] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ostinato.config import load_config
from ostinato.model.llama import Llama
from ostinato.train.metrics import read_metrics
from ostinato.train.state import make_optimizer
from ostinato.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 10  # first steps of each run are not timed (allocator, caches)


def config(steps: int, threads: int):
    return load_config(
        ROOT / "configs" / "demo.toml",
        [
            f"train.steps={steps}",
            f"train.threads={threads}",
            "checkpoint.every=50",
            "train.eval_problems=0",
            "train.samples=0",
            "data.problems=4000",
        ],
    )


def plain_loop(cfg) -> float:
    """Tokens/s of the simplest correct loop: the baseline."""
    torch.set_num_threads(cfg.train.threads)
    model = Llama(cfg.model)
    model.init_weights(cfg.train.seed)
    optimizer = make_optimizer(model, cfg.train)
    shape = (cfg.train.steps, cfg.train.batch_size, cfg.data.seq_len + 1)
    data = torch.randint(0, cfg.model.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(cfg.train.steps):
        started = time.perf_counter()
        loss = model(data[step, :, :-1], data[step, :, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        times.append(time.perf_counter() - started)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return tokens * (len(times) - WARMUP) / sum(times[WARMUP:])


def ostinato_run(cfg) -> tuple[float, float, float]:
    """Tokens/s of `ostinato train`, its longest checkpoint stall, and its mean step time."""
    with tempfile.TemporaryDirectory() as out:
        train(cfg, Path(out), "none", show_progress=False)
        records = read_metrics(Path(out) / "metrics.jsonl")[WARMUP:]
    total_s = sum(r["step_s"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    plain_steps = [r["step_s"] for r in records if r["checkpoint_stall_s"] == 0]
    stall = max(r["checkpoint_stall_s"] for r in records)
    return tokens / total_s, stall, statistics.mean(plain_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cfg = config(args.steps, args.threads)
    plain, ours, stalls = [], [], []
    for repeat in range(args.repeats):
        plain.append(plain_loop(cfg))
        tokens_per_s, stall, step_s = ostinato_run(cfg)
        ours.append(tokens_per_s)
        stalls.append(stall / step_s)
        print(
            f"repeat {repeat}: plain {plain[-1]:,.0f} tok/s  ostinato {ours[-1]:,.0f} tok/s  "
            f"longest checkpoint stall {stall * 1000:.1f} ms = {stalls[-1]:.2f} x mean step"
        )
    ratio = statistics.mean(ours) / statistics.mean(plain)
    print(
        f"\nmodel {cfg.model.size}, batch {cfg.train.batch_size}x{cfg.data.seq_len}, "
        f"{args.threads} threads, {args.steps} steps, checkpoint every 50 (async)"
    )
    print(f"tokens/s ratio ostinato / plain loop: {ratio:.3f}  (target >= 0.95)")
    print(f"longest checkpoint stall / mean step time: {max(stalls):.2f}  (target <= 1)")


if __name__ == "__main__":
    main()
