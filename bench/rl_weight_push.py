"""Weights to rollout islands: bytes per update, whole fp32 against quantized deltas, on the
versions a real GRPO run makes, side by side in one process.

The policy (an `ostinato train` run) takes `--updates` GRPO updates; every version goes through
a Publisher of each kind and a Receiver over a real TCPStore on loopback (the path the trainer
and its islands use). Printed per kind: median bytes per update (the whole copies every 20
versions included), their ratio to fp32, the seconds one update's push would take on a
100 Mbit/s link (bytes x 8 / 1e8: computed, not measured through a shaped link), the loopback
seconds of publish + refresh, and how far the islands' copy is from the trainer's weights
(max |R - W|, relative to max |W|).

    .venv/bin/python bench/rl_weight_push.py --init runs/demo-sft [--updates 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ostinato.config import load_config
from ostinato.fleet import wire
from ostinato.rl.policy import load_policy, prompts_of
from ostinato.rl.rollout import rollouts
from ostinato.rl.trainer import update
from ostinato.rl.weights import Publisher, Receiver, flat_parameters, rl_prefix

LINK_BITS_PER_S = 100e6


def versions(init: str, updates: int) -> list[torch.Tensor]:
    cfg = load_config(None, [f"rl.init={init}", "rl.threads=2"])
    policy, _ = load_policy(cfg, set())
    rl, out = cfg.rl, [flat_parameters(policy.model)]
    for step in range(1, updates + 1):
        tasks = prompts_of(policy.tasks.train, rl, step)
        generated = rollouts(
            policy.model, policy.tokenizer, tasks, policy.tasks.reward, rl.group_size,
            rl.max_new_tokens, rl.temperature, rl.seed, step, rl.format_reward,
        )  # fmt: skip
        update(policy, generated, rl)
        out.append(flat_parameters(policy.model))
        print(
            f"update {step}/{updates}: reward {sum(r.reward for r in generated.rollouts) / 64:.3f}"
        )
    return out


def push(kind: str, weights: list[torch.Tensor]) -> dict[str, float]:
    store = wire.serve_store("127.0.0.1:0")
    view = torch.distributed.PrefixStore(rl_prefix(kind), store)
    publisher = Publisher(view, "token", kind)
    receiver = Receiver(view, "token", kind, weights[0].numel())
    sizes, seconds, drift = [], [], []
    for version, w in enumerate(weights):
        started = time.perf_counter()
        sizes.append(publisher.publish(w, version))
        assert receiver.refresh()
        seconds.append(time.perf_counter() - started)
        drift.append(float((receiver.held - w).abs().max() / w.abs().max()))
    return {
        "bytes": statistics.median(sizes[1:]),
        "mean_bytes": statistics.fmean(sizes[1:]),
        "seconds": statistics.median(seconds[1:]),
        "drift": max(drift),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True)
    parser.add_argument("--updates", type=int, default=20)
    args = parser.parse_args()
    weights = versions(args.init, args.updates)
    print(f"\n{weights[0].numel():,} parameters, {len(weights) - 1} updates")
    results = {kind: push(kind, weights) for kind in ("full", "int8", "int4")}
    full = results["full"]["mean_bytes"]
    print(
        "kind   median B/update   mean B/update   x fewer   s @100Mbit/s   loopback s   max|R-W|/max|W|"
    )
    for kind, r in results.items():
        print(
            f"{kind:5}  {r['bytes']:15,.0f}  {r['mean_bytes']:14,.0f}  {full / r['mean_bytes']:8.2f}"
            f"  {r['mean_bytes'] * 8 / LINK_BITS_PER_S:13.4f}  {r['seconds']:11.4f}  {r['drift']:.2e}"
        )


if __name__ == "__main__":
    main()
