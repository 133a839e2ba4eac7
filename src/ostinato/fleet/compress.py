"""Compression of pseudo-gradients for the wire: fp32, bf16, int8 and 4-bit with per-block scales.

Every encoding has a size that depends only on (numel, kind, block), so members can all-gather
fixed-size buffers. Quantization is symmetric per block of `block` values: scale = absmax / qmax,
round half to even. Error feedback carries each round's quantization error into the next round,
so the error does not accumulate over rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("fp32", "bf16", "int8", "int4")
QMAX = {"int8": 127, "int4": 7}
TOKEN_COUNT_BYTES = 8  # the tokens a member trained on, weighting its pseudo-gradient
MAC_BYTES = 32  # HMAC-SHA256 (fleet/wire.py seals every payload with one)


@dataclass
class Packed:
    """One flat tensor on the wire: `payload` as raw bytes plus fp32 block scales."""

    kind: str
    numel: int
    payload: torch.Tensor  # uint8
    scales: torch.Tensor  # float32; empty for fp32 and bf16

    @property
    def wire_bytes(self) -> int:
        return self.payload.numel() + 4 * self.scales.numel()

    def to_bytes(self) -> torch.Tensor:
        """payload and scales as one uint8 tensor (what is all-gathered)."""
        return torch.cat([self.payload, self.scales.view(torch.uint8)])


def _blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def payload_size(numel: int, kind: str, block: int) -> int:
    """Bytes of one packed tensor (payload + scales) of `numel` values."""
    if kind == "fp32":
        return 4 * numel
    if kind == "bf16":
        return 2 * numel
    padded = _blocks(numel, block) * block
    values = padded if kind == "int8" else padded // 2
    return values + 4 * _blocks(numel, block)


def message_bytes(numel: int, kind: str, block: int) -> int:
    """Bytes one member sends each peer in a round (an all-gather): the packed pseudo-gradient,
    its token count (fp64) and the MAC that seals them (fleet/wire.py: HMAC-SHA256)."""
    return payload_size(numel, kind, block) + TOKEN_COUNT_BYTES + MAC_BYTES


def pack(x: torch.Tensor, kind: str, block: int = 128) -> Packed:
    """Encode a flat fp32 tensor."""
    x = x.detach().float().flatten()
    empty = torch.empty(0, dtype=torch.float32)
    if kind == "fp32":
        return Packed(kind, x.numel(), x.clone().view(torch.uint8), empty)
    if kind == "bf16":
        return Packed(kind, x.numel(), x.to(torch.bfloat16).view(torch.uint8), empty)
    if kind not in QMAX:
        raise ValueError(f"fleet.compression = {kind!r}: allowed values: {', '.join(KINDS)}")
    if block % 2:
        raise ValueError(f"fleet.block = {block}: must be even (4-bit values are packed in pairs)")
    rows = torch.nn.functional.pad(x, (0, _blocks(x.numel(), block) * block - x.numel()))
    rows = rows.view(-1, block)
    qmax = QMAX[kind]
    scales = rows.abs().amax(dim=1) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(rows / safe[:, None]).clamp_(-qmax, qmax).to(torch.int8).flatten()
    if kind == "int8":
        payload = q.view(torch.uint8)
    else:  # two 4-bit values per byte, offset to 1..15
        nibbles = (q + 8).to(torch.uint8).view(-1, 2)
        payload = nibbles[:, 0] | (nibbles[:, 1] << 4)
    return Packed(kind, x.numel(), payload.contiguous(), scales.contiguous())


def unpack(packed: Packed, block: int = 128) -> torch.Tensor:
    """Decode to a flat fp32 tensor of `packed.numel` values."""
    if packed.kind == "fp32":
        return packed.payload.view(torch.float32).clone()
    if packed.kind == "bf16":
        return packed.payload.view(torch.bfloat16).float()
    if packed.kind == "int8":
        q = packed.payload.view(torch.int8).float()
    else:
        low = (packed.payload & 0x0F).to(torch.int16) - 8
        high = (packed.payload >> 4).to(torch.int16) - 8
        q = torch.stack([low, high], dim=1).flatten().float()
    values = (q.view(-1, block) * packed.scales[:, None]).flatten()
    return values[: packed.numel]


def from_bytes(raw: torch.Tensor, numel: int, kind: str, block: int = 128) -> Packed:
    """Inverse of `Packed.to_bytes` for a buffer received from a peer."""
    scale_count = 0 if kind in ("fp32", "bf16") else _blocks(numel, block)
    split = raw.numel() - 4 * scale_count
    scales = raw[split:].clone().view(torch.float32)
    return Packed(kind, numel, raw[:split].clone(), scales)


class ErrorFeedback:
    """Adds the previous round's quantization error before compressing, and keeps the new one.

    The new error is only kept when the round commits (`commit`), so a failed round that is
    retried compresses the same values again. With Streaming DiLoCo a round sends one fragment:
    `start` says where its values begin in the flat residual.
    """

    def __init__(self, numel: int, kind: str, block: int = 128):
        self.kind, self.block = kind, block
        self.residual = torch.zeros(numel)
        self._pending: tuple[int, torch.Tensor] | None = None

    def compress(self, pseudo_gradient: torch.Tensor, start: int = 0) -> Packed:
        corrected = pseudo_gradient + self.residual[start : start + pseudo_gradient.numel()]
        packed = pack(corrected, self.kind, self.block)
        self._pending = (start, corrected - unpack(packed, self.block))
        return packed

    def commit(self) -> None:
        if self._pending is None:
            return
        start, error = self._pending
        if error.numel() == self.residual.numel():
            self.residual = error
        else:
            self.residual[start : start + error.numel()] = error
        self._pending = None

    def reset(self) -> None:
        """Forget the residual: the work it came from was dropped (a quarantined island)."""
        self.residual.zero_()
        self._pending = None

    def carry(self, extra: torch.Tensor, start: int = 0) -> None:
        """Fold work that could not be sent this round into what is sent next round."""
        self.residual[start : start + extra.numel()] += extra

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"residual": self.residual}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residual = state["residual"].clone()
