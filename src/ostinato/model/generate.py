"""Greedy and sampled decoding with a KV cache, on token ids."""

from __future__ import annotations

import torch

from ostinato.model.llama import KVCache, Llama


@torch.no_grad()
def generate(
    model: Llama,
    prompt: list[int],
    max_new_tokens: int,
    stop_id: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """New token ids after `prompt` (one sequence), until `stop_id` or `max_new_tokens`."""
    device = next(model.parameters()).device
    room = model.cfg.max_seq_len - len(prompt)
    prompt = prompt[-model.cfg.max_seq_len :]
    caches = [KVCache() for _ in model.model.layers]
    tokens = torch.tensor([prompt], device=device)
    position = 0
    out: list[int] = []
    for _ in range(max(0, min(max_new_tokens, room))):
        positions = torch.arange(position, position + tokens.shape[1], device=device)
        logits = model(tokens, positions=positions, caches=caches)[0, -1].float()
        position += tokens.shape[1]
        next_id = _pick(logits, temperature, generator)
        if next_id == stop_id:
            break
        out.append(next_id)
        tokens = torch.tensor([[next_id]], device=device)
    return out


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
