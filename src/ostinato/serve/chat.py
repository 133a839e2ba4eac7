"""A terminal chat on the serving engine: the answer is printed as it is generated."""

from __future__ import annotations

import queue
import sys
from collections.abc import Callable
from typing import TextIO

from tokenizers import Tokenizer

from ostinato.serve.engine import Engine, Sampling
from ostinato.serve.text import TextStream, render_chat

HELP = "Type a question; /reset forgets the conversation, /exit (or Ctrl-D) quits."


class Chat:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, eos_token: str, template: str):
        self.engine, self.tokenizer = engine, tokenizer
        self.eos_token, self.template = eos_token, template
        self.history: list[dict[str, str]] = []

    def prompt_ids(self, min_room: int) -> list[int] | None:
        """The conversation as tokens, oldest turns dropped until `min_room` tokens are left."""
        while self.history:
            text = render_chat(self.history, self.eos_token, self.template)
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            if len(ids) + min_room <= self.engine.max_seq_len:
                return ids
            self.history.pop(0)
        return None

    def answer(self, question: str, sampling: Sampling, write: Callable[[str], None]) -> str:
        """Stream the answer to `question` through `write`; returns it (and keeps it in history)."""
        self.history.append({"role": "user", "content": question})
        prompt = self.prompt_ids(min_room=1)
        if prompt is None:
            write("(that question is longer than the model's context)")
            return ""
        room = self.engine.max_seq_len - len(prompt)
        sampling.max_tokens = min(sampling.max_tokens, room)
        tokens: queue.Queue = queue.Queue()
        seq = self.engine.submit(prompt, sampling, lambda t, r: tokens.put((t, r)))
        text, pieces = TextStream(self.tokenizer, lstrip=True), []
        while True:
            token, reason = tokens.get()
            pieces.append(text.push(token) if token is not None else "")
            if reason is not None:
                pieces.append(text.flush())
            write(pieces[-1])
            if reason is not None or text.stopped:
                break
        self.engine.cancel(seq)
        self.history.append({"role": "assistant", "content": "".join(pieces)})
        return "".join(pieces)


def run_chat(
    chat: Chat,
    sampling: Sampling,
    echo: bool = False,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> None:
    """Read questions until EOF or /exit; print each answer as it streams.

    `echo` repeats each question, so a transcript of piped input reads like a conversation.
    """

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    print(HELP, file=out)
    chat.engine.start()
    try:
        while True:
            try:
                line = read("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                break
            if echo:
                write(line + "\n")
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                chat.history.clear()
            elif line:
                write("model> ")
                chat.answer(line, Sampling(**vars(sampling)), write)
                write("\n")
    finally:
        chat.engine.stop()
