"""What routing needs of a request: its body (validated as vLLM would), prompt tokens, output-length hint and the
text a length estimator reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from block.engine.tokens import PromptError, TokenCounter, count_request_prompt, message_text
from block.openai_params import validate_request
from block.service import bad_request, int_field, json_object

HINT_HEADER = "x-expected-output-tokens"
HINT_FIELD = "expected_output_tokens"
FALLBACK_OUTPUT_TOKENS = 256  # length assumed when a request has neither a hint nor max_tokens (and no default set)


@dataclass
class Parsed:
    chat: bool
    stream: bool
    prompt_tokens: int
    max_tokens: Optional[int]
    hint: Optional[int]
    hint_in_body: bool
    coerced: bool = False  # the body was rewritten with vLLM's parsed values ("5" -> 5): forward it, not raw


class PromptCounter:
    """Prompt tokens of a completions/chat body, as the emulated engine counts them (block/engine/tokens.py)."""

    def __init__(self, tokenizer: str = "llama2") -> None:
        self.counter = TokenCounter(tokenizer)

    def count(self, body: Mapping[str, Any], chat: bool) -> int:
        try:
            return count_request_prompt(self.counter, body, chat)
        except PromptError as err:
            raise bad_request(str(err)) from None


def parse_body(raw: bytes, headers: Mapping[str, str], chat: bool, counter: PromptCounter) -> tuple[dict, Parsed]:
    """The body (bounded JSON, vLLM's validation: ``block.openai_params``) and what routing needs of it; a 400
    worded as vLLM's for what vLLM refuses, so nothing it would refuse is routed. Values vLLM parses leniently
    ("5", "true") are forwarded parsed, so the predictor and the engine read the request as we did."""
    body = json_object(raw)
    r = validate_request(body, chat)
    if r.coerced:
        body = {**body, **r.coerced}
    in_body = body.get(HINT_FIELD) is not None
    hint = int_field(HINT_FIELD, body.get(HINT_FIELD) if in_body else headers.get(HINT_HEADER), 1)
    prompt = counter.count(body, chat)
    return body, Parsed(chat, r.stream, prompt, r.max_tokens, hint, in_body, bool(r.coerced))


def prompt_text(body: Mapping[str, Any], chat: bool) -> Optional[str]:
    """The text the length estimator reads: a completions prompt string, or the last user message of a chat (the
    estimator is trained on first user turns). None for token-id prompts (nothing to read)."""
    if chat:
        msgs = body.get("messages") or ()
        for m in reversed(msgs):
            if isinstance(m, dict) and m.get("role") == "user":
                return message_text(m.get("content"))
        for m in reversed(msgs):
            if isinstance(m, dict):
                return message_text(m.get("content"))
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else None
