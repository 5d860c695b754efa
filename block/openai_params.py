"""vLLM's validation of an OpenAI ``/v1/completions`` or ``/v1/chat/completions`` body, for the engine and the scheduler.

Why one module: a client must get the same 400 from our stack (the scheduler in front, the emulated engine behind)
as from a real vLLM server, and the scheduler must not route -- or log as a success -- a request vLLM refuses.
The rules are vLLM's (v0.32: ``entrypoints/openai/{completion,chat_completion}/protocol.py`` and
``SamplingParams._verify_args``), in the order vLLM applies them:

1. its "before" model validators on the raw body (logprobs, stream_options, an empty prompt);
2. the field types, parsed as pydantic's lax mode does (``"5"`` and ``5.0`` are the integer 5, ``"true"`` is
   True); a type error reads like vLLM's ``RequestValidationError`` answer;
3. the ranges of ``SamplingParams`` (temperature in [0, 2], top_p in (0, 1], ...), with vLLM's messages;
4. lengths against ``max_model_len`` where it is known (``check_context``).

Integers must fit in 64 bits (vLLM's bound for ``seed``; its engine transport carries no wider ones). Only the
fields present are checked, and a value of the exact type skips pydantic: a few microseconds per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from block.service import INT64_MAX, INT64_MIN, ServiceError, bad_request

MAX_N = 16384  # VLLM_MAX_N_SEQUENCES
MAX_STOP_STRINGS = 4  # VLLM_MAX_STOP_STRINGS
MAX_LOGPROBS = 20  # ModelConfig.max_logprobs (vllm serve --max-logprobs)
MAX_COMPLETION_PROMPTS = 1024  # VLLM_MAX_COMPLETION_PROMPTS
DEFAULT_COMPLETION_MAX_TOKENS = 16  # CompletionRequest.max_tokens (chat: none, i.e. up to max_model_len)

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # as vLLM's OpenAIBaseModel (its type error reads alike)
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


_COMMON: dict[str, Any] = {
    "model": Optional[str], "user": Optional[str],
    "frequency_penalty": Optional[float], "presence_penalty": Optional[float], "repetition_penalty": Optional[float],
    "temperature": Optional[float], "top_p": Optional[float], "top_k": Optional[Int64], "min_p": Optional[float],
    "max_tokens": Optional[Int64], "min_tokens": Int64, "seed": Optional[Int64],
    "stop": Union[str, Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)], None],
    "stop_token_ids": Optional[list[Int64]], "ignore_eos": bool, "include_stop_str_in_output": bool,
    "skip_special_tokens": bool, "spaces_between_special_tokens": bool, "logit_bias": Optional[dict[str, float]],
    "stream": Optional[bool], "stream_options": Optional[StreamOptions], "prompt_logprobs": Optional[Int64],
    "priority": Int64, "use_beam_search": bool,
}
_FIELDS = {
    False: {**_COMMON, "n": Int64, "logprobs": Optional[Int64], "echo": Optional[bool], "suffix": Optional[str],
            "prompt": Union[list[TokenId], list[list[TokenId]], str, list[str], None]},
    True: {**_COMMON, "n": Optional[Int64], "logprobs": Optional[bool], "top_logprobs": Optional[Int64],
           "max_completion_tokens": Optional[Int64], "echo": bool,
           "messages": list[Any]},  # each message's shape: count_request_prompt
}
_ADAPTERS = {chat: {k: TypeAdapter(t) for k, t in spec.items()} for chat, spec in _FIELDS.items()}


_FLOAT = (float, int)


def _plain_types(t: Any) -> Union[str, tuple[type, ...]]:
    """The exact Python types of a field's value that need no parsing ("int64": an int in 64 bits; bool is not
    one of them -- pydantic turns True into 1)."""
    if t in (Int64, Optional[Int64]):
        return "int64"
    if t in (float, Optional[float]):
        return _FLOAT
    for plain in (str, bool):
        if t in (plain, Optional[plain]):
            return (plain,)
    return ()


_FAST = {chat: {k: _plain_types(t) for k, t in spec.items()} for chat, spec in _FIELDS.items()}


def vllm_error(message: str, parameter: Optional[str] = None, value: Any = None) -> ServiceError:
    """A 400 worded as vLLM's ``VLLMValidationError``: the message, then ``(parameter=…, value=…)`` when vLLM
    names them."""
    extras = [f"parameter={parameter}"] * (parameter is not None) + [f"value={value}"] * (value is not None)
    return bad_request(f"{message} ({', '.join(extras)})" if extras else message)


_LOC_MARKERS = frozenset({"function-wrap", "function-after", "function-before", "function-plain", "json-or-python",
                          "lax-or-strict", "chain", "default", "nullable", "tagged-union", "union", "call",
                          "arguments", "is-instance", "is-subclass", "callable", "str", "int", "float", "bool",
                          "bytes", "bytearray", "list", "tuple", "dict", "set", "frozenset", "complex", "none",
                          "nonetype"})


def _clean_loc(loc: tuple) -> str:
    """vLLM's ``clean_loc_for_param``: the dotted path without pydantic's union-branch markers."""
    parts = [str(p) for p in loc if not (any(c in str(p) for c in "[]{}()") or str(p).lower() in _LOC_MARKERS)]
    return ".".join(parts) if parts else ".".join(str(p) for p in loc)


def validation_error(errors: list[dict[str, Any]]) -> ServiceError:
    """A 400 worded as vLLM's ``RequestValidationError`` handler words it (bounded like it: 10 errors, inputs
    summarised)."""
    n = len(errors)
    label = "error" if n == 1 else "errors"
    lines = []
    for e in errors[:10]:
        d = {"type": e.get("type"), "loc": _clean_loc(tuple(e.get("loc", ()))), "msg": e.get("msg"),
             "input": _summary(e.get("input"))}
        if e.get("ctx"):
            d["ctx"] = dict(e["ctx"])
        text = str(d)
        lines.append("  " + (text if len(text) <= 1000 else text[:1000] + "...[truncated]"))
    more = f"\n  ...and {n - 10} more {label}" if n > 10 else ""
    return ServiceError(400, f"{n} validation {label}:\n" + "\n".join(lines) + more, "Bad Request")


def _summary(v: Any) -> str:
    """vLLM's ``_summarize_error_input``: containers described, anything else as its (bounded) text."""
    if isinstance(v, (list, tuple, set, frozenset, dict)):
        return f"<{type(v).__name__} of {len(v)} items>"
    try:
        text = str(v)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        return f"<{type(v).__name__}>"
    return text if len(text) <= 200 else text[:200] + "...[truncated]"


@dataclass
class OpenAIRequest:
    """What the services use of a validated body (the rest is the engine's business)."""

    chat: bool
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    n: int = 1
    max_tokens: Optional[int] = None  # max_completion_tokens for chat when given; None: up to the context
    max_tokens_name: str = "max_tokens"
    min_tokens: int = 0
    seed: Optional[int] = None
    ignore_eos: bool = False
    # fields whose parsed value differs from what was sent ("5" -> 5): the scheduler forwards the parsed values,
    # so the engine and the predictor behind it read the same request
    coerced: dict[str, Any] = field(default_factory=dict)


def _before_validators(body: Mapping[str, Any], chat: bool) -> None:
    """vLLM's ``mode="before"`` model validators: on the raw body, before the field types."""
    for name in ("prompt_logprobs", "top_logprobs" if chat else "logprobs"):
        v = body.get(name)
        if v is not None and not isinstance(v, (int, float)):
            raise vllm_error(f"`{name}` must be an integer.", name, v)
    pl = body.get("prompt_logprobs")
    if pl is not None:
        if body.get("stream") and (pl > 0 or pl == -1):
            raise vllm_error("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
        if pl < 0 and pl != -1:
            raise vllm_error("`prompt_logprobs` must be a positive value or -1.", "prompt_logprobs", pl)
    if chat:
        tl = body.get("top_logprobs")
        if tl is not None:
            if tl < 0 and tl != -1:
                raise vllm_error("`top_logprobs` must be a positive value or -1.", "top_logprobs", tl)
            if (tl == -1 or tl > 0) and not body.get("logprobs"):
                raise vllm_error("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    else:
        lp = body.get("logprobs")
        if lp is not None and lp < 0 and lp != -1:
            raise vllm_error("`logprobs` must be a positive value or -1.", "logprobs", lp)
    if body.get("stream_options") and not body.get("stream"):
        raise vllm_error("Stream options can only be defined when `stream=True`.", "stream_options")
    if not chat:
        prompt = body.get("prompt")
        if prompt is None or prompt == "":
            raise vllm_error("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
        if isinstance(prompt, list) and len(prompt) > MAX_COMPLETION_PROMPTS and type(prompt[0]) is not int \
                and set(map(type, prompt)) != {int}:
            raise vllm_error(f"prompt list length {len(prompt)} exceeds the maximum allowed count of "
                             f"{MAX_COMPLETION_PROMPTS}. To increase this limit, set the VLLM_MAX_COMPLETION_PROMPTS "
                             "environment variable.", "prompt")
    elif "messages" not in body:
        raise validation_error([{"type": "missing", "loc": ("body", "messages"), "msg": "Field required",
                                 "input": body}])


def _nonneg(ids: list) -> bool:
    try:
        return min(ids) >= 0
    except TypeError:  # mixed types: pydantic's pass words the error
        return False


def _parse_fields(body: Mapping[str, Any], chat: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The present fields of vLLM's request model, parsed as pydantic's lax mode does, and those whose parsed
    value is not what was sent ("5" -> 5; not 5 -> 5.0, which reads the same); type errors -> 400."""
    adapters, fast = _ADAPTERS[chat], _FAST[chat]
    out: dict[str, Any] = {}
    coerced: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name, v in body.items():
        a = adapters.get(name)
        if a is None:
            continue
        if name == "prompt" and (type(v) is str or type(v) is list and v and type(v[0]) is int and _nonneg(v)):
            out[name] = v  # text, or token ids (count_request_prompt checks their types): no pydantic pass
            continue
        plain = fast[name]
        if plain == "int64" and type(v) is int and INT64_MIN <= v <= INT64_MAX \
                or plain and plain != "int64" and type(v) in plain:
            out[name] = float(v) if plain is _FLOAT and type(v) is int else v  # vLLM's messages print 3.0
            continue
        try:
            x = out[name] = a.validate_python(v)
        except ValidationError as err:
            for e in err.errors(include_url=False):
                errors.append({**e, "loc": ("body", name, *e.get("loc", ()))})
            continue
        if type(x) is not type(v) and not isinstance(x, BaseModel) and not (type(x) is float and type(v) is int):
            coerced[name] = x
    if errors:
        raise validation_error(errors)
    return out, coerced


def _verify_sampling(f: Mapping[str, Any], r: OpenAIRequest, logprobs: Optional[int],
                     vocab_size: Optional[int]) -> None:
    """``SamplingParams._verify_args`` (and ``_validate_logprobs`` with vLLM's default ``max_logprobs``); the
    messages are built only on failure (this runs on every request through the scheduler)."""
    if r.n < 1:
        raise bad_request(f"n must be at least 1, got {r.n}.")
    if r.n > MAX_N:
        raise bad_request(f"n must be at most {MAX_N}, got {r.n}. To increase this limit, set the "
                          "VLLM_MAX_N_SEQUENCES environment variable.")
    get = f.get
    for name in ("presence_penalty", "frequency_penalty"):
        v = get(name)
        if v is not None and not -2.0 <= v <= 2.0:
            raise bad_request(f"{name} must be in [-2, 2], got {v}.")
    v = get("repetition_penalty")
    if v is not None:
        if not math.isfinite(v):
            raise bad_request(f"repetition_penalty must be a finite number, got {v}.")
        if v <= 0.0:
            raise bad_request(f"repetition_penalty must be greater than zero, got {v}.")
    v = get("temperature")
    if v is not None:
        if not math.isfinite(v):
            raise vllm_error(f"temperature must be a finite number, got {v}.", "temperature", v)
        if v < 0.0:
            raise vllm_error(f"temperature must be non-negative, got {v}.", "temperature", v)
        if v > 2.0:
            raise vllm_error(f"temperature must be in [0, 2], got {v}.", "temperature", v)
    v = get("top_p")
    if v is not None and not 0.0 < v <= 1.0:
        raise vllm_error(f"top_p must be in (0, 1], got {v}.", "top_p", v)
    v = get("top_k")
    if v is not None and v < -1:
        raise bad_request(f"top_k must be 0 (disable), or at least 1, got {v}.")
    v = get("min_p")
    if v is not None and not 0.0 <= v <= 1.0:
        raise bad_request(f"min_p must be in [0, 1], got {v}.")
    if r.max_tokens is not None and r.max_tokens < 1:
        raise vllm_error(f"max_tokens must be at least 1, got {r.max_tokens}.", "max_tokens", r.max_tokens)
    if r.min_tokens < 0:
        raise bad_request(f"min_tokens must be greater than or equal to 0, got {r.min_tokens}.")
    if r.max_tokens is not None and r.min_tokens > r.max_tokens:
        raise bad_request(f"min_tokens must be less than or equal to max_tokens={r.max_tokens}, got {r.min_tokens}.")
    stop = get("stop")
    if isinstance(stop, list) and not all(stop):
        raise bad_request("stop cannot contain an empty string.")
    for kind, name, n in (("sample", "logprobs", logprobs), ("prompt", "prompt_logprobs", get("prompt_logprobs"))):
        if n == -1 and vocab_size is not None:
            n = vocab_size
        if n and (n == -1 or n > MAX_LOGPROBS):
            raise vllm_error(f"Requested {kind} logprobs of {'the whole vocabulary (-1)' if n == -1 else n}, "
                             f"which is greater than max allowed: {MAX_LOGPROBS}", name, n)


def validate_request(body: Mapping[str, Any], chat: bool, vocab_size: Optional[int] = None) -> OpenAIRequest:
    """Check a completions (``chat=False``) or chat body as vLLM does; a 400 worded like vLLM's otherwise.

    Prompt/messages shapes are counted (and refused) by ``block.engine.tokens.count_request_prompt``; lengths
    against the context by :func:`check_context` once the prompt is counted."""
    _before_validators(body, chat)
    f, coerced = _parse_fields(body, chat)
    r = OpenAIRequest(chat=chat, coerced=coerced)
    r.stream = bool(f.get("stream"))
    so = f.get("stream_options")
    if so is not None:
        r.include_usage = bool(so.include_usage)
        r.continuous_usage = bool(so.continuous_usage_stats)
        raw = body["stream_options"]
        if any(raw.get(k) is not None and type(raw.get(k)) is not bool for k in ("include_usage",
                                                                               "continuous_usage_stats")):
            r.coerced["stream_options"] = {**raw, "include_usage": so.include_usage,
                                           "continuous_usage_stats": so.continuous_usage_stats}
    r.n = 1 if f.get("n") is None else f["n"]
    if chat and f.get("max_completion_tokens") is not None:
        r.max_tokens, r.max_tokens_name = f["max_completion_tokens"], "max_completion_tokens"
    else:
        r.max_tokens = f.get("max_tokens")
    r.min_tokens = f.get("min_tokens", 0)
    r.seed = f.get("seed")
    r.ignore_eos = f.get("ignore_eos", False)
    if chat:
        logprobs = f.get("top_logprobs") if f.get("logprobs") else None
    else:
        logprobs = f.get("logprobs")
    _verify_sampling(f, r, logprobs, vocab_size)
    return r


def check_context(r: OpenAIRequest, prompt_tokens: int, max_model_len: int) -> int:
    """The output budget of a request whose prompt has ``prompt_tokens`` tokens on a model with ``max_model_len``
    (``max_tokens``, or the rest of the context when unset); a 400 worded as vLLM's when it does not fit."""
    L = max_model_len
    if prompt_tokens >= L:
        raise bad_request(f"This model's maximum context length is {L} tokens. However, your request has "
                          f"{prompt_tokens} input tokens. Please reduce the length of the input messages.")
    if r.max_tokens is None:
        return L - prompt_tokens
    if prompt_tokens + r.max_tokens > L:
        raise bad_request(f"'max_tokens' or 'max_completion_tokens' is too large: {r.max_tokens}. This model's "
                          f"maximum context length is {L} tokens and your request has {prompt_tokens} input tokens "
                          f"({r.max_tokens} > {L} - {prompt_tokens}).")
    if r.min_tokens > r.max_tokens:
        raise bad_request(f"min_tokens must be less than or equal to max_tokens={r.max_tokens}, got "
                          f"{r.min_tokens}.")
    return r.max_tokens
