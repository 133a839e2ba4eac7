"""One rank of a 2-rank FSDP island holding fleet shards, launched by torchrun from
test_fleet_shards.py (argv: OUT, a 1-rank run to warm-start from). It checks its shards against a whole, unsharded copy of the same model
and writes what it found to OUT/rankR.json; rank 0 then reads the island's sharded save alone,
as a 1-rank island would resume it."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ostinato.checkpoint.reader import load_trained
from ostinato.checkpoint.store import CheckpointWriter, committed_checkpoints, load_tensors
from ostinato.config import CheckpointConfig, FleetConfig, ParallelConfig, load_config
from ostinato.fleet.crew import Crew
from ostinato.fleet.outer import flatten
from ostinato.fleet.shards import ShardSet
from ostinato.hardware import Placement
from ostinato.train.parallel import build_model
from ostinato.train.state import start_from

SHARDS = 3
out = Path(sys.argv[1])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo")
place = Placement(torch.device("cpu"), "gloo", rank, world)
model_cfg = load_config(None, ["model.size=tiny"]).model
sharded = build_model(ParallelConfig(strategy="fsdp"), model_cfg, 0, place, "fsdp")
whole = build_model(ParallelConfig(), model_cfg, 0, Placement(torch.device("cpu"), "gloo"), "single")
reference = flatten(whole)
cfg = FleetConfig(shards=SHARDS, compression="fp32")
ops: list[str] = []
crew = Crew(rank, world, lambda op, args: ops.append(op) or {"rank": rank})
shards = ShardSet(sharded, cfg, rank, world, crew.group)  # a collective: full_tensor per param
report: dict = {"mine": shards.mine, "held_bytes": shards.held_bytes()}
report["sizes"] = [hi - lo for lo, hi in shards.bounds]
# 1. each owned shard holds exactly the model's values of its range
report["read_equal"] = all(
    torch.equal(shards.outer[k].global_params, reference[lo:hi])
    for k, (lo, hi) in enumerate(shards.bounds)
    if k in shards.mine
)
# 2. new global values go back into every rank's FSDP rows, each slice from its owner
for k in shards.mine:
    shards.outer[k].global_params.mul_(0.5).add_(k)
expected = torch.cat([reference[lo:hi] * 0.5 + k for k, (lo, hi) in enumerate(shards.bounds)])
shards.write(sharded, None)
written = torch.cat([p.full_tensor().detach().reshape(-1) for p in sharded.parameters()])
report["write_equal"] = torch.equal(written, expected)
# 3. the crew: the leader's operation runs on every rank, each rank's result comes back
if rank == 0:
    report["crew"] = crew.run("probe", value=1)
    crew.end({"done": True})
else:
    report["crew_end"] = crew.follow()
report["ops"] = ops
# 4. a sharded save: each rank writes only its shards' keys
writer = CheckpointWriter(out / "island", CheckpointConfig(), rank, process_group=crew.group)
writer.save(1, {"outer_optimizer": shards.tensor_state()}, {"parts": ["outer_optimizer"]})
writer.wait()
dist.barrier()
if rank == 0:  # resumed on one rank: it owns every shard and finds each by name
    alone = ShardSet(whole, cfg)
    [path] = committed_checkpoints(out / "island")
    state = {"outer_optimizer": {f"shard{k}": alone.empty_state(k) for k in range(SHARDS)}}
    load_tensors(path, state, no_dist=True)
    alone.load_tensor_state(state["outer_optimizer"])
    loaded = torch.cat([alone.outer[k].global_params for k in range(SHARDS)])
    report["resumed_on_one_equal"] = torch.equal(loaded, expected)
# 5. a warm start into the sharded model: DCP reads each rank's own rows of a 1-rank run
trained = load_trained(sys.argv[2])  # the whole model, to compare against
start_from(sharded, trained.config, trained.path)
started = torch.cat([p.full_tensor().detach().reshape(-1) for p in sharded.parameters()])
report["warm_start_equal"] = torch.equal(started, flatten(trained.model))
(out / f"rank{rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()
