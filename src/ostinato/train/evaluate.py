"""End-of-run evaluation: validation loss, accuracy on held-out problems, sample answers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from ostinato.data.reasoning import Problem, extract_answer
from ostinato.data.tokenizer import eos_id
from ostinato.model.generate import generate
from ostinato.model.llama import Llama


@dataclass
class Sample:
    question: str
    answer: str
    expected: int
    correct: bool


@dataclass
class Evaluation:
    val_loss: float | None = None
    accuracy: float | None = None
    samples: list[Sample] = field(default_factory=list)


@torch.no_grad()
def validation_loss(
    model: Llama, tokens: torch.Tensor, seq_len: int, max_batches: int = 8
) -> float | None:
    """Mean loss over consecutive windows of the validation tokens."""
    windows = [tokens[i : i + seq_len + 1] for i in range(0, len(tokens) - seq_len - 1, seq_len)]
    windows = windows[: max_batches * 8]
    if not windows:
        return None
    device = next(model.parameters()).device
    losses = []
    for start in range(0, len(windows), 8):
        rows = torch.stack(windows[start : start + 8]).to(device)
        losses.append(float(model(rows[:, :-1], rows[:, 1:])))
    return sum(losses) / len(losses)


@torch.no_grad()
def answer(model: Llama, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 128) -> str:
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    out = generate(model, ids, max_new_tokens, stop_id=eos_id(tokenizer))
    return tokenizer.decode(out).strip()


def accuracy(
    model: Llama, tokenizer: Tokenizer, problems: list[Problem], samples: int
) -> tuple[float | None, list[Sample]]:
    """Share of problems whose generated `#### N` equals the answer, and the first few answers."""
    if not problems:
        return None, []
    results = []
    for problem in problems:
        text = answer(model, tokenizer, problem.prompt)
        got = extract_answer(text)
        results.append(Sample(problem.question, text, problem.answer, got == problem.answer))
    return sum(r.correct for r in results) / len(results), results[:samples]
