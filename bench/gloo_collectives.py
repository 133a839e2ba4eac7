"""Milliseconds of the collectives FSDP and DDP run per decoder layer, on gloo: all-reduce of a
layer's gradients (DDP), reduce-scatter of them and all-gather of the shards (FSDP), each
timed over 5 repeats after a warm-up. Launch it under torchrun:

    .venv/bin/torchrun --standalone --nproc_per_node 2 bench/gloo_collectives.py [VALUES]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist


def timed(collective, repeats: int = 5) -> float:
    collective()  # warm-up: connections, buffers
    dist.barrier()
    started = time.perf_counter()
    for _ in range(repeats):
        collective()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    values = int(sys.argv[1]) if len(sys.argv) > 1 else 6_300_000  # a 768-wide layer's
    values -= values % world
    grads, shard, whole = torch.randn(values), torch.empty(values // world), torch.empty(values)
    reduce = timed(lambda: dist.all_reduce(grads))
    scatter = timed(lambda: dist.reduce_scatter_tensor(shard, grads))
    gather = timed(lambda: dist.all_gather_into_tensor(whole, grads[: values // world]))
    if dist.get_rank() == 0:
        print(
            f"{world} ranks, {values:,} fp32 values: all-reduce {reduce * 1e3:.1f} ms, "
            f"reduce-scatter {scatter * 1e3:.1f} ms, all-gather {gather * 1e3:.1f} ms; per layer "
            f"FSDP (2 all-gathers + reduce-scatter) / DDP (all-reduce) = "
            f"{(2 * gather + scatter) / reduce:.2f}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
