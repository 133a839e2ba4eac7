"""How the ranks of one island share the model: FSDP2 shards (or HSDP, shards replicated over
nodes), or DDP replicas. Everything here is torch.distributed's own: `fully_shard` over a
device mesh, `torch.utils.checkpoint` through its composable `checkpoint`, DTensor for shards.

A sharded model is built on the meta device, cut into shards, and only then given memory: each
rank allocates and draws only its own rows (model/llama.py: `normal_rows`), with the values an
uncut model would have, so no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from ostinato.config import ModelConfig, ParallelConfig
from ostinato.hardware import Placement
from ostinato.model.llama import Llama


def strategy_of(cfg: ParallelConfig, world_size: int, in_fleet: bool) -> str:
    """What this island's ranks do: `single` (one rank), `fsdp` or `ddp`; a ValueError naming
    the field for what cannot run, raised before any process group starts.

    auto means fsdp, but ddp for a fleet island: each round gathers every sharded parameter
    whole, one at a time, to read and write the island's fleet shards (fleet/shards.py), so
    sharding a fleet island pays only when the model does not fit a chip."""
    if world_size == 1:
        return "single"
    strategy = "ddp" if cfg.strategy == "auto" and in_fleet else cfg.strategy
    strategy = "fsdp" if strategy == "auto" else strategy
    if strategy == "fsdp" and world_size % cfg.replicate:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"parallel.replicate = {cfg.replicate}: the island's {world_size} ranks must divide "
            f"by it (allowed: {', '.join(map(str, divisors))})"
        )
    return strategy


def build_model(
    cfg: ParallelConfig, model_cfg: ModelConfig, seed: int, place: Placement, strategy: str
) -> Llama:
    """The rank's model, initialised from `seed` the same way whatever the strategy: whole on
    every rank for single and ddp (wrap it with `replicate` once it holds its final values),
    sharded over the island for fsdp."""
    if strategy != "fsdp":
        model = Llama(model_cfg)
        model.init_weights(seed)
        recompute_activations(model, cfg)
        return model.to(place.device)
    with torch.device("meta"):
        model = Llama(model_cfg)
    mesh = island_mesh(cfg, place)
    shard(model, cfg, mesh, place)
    model.to_empty(device=place.device)
    model.init_weights(seed, local=shard_rows)
    return model


def island_mesh(cfg: ParallelConfig, place: Placement) -> DeviceMesh:
    """1-D (shard) for FSDP; 2-D (replicate, shard) for HSDP."""
    device = place.device.type
    if cfg.replicate == 1:
        return init_device_mesh(device, (place.world_size,), mesh_dim_names=("shard",))
    shape = (cfg.replicate, place.world_size // cfg.replicate)
    return init_device_mesh(device, shape, mesh_dim_names=("replicate", "shard"))


def shard(model: Llama, cfg: ParallelConfig, mesh: DeviceMesh, place: Placement) -> None:
    """FSDP2 as TorchTitan applies it: each decoder layer its own unit (gathered just before
    it runs, freed after), the root holding embeddings, final norm and head."""
    recompute_activations(model, cfg)
    layers = model.model.layers
    for index, layer in enumerate(layers):
        reshard = reshards_after_forward(cfg.reshard_after_forward, index == len(layers) - 1)
        fully_shard(layer, mesh=mesh, mp_policy=precision(place), reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=precision(place))
    if place.backend == "gloo":
        for unit in model.modules():
            if isinstance(unit, FSDPModule):
                unit.set_custom_reduce_scatter(ReduceScatterByAllReduce())


def reshards_after_forward(policy: str, last_layer: bool) -> bool:
    """TorchTitan's policy names: by default the last layer stays gathered, as its backward
    comes right after its forward."""
    return {"always": True, "never": False, "default": not last_layer}[policy]


class ReduceScatterByAllReduce(ReduceScatter):
    """FSDP2's gradient reduce-scatter as an all-reduce of which each rank keeps its own slice,
    for gloo only: gloo's all-reduce of a decoder layer's gradients is faster than its
    reduce-scatter of them (bench/gloo_collectives.py, 6.3M fp32 values: 20 against 33-36 ms
    on 2 ranks, 53 against 83 ms on 4), where NCCL and HCCL build the all-reduce from the
    reduce-scatter. FSDP hands over a flat input of equal rank slices and frees it after."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        dist.all_reduce(input_tensor, op=op, group=group)
        begin = dist.get_rank(group) * output_tensor.numel()
        output_tensor.copy_(input_tensor.view(-1)[begin : begin + output_tensor.numel()])


def recompute_activations(model: Llama, cfg: ParallelConfig) -> None:
    for index, layer in enumerate(model.model.layers):
        if recomputes(cfg.activation_checkpointing, index):
            checkpoint(layer)  # composable: the parameters keep their names


def recomputes(mode: str, layer_index: int) -> bool:
    """Whether a layer's activations are recomputed in the backward pass (selective: every
    other layer, TorchTitan's layer-level selective choice)."""
    return mode == "full" or (mode == "selective" and layer_index % 2 == 0)


def precision(place: Placement) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on accelerators, fp32 master weights always;
    fp32 throughout on CPU, where bf16 matmuls are slow."""
    if place.is_accelerator:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's rows of a sharded parameter and the index of the first (what
    `Llama.init_weights` draws, and fleet/shards.py writes): FSDP2 cuts dim 0 as torch.chunk does,
    ceil(rows / shards) rows per shard, on the mesh's "shard" dimension."""
    assert isinstance(param, DTensor) and param.placements[-1] == Shard(0), param
    mesh = param.device_mesh
    shards, position = mesh["shard"].size(), mesh["shard"].get_local_rank()
    chunk = -(-param.shape[0] // shards)
    return param.to_local(), min(position * chunk, param.shape[0])


def replicate(model: nn.Module, place: Placement, strategy: str) -> nn.Module:
    """What a step runs: DDP around the model for ddp, the model itself otherwise (a sharded
    model is its own wrapper)."""
    if strategy != "ddp":
        return model
    device_ids = [place.device.index] if place.is_accelerator else None
    return DistributedDataParallel(model, device_ids=device_ids)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def replica_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The ranks that hold the same values as this one (the rank digest guard compares them):
    the whole island with ddp, the ranks holding the same shard with HSDP; None where no other
    rank does (one rank, plain FSDP)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if not is_sharded(model):
        return dist.group.WORLD
    mesh = next(model.parameters()).device_mesh
    return mesh.get_group("replicate") if mesh.ndim == 2 else None


@contextlib.contextmanager
def gradient_sync(step_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across replicas in this backward pass only if `enabled` (the last
    micro-batch of an accumulated step): DDP's no_sync. A sharded model reduce-scatters every
    micro-batch, as TorchTitan does (holding unreduced gradients would hold a whole model's
    worth on each rank), and with HSDP skips only the all-reduce across replicas."""
    if enabled or not dist.is_initialized():
        yield
    elif isinstance(step_model, FSDPModule):
        step_model.set_requires_all_reduce(False)
        try:
            yield
        finally:
            step_model.set_requires_all_reduce(True)
    elif isinstance(step_model, DistributedDataParallel):
        with step_model.no_sync():
            yield
    else:
        yield


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storage behind `tensors` on this rank (a shard's own, padding included;
    each storage counted once however many views it backs)."""
    storages = {}
    for tensor in tensors:
        storage = local_part(tensor).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def gradient_bytes(model: nn.Module) -> int:
    return held_bytes(p.grad for p in model.parameters() if p.grad is not None)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, gradients: int) -> int:
    """What training holds on this rank besides activations: parameters, `gradients` (bytes,
    measured while they existed) and the optimizer's state."""
    moments = (v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return held_bytes(model.parameters()) + gradients + held_bytes(moments)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a sharded one's own shard, a plain one itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A reduced value as a plain tensor (FSDP2's gradient norm is a DTensor)."""
    return value.full_tensor() if isinstance(value, DTensor) else value
