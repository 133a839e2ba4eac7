"""Weights from the trainer to its rollout islands, over the trainer's store.

`rl.weight_push = "full"` sends every version's fp32 weights. `"int8"` / `"int4"` send each
version as a delta, quantized per block as pseudo-gradients are (fleet/compress.py), against
what the islands already hold: the trainer keeps that copy itself (R), so the delta of the next
version carries this one's quantization error too (error feedback), and islands and trainer
add the same bits, so every island holds exactly R. Every `FULL_EVERY` versions R is sent
whole, so an island that joins late, or fell behind, loads it and at most that many deltas.
Each payload is sealed with a MAC under the fleet token, bound to its kind and version.

Rollouts then come from R, which differs from the trainer's weights by the last quantization
error; the islands measure their answers' log-probabilities under R, and the update corrects
for the difference with importance weights, as it does for stale rollouts.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ostinato.fleet import wire
from ostinato.fleet.compress import from_bytes, pack, payload_size, unpack
from ostinato.model.llama import Llama

FULL_EVERY = 20  # versions between whole copies of R
BLOCK = 128


def rl_prefix(token: str) -> str:
    """Where an RL run's keys live in its store: under the fleet token's namespace."""
    return wire.namespace(token) + "/rl"


def put_sealed(view: Any, token: str, key: str, payload: bytes, *context: Any) -> None:
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    view.set(key, wire.seal(data, token, *context).numpy().tobytes())


def get_sealed(view: Any, token: str, key: str, *context: Any) -> bytes | None:
    """The payload under `key` if its MAC holds for `context`; None if absent or changed."""
    if not view.check([key]):
        return None
    raw = view.get(key)
    sealed = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0)
    opened = wire.unseal(sealed, token, *context)
    return None if opened is None else opened.numpy().tobytes()


def flat_parameters(model: Llama) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def load_flat(model: Llama, flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(flat[offset : offset + param.numel()].view_as(param))
            offset += param.numel()


def _put(view: Any, token: str, key: str, payload: torch.Tensor, *context: Any) -> None:
    put_sealed(view, token, key, payload.contiguous().view(torch.uint8).numpy().tobytes(), *context)


class Publisher:
    """The trainer's side: `publish` makes the policy's weights version `version`."""

    def __init__(self, view: Any, token: str, kind: str):
        self.view, self.token, self.kind = view, token, kind
        self.held: torch.Tensor | None = None  # R: what the islands hold
        self.base = -1  # version of the last whole copy
        self.deltas: list[int] = []  # versions whose delta is in the store

    def publish(self, flat: torch.Tensor, version: int) -> int:
        """Returns the bytes sent."""
        whole = self.kind == "full" or self.held is None or version - self.base >= FULL_EVERY
        if whole:
            self.held = flat.clone() if self.kind != "full" else flat
            _put(self.view, self.token, "weights", self.held, "weights", version)
            self.view.set("base", json.dumps(version))
            self.view.set("version", json.dumps(version))
            for old in self.deltas:  # a joiner now starts from this copy
                self.view.delete_key(f"delta/{old}")
            self.base, self.deltas = version, []
            return 4 * flat.numel()
        packed = pack(flat - self.held, self.kind, BLOCK)
        self.held = self.held + unpack(packed, BLOCK)
        raw = packed.to_bytes()
        _put(self.view, self.token, f"delta/{version}", raw, "delta", version)
        self.deltas.append(version)
        self.view.set("version", json.dumps(version))
        return raw.numel()


class Receiver:
    """The island's side: `refresh` brings its copy up to the newest version published."""

    def __init__(self, view: Any, token: str, kind: str, numel: int):
        self.view, self.token, self.kind, self.numel = view, token, kind, numel
        self.held: torch.Tensor | None = None
        self.version = -1

    def _get(self, key: str, *context: Any) -> torch.Tensor | None:
        payload = get_sealed(self.view, self.token, key, *context)
        return None if payload is None else torch.frombuffer(bytearray(payload), dtype=torch.uint8)

    def refresh(self) -> bool:
        """True when the copy moved to a newer version. A payload missing (replaced meanwhile)
        or changed on its way leaves the copy as it was: the next look tries again."""
        if not self.view.check(["version", "base"]):
            return False
        version, base = json.loads(self.view.get("version")), json.loads(self.view.get("base"))
        if version <= self.version:
            return False
        held, at = self.held, self.version
        if held is None or at < base:
            raw = self._get("weights", "weights", base)
            if raw is None or raw.numel() != 4 * self.numel:
                return False
            held, at = raw.view(torch.float32).clone(), base
        for step in range(at + 1, version + 1):
            raw = self._get(f"delta/{step}", "delta", step)
            if raw is None or raw.numel() != payload_size(self.numel, self.kind, BLOCK):
                return False
            held = held + unpack(from_bytes(raw, self.numel, self.kind, BLOCK), BLOCK)
        self.held, self.version = held, version
        return True
