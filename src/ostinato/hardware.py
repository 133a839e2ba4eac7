"""Device and backend detection: one code path for cpu/gloo, cuda/nccl and npu/hccl.

Ascend NPUs appear to torch only after `import torch_npu`, which registers the `npu` device and
the `hccl` backend; everything else goes through the same torch.distributed calls.
"""

from __future__ import annotations

import importlib
import os
import platform
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ostinato.config import HardwareConfig

BACKEND_FOR_DEVICE = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl", "mps": "gloo"}


@dataclass
class Placement:
    """Where this rank runs and how it talks to the rest of its island."""

    device: torch.device
    backend: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_accelerator(self) -> bool:
        return self.device.type != "cpu"


def _npu_available() -> bool:
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def available_devices() -> dict[str, int]:
    """Device types this process can use, with how many of each."""
    found = {"cpu": 1}
    if torch.cuda.is_available():
        found["cuda"] = torch.cuda.device_count()
    if _npu_available():
        found["npu"] = torch.npu.device_count()
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        found["mps"] = 1
    return found


def choose_device_type(cfg: HardwareConfig) -> str:
    found = available_devices()
    if cfg.device == "auto":
        return next(d for d in ("cuda", "npu", "mps", "cpu") if d in found)
    if cfg.device not in found:
        raise ValueError(
            f"hardware.device = {cfg.device!r} is not available here; found: {', '.join(found)}. "
            f"Use --hardware.device=auto or one of those."
        )
    return cfg.device


def stack_versions() -> dict[str, str]:
    """The software stack, recorded in every checkpoint: a fault is often the stack, not the chip."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name(0)
    try:
        versions["torch_npu"] = importlib.import_module("torch_npu").__version__
    except ImportError:
        pass
    if os.environ.get("ASCEND_TOOLKIT_HOME"):
        versions["cann"] = os.environ["ASCEND_TOOLKIT_HOME"]
    return versions


def launched_world_size() -> int:
    """The island's rank count as torchrun set it (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(cfg: HardwareConfig) -> Placement:
    """Pick the device, and join the island's process group when launched by torchrun."""
    device_type = choose_device_type(cfg)
    backend = BACKEND_FOR_DEVICE[device_type] if cfg.backend == "auto" else cfg.backend
    world_size = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    index = local_rank if device_type in ("cuda", "npu") else None
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(device)
    elif device_type == "npu":
        torch.npu.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=cfg.timeout_s)
        store = attempt_store(timeout)
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
    return Placement(device, backend, rank, world_size, local_rank, stack_versions())


def attempt_store(timeout: timedelta) -> dist.Store:
    """The rendezvous store of this launch attempt. When torchrun restarts the workers
    (--max-restarts), they find the store still holding the dead attempt's gloo addresses
    and fail to connect (pytorch/pytorch#167288); keys under the attempt's own prefix are
    fresh."""
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"ostinato/attempt_{attempt}", store)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
