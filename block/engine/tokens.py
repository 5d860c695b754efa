"""Prompt token counting and the deterministic filler text of the emulated engine.

Counting (what ``usage.prompt_tokens`` reports and what the engine schedules):

- a list of token ids -> its length (the benchmark client sends ids for length-only datasets);
- text -> the configured tokenizer (``data.tokenizer``: Llama-2 or Qwen2, offline, special tokens included as vLLM
  counts them) when the ``tokenizers`` package is available, else the fallback ``max(1, ceil(utf8 bytes / 4))``;
- chat messages -> the sum over message contents (tokenizer without special tokens, or the fallback) plus a fixed
  template overhead of ``CHAT_TOKENS_PER_MESSAGE`` per message and ``CHAT_TOKENS_FIXED`` once (BOS and the assistant
  generation prompt) -- a stand-in for the model's chat template, which we do not render.

Output text: token ``i`` of a request with seed ``r`` is ``" " + WORDS[(r + i) % len(WORDS)]``, so the text is
deterministic, one word per token, and ``usage.completion_tokens`` equals the number of streamed text chunks.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

log = logging.getLogger("block.engine")

CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_FIXED = 3
BYTES_PER_TOKEN = 4

WORDS = (
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
    "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you",
    "were", "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will",
    "would", "who", "so", "no", "time", "may", "out", "up", "into", "only", "new", "some", "what", "than",
    "then", "now", "two", "first", "other",
)


def token_text(seed: int, i: int) -> str:
    return " " + WORDS[(seed + i) % len(WORDS)]


def filler_text(seed: int, n: int, start: int = 0) -> str:
    return "".join(token_text(seed, i) for i in range(start, start + n))


class TokenCounter:
    """Counts prompt tokens of text with a bundled tokenizer, or with the bytes/4 fallback (``name="none"``)."""

    def __init__(self, name: str = "none") -> None:
        self.name = "none"
        self._tok = None
        if name and name != "none":
            try:
                from data.tokenizer import load_tokenizer

                self._tok = load_tokenizer(name)
                self.name = name
            except (ImportError, ValueError, OSError) as err:
                log.warning("tokenizer %r unavailable (%s): counting text as ceil(utf8 bytes / %d)", name, err,
                            BYTES_PER_TOKEN)

    @staticmethod
    def fallback(text: str) -> int:
        return max(1, math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN))

    def count_text(self, text: str, special: bool = True) -> int:
        if self._tok is None:
            return self.fallback(text)
        return max(1, len(self._tok.encode(text, add_special_tokens=special).ids))

    def count_chat(self, contents: list[str]) -> int:
        body = 0
        for c in contents:
            if c:
                body += len(self._tok.encode(c, add_special_tokens=False).ids) if self._tok is not None \
                    else self.fallback(c)
        return body + CHAT_TOKENS_PER_MESSAGE * len(contents) + CHAT_TOKENS_FIXED


def message_text(content: Any) -> Optional[str]:
    """The text of a chat message's ``content`` (a string, None, or a list of parts); None if malformed."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                return None
        return "\n".join(out)
    return None


class PromptError(ValueError):
    """A malformed prompt in an OpenAI request body (the services answer it with a 400)."""


def count_request_prompt(counter: "TokenCounter", body: Any, chat: bool, vocab_size: Optional[int] = None) -> int:
    """Prompt tokens of a /v1/completions (``prompt``: text or token ids) or /v1/chat/completions (``messages``) body.

    One function for the engine and the scheduler, so both count -- and refuse -- the same prompts.
    """
    if chat:
        msgs = body.get("messages")
        if msgs is None:
            raise PromptError("messages is required")
        if not isinstance(msgs, list) or not msgs:
            raise PromptError("messages must be a non-empty list of {role, content} objects")
        contents = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise PromptError(f"messages[{i}] must be an object with a string 'role'")
            text = message_text(m.get("content"))
            if text is None:
                raise PromptError(f"messages[{i}].content must be a string or a list of text parts")
            contents.append(text)
        return counter.count_chat(contents)
    prompt = body.get("prompt")
    if prompt is None:
        raise PromptError("prompt is required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        return counter.count_text(prompt)
    if isinstance(prompt, list):
        if not prompt:
            raise PromptError("prompt must not be empty")
        if set(map(type, prompt)) != {int}:  # one C-speed pass; bool is its own type here
            if any(isinstance(t, (str, list)) for t in prompt):
                raise PromptError("batched prompts are not supported: send one prompt per request")
            raise PromptError("prompt must be a string or a list of token ids (integers)")
        lo, hi = min(prompt), max(prompt)
        if lo < 0:
            raise PromptError(f"Token id {lo} is out of vocabulary")
        if vocab_size is not None and hi >= vocab_size:
            raise PromptError(f"Token id {hi} is out of vocabulary")
        return len(prompt)
    raise PromptError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
