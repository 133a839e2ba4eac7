"""Text around the token engine: the chat template, and streamed detokenisation with stops.

The chat template maps a conversation onto the format the reasoning corpus was trained on
("Question: ...\nAnswer: <worked steps> #### N<|endoftext|>"). It is a Jinja template, shipped
in tokenizer_config.json, so transformers, vLLM and `ostinato serve` all render it the same way.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'Question: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Answer: ' + message['content'] + eos_token }}"
    "{%- else -%}"
    "{{ message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:' }}{%- endif -%}"
)


@lru_cache(maxsize=4)
def _compiled(template: str):
    # Sandboxed, as transformers does: a template shipped with a model is untrusted input.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template)


def render_chat(
    messages: list[dict[str, str]], eos_token: str, template: str = CHAT_TEMPLATE
) -> str:
    """The prompt for `messages`, ending where the assistant's answer starts."""
    return _compiled(template).render(
        messages=messages, eos_token=eos_token, bos_token="", add_generation_prompt=True
    )


class TextStream:
    """Turns generated token ids into text pieces, safely cut, with stop strings applied.

    Byte-level BPE tokens can split a UTF-8 character; text is only released once it decodes
    cleanly. Text that could be the start of a stop string is held back until it cannot be.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None, lstrip: bool = False):
        self.tokenizer, self.stop, self.lstrip = tokenizer, [s for s in stop or [] if s], lstrip
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """New text after this token ('' while held back); sets `stopped` on a stop string."""
        return self.push_many([token_id])

    def push_many(self, token_ids: list[int]) -> str:
        """New text after these tokens, decoded once. With stop strings they go one by one:
        the token that completes a stop string is the completion's last (its usage count)."""
        if self.stop and len(token_ids) > 1:
            pieces = []
            for token_id in token_ids:
                pieces.append(self.push_many([token_id]))
                if self.stopped:
                    break
            return "".join(pieces)
        self.ids.extend(token_ids)
        text = self._text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            return ""
        for stop in self.stop:
            at = text.find(stop, self.sent)
            if at >= 0:
                self.stopped = True
                return self._release(text, at)
        return self._release(text, len(text) - self._held_back(text))

    def flush(self) -> str:
        """What is left at the end of generation (held-back text that never became a stop)."""
        return "" if self.stopped else self._release(self._text(), len(self._text()))

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return text.lstrip() if self.lstrip else text

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text) - self.sent), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, text: str, end: int) -> str:
        piece = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece
