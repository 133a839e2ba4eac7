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
    return sample_token(logits, temperature, 1.0, generator)


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """One token from softmax(logits / temperature), cut to the top_p nucleus; any T, p > 0.

    Computed in float64 on shifted logits: (logit - max) / T is <= 0 with the top token at
    exactly 0, so no temperature, however small (1e-40, a subnormal), overflows to inf or NaN,
    and the softmax's sum is at least 1. A tiny T becomes greedy by itself: the other tokens
    get exp(-huge) = 0. top_p is compared in float64 too (1e-300 is 0 in float32, which used to
    cut every token away), and the most likely token is always kept.
    """
    scores = logits.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(scores.max())):
        raise ValueError(f"the model produced a non-finite logit ({float(scores.max())})")
    probs = torch.softmax((scores - scores.max()) / temperature, dim=-1)
    if top_p < 1.0:
        probs = _nucleus(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_probs, order = probs.sort(descending=True)
    outside = sorted_probs.cumsum(0) - sorted_probs >= top_p
    outside[0] = False  # the most likely token stays, whatever top_p is
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter(0, order, sorted_probs)
