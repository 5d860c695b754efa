"""The predictor side-car's HTTP face: a pass-through proxy for one engine, the what-if ``/predict``, load figures.

Endpoints (docs/services.md, "Predictor side-car"):

- ``POST /v1/completions``, ``POST /v1/chat/completions`` -- forwarded to the engine (streaming preserved chunk by
  chunk; the engine's status codes and JSON errors passed through); every request is tracked while in flight.
  Streams are requested with ``continuous_usage_stats`` (exact token counts; stripped again for the client) and a
  non-streaming request is sent upstream as a stream and reassembled, so the predictor sees its progress too.
  No silent loss (docs/services.md, "Proxy"): an answer counts only if it ended properly ([DONE] or finish_reason).
  Before the first token a failure is a prompt 502/503 ``engine_unavailable`` (nothing reached the client: the
  scheduler may retry elsewhere); after it, 502 ``engine_failed`` (non-streaming) or an SSE error event and [DONE];
  an in-stream error with a 4xx code is the client's (that status, or the event relayed). While the engine is known
  to be down, ``/predict``, ``/stats`` and the proxy answer 503 ``engine_down`` at once.
- ``GET /v1/models`` -- passthrough.
- ``POST /predict`` -- ``vidur.whatif.predict`` on the current state -> ``Prediction.to_dict()``.
- ``GET /stats`` (``InstanceStats``), ``GET /state`` (the ``InstanceState`` used, plus source and age),
  ``GET /metrics`` (Prometheus), ``GET /health``.
- ``POST /debug/state`` / ``DELETE /debug/state`` -- only with ``--debug-allow-state-injection``.

Everything runs on one asyncio loop (no locks); the what-if is synchronous and takes well under a millisecond.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import time
from typing import Any, Awaitable, Optional

import anyio
import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from block import prom
from block.engine.tokens import TokenCounter
from block.predictor.tracker import (
    Reassembler,
    Tracked,
    Tracker,
    chunk_progress,
    config_with_blocks,
    shape_usage,
)
from block.sse import DONE, SSE_DONE, SSEScanner, client_error_status, error_event, error_message, parse_payload
from block.service import DEFAULT_MAX_BODY, ServiceError, create_app, int_field, json_object, loads_json, show
from vidur.engine import Engine, StepTimeModel
from vidur.types import EngineConfig, InstanceState, InstanceStats, Request as VRequest
from vidur.whatif import predict

log = logging.getLogger("block.predictor")

JSON = "application/json"
BIG = 1e18  # stands for "never" (a request that can never fit): JSON has no infinity
PREDICT_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
OUTCOMES = ("ok", "client_error", "engine_error", "unavailable", "failed_midstream", "client_disconnect",
            "bad_request")
DROP_REQ_HEADERS = frozenset((
    b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"te", b"trailer", b"upgrade",
    b"proxy-authorization", b"proxy-connection", b"accept-encoding", b"authorization", b"expect",
))
PASS_RESP_HEADERS = ("x-request-id",)
NOT_FORCEABLE = ("logprobs", "top_logprobs", "echo", "prompt_logprobs", "tools", "functions", "best_of")


def _err(status: int, message: str, type_: str, code: Any = None) -> Response:
    return Response(orjson.dumps({"error": {"message": message, "type": type_, "code": code or status}}),
                    status_code=status, media_type=JSON)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type=JSON)


def _pos_int(name: str, v: Any) -> int:
    """A required integer >= 1 (block.service.int_field: integral floats too, 64-bit bound); no digit strings."""
    if v is None:
        raise ServiceError(400, f"{name} is required")
    if isinstance(v, str):
        raise ServiceError(400, f"{name} must be an integer, got {show(v)}")
    return int_field(name, v, lo=1)  # type: ignore[return-value]


def parse_predict(raw: bytes) -> tuple[int, int]:
    """(prompt tokens, expected output tokens) of a /predict body; ours or Block's field names. 400 on bad input."""
    d = json_object(raw)  # bounded: block.service.loads_json
    p = d.get("prompt_tokens")
    name_p = "prompt_tokens"
    if p is None and "num_context_tokens" in d:
        p, name_p = d.get("num_context_tokens"), "num_context_tokens"
    e = d.get("expected_output_tokens")
    name_e = "expected_output_tokens"
    if e is None and "num_decode_tokens" in d:
        e, name_e = d.get("num_decode_tokens"), "num_decode_tokens"
    return _pos_int(name_p, p), _pos_int(name_e, e)


METRIC_PREFIXES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:gpu_cache_usage_perc", "vllm:num_preemptions_total", "vllm:cache_config_info")


def metrics_subset(text: str) -> str:
    """The lines of a /metrics scrape that VllmLoad needs (parsing all of vLLM's histograms takes ~1 ms)."""
    return "\n".join(line for line in text.splitlines() if line.startswith(METRIC_PREFIXES))


def rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Upstream(Exception):
    """The engine could not be reached or did not answer: status 502 (transport) or 503 (timeout)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PredictorService:
    """State tracking, state sources, what-if and the proxy for one engine."""

    def __init__(self, config: EngineConfig, model: StepTimeModel, *, engine_url: str,
                 engine_token: Optional[str] = None, state_source: str = "proxy", metrics_interval_s: float = 0.5,
                 state_interval_s: float = 0.05, connect_timeout_s: float = 2.0, read_timeout_s: float = 300.0,
                 instance_id: int = 0, overrun_tokens: int = 10, tokenizer: str = "none", force_stream: bool = True,
                 continuous_usage: bool = True, num_blocks_fixed: bool = False, engine_down_after_s: float = 0.0,
                 allow_state_injection: bool = False, forward_client_auth: bool = False,
                 clock=time.monotonic) -> None:
        if state_source not in ("proxy", "engine"):
            raise ValueError(f"state source {state_source!r}: use 'proxy' or 'engine'")
        self.config = config
        self.model = model
        self.engine_url = engine_url.rstrip("/")
        self.engine_token = engine_token
        self.state_source = state_source
        self.metrics_interval_s = max(0.0, metrics_interval_s)
        self.state_interval_s = max(0.0, state_interval_s)
        self.timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s,
                                     pool=connect_timeout_s)
        self.poll_timeout = httpx.Timeout(max(connect_timeout_s, 2.0))
        self.instance_id = instance_id
        self.overrun = overrun_tokens
        self.counter = TokenCounter(tokenizer)
        self.force_stream = force_stream
        self.continuous_usage = continuous_usage
        self.num_blocks_fixed = num_blocks_fixed
        self.allow_injection = allow_state_injection
        self.forward_client_auth = forward_client_auth
        self.clock = clock
        poll = self.state_interval_s if state_source == "engine" else self.metrics_interval_s
        self.liveness_interval_s = poll if poll > 0 else 1.0
        self.down_after_s = engine_down_after_s if engine_down_after_s > 0 else max(3.0, 5 * self.liveness_interval_s)
        self.tracker = Tracker(config.max_model_len, clock)
        self.client: Optional[httpx.AsyncClient] = None
        self._task: Optional[asyncio.Task] = None
        # engine liveness
        self.last_ok: Optional[float] = None
        self.last_err: Optional[float] = None
        self.last_err_msg: Optional[str] = None
        # /metrics of the engine (proxy mode)
        self.metrics_supported = self.metrics_interval_s > 0
        self.load: Optional[prom.VllmLoad] = None
        self.load_at: Optional[float] = None
        self.load_version = 0
        # /state of the engine (engine mode)
        self.engine_state: Optional[InstanceState] = None
        self.engine_state_at: Optional[float] = None
        self.engine_state_extra: dict[str, Any] = {}
        self.engine_state_version = 0
        self._fetching: Optional[asyncio.Future] = None
        # injected state (benchmarks / debugging)
        self.injected: Optional[InstanceState] = None
        self.injected_at: Optional[float] = None
        # proxy-state cache
        self._cache_key: Optional[tuple[int, int]] = None
        self._cache_state: Optional[InstanceState] = None
        self._init_metrics()

    # ------------------------------------------------------------------ lifecycle
    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.engine_token}"} if self.engine_token else {}

    async def start(self) -> None:
        gc.freeze()  # startup objects (pandas, the execution model) out of the collector's way: shorter GC pauses
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.timeout, headers=self._headers(),
                                            limits=httpx.Limits(max_connections=4096, max_keepalive_connections=512,
                                                                keepalive_expiry=30.0))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll_loop(), name="block-predictor-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
            self._task = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # ------------------------------------------------------------------ engine liveness
    def mark_ok(self) -> None:
        self.last_ok = self.clock()

    def mark_err(self, msg: str) -> None:
        self.last_err = self.clock()
        self.last_err_msg = msg

    def engine_ok(self) -> bool:
        if self.last_ok is None:
            return False
        if self.last_err is not None and self.last_err >= self.last_ok:
            return False
        return self.clock() - self.last_ok <= self.down_after_s

    def engine_down(self) -> bool:
        """The engine is known to be down: its latest news is a failure, or it has been silent for ``down_after_s``.

        While it is, the instance is unavailable: ``/predict``, ``/stats`` and the proxy answer 503 ``engine_down``
        at once, so a scheduler leaves it out when probing instead of paying a failed forward per request. The poll
        loop (every ``liveness_interval_s``) brings it back as soon as the engine answers. Nothing heard yet (just
        started) is not "down": the first poll or request decides.
        """
        if self.last_err is not None and (self.last_ok is None or self.last_err >= self.last_ok):
            return True
        return self.last_ok is not None and self.clock() - self.last_ok > self.down_after_s

    def check_available(self) -> None:
        """Raise the 503 ``engine_down`` error while the engine is down (an injected state answers regardless)."""
        if self.injected is None and self.engine_down():
            raise ServiceError(503, f"engine at {self.engine_url} is down ({self.last_err_msg or 'no answer'}); "
                                    f"this instance is unavailable until it answers again", "engine_down")

    # ------------------------------------------------------------------ polling
    async def _poll_loop(self) -> None:
        while True:
            t0 = self.clock()
            try:
                if self.state_source == "engine" and self.state_interval_s > 0:
                    await self.fetch_engine_state()
                elif self.state_source == "proxy" and self.metrics_supported:
                    await self.poll_metrics()
                else:
                    await self.ping()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - keep polling; staleness is reported
                self.mark_err(f"{type(err).__name__}: {err}")
            await asyncio.sleep(max(0.0, self.liveness_interval_s - (self.clock() - t0)))

    async def _get(self, path: str) -> httpx.Response:
        assert self.client is not None
        try:
            r = await self.client.get(self.engine_url + path, timeout=self.poll_timeout)
        except httpx.HTTPError as err:
            self.mark_err(f"GET {path}: {type(err).__name__}: {err}")
            raise
        return r

    async def ping(self) -> None:
        r = await self._get("/health")
        if r.status_code == 404:
            r = await self._get("/v1/models")
        if r.status_code < 500:
            self.mark_ok()
        else:
            self.mark_err(f"GET /health: HTTP {r.status_code}")

    async def poll_metrics(self) -> None:
        r = await self._get("/metrics")
        if r.status_code == 404:  # an OpenAI server without /metrics: liveness pings only
            self.metrics_supported = False
            self.mark_ok()
            return
        if r.status_code != 200:
            self.mark_err(f"GET /metrics: HTTP {r.status_code}")
            return
        self.mark_ok()
        try:
            load = prom.VllmLoad.from_metrics(metrics_subset(r.text))
        except prom.PromParseError as err:
            self.mark_err(f"GET /metrics: {err}")
            return
        self.load, self.load_at = load, self.clock()
        self.load_version += 1
        if not self.num_blocks_fixed and (load.num_gpu_blocks or load.block_size):
            self.config = config_with_blocks(self.config, load.num_gpu_blocks, load.block_size)

    async def fetch_engine_state(self) -> None:
        """GET {engine}/state (concurrent callers share one fetch); keeps the last good state on failure."""
        if self._fetching is not None:
            await asyncio.shield(self._fetching)
            return
        fut = self._fetching = asyncio.get_running_loop().create_future()
        try:
            r = await self._get("/state")
            if r.status_code != 200:
                self.mark_err(f"GET /state: HTTP {r.status_code}")
                return
            self.mark_ok()
            try:
                d = orjson.loads(r.content)
                st = InstanceState.from_dict(d)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                self.mark_err(f"GET /state: unreadable state ({type(err).__name__}: {err})")
                return
            self.engine_state, self.engine_state_at = st, self.clock()
            self.engine_state_extra = {k: d[k] for k in ("time_scale", "model", "num_steps", "request_ids")
                                       if k in d}
            self.engine_state_version += 1
        except httpx.HTTPError:
            return
        finally:
            self._fetching = None
            fut.set_result(None)

    # ------------------------------------------------------------------ state
    def _fresh_load(self) -> Optional[prom.VllmLoad]:
        if self.load is None or self.load_at is None:
            return None
        if self.clock() - self.load_at > max(1.0, 4 * self.metrics_interval_s):
            return None
        return self.load

    def proxy_state(self) -> InstanceState:
        load = self._fresh_load()
        key = (self.tracker.version, self.load_version if load is not None else -1)
        if key != self._cache_key or self._cache_state is None:
            pre = int(load.num_preemptions) if load is not None and load.num_preemptions is not None else 0
            lt = (self.load_at - self.tracker.t0) if load is not None and self.load_at is not None else None
            self._cache_state = self.tracker.build_state(self.config, self.config.num_blocks, load, pre, lt)
            self._cache_key = key
        else:
            self._cache_state.now_s = self.tracker.now()
        return self._cache_state

    async def current_state(self) -> tuple[InstanceState, str, float]:
        """(state, source, age in seconds): injected > engine (last good) > proxy tracking."""
        if self.injected is not None:
            return self.injected, "injected", self.clock() - (self.injected_at or self.clock())
        if self.state_source == "engine":
            if self.state_interval_s <= 0:
                await self.fetch_engine_state()
            if self.engine_state is not None:
                return self.engine_state, "engine", self.clock() - (self.engine_state_at or 0.0)
            return self.proxy_state(), "proxy-fallback", 0.0
        return self.proxy_state(), "proxy", 0.0

    def stats_of(self, st: InstanceState) -> InstanceStats:
        s = Engine.from_state(st, self.model, overrun_tokens=self.overrun).stats()
        s.instance_id = self.instance_id
        return s

    # ------------------------------------------------------------------ metrics
    def _init_metrics(self) -> None:
        r = self.registry = prom.Registry()
        self.c_pred = r.counter("block_predictor_predictions", "Predictions served by /predict.")
        self.h_pred = r.histogram("block_predictor_predict_seconds", "Time inside the /predict handler (seconds).",
                                  PREDICT_BUCKETS)
        self.c_proxied = r.counter("block_predictor_proxied_requests", "Requests proxied to the engine, by outcome.",
                                   ("outcome",))
        self.g_running = r.gauge("block_predictor_requests_running", "Running requests in the predictor's state.")
        self.g_waiting = r.gauge("block_predictor_requests_waiting", "Waiting requests in the predictor's state.")
        self.g_tracked = r.gauge("block_predictor_tracked_requests", "Proxied requests in flight.")
        self.g_free = r.gauge("block_predictor_free_blocks", "Free KV blocks in the predictor's state.")
        self.g_age = r.gauge("block_predictor_state_age_seconds", "Age of the state the predictor uses.")
        self.g_up = r.gauge("block_predictor_engine_up", "1 if the engine answered recently.")
        self.g_rss = r.gauge("process_resident_memory_bytes", "Resident memory size in bytes.")
        self.h_pred.touch()
        self.c_pred.touch()
        for o in OUTCOMES:
            self.c_proxied.touch(outcome=o)

    async def render_metrics(self) -> str:
        st, _, age = await self.current_state()
        self.g_running.set(len(st.running))
        self.g_waiting.set(len(st.waiting))
        self.g_free.set(st.free_blocks)
        self.g_tracked.set(len(self.tracker.entries))
        self.g_age.set(age)
        self.g_up.set(1.0 if self.engine_ok() else 0.0)
        rss = rss_bytes()
        if rss is not None:
            self.g_rss.set(rss)
        return self.registry.render()

    def health(self) -> dict[str, Any]:
        now = self.clock()
        ok = self.engine_ok()
        age = None
        if self.injected is not None:
            age = now - (self.injected_at or now)
        elif self.state_source == "engine" and self.engine_state_at is not None:
            age = now - self.engine_state_at
        down = self.engine_down()
        return {"status": "ok" if ok else "degraded", "engine_url": self.engine_url, "engine_ok": ok,
                "engine_down": down, "available": not down or self.injected is not None,
                "engine_last_ok_s_ago": None if self.last_ok is None else round(now - self.last_ok, 3),
                "engine_last_error": self.last_err_msg if not ok else None, "state_source": self.state_source,
                "state_age_s": age, "tracked_requests": len(self.tracker.entries)}

    # ------------------------------------------------------------------ /predict
    async def predict(self, raw: bytes) -> dict[str, Any]:
        t0 = time.perf_counter()
        prompt, expected = parse_predict(raw)
        self.check_available()
        st, _, _ = await self.current_state()
        lim = st.config.max_model_len
        if prompt >= lim:
            raise ServiceError(400, f"prompt_tokens={prompt} must be below the engine's max_model_len={lim}")
        expected = min(expected, lim - prompt)  # the engine would stop there
        try:
            p = predict(st, VRequest(-2, 0.0, prompt, expected), self.model, instance_id=self.instance_id,
                        overrun_tokens=self.overrun, expected_output_tokens=expected)
        except Exception as err:  # noqa: BLE001 - e.g. an inconsistent injected or engine state
            log.exception("what-if failed")
            raise ServiceError(500, f"what-if failed: {type(err).__name__}: {err}", "server_error") from None
        d = p.to_dict()
        for k in ("e2e_s", "ttft_s", "queue_s"):
            if not math.isfinite(d[k]):
                d[k] = BIG
        dt = time.perf_counter() - t0
        d["predict_ms"] = dt * 1e3
        self.c_pred.inc()
        self.h_pred.observe(dt)
        return d

    # ------------------------------------------------------------------ proxy
    def _fwd_headers(self, request: Request) -> list[tuple[bytes, bytes]]:
        out = []
        for k, v in request.headers.raw:
            lk = k.lower()
            if lk in DROP_REQ_HEADERS:
                if lk == b"authorization" and self.forward_client_auth and not self.engine_token:
                    out.append((k, v))
                continue
            out.append((k, v))
        return out

    async def _open(self, path: str, content: bytes, headers: list[tuple[bytes, bytes]]) -> httpx.Response:
        assert self.client is not None
        req = self.client.build_request("POST", self.engine_url + path, content=content, headers=headers)
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.TimeoutException as err:
            self.mark_err(f"POST {path}: {type(err).__name__}")
            raise Upstream(503, f"engine at {self.engine_url} did not answer in time ({type(err).__name__})") \
                from None
        except httpx.HTTPError as err:
            self.mark_err(f"POST {path}: {type(err).__name__}: {err}")
            raise Upstream(502, f"engine at {self.engine_url} unreachable: {type(err).__name__}: {err}") from None
        self.mark_ok()
        return resp

    def _finish(self, t: Tracked, outcome: str) -> None:
        self.tracker.remove(t)
        self.c_proxied.inc(outcome=outcome)

    def _scan(self, scanner: SSEScanner, chunk: bytes, t: Tracked, ra: Optional[Reassembler] = None,
              shape: Optional[tuple[bool, bool]] = None) -> tuple[bytes, bool, Any]:
        """Feed one upstream chunk: update ``t``'s progress; (the bytes to relay, saw [DONE], error or None).

        ``shape`` = (chat, the client asked include_usage): the proxy asked the engine for per-chunk usage that the
        client did not ask for (:meth:`_usage_request`); it is taken out again (``shape_usage``), so only complete
        events are relayed (an event's rest follows with a later chunk). Without ``shape`` the chunk is relayed as is.
        """
        done = False
        err = None
        items = [(None, p) for p in scanner.feed(chunk)] if shape is None else scanner.events(chunk)
        parts: list[bytes] = []
        for raw, p in items:
            obj = parse_payload(p) if p is not None else None
            if obj == DONE:
                done = True
            if ra is not None:
                ra.add(obj)
            if obj is not None and obj != DONE:
                n, pt, ct, rid, e = chunk_progress(obj)
                if e is not None:
                    err = err if err is not None else e
                elif n or pt is not None or ct is not None or rid:
                    self.tracker.progress(t, n, pt, ct, rid)
            if raw is not None:
                kept = shape_usage(obj, *shape) if isinstance(obj, dict) and shape is not None else obj
                if kept is obj:
                    parts.append(raw)
                elif kept is not None:
                    parts.append(b"data: " + orjson.dumps(kept) + b"\n\n")
        return (chunk if shape is None else b"".join(parts)), done, err

    @staticmethod
    def _resp_headers(resp: httpx.Response) -> dict[str, str]:
        return {k: resp.headers[k] for k in PASS_RESP_HEADERS if k in resp.headers}

    async def _passthrough(self, resp: httpx.Response, t: Tracked) -> Response:
        """The engine's whole (error or plain) answer, status and body as they are."""
        try:
            body = await resp.aread()
        except httpx.HTTPError as err:
            self.mark_err(f"reading answer: {type(err).__name__}")
            self._finish(t, "unavailable")
            return _err(502, f"engine failed while answering: {type(err).__name__}: {err}", "engine_unavailable")
        finally:
            await resp.aclose()
        s = resp.status_code
        self._finish(t, "ok" if s < 400 else "client_error" if s < 500 else "engine_error")
        return Response(body, status_code=s, media_type=resp.headers.get("content-type", JSON),
                        headers=self._resp_headers(resp))

    def _broken(self, t: Tracked, status: int, message: str) -> Response:
        """A non-streaming answer the engine did not finish. Before the first token: ``engine_unavailable``
        (502/503; nothing happened, the scheduler retries elsewhere). After it: 502 ``engine_failed`` (the engine
        did part of the work and failed; the client gets the error, not a silent second run)."""
        if t.decoded == 0:
            self._finish(t, "unavailable")
            return _err(status, f"{message} (before the first token)", "engine_unavailable")
        self._finish(t, "failed_midstream")
        return _err(502, f"{message} (after {t.decoded} tokens)", "engine_failed")

    def _engine_error(self, t: Tracked, err: Any) -> Response:
        """An error event in an answer not relayed yet. An error the engine blames on the request (a 4xx ``code``,
        e.g. vLLM's out-of-vocabulary token id inside an HTTP 200 stream) is answered with that status and the
        engine's error object: the client's fault, never retried. Any other is the engine's failure (_broken)."""
        status = client_error_status(err)
        if status is not None:
            self._finish(t, "client_error")
            return _json({"error": err}, status)
        if t.decoded == 0:
            self._finish(t, "engine_error")
            return _err(502, f"engine failed before the first token: {error_message(err)}", "engine_unavailable")
        self._finish(t, "engine_error")
        return _err(502, f"engine failed after {t.decoded} tokens: {error_message(err)}", "engine_failed")

    async def proxy(self, request: Request, path: str, chat: bool) -> Response:
        raw = await request.body()
        try:
            body = json_object(raw)  # bounded: what we read we can write back (the forced-stream rewrite)
        except ServiceError as err:
            self.c_proxied.inc(outcome="bad_request")
            return _err(400, err.message, "BadRequestError", 400)
        try:
            self.check_available()
        except ServiceError as err:
            self.c_proxied.inc(outcome="unavailable")
            return _err(err.status, err.message, err.type)
        t = self.tracker.add(body, request.headers, chat, self.counter)
        headers = self._fwd_headers(request)
        stream = body.get("stream")
        handed_off = False
        try:
            if stream is True:
                up, shape = self._usage_request(body, raw, chat)
                # watched until the first token too: a client that leaves while the request waits in the engine's
                # queue has it aborted there at once, not after its prefill
                resp = await self._until_disconnect(request, self._stream(path, up, headers, t, shape), t)
                handed_off = isinstance(resp, StreamingResponse)
                return resp
            if stream in (None, False) and self.force_stream and self._forceable(body):
                return await self._until_disconnect(request, self._forced(path, body, headers, t, chat), t)
            return await self._until_disconnect(request, self._plain(path, raw, headers, t), t)
        except Upstream as up:
            self._finish(t, "unavailable")
            return _err(up.status, up.message, "engine_unavailable")
        except Exception as err:  # noqa: BLE001 - a bug must not cost the client a JSON answer
            log.exception("proxying %s failed", path)
            self._finish(t, "engine_error")
            return _err(500, f"predictor error while proxying: {type(err).__name__}: {err}", "server_error")
        finally:
            if not handed_off:
                self.tracker.remove(t)  # no-op when already finished

    def _usage_request(self, body: dict[str, Any], raw: bytes, chat: bool) -> tuple[bytes, Optional[tuple[bool, bool]]]:
        """The upstream body of a streaming request and the usage shape to restore on the way back.

        vLLM may pack several tokens into one chunk, so counting chunks undercounts decode progress. Asking for
        ``continuous_usage_stats`` makes every chunk carry ``usage.completion_tokens`` (exact); what the client did
        not ask for is taken out of the answer again. The body goes as is when the client asked for it itself, when
        its stream_options are not well-formed (the engine judges them) or with ``continuous_usage`` off.
        """
        so = body.get("stream_options")
        if not self.continuous_usage or not (so is None or isinstance(so, dict)):
            return raw, None
        so = so or {}
        inc, cont = so.get("include_usage"), so.get("continuous_usage_stats")
        if inc not in (None, True, False) or cont not in (None, False):
            return raw, None
        try:
            up = orjson.dumps({**body, "stream_options": {**so, "include_usage": True,
                                                         "continuous_usage_stats": True}})
        except (orjson.JSONEncodeError, TypeError):
            return raw, None
        return up, (chat, inc is True)

    @staticmethod
    def _forceable(body: dict[str, Any]) -> bool:
        if body.get("stream_options") is not None:
            return False  # stream_options without stream: let the engine refuse it
        n = body.get("n")
        if n not in (None, 1):
            return False
        return not any(body.get(k) not in (None, False, 0) for k in NOT_FORCEABLE)

    async def _until_disconnect(self, request: Request, work: Awaitable[Response], t: Tracked) -> Response:
        """Run ``work``; if the client goes away first, cancel it (closing the upstream request) and give up."""
        task = asyncio.ensure_future(work)

        async def gone() -> None:
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    return

        watch = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            watch.cancel()
            raise
        if task.done():
            watch.cancel()
            return task.result()
        task.cancel()
        await asyncio.wait({task})  # its finally blocks close the upstream request
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning
        self._finish(t, "client_disconnect")
        return _err(499, "client disconnected", "ClientDisconnected", 499)

    async def _plain(self, path: str, raw: bytes, headers: list, t: Tracked) -> Response:
        resp = await self._open(path, raw, headers)
        return await self._passthrough(resp, t)

    async def _forced(self, path: str, body: dict[str, Any], headers: list, t: Tracked, chat: bool) -> Response:
        """A non-streaming request sent upstream as a stream and reassembled. Only an answer that ended properly
        (``[DONE]``, or every choice finished) is a 200: an engine that closes early (e.g. after a role-only
        chunk) must not become ``200 {"text": "", "finish_reason": null}``, a lost request that looks served."""
        up = dict(body)
        up["stream"] = True
        up["stream_options"] = {"include_usage": True, "continuous_usage_stats": self.continuous_usage}
        resp = await self._open(path, orjson.dumps(up), headers)
        if resp.status_code != 200:
            return await self._passthrough(resp, t)
        ra = Reassembler(chat)
        scanner = SSEScanner()
        err = None
        try:
            async for chunk in resp.aiter_raw():
                _, _, e = self._scan(scanner, chunk, t, ra)
                err = err if err is not None else e
        except httpx.TimeoutException as e:
            self.mark_err(f"POST {path}: {type(e).__name__}")
            return self._broken(t, 503, f"engine at {self.engine_url} stopped answering ({type(e).__name__})")
        except httpx.HTTPError as e:
            self.mark_err(f"POST {path}: {type(e).__name__}: {e}")
            return self._broken(t, 502, f"engine at {self.engine_url} failed mid-request: {type(e).__name__}: {e}")
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()
        if err is not None:
            return self._engine_error(t, err)
        if not ra.complete:
            return self._broken(t, 502, f"engine at {self.engine_url} closed the stream without finishing the answer")
        self._finish(t, "ok")
        return Response(orjson.dumps(ra.response()), media_type=JSON, headers=self._resp_headers(resp))

    async def _stream(self, path: str, raw: bytes, headers: list, t: Tracked,
                      shape: Optional[tuple[bool, bool]] = None) -> Response:
        """Open the upstream stream and hold it until its first token (so a failure before it is retryable): a
        stream that ends before it without ``[DONE]`` -- even after some bytes, e.g. a role-only chunk -- is a 502
        ``engine_unavailable``; an error event before it is answered as :meth:`_engine_error` says."""
        resp = await self._open(path, raw, headers)
        if resp.status_code != 200:
            return await self._passthrough(resp, t)
        scanner = SSEScanner()
        it = resp.aiter_raw()
        buffered: list[bytes] = []
        done = False
        try:
            while t.decoded == 0 and not done:
                try:
                    chunk = await it.__anext__()
                except StopAsyncIteration:  # the engine answered, badly: not a sign that it is down
                    await resp.aclose()
                    raise Upstream(502, f"engine at {self.engine_url} ended the stream before the first token"
                                        + (" without [DONE]" if buffered else "")) from None
                out, done, err = self._scan(scanner, chunk, t, shape=shape)
                if out:
                    buffered.append(out)
                if err is not None and t.decoded == 0:
                    await resp.aclose()
                    return self._engine_error(t, err)
        except httpx.TimeoutException as e:
            await resp.aclose()
            self.mark_err(f"POST {path}: {type(e).__name__}")
            raise Upstream(503, f"engine at {self.engine_url} did not answer in time ({type(e).__name__})") \
                from None
        except httpx.HTTPError as e:
            await resp.aclose()
            self.mark_err(f"POST {path}: {type(e).__name__}: {e}")
            raise Upstream(502, f"engine at {self.engine_url} failed before the first token: "
                                f"{type(e).__name__}: {e}") from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await resp.aclose()
            raise
        hdrs = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **self._resp_headers(resp)}
        return StreamingResponse(self._relay(path, resp, it, buffered, scanner, t, done, shape), status_code=200,
                                 media_type=resp.headers.get("content-type", "text/event-stream"), headers=hdrs)

    async def _relay(self, path: str, resp: httpx.Response, it, buffered: list[bytes], scanner: SSEScanner,
                     t: Tracked, done: bool, shape: Optional[tuple[bool, bool]] = None):
        """Relay the rest of a stream. It always ends with ``data: [DONE]``: a stream the engine breaks or ends
        without it gets an error event (unless the engine sent one) and ``[DONE]``, counted ``failed_midstream``."""
        outcome = "client_disconnect"
        try:
            for b in buffered:
                yield b
            buffered.clear()
            failed = client = False  # error events relayed: the engine's fault / the request's (4xx code)
            if not done:
                try:
                    async for chunk in it:
                        out, d, err = self._scan(scanner, chunk, t, shape=shape)
                        done = done or d
                        if err is not None:
                            if client_error_status(err) is not None:
                                client = True
                            else:
                                failed = True
                        if out:
                            yield out
                except httpx.HTTPError as e:
                    self.mark_err(f"POST {path}: {type(e).__name__}: {e}")
                    outcome = "failed_midstream"
                    sep = b"\n\n" if scanner.rest() else b""  # end a half-relayed event first
                    yield sep + error_event(f"engine failed mid-stream: {type(e).__name__}: {e}",
                                            "engine_unavailable", 502) + SSE_DONE
                    return
            if not done:
                outcome = "failed_midstream"
                sep = b"\n\n" if scanner.rest() else b""
                ev = b"" if failed or client else error_event(
                    f"engine closed the stream without [DONE] after {t.decoded} tokens", "engine_failed", 502)
                yield sep + ev + SSE_DONE
                return
            outcome = "client_error" if client else "engine_error" if failed else "ok"
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()  # a stream cut short closes the connection: the engine aborts the request
            self._finish(t, outcome)

    async def models(self, request: Request) -> Response:
        assert self.client is not None
        try:
            resp = await self.client.get(self.engine_url + "/v1/models", headers=self._fwd_headers(request))
        except httpx.TimeoutException as err:
            self.mark_err(f"GET /v1/models: {type(err).__name__}")
            return _err(503, f"engine at {self.engine_url} did not answer in time", "engine_unavailable")
        except httpx.HTTPError as err:
            self.mark_err(f"GET /v1/models: {type(err).__name__}: {err}")
            return _err(502, f"engine at {self.engine_url} unreachable: {type(err).__name__}: {err}",
                        "engine_unavailable")
        self.mark_ok()
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", JSON))

    # ------------------------------------------------------------------ /state, injection
    async def state_doc(self) -> dict[str, Any]:
        st, source, age = await self.current_state()
        d = st.to_dict()
        d["source"] = source
        d["age_s"] = age
        d["instance_id"] = self.instance_id
        d["engine_ok"] = self.engine_ok()
        if source == "engine":
            d.update(self.engine_state_extra)
            d["version"] = self.engine_state_version
        elif source.startswith("proxy"):
            d["request_ids"] = {str(t.id): t.upstream_id for t in self.tracker.entries.values() if t.upstream_id}
            load = self._fresh_load()
            if load is not None:
                d["engine_metrics"] = {"num_running": load.num_running, "num_waiting": load.num_waiting,
                                       "kv_cache_usage": load.kv_cache_usage, "free_blocks": load.free_blocks,
                                       "age_s": self.clock() - (self.load_at or 0.0)}
        return d

    def inject(self, raw: bytes) -> dict[str, Any]:
        try:
            d = loads_json(raw)  # a BadJSON is a ValueError: a 400 below
            if not isinstance(d, dict):
                raise TypeError("state must be a JSON object")
            st = InstanceState.from_dict(d)
            if "config" not in d:
                st.config = self.config
            st.config.validate()
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ServiceError(400, f"not an InstanceState: {type(err).__name__}: {err}") from None
        self.injected, self.injected_at = st, self.clock()
        return {"injected": True, "running": len(st.running), "waiting": len(st.waiting)}


def build_app(service: PredictorService, token: Optional[str] = None,
              max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    app = create_app("block predictor", token=token, max_body_bytes=max_body_bytes, health=service.health)
    app.state.predictor = service

    @app.post("/predict")
    async def predict_ep(request: Request) -> Response:
        return Response(orjson.dumps(await service.predict(await request.body())), media_type=JSON)

    @app.get("/stats")
    async def stats() -> Response:
        service.check_available()
        st, _, _ = await service.current_state()
        return _json(service.stats_of(st).to_dict())

    @app.get("/state")
    async def state() -> Response:
        return _json(await service.state_doc())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await service.render_metrics(), media_type=prom.CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await service.proxy(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.proxy(request, "/v1/chat/completions", chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await service.models(request)

    if service.allow_injection:
        @app.post("/debug/state")
        async def inject(request: Request) -> Response:
            return _json(service.inject(await request.body()))

        @app.delete("/debug/state")
        async def clear() -> Response:
            service.injected = service.injected_at = None
            return _json({"injected": False})

    app.router.on_startup.append(service.start)
    app.router.on_shutdown.append(service.stop)
    return app


def pid_rss_mb(pid: Optional[int] = None) -> Optional[float]:
    """VmRSS of a process in MiB (this one by default), for benchmarks."""
    path = f"/proc/{pid or os.getpid()}/status"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
