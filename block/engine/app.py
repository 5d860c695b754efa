"""The emulated engine's HTTP face: vLLM's OpenAI API, /metrics with vLLM's names, and /state.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming or not), ``GET /v1/models``,
``GET /health``, ``GET /version``, ``GET /state`` (the engine's exact ``InstanceState``), ``GET /metrics``.
See docs/services.md ("Emulated engine") for the request fields and the counting conventions.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from block import prom
from block.engine.runner import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    Handle,
    RealTimeEngine,
)
from block.engine.tokens import (
    PromptError,
    count_request_prompt,
    WORDS,
    TokenCounter,
    filler_text,
    token_text,
)
from block.openai_params import check_context, validate_request
from block.service import DEFAULT_MAX_BODY, ServiceError, bad_request, create_app, int_field, read_json, show
from vidur.engine import StepTimeModel
from vidur.types import EngineConfig

EXPECTED_HEADER = "x-expected-output-tokens"
SSE_DONE = "data: [DONE]\n\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


TOKEN_JSON = [_dumps(" " + w) for w in WORDS]  # token i of a request with seed r is TOKEN_JSON[(r + i) % NWORDS]
NWORDS = len(WORDS)


def _sse(obj: Any) -> str:
    return "data: " + _dumps(obj) + "\n\n"


@dataclass
class Params:
    chat: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool
    prompt_tokens: int
    max_tokens: int
    min_tokens: int
    expected: Optional[int]
    seed: Optional[int]
    external_id: str


class EngineService:
    """Glue between HTTP and a :class:`RealTimeEngine`: validation, response shapes, metrics."""

    def __init__(self, config: EngineConfig, model: StepTimeModel, *, served_model_name: str, time_scale: float = 1.0,
                 tokenizer: str = "none", seed: int = 0, vocab_size: Optional[int] = None,
                 abort_on_disconnect: bool = True) -> None:
        self.config = config
        self.served = served_model_name
        self.runner = RealTimeEngine(config, model, time_scale=time_scale, on_event=self._on_event)
        self.counter = TokenCounter(tokenizer)
        self.seed = int(seed)
        self.vocab_size = vocab_size
        self.abort_on_disconnect = abort_on_disconnect
        self.created = int(time.time())
        self._n = 0
        self.max_len = config.max_model_len
        self.max_blocks = config.num_blocks - config.watermark_blocks
        self._labels = {"model_name": self.served, "engine": "0"}
        self._init_metrics()

    # ------------------------------------------------------------------ metrics
    def _init_metrics(self) -> None:
        r = self.registry = prom.Registry()
        ln = ("model_name", "engine")
        lab = self._labels
        self.g_running = r.gauge("vllm:num_requests_running", "Number of requests in model execution batches.", ln)
        self.g_waiting = r.gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", ln)
        self.g_kv = r.gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", ln)
        self.g_info = r.gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                              ("block_size", "cache_dtype", "enable_prefix_caching", "engine", "model_name",
                               "num_gpu_blocks", "watermark"))
        self.g_info.set(1.0, block_size=str(self.config.block_size), cache_dtype="auto",
                        enable_prefix_caching="False", engine="0", model_name=self.served,
                        num_gpu_blocks=str(self.config.num_blocks), watermark=str(self.config.watermark))
        self.c_preempt = r.counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", ln)
        self.c_prompt = r.counter("vllm:prompt_tokens", "Number of prefill tokens processed.", ln)
        self.c_gen = r.counter("vllm:generation_tokens", "Number of generation tokens processed.", ln)
        self.c_success = r.counter("vllm:request_success", "Count of successfully processed requests.",
                                   ln + ("finished_reason",))
        for c in (self.c_preempt, self.c_prompt, self.c_gen):
            c.touch(**lab)
        for reason in ("stop", "length", "abort"):
            self.c_success.touch(**lab, finished_reason=reason)
        tok_buckets = prom.build_1_2_5_buckets(self.max_len)
        self.h_prompt = r.histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                    tok_buckets, ln)
        self.h_gen = r.histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                 tok_buckets, ln)
        self.h_ttft = r.histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                  prom.TTFT_BUCKETS, ln)
        self.h_e2e = r.histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                                 prom.REQUEST_LATENCY_BUCKETS, ln)
        self.h_queue = r.histogram("vllm:request_queue_time_seconds",
                                   "Histogram of time spent in WAITING phase for request.",
                                   prom.REQUEST_LATENCY_BUCKETS, ln)
        for h in (self.h_prompt, self.h_gen, self.h_ttft, self.h_e2e, self.h_queue):
            h.touch(**lab)

    def _on_event(self, kind: str, h: Handle, n: int) -> None:
        lab = self._labels
        if kind == "tokens":
            if h.emitted == n:  # the first tokens of this request: its prefill is done
                self.c_prompt.inc(h.prompt_tokens, **lab)
                self.h_ttft.observe(h.first_token_wall - h.arrival_wall, **lab)  # type: ignore[operator]
                s = h.seq
                if s is not None and s.first_sched is not None:
                    self.h_queue.observe(max(0.0, s.first_sched - s.arrival) / self.runner.scale, **lab)
            self.c_gen.inc(n, **lab)
        elif kind == "finish":
            reason = "length" if h.finish_reason == FINISH_LENGTH else "abort"
            self.c_success.inc(1, **lab, finished_reason=reason)
            if reason == "length":
                self.h_e2e.observe(h.finish_wall - h.arrival_wall, **lab)  # type: ignore[operator]
                self.h_prompt.observe(h.prompt_tokens, **lab)
                self.h_gen.observe(h.emitted, **lab)

    def render_metrics(self) -> str:
        running, waiting, free, total, preempt = self.runner.counts()
        lab = self._labels
        self.g_running.set(running, **lab)
        self.g_waiting.set(waiting, **lab)
        self.g_kv.set((total - free) / total if total else 0.0, **lab)
        self.c_preempt.set_total(preempt, **lab)  # the runner keeps the total
        return self.registry.render()

    # ------------------------------------------------------------------ request parsing
    def _count_prompt(self, body: Mapping[str, Any], chat: bool) -> int:
        try:
            return count_request_prompt(self.counter, body, chat, self.vocab_size)
        except PromptError as err:
            raise bad_request(str(err)) from None

    def parse(self, body: Mapping[str, Any], headers: Mapping[str, str], chat: bool) -> Params:
        """vLLM's validation (``block.openai_params``: the scheduler in front applies the same), then what only
        this engine knows: its model name, its context length, its KV cache."""
        r = validate_request(body, chat, self.vocab_size)
        model = body.get("model")
        if model is not None and model != self.served:
            raise ServiceError(404, f"The model `{show(model)}` does not exist.", "NotFoundError")
        if r.n != 1:
            raise bad_request(f"n={r.n} is not supported: the emulated engine generates one choice (n=1)")
        exp = body.get("expected_output_tokens")
        if exp is None and headers.get(EXPECTED_HEADER) is not None:
            exp = headers.get(EXPECTED_HEADER)
        expected = int_field("expected_output_tokens", exp, lo=1)
        prompt = self._count_prompt(body, chat)
        max_tokens = check_context(r, prompt, self.max_len)
        min_tokens = r.min_tokens
        bs = self.config.block_size
        need = math.ceil((prompt + max_tokens) / bs)
        if need > self.max_blocks:
            raise bad_request(f"request needs {need} KV blocks ({prompt} prompt + {max_tokens} output tokens, "
                              f"block_size {bs}) but this engine can hold at most {self.max_blocks}")
        base = headers.get("x-request-id") or uuid.uuid4().hex
        ext = ("chatcmpl-" if chat else "cmpl-") + base
        return Params(chat=chat, stream=r.stream, include_usage=r.include_usage, continuous_usage=r.continuous_usage,
                      prompt_tokens=prompt, max_tokens=max_tokens, min_tokens=min_tokens, expected=expected,
                      seed=r.seed, external_id=ext)

    # ------------------------------------------------------------------ responses
    def submit(self, p: Params) -> Handle:
        self._n += 1
        seed = p.seed if p.seed is not None else (self.seed * 7919 + self._n) % (1 << 31)
        if self.runner.failed:
            raise ServiceError(503, self.runner.failed, "ServiceUnavailableError")
        return self.runner.submit(p.prompt_tokens, p.max_tokens, external_id=p.external_id, expected=p.expected,
                                  seed=seed)

    @staticmethod
    def _usage(h: Handle) -> dict[str, Any]:
        return {"prompt_tokens": h.prompt_tokens, "total_tokens": h.prompt_tokens + h.emitted,
                "completion_tokens": h.emitted, "prompt_tokens_details": None}

    def _chunk(self, p: Params, h: Handle, created: int, choice: Optional[dict[str, Any]],
               usage: Optional[dict[str, Any]] = None) -> str:
        obj: dict[str, Any] = {
            "id": h.external_id, "object": "chat.completion.chunk" if p.chat else "text_completion",
            "created": created, "model": self.served, "choices": [] if choice is None else [choice],
        }
        if usage is not None or not p.chat or p.include_usage:
            obj["usage"] = usage
        return _sse(obj)

    def _choice(self, p: Params, text: Optional[str], finish: Optional[str], role: bool = False) -> dict[str, Any]:
        if p.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}

    def _token_template(self, p: Params, h: Handle, created: int) -> tuple[str, str]:
        """(head, tail) of a plain token chunk: ``head + json(text) + tail`` equals ``_chunk`` (the hot path)."""
        marker = "\u0000MARK\u0000"
        full = self._chunk(p, h, created, self._choice(p, marker, None))
        head, tail = full.split(_dumps(marker), 1)
        return head, tail

    async def stream(self, p: Params, h: Handle) -> AsyncIterator[str]:
        created = int(time.time())
        idx = 0
        first = True
        head, tail = self._token_template(p, h, created)
        fast = not p.continuous_usage
        try:
            while True:
                n, reason = await h.queue.get()
                parts = []
                if p.chat and first and (n > 0 or reason is not None):
                    parts.append(self._chunk(p, h, created, self._choice(p, None, None, role=True)))
                    first = False
                last = n - 1 if reason is not None else n
                if fast and last > 0:
                    parts.extend(head + TOKEN_JSON[(h.seed + j) % NWORDS] + tail for j in range(idx, idx + last))
                    idx += last
                    n -= last
                for i in range(n):
                    fr = reason if (reason is not None and i == n - 1) else None
                    cu = None
                    if p.continuous_usage:
                        cu = {"prompt_tokens": h.prompt_tokens, "total_tokens": h.prompt_tokens + idx + 1,
                              "completion_tokens": idx + 1}
                    parts.append(self._chunk(p, h, created, self._choice(p, token_text(h.seed, idx), fr), cu))
                    idx += 1
                if reason is not None:
                    if reason == FINISH_ERROR:
                        parts.append(_sse({"error": {"message": h.error or "engine error",
                                                     "type": "InternalServerError", "code": 500}}))
                    elif n == 0:
                        parts.append(self._chunk(p, h, created, self._choice(p, "", reason)))
                    if p.include_usage:
                        parts.append(self._chunk(p, h, created, None, self._usage(h)))
                    parts.append(SSE_DONE)
                    yield "".join(parts)
                    return
                if parts:
                    yield "".join(parts)
        finally:
            if not h.finished and self.abort_on_disconnect:
                self.runner.abort(h)

    async def wait(self, h: Handle, request: Request) -> bool:
        """Wait until ``h`` finishes; if the client disconnects first, abort it (vLLM does) and return False."""

        async def disconnected() -> None:
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    return

        done = asyncio.ensure_future(h.done.wait())
        gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (done, gone):
                if not t.done():
                    t.cancel()
        if not h.finished:
            if self.abort_on_disconnect:
                self.runner.abort(h)
            return False
        return True

    def full_response(self, p: Params, h: Handle) -> dict[str, Any]:
        text = filler_text(h.seed, h.emitted)
        reason = h.finish_reason if h.finish_reason in (FINISH_LENGTH, FINISH_ABORT) else None
        if p.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                      "logprobs": None, "finish_reason": reason, "stop_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None,
                      "prompt_logprobs": None}
        return {"id": h.external_id, "object": "chat.completion" if p.chat else "text_completion",
                "created": int(time.time()), "model": self.served, "choices": [choice], "usage": self._usage(h)}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.served, "object": "model", "created": self.created, "owned_by": "vllm", "root": self.served,
            "parent": None, "max_model_len": self.max_len,
            "permission": [{"id": f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, self.served).hex}",
                            "object": "model_permission", "created": self.created, "allow_create_engine": False,
                            "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False,
                            "allow_view": True, "allow_fine_tuning": False, "organization": "*", "group": None,
                            "is_blocking": False}],
        }]}

    def state(self) -> dict[str, Any]:
        st, _ = self.runner.snapshot()
        d = st.to_dict()
        handles = self.runner.handles
        d["request_ids"] = {str(s.id): handles[s.id].external_id for s in st.running + st.waiting if s.id in handles}
        d["time_scale"] = self.runner.scale
        d["model"] = self.served
        d["num_steps"] = self.runner.engine.num_steps
        return d

    def health(self) -> dict[str, Any]:
        return {"model": self.served, "time_scale": self.runner.scale,
                "engine_loop": "failed" if self.runner.failed else "ok"}


def build_app(service: EngineService, token: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    app = create_app("block emulated engine", token=token, max_body_bytes=max_body_bytes, health=service.health)
    app.state.engine_service = service

    async def _generate(request: Request, chat: bool) -> Response:
        body = await read_json(request)
        p = service.parse(body, request.headers, chat)
        h = service.submit(p)
        if p.stream:
            return StreamingResponse(service.stream(p, h), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if not await service.wait(h, request):
            return JSONResponse({"error": {"message": "client disconnected", "type": "ClientDisconnected",
                                           "code": 499}}, status_code=499)
        if h.finish_reason == FINISH_ERROR:
            raise ServiceError(500, h.error or "engine error", "InternalServerError")
        return JSONResponse(service.full_response(p, h))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return service.models()

    @app.get("/version")
    async def version() -> dict[str, Any]:
        return {"version": "block-emulated"}

    @app.get("/state")
    async def state() -> dict[str, Any]:
        return service.state()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.render_metrics(), media_type=prom.CONTENT_TYPE)

    async def _shutdown() -> None:
        await service.runner.stop()

    hooks = getattr(app.router, "on_shutdown", None)  # FastAPI's default lifespan runs these
    if isinstance(hooks, list):
        hooks.append(_shutdown)

    return app
