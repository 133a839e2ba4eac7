"""One round's exchange with the fleet state cut into shards, against the same payload funnelled
through rank 0 (issue 13: target >= 3x faster with 4 ranks). As root, on one machine.

Two islands of 4 ranks each; every rank is a process in its own network namespace, joined to the
host by a veth pair whose two ends are capped with `tc ... tbf rate RATE` (its upload and its
download, as a full-duplex NIC of that rate; the host routes between them, as bench/netns_link.sh
does for whole islands). The coordinator's store listens on the host. Each rank builds the
island's real FleetMember (rank r of 4, its crew over the island's own gloo group), takes a
pseudo-gradient of the same model, and the leader runs the round's `open` step on its crew, as a
round does (fleet/shard_ops.py: each rank compresses, seals and all-gathers its own shards with
the same shard's owners on the other island, over a gloo group per shard):

  sharded    fleet.shards = 4: each rank exchanges a quarter of the payload on its own link
  funnelled  fleet.shards = 1: rank 0 owns the whole fleet state and exchanges it on its link

The timed part is the leader's `open` from the first byte to every rank's report: compress, the
groups' rendezvous, the transfer, unsealing and unpacking. The step, commit and the write-back
into the model are left out (they cross no island link). Arms alternate, REPEATS times each,
medians reported.

    .venv/bin/python bench/sharded_exchange.py [--params 16000000] [--rate 200mbit]
        [--compression int8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

ISLANDS, RANKS = ("a", "b"), 4
HOST = "10.78.1.1"  # the host's end of the first rank's veth: the stores listen here


def namespace(island: str, rank: int) -> str:
    return f"oste_{island}{rank}"


def index(island: str, rank: int) -> int:
    return 1 + ISLANDS.index(island) * RANKS + rank


def sh(*command: str) -> None:
    subprocess.run(command, check=True)


def setup(rate: str) -> None:
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    for island in ISLANDS:
        for rank in range(RANKS):
            ns, i = namespace(island, rank), index(island, rank)
            host, inner = f"osth_{island}{rank}", f"ostn_{island}{rank}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "addr", "add", f"10.78.{i}.1/24", "dev", host)
            sh("ip", "link", "set", host, "up")
            run_in = ["ip", "netns", "exec", ns]
            sh(*run_in, "ip", "addr", "add", f"10.78.{i}.2/24", "dev", inner)
            sh(*run_in, "ip", "link", "set", inner, "up")
            sh(*run_in, "ip", "link", "set", "lo", "up")
            sh(*run_in, "ip", "route", "add", "default", "via", f"10.78.{i}.1")
            # burst 64kb: ~2.6 ms at 200 Mbit/s (tbf needs >= rate/HZ); latency bounds the queue
            shape = ["root", "tbf", "rate", rate, "burst", "64kb", "latency", "100ms"]
            sh("tc", "qdisc", "replace", "dev", host, *shape)
            sh(*run_in, "tc", "qdisc", "replace", "dev", inner, *shape)


def cleanup(forward: str) -> None:
    for island in ISLANDS:
        for rank in range(RANKS):
            subprocess.run(["ip", "link", "del", f"osth_{island}{rank}"], capture_output=True)
            subprocess.run(["ip", "netns", "del", namespace(island, rank)], capture_output=True)
    Path("/proc/sys/net/ipv4/ip_forward").write_text(forward)


def worker(args: argparse.Namespace) -> None:
    """One rank of one island, in its namespace: join the island's group, build the member,
    run `open` REPEATS times (the leader times it), write the times."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from ostinato.config import FleetConfig
    from ostinato.fleet import wire
    from ostinato.fleet.member import FleetMember

    island, rank = args.island, args.rank
    store = dist.TCPStore(HOST, args.island_port, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group(
        "gloo", store=dist.PrefixStore(island, store), rank=rank, world_size=RANKS
    )
    torch.manual_seed(0)
    model = nn.Linear(args.params // 1000, 1000, bias=False)  # one tensor: the cut is even
    cfg = FleetConfig(
        coordinator=f"{HOST}:{args.coordinator_port}",
        island=island,
        token=args.token,
        shards=args.shards,
        compression=args.compression,
        timeout_s=120.0,
    )
    member = FleetMember(cfg, model, {}, rank=rank, ranks=RANKS)
    member._connect()
    with torch.no_grad():  # the island trained: every value moved
        model.weight.add_(torch.randn(model.weight.shape) * 1e-3)
    member.prepare(model)
    times = []
    for attempt in range(args.repeats):
        if rank == 0:
            member.keys.put(f"bench/{args.shards}/{attempt}/{island}", 1)
            member.keys.bump(wire.ORDERS)  # the other leader's wait looks at once
            other = [i for i in ISLANDS if i != island][0]
            peer_key = f"bench/{args.shards}/{attempt}/{other}"
            member._wait_for(lambda key=peer_key: member.keys.get(key), "peer", 120)
            started = time.perf_counter()
            reports = member.crew.run(
                "open", number=args.round, attempt=attempt, members=list(ISLANDS), tokens=100
            )
            times.append(time.perf_counter() - started)
            member.crew.end()
            assert not any(r["refused"] for r in reports), reports
        else:
            member.crew.follow()
    if rank == 0:
        Path(args.result).write_text(json.dumps({"seconds": times, "shards": args.shards}))
    dist.barrier()
    dist.destroy_process_group()


def run_arm(args: argparse.Namespace, shards: int, round_number: int, out: Path) -> list[float]:
    """Both islands' 8 ranks, each in its namespace; returns the two leaders' times. The
    stores live in this process until the ranks are done."""
    from ostinato.fleet import wire

    coordinator = wire.serve_store(f"{HOST}:0")
    island_stores = {i: wire.serve_store(f"{HOST}:0") for i in ISLANDS}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    processes = []
    for island in ISLANDS:
        for rank in range(RANKS):
            command = ["ip", "netns", "exec", namespace(island, rank), sys.executable, __file__]
            command += ["--worker", "--island", island, "--rank", str(rank)]
            command += ["--island-port", str(island_stores[island].port)]
            command += ["--coordinator-port", str(coordinator.port), "--shards", str(shards)]
            command += ["--params", str(args.params), "--compression", args.compression]
            command += ["--repeats", str(args.repeats), "--round", str(round_number)]
            command += ["--token", "bench-token", "--result", str(out / f"{island}-{shards}.json")]
            worker_env = {**env, "GLOO_SOCKET_IFNAME": f"ostn_{island}{rank}"}
            processes.append(subprocess.Popen(command, env=worker_env))
    failed = [p.wait(timeout=900) for p in processes]
    del coordinator, island_stores
    if any(failed):
        raise SystemExit(f"a rank failed (exit codes {failed})")
    return [
        t
        for island in ISLANDS
        for t in json.loads((out / f"{island}-{shards}.json").read_text())["seconds"]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=16_000_000)
    parser.add_argument("--rate", default="200mbit")
    parser.add_argument("--compression", default="int8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=2, help="alternations of the two arms")
    parser.add_argument("--out", default="/tmp/sharded_exchange")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--island")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--island-port", type=int)
    parser.add_argument("--coordinator-port", type=int)
    parser.add_argument("--shards", type=int)
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--token", default="")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if os.geteuid() != 0:
        raise SystemExit("sharded_exchange.py: needs root (ip netns, tc)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    cleanup(forward)
    times: dict[str, list[float]] = {"sharded": [], "funnelled": []}
    try:
        setup(args.rate)
        for turn in range(args.turns):
            for name, shards in (("funnelled", 1), ("sharded", RANKS)):
                got = run_arm(args, shards, turn + 1, out)
                times[name] += got
                print(
                    f"turn {turn + 1} {name:9s}: " + ", ".join(f"{t:.2f}" for t in got), flush=True
                )
    finally:
        cleanup(forward)
    payload = args.params * {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}[args.compression]
    median = {name: statistics.median(t) for name, t in times.items()}
    summary = {
        "params": args.params,
        "compression": args.compression,
        "payload_mb": payload / 1e6,
        "rate": args.rate,
        "ranks_per_island": RANKS,
        "median_s": median,
        "range_s": {name: [min(t), max(t)] for name, t in times.items()},
        "speedup": median["funnelled"] / median["sharded"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(
        f"sharded exchange {summary['speedup']:.2f}x faster than funnelled through rank 0 "
        f"(target >= 3x with {RANKS} ranks)"
    )


if __name__ == "__main__":
    main()
