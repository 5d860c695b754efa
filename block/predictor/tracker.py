"""What the predictor knows of the requests it proxies, and the ``InstanceState`` it builds from that (proxy mode).

Pure bookkeeping, no I/O: :class:`Tracker` holds one :class:`Tracked` entry per request in flight (in arrival
order), :func:`chunk_progress` reads an SSE payload's progress (non-empty output, usage; block/sse.py reads the
stream itself), :class:`Reassembler` turns a stream of chunks back into the non-streaming OpenAI response, and
:meth:`Tracker.build_state` applies the proxy-mode rules:

- a request with no output token yet is *waiting* (FCFS by arrival, computed 0) -- unless the engine's /metrics
  (``vllm:num_requests_running``, when fresh) says more requests run than have tokens: then the oldest no-token
  requests (that had arrived when /metrics was read) are taken as *running prefills* (computed 0, holding their
  prompt's blocks);
- a request with ``d >= 1`` tokens is a *running decode* with ``computed = prompt + d - 1``; when /metrics says fewer
  requests run than have tokens and more wait than we think, the newest decodes without a token since that reading
  are taken as *preempted* (recompute: waiting at the front, computed 0, decoded kept);
- free blocks = total - blocks held (``ceil(computed / block_size)`` per decode, ``ceil(prompt / block_size)`` per
  running prefill under V0 rules, none under V1, whose prefills hold blocks per computed chunk, as the simulator's
  engine counts them), never below 0; ``busy_for_s = 0``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Optional


from block.engine.tokens import TokenCounter, message_text
from block.prom import VllmLoad
from block.service import INT64_MIN, ServiceError, int_field
from block.sse import DONE, SSEScanner, error_of, has_output, parse_payload  # noqa: F401 - re-exported
from vidur.types import EngineConfig, InstanceState, SeqState

EXPECTED_HEADER = "x-expected-output-tokens"


def _as_int(v: Any) -> Optional[int]:
    """A 64-bit integer from a JSON value or header string (``block.service.int_field``'s rules), else None:
    tracking is tolerant (the engine answers a bad value with its 400), but a value outside 64 bits must never
    reach the tracked state, which would then be unserialisable."""
    try:
        return int_field("value", v, lo=INT64_MIN)
    except ServiceError:
        return None


def count_prompt(body: Mapping[str, Any], chat: bool, counter: TokenCounter) -> int:
    """Prompt tokens of an OpenAI request body as the engine counts them (0 if malformed: the engine will refuse it).

    A list of token ids counts its length, text goes through ``counter`` (block/engine/tokens.py), chat messages
    through ``counter.count_chat``. The count is corrected from ``usage.prompt_tokens`` when the engine reports it.
    """
    try:
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                return 0
            contents = []
            for m in msgs:
                if not isinstance(m, dict):
                    return 0
                text = message_text(m.get("content"))
                if text is None:
                    return 0
                contents.append(text)
            return counter.count_chat(contents)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return counter.count_text(prompt)
        if isinstance(prompt, list):
            return len(prompt)
    except Exception:  # noqa: BLE001 - hostile input must not break the proxy; the engine answers it
        return 0
    return 0


class Tracked:
    """One proxied request in flight."""

    __slots__ = ("id", "arrival_s", "prompt", "expected", "max_tokens", "decoded", "prompt_exact", "upstream_id",
                 "stream", "chat", "first_token_s", "last_token_s")

    def __init__(self, id: int, arrival_s: float, prompt: int, expected: int, max_tokens: Optional[int],
                 stream: bool, chat: bool) -> None:
        self.id = id
        self.arrival_s = arrival_s
        self.prompt = prompt
        self.expected = expected
        self.max_tokens = max_tokens
        self.decoded = 0
        self.prompt_exact = False
        self.upstream_id: Optional[str] = None
        self.stream = stream
        self.chat = chat
        self.first_token_s: Optional[float] = None
        self.last_token_s: Optional[float] = None


class Tracker:
    """The requests in flight through one predictor, in arrival order; builds the proxy-mode ``InstanceState``."""

    def __init__(self, max_model_len: int, clock=time.monotonic) -> None:
        self.max_model_len = max_model_len
        self.clock = clock
        self.t0 = clock()
        self.entries: dict[int, Tracked] = {}
        self.next_id = 0
        self.version = 0  # bumped on every change (cheap cache key)

    def now(self) -> float:
        return self.clock() - self.t0

    def add(self, body: Mapping[str, Any], headers: Mapping[str, str], chat: bool, counter: TokenCounter) -> Tracked:
        prompt = count_prompt(body, chat, counter)
        mt = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
            else body.get("max_tokens")
        max_tokens = _as_int(mt)
        if max_tokens is not None and max_tokens < 1:
            max_tokens = None
        hint = _as_int(body.get("expected_output_tokens"))
        if hint is None:
            hint = _as_int(headers.get(EXPECTED_HEADER))
        if hint is not None and hint < 1:
            hint = None
        default = max_tokens if max_tokens is not None else max(1, self.max_model_len - prompt)
        expected = min(hint, default) if hint is not None else default  # the engine stops at max_tokens
        expected = min(expected, max(1, self.max_model_len - prompt))  # ... and at the model's length
        t = Tracked(self.next_id, self.now(), prompt, max(1, expected), max_tokens, bool(body.get("stream") is True),
                    chat)
        self.next_id += 1
        self.entries[t.id] = t
        self.version += 1
        return t

    def remove(self, t: Tracked) -> None:
        if self.entries.pop(t.id, None) is not None:
            self.version += 1

    def progress(self, t: Tracked, new_tokens: int, prompt_tokens: Optional[int] = None,
                 completion_tokens: Optional[int] = None, upstream_id: Optional[str] = None) -> None:
        changed = False
        if upstream_id and t.upstream_id is None:
            t.upstream_id = upstream_id
        if prompt_tokens is not None and prompt_tokens > 0 and (prompt_tokens != t.prompt or not t.prompt_exact):
            t.prompt = prompt_tokens
            t.prompt_exact = True
            changed = True
        d = t.decoded + new_tokens
        if completion_tokens is not None and completion_tokens >= 0:
            d = completion_tokens  # the engine's own count (several tokens may share a chunk)
        if d != t.decoded:
            now = self.now()
            if t.decoded == 0 and d > 0:
                t.first_token_s = now
            t.last_token_s = now
            t.decoded = d
            changed = True
        if changed:
            self.version += 1

    # ------------------------------------------------------------------ state
    def counts(self) -> tuple[int, int]:
        """(with tokens, without tokens) -- the tracked running/waiting split before /metrics corrections."""
        with_tok = sum(1 for t in self.entries.values() if t.decoded > 0)
        return with_tok, len(self.entries) - with_tok

    def build_state(self, config: EngineConfig, total_blocks: int, load: Optional[VllmLoad] = None,
                    num_preemptions: int = 0, load_t: Optional[float] = None) -> InstanceState:
        """The proxy-mode ``InstanceState`` (module docstring).

        ``load`` is a fresh /metrics reading taken at ``load_t`` (this tracker's clock; None = now). Only requests
        that had arrived by then can be the running prefills it implies, and only decodes with no token since then
        can be the preempted ones (a token after the reading proves the request was running).
        """
        entries = list(self.entries.values())
        n_dec = sum(1 for t in entries if t.decoded > 0)
        n_fresh = len(entries) - n_dec
        prefills = preempted = 0
        lt = self.now() if load_t is None else load_t
        if load is not None and load.num_running is not None:
            r_m = int(load.num_running)
            extra = r_m - n_dec
            if extra > 0:
                prefills = min(extra, sum(1 for t in entries if t.decoded == 0 and t.arrival_s <= lt))
            elif extra < 0 and load.num_waiting is not None and int(load.num_waiting) > n_fresh:
                stalled = 0  # the newest decodes with no token since the reading
                for t in reversed(entries):
                    if t.decoded > 0:
                        if t.last_token_s is not None and t.last_token_s >= lt:
                            break
                        stalled += 1
                preempted = min(-extra, int(load.num_waiting) - n_fresh, stalled)
        bs = config.block_size
        prefill_holds_prompt = getattr(config, "scheduler", "v0") != "v1"
        running: list[SeqState] = []
        waiting: list[SeqState] = []
        held = 0
        dec_left = n_dec - preempted  # the first (oldest) dec_left decodes stay running
        pre_q: list[SeqState] = []
        for t in entries:
            if t.decoded > 0:
                exp = t.expected
                if dec_left > 0:
                    dec_left -= 1
                    c = t.prompt + t.decoded - 1
                    held += -(-c // bs)
                    running.append(SeqState(t.id, t.prompt, exp, c, t.decoded, t.arrival_s))
                else:
                    pre_q.append(SeqState(t.id, t.prompt, exp, 0, t.decoded, t.arrival_s))
            elif prefills > 0:
                prefills -= 1
                if prefill_holds_prompt:  # V0 allocates a prefill's whole prompt; V1 per computed chunk (0 here)
                    held += -(-t.prompt // bs)
                running.append(SeqState(t.id, t.prompt, t.expected, 0, 0, t.arrival_s))
            else:
                waiting.append(SeqState(t.id, t.prompt, t.expected, 0, 0, t.arrival_s))
        if pre_q:
            pre_q.reverse()  # vLLM re-queues preempted requests at the front, the last preempted first
            waiting = pre_q + waiting
        return InstanceState(running=running, waiting=waiting, free_blocks=max(0, total_blocks - held),
                             total_blocks=total_blocks, num_preemptions=num_preemptions, config=config,
                             now_s=self.now(), busy_for_s=0.0)


def config_with_blocks(config: EngineConfig, num_blocks: Optional[int], block_size: Optional[int]) -> EngineConfig:
    changes: dict[str, int] = {}
    if num_blocks and num_blocks != config.num_blocks:
        changes["num_blocks"] = int(num_blocks)
    if block_size and block_size != config.block_size:
        changes["block_size"] = int(block_size)
    return dataclasses.replace(config, **changes) if changes else config


# ---------------------------------------------------------------------------------------------------------------
# SSE chunks (the stream format itself is read by block/sse.py)
# ---------------------------------------------------------------------------------------------------------------


def chunk_progress(obj: Any) -> tuple[int, Optional[int], Optional[int], Optional[str], Optional[Any]]:
    """(1 if the chunk carries non-empty output else 0, usage.prompt_tokens, usage.completion_tokens, id, error)."""
    if not isinstance(obj, dict):
        return 0, None, None, None, None
    err = error_of(obj)
    if err is not None:
        return 0, None, None, None, err
    n = 1 if has_output(obj) else 0
    pt = ct = None
    u = obj.get("usage")
    if isinstance(u, dict):
        pt = _as_int(u.get("prompt_tokens"))
        ct = _as_int(u.get("completion_tokens"))
    rid = obj.get("id")
    return n, pt, ct, rid if isinstance(rid, str) else None, None


def shape_usage(obj: dict[str, Any], chat: bool, include_usage: bool) -> Optional[dict[str, Any]]:
    """A chunk as the engine sends it without ``continuous_usage_stats`` (which the proxy asked for to count tokens
    exactly, and the client did not): ``obj`` itself when nothing changes, a copy without the per-chunk usage
    (``"usage": null`` where the engine writes it -- completions, or chat with ``include_usage`` -- else no key), or
    None for the final usage-only chunk when the client did not ask for ``include_usage``."""
    if not isinstance(obj.get("usage"), dict):
        return obj
    if not obj.get("choices"):
        return obj if include_usage else None
    out = dict(obj)
    if chat and not include_usage:
        del out["usage"]
    else:
        out["usage"] = None
    return out


class Reassembler:
    """Rebuild the non-streaming response (vLLM/OpenAI shape) from the chunks of a forced stream."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.id: Optional[str] = None
        self.created: Optional[int] = None
        self.model: Optional[str] = None
        self.usage: Optional[dict[str, Any]] = None
        self.choices: dict[int, dict[str, Any]] = {}
        self.error: Optional[Any] = None
        self.done = False
        self.extra: dict[str, Any] = {}

    def add(self, obj: Any) -> None:
        if obj == DONE:
            self.done = True
            return
        if not isinstance(obj, dict):
            return
        if obj.get("error") is not None:
            self.error = obj["error"]
            return
        if self.id is None:
            self.id = obj.get("id")
            self.created = obj.get("created")
            self.model = obj.get("model")
            if obj.get("system_fingerprint") is not None:
                self.extra["system_fingerprint"] = obj["system_fingerprint"]
        u = obj.get("usage")
        if isinstance(u, dict):
            self.usage = u
        for c in obj.get("choices") or ():
            if not isinstance(c, dict):
                continue
            idx = c.get("index", 0)
            ch = self.choices.get(idx)
            if ch is None:
                ch = self.choices[idx] = {"parts": [], "finish_reason": None, "stop_reason": None, "role": None}
            if self.chat:
                d = c.get("delta") or {}
                if isinstance(d, dict):
                    if d.get("role"):
                        ch["role"] = d["role"]
                    if d.get("content"):
                        ch["parts"].append(d["content"])
            elif c.get("text"):
                ch["parts"].append(c["text"])
            if c.get("finish_reason") is not None:
                ch["finish_reason"] = c["finish_reason"]
            if c.get("stop_reason") is not None:
                ch["stop_reason"] = c["stop_reason"]

    @property
    def complete(self) -> bool:
        """The answer ended properly: ``[DONE]``, or every choice has its ``finish_reason``."""
        return self.done or (bool(self.choices) and all(ch["finish_reason"] is not None
                                                        for ch in self.choices.values()))

    def response(self) -> dict[str, Any]:
        choices = []
        for idx in sorted(self.choices, key=lambda x: x if isinstance(x, int) else 0):
            ch = self.choices[idx]
            text = "".join(ch["parts"])
            if self.chat:
                choices.append({"index": idx, "message": {"role": ch["role"] or "assistant", "content": text,
                                                          "tool_calls": []},
                                "logprobs": None, "finish_reason": ch["finish_reason"],
                                "stop_reason": ch["stop_reason"]})
            else:
                choices.append({"index": idx, "text": text, "logprobs": None, "finish_reason": ch["finish_reason"],
                                "stop_reason": ch["stop_reason"], "prompt_logprobs": None})
        usage = self.usage
        if usage is not None and "prompt_tokens" in usage:
            pt = usage.get("prompt_tokens")
            ct = usage.get("completion_tokens")
            usage = {"prompt_tokens": pt, "total_tokens": usage.get("total_tokens", (pt or 0) + (ct or 0)),
                     "completion_tokens": ct, "prompt_tokens_details": usage.get("prompt_tokens_details")}
        out = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
               "created": self.created if self.created is not None else int(time.time()), "model": self.model,
               "choices": choices, "usage": usage}
        out.update(self.extra)
        return out

