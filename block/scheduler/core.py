"""The global scheduler's logic: parse a request, gather the policy's signals from k predictors, choose, forward.

One :class:`Scheduler` per process. It holds no durable state (any number of schedulers may run side by side): a
per-process ``random.Random(seed)``, the policy's own memory (``RoutingContext.state``, e.g. min-QPM's history), a
short-lived "down" mark per instance (a connection refused puts an instance out of the sampling for
``down_cooldown_s``), counters for ``/metrics`` and the per-request log.

Request path (``handle``):

1. parse the body (prompt tokens: a list of ids -> its length, text/chat -> ``block.engine.tokens.TokenCounter``),
   the length hint (header ``x-expected-output-tokens`` or body ``expected_output_tokens``, else -- with a length
   estimator configured (``length_estimator``) -- the estimator's prediction from the prompt text, capped at
   ``max_tokens``, else ``default_output_tokens``, else ``max_tokens``); bad input -> 400 JSON. The estimator runs
   batched in a worker thread (``length_estimation.serve.BatchingEstimator``); the latency it adds is in
   ``/metrics`` (``block_scheduler_length_estimator_seconds``) and in the request's log row (``estimator_ms``);
2. ``route``: sample k of the eligible instances with the process's rng (as ``vidur.cluster`` does), probe them
   concurrently according to the policy's signal (prediction: ``POST /predict`` with the length the policy tells
   that instance; stats: ``GET /stats``; none: no probe) within ``probe_timeout_s``; probes that fail or time out are
   left out; if none answers, fall back to a uniformly random healthy instance (counted); else apply the policy's
   ``choose`` -- the very function the simulator calls -- and its ``observe`` hook;
3. forward the body to the chosen instance's predictor with the hint header set to the length told to that instance;
   a streaming answer is relayed chunk by chunk once the first token has arrived. A failure before the first token
   (connect error, 5xx, a stream that ends or errors without a token) re-routes the request on the instances not yet
   tried, up to ``max_retries`` times; a failure after it ends the stream with an SSE error event and ``[DONE]``
   (a non-streamed answer: the predictor's 502 ``engine_failed``, relayed). An error the engine blames on the request
   (a 4xx, also inside a stream) reaches the client as that 4xx, once. An instance whose probe or forward says its
   engine is down (503 ``engine_down``) or refuses the connection is out of the sampling for ``down_cooldown_s``;
4. a client that disconnects before its answer is complete has its upstream request closed (the engine aborts it).

Every request ends as a success or a clear error (HTTP status + JSON body, or an SSE error event), is counted in
``/metrics`` and written as one JSON line to the log file.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import random
import reprlib
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Mapping, Optional, Sequence

from block import prom
from block.engine.tokens import PromptError, TokenCounter, count_request_prompt, message_text
from block.http import Origin, Pool, Response, UpstreamError
from block.sse import SSE_DONE, StreamView, client_error_status, error_event, error_message
from block.openai_params import validate_request
from block.service import bad_request, int_field, json_object
from vidur.outcomes import deliver, from_log_row, wants_outcomes
from vidur.policy_contract import RoutingPolicy
from vidur.routing import Router
from vidur.types import Candidate, InstanceStats, Prediction, Request

try:  # orjson (the predictor's dependency too) is faster; the standard library is the fallback
    import orjson as _orjson

    def _loads(b: bytes) -> Any:
        return _orjson.loads(b)

    def _dumps(obj: Any) -> bytes:
        return _orjson.dumps(obj)
except ImportError:  # pragma: no cover - depends on the environment
    def _loads(b: bytes) -> Any:
        return json.loads(b)

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

log = logging.getLogger("block.scheduler")

HINT_HEADER = "x-expected-output-tokens"
HINT_FIELD = "expected_output_tokens"
FALLBACK_OUTPUT_TOKENS = 256  # length assumed when a request has neither a hint nor max_tokens (and no default set)
# error types of a predictor's answer (block/predictor/app.py) that decide what the scheduler does
ERR_ENGINE_DOWN = "engine_down"  # 503: its engine is known to be down -> retried elsewhere, instance marked down
ERR_ENGINE_FAILED = "engine_failed"  # 502: its engine failed after the first token -> relayed, not retried

# statuses of a finished request (the log's ``status`` and the label of block_scheduler_requests_total)
ST_OK = "ok"  # answered in full
ST_CLIENT_ERROR = "client_error"  # 4xx: the request was bad (ours or the engine's verdict)
ST_UPSTREAM_ERROR = "upstream_error"  # no instance could serve it before the first token (5xx to the client)
ST_STREAM_ERROR = "stream_error"  # the upstream failed after the first token (SSE error event; non-streamed: 502)
ST_DISCONNECTED = "client_disconnected"  # the client went away first
ST_INTERNAL = "internal_error"  # a bug in the scheduler (500)
STATUSES = (ST_OK, ST_CLIENT_ERROR, ST_UPSTREAM_ERROR, ST_STREAM_ERROR, ST_DISCONNECTED, ST_INTERNAL)
# where a request's expected output length came from (the log's ``hint_source``)
HINT_SOURCES = ("client", "estimator", "default")


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class SchedulerConfig:
    instances: list[str]  # predictor base URLs; requests are forwarded through them
    policy: RoutingPolicy
    probe_timeout_s: float = 1.0
    default_output_tokens: Optional[int] = None  # None: max_tokens
    max_retries: int = 2
    seed: int = 0
    log_file: Optional[str] = None
    upstream_token: Optional[str] = None
    tokenizer: str = "llama2"
    connect_timeout_s: float = 5.0
    upstream_timeout_s: float = 1800.0  # between two chunks of an upstream answer
    down_cooldown_s: float = 2.0
    max_connections: int = 4096
    policy_config: dict[str, Any] = field(default_factory=dict)  # what built the policy (for /health and logs)
    # length estimator for requests without a hint: none | cpu | auto | <file.npz> | <checkpoint dir>
    length_estimator: Optional[str] = None
    estimator_max_batch: int = 32
    estimator_wait_ms: float = 2.0  # batching window: prompts arriving within it share one predict call
    estimator_timeout_s: float = 5.0  # an estimate slower than this falls back to the default length

    def __post_init__(self) -> None:
        if not self.instances:
            raise ValueError("the scheduler needs at least one instance (--instances or --instances-file)")
        self.instances = [normalize_url(u) for u in self.instances]
        if len(set(self.instances)) != len(self.instances):
            raise ValueError(f"duplicate instance URLs in {self.instances}")
        for name in ("probe_timeout_s", "connect_timeout_s", "upstream_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v} must be a positive number")
        if self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries} must be >= 0")
        if self.default_output_tokens is not None and self.default_output_tokens < 1:
            raise ValueError(f"default_output_tokens={self.default_output_tokens} must be >= 1")
        if self.down_cooldown_s < 0:
            raise ValueError(f"down_cooldown_s={self.down_cooldown_s} must be >= 0")
        if self.estimator_max_batch < 1:
            raise ValueError(f"estimator_max_batch={self.estimator_max_batch} must be >= 1")
        if not (math.isfinite(self.estimator_wait_ms) and self.estimator_wait_ms >= 0):
            raise ValueError(f"estimator_wait_ms={self.estimator_wait_ms} must be >= 0")


def normalize_url(u: str) -> str:
    u = str(u).strip()
    if not u:
        raise ValueError("empty instance URL")
    if "://" not in u:
        u = "http://" + u
    if not u.startswith(("http://", "https://")):
        raise ValueError(f"instance URL {u!r} must be http(s)://host:port")
    return u.rstrip("/")


def read_instances_file(path: str) -> list[str]:
    """Instance URLs from a file: a YAML/JSON list (of URLs or ``{url: ...}`` mappings) or one URL per line
    (blank lines and ``#`` comments skipped)."""
    with open(path) as f:
        text = f.read()
    stripped = text.strip()
    if stripped.startswith(("[", "-", "{", "instances:")):
        import yaml

        data = yaml.safe_load(text)
        if isinstance(data, dict) and "instances" in data:
            data = data["instances"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of instance URLs")
        out = []
        for i, x in enumerate(data):
            if isinstance(x, dict):
                x = x.get("url") or x.get("predictor")
            if not isinstance(x, str):
                raise ValueError(f"{path}: entry {i} is not a URL: {x!r}")
            out.append(x)
        return out
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]


# ------------------------------------------------------------------------------------------------ request parsing
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


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 500


def loggable_row(row: Mapping[Any, Any], limit: int = 500) -> dict[str, Any]:
    """``row`` with every value JSON cannot carry (a huge integer, a lone surrogate, an object) replaced by its
    repr (ASCII-safe, truncated to ``limit``), and marked: ``status`` internal_error (the original kept as
    ``logged_status``), ``log_error`` naming the fields."""
    out: dict[str, Any] = {}
    bad = []
    for k, v in row.items():
        key = k if isinstance(k, str) else repr(k)
        try:
            _dumps(v)
            out[key] = v
        except (TypeError, ValueError):
            try:
                r = _REPR.repr(v)  # bounded; repr escapes lone surrogates (they are not printable)
            except ValueError:  # e.g. an int past sys.get_int_max_str_digits()
                r = f"<{type(v).__name__}>"
            out[key] = r if len(r) <= limit else r[:limit] + "...[truncated]"
            bad.append(key)
    try:
        _dumps(out.get("status"))
        out["logged_status"] = out.get("status")
    except (TypeError, ValueError):
        pass
    out["status"] = ST_INTERNAL
    out["log_error"] = "not JSON-serialisable, written as repr: " + ", ".join(map(ascii, bad))
    return out


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


# ------------------------------------------------------------------------------------------------ state
@dataclass
class Instance:
    index: int
    url: str
    origin: Origin
    down_until: float = 0.0  # monotonic time; sampled again after it


@dataclass
class Decision:
    instance: int
    told_tokens: int  # output length told to the chosen instance (hint header)
    predicted_e2e_s: float
    probe_ms: float
    decision_ms: float
    fallback: bool
    probed: list[int]
    answered: list[int]
    num_active: Optional[int] = None  # routable instances at dispatch, with auto-provisioning (else None)


class UpstreamFailure(Exception):
    """The chosen instance failed before the first token: the request may be retried elsewhere."""

    def __init__(self, message: str, status: int = 502, mark_down: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.mark_down = mark_down


class Metrics:
    def __init__(self, n: int) -> None:
        r = self.registry = prom.Registry()
        self.requests = r.counter("block_scheduler_requests", "Requests finished, by final status.", ("status",))
        for s in STATUSES:
            self.requests.touch(status=s)
        self.routed = r.counter("block_scheduler_routed", "Dispatches (first tries and retries) per instance.",
                                ("instance",))
        self.probe_failures = r.counter("block_scheduler_probe_failures",
                                        "Probes (/predict or /stats) that failed or timed out, per instance.",
                                        ("instance",))
        self.upstream_failures = r.counter("block_scheduler_upstream_failures",
                                           "Forwarded requests that failed before their first token, per instance.",
                                           ("instance",))
        for i in range(n):
            for c in (self.routed, self.probe_failures, self.upstream_failures):
                c.touch(instance=str(i))
        self.retries = r.counter("block_scheduler_retries", "Re-dispatches after a failure before the first token.")
        self.fallbacks = r.counter("block_scheduler_fallbacks",
                                   "Decisions where no probed instance answered (random healthy instance).")
        self.stream_errors = r.counter("block_scheduler_stream_errors",
                                       "Streams that failed after the first token (error event sent).")
        for c in (self.retries, self.fallbacks, self.stream_errors):
            c.touch()
        self.inflight = r.gauge("block_scheduler_requests_in_flight", "Requests being served now.")
        self.inflight.set(0)
        self.healthy = r.gauge("block_scheduler_healthy_instances", "Instances not marked down.")
        buckets = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
        self.decision = r.histogram("block_scheduler_decision_seconds",
                                    "Routing time per dispatch (sampling + probes + policy).", buckets)
        self.probe = r.histogram("block_scheduler_probe_seconds", "Time waiting for the probes per dispatch.",
                                 buckets)
        self.decision.touch()
        self.probe.touch()
        self.n_inflight = 0
        self.hints = r.counter("block_scheduler_length_hints",
                               "Where each routed request's expected output length came from.", ("source",))
        for src in HINT_SOURCES:
            self.hints.touch(source=src)
        self.estimator_latency = r.histogram(
            "block_scheduler_length_estimator_seconds",
            "Latency the length estimator added per estimated request (queueing + batching window + prediction).",
            buckets)
        self.estimator_batch = r.histogram("block_scheduler_length_estimator_batch_size",
                                           "Prompts per length-estimator call, per estimated request.",
                                           (1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.estimator_failures = r.counter("block_scheduler_length_estimator_failures",
                                            "Estimates that failed or timed out (default length used instead).")
        self.estimator_latency.touch()
        self.estimator_batch.touch()
        self.estimator_failures.touch()


def _finite(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.inf
    return v if math.isfinite(v) else math.inf


class Scheduler:
    """See the module docstring. Create it, ``await start()`` inside the event loop, ``await close()`` at the end."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.policy = cfg.policy
        self.instances = [Instance(i, u, Origin(u)) for i, u in enumerate(cfg.instances)]
        self.rng = random.Random(cfg.seed)
        self.policy_state: dict[str, Any] = {}
        self.router = Router(self.policy, self.rng, self.policy_state)
        self.counter = PromptCounter(cfg.tokenizer)
        self.metrics = Metrics(len(self.instances))
        self.t0 = time.monotonic()
        self.n = 0  # requests routed (the RoutingContext's request_index)
        self.pool: Optional[Pool] = None
        self._auth = {"authorization": f"Bearer {cfg.upstream_token}"} if cfg.upstream_token else {}
        self._json_headers = {"content-type": "application/json", **self._auth}
        self._log = open(cfg.log_file, "a", buffering=1) if cfg.log_file else None
        self._pid = os.getpid()
        self.provisioning: Any = None  # block.scheduler.provisioning.LivePool (auto-provisioning), set by its attach
        self.estimator = None  # length_estimation.serve.BatchingEstimator for requests without a hint
        if cfg.length_estimator and cfg.length_estimator.strip().lower() not in ("none", "off", ""):
            from length_estimation.serve import BatchingEstimator, load_estimator

            est = load_estimator(cfg.length_estimator)
            if est is not None:
                self.estimator = BatchingEstimator(est, cfg.estimator_max_batch, cfg.estimator_wait_ms,
                                                   cfg.estimator_timeout_s)
                self.estimator.warmup()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        gc.collect()
        gc.freeze()  # startup objects (FastAPI, pandas via vidur) out of the collector's way: shorter GC pauses
        if self.pool is None:
            self.pool = Pool(connect_timeout_s=self.cfg.connect_timeout_s, max_idle=self.cfg.max_connections)
        if self.provisioning is not None:
            await self.provisioning.start()

    async def close(self) -> None:
        if self.provisioning is not None:
            await self.provisioning.close()
        if self.estimator is not None:
            await self.estimator.close()
        if self.pool is not None:
            await self.pool.aclose()
            self.pool = None
        if self._log is not None:
            self._log.close()
            self._log = None

    # ------------------------------------------------------------------ health
    def eligible(self, exclude: Iterable[int] = ()) -> list[int]:
        """Instances to route to: not excluded and not marked down (all non-excluded ones if every one is down)."""
        now = time.monotonic()
        ex = set(exclude)
        if self.provisioning is not None:  # only the provisioned pool's active slots are routable
            ex |= {x.index for x in self.instances if x.index not in self.provisioning.routable}
        ids = [x.index for x in self.instances if x.index not in ex and x.down_until <= now]
        if not ids:
            ids = [x.index for x in self.instances if x.index not in ex]
        return ids

    def mark_down(self, i: int) -> None:
        if self.cfg.down_cooldown_s > 0:
            self.instances[i].down_until = time.monotonic() + self.cfg.down_cooldown_s

    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        up = sum(1 for x in self.instances if x.down_until <= now)
        return {"role": "scheduler", "policy": self.policy.name, "k": self.policy.k, "signal": self.policy.signal,
                "instances": len(self.instances), "healthy_instances": up, "requests": self.n,
                "in_flight": self.metrics.n_inflight,
                "length_estimator": None if self.estimator is None else self.estimator.name,
                **({} if self.provisioning is None else {"provisioning": self.provisioning.describe()})}

    def render_metrics(self) -> str:
        now = time.monotonic()
        self.metrics.healthy.set(sum(1 for x in self.instances if x.down_until <= now))
        self.metrics.inflight.set(self.metrics.n_inflight)
        return self.metrics.registry.render()

    # ------------------------------------------------------------------ routing
    async def _probe_one(self, kind: str, i: int, req: Request, told: Optional[int], rid: str) -> Candidate:
        inst = self.instances[i]
        pool = self.pool
        assert pool is not None
        # no per-read timer: _probe bounds the whole probe (and cancels it) with asyncio.wait
        if kind == "prediction":
            payload = _dumps({"prompt_tokens": req.prompt_tokens, "expected_output_tokens": told, "id": rid})
            r = await pool.request("POST", inst.origin, "/predict", payload, self._json_headers, None)
        else:
            r = await pool.request("GET", inst.origin, "/stats", b"", self._auth, None)
        body = await r.read()
        if r.status_code != 200:
            down = r.status_code == 503 and _error_type(body) == ERR_ENGINE_DOWN  # its engine is down
            raise UpstreamError("down" if down else "status", f"{'/predict' if kind == 'prediction' else '/stats'}"
                                                              f" answered {r.status_code}")
        d = _loads(body)
        d["instance_id"] = i
        if kind == "prediction":
            d["e2e_s"] = _finite(d.get("e2e_s"))
            return Candidate(i, prediction=Prediction.from_dict(d))
        return Candidate(i, stats=InstanceStats.from_dict(d))

    async def _probe(self, kind: str, ids: list[int], req: Request, told: Mapping[int, int],
                     rid: str) -> list[Candidate]:
        """Probe ``ids`` concurrently (a prediction probe carries the length ``told`` to that instance); return the
        candidates that answered in time (failures are left out)."""
        tasks = [asyncio.ensure_future(self._probe_one(kind, i, req, told.get(i), rid)) for i in ids]
        try:
            done, pending = await asyncio.wait(tasks, timeout=self.cfg.probe_timeout_s)
        except BaseException:  # cancelled (the client left): no probe outlives the request
            for t in tasks:
                t.cancel()
            raise
        for t in pending:
            t.cancel()
        out = []
        for i, t in zip(ids, tasks):
            if t in done and t.exception() is None:
                out.append(t.result())
            else:
                self._probe_failed(i, t.exception() if t in done else asyncio.TimeoutError())
        return out

    def _probe_failed(self, i: int, err: Optional[BaseException]) -> None:
        self.metrics.probe_failures.inc(instance=str(i))
        if isinstance(err, UpstreamError) and err.kind in ("connect", "down"):
            self.mark_down(i)
        log.debug("probe of instance %d failed: %r", i, err)

    async def route(self, req: Request, index: int, exclude: Sequence[int] = ()) -> Decision:
        """Choose the instance for ``req`` among the eligible ones (``exclude``: instances that already failed it).

        The decision is ``vidur.routing``'s, as in the simulator; this supplies the probes, the fallback when no
        probe answered (a random healthy instance, never one whose probe just failed) and auto-provisioning's
        override (a slot routable now takes the request, as in sim)."""
        w0 = time.perf_counter()
        ids = self.eligible(exclude)
        if not ids:
            raise UpstreamFailure("no instance left to try", 503)
        probe_ms = 0.0

        async def gather(kind: str, probe_ids: list[int], told: Mapping[int, int]) -> list[Candidate]:
            nonlocal probe_ms
            p0 = time.perf_counter()
            cands = await self._probe(kind, probe_ids, req, told, str(req.id))
            probe_ms = (time.perf_counter() - p0) * 1e3
            self.metrics.probe.observe(probe_ms / 1e3)
            return cands

        def fallback(probed: list[int]) -> int:
            self.metrics.fallbacks.inc()
            rest = [i for i in self.eligible(exclude) if i not in probed] or ids
            return self.rng.choice(rest)

        force = None
        if self.provisioning is not None:
            prov = self.provisioning

            def force(cands: list[Candidate]) -> Optional[int]:
                forced = prov.before_route(req, cands)
                return forced if forced is not None and forced not in exclude else None

        r = await self.router.aroute(req, ids, time.monotonic() - self.t0, index, gather, force=force,
                                     fallback=fallback)
        ms = (time.perf_counter() - w0) * 1e3
        self.metrics.decision.observe(ms / 1e3)
        self.metrics.routed.inc(instance=str(r.instance))
        return Decision(r.instance, r.told_tokens, r.predicted_e2e_s, probe_ms, ms, r.fallback, r.probed,
                        [c.instance_id for c in r.candidates],
                        None if self.provisioning is None else self.provisioning.num_active())

    # ------------------------------------------------------------------ request handling
    def make_request(self, index: int, arrival_s: float, p: Parsed, estimated: Optional[int] = None) -> Request:
        out = p.max_tokens or self.cfg.default_output_tokens or FALLBACK_OUTPUT_TOKENS
        predicted = p.hint if p.hint is not None else estimated if estimated is not None \
            else self.cfg.default_output_tokens
        return Request(index, arrival_s, p.prompt_tokens, out, predicted)

    async def estimate_length(self, body: Mapping[str, Any], p: Parsed, row: dict[str, Any]) -> Optional[int]:
        """The estimator's length for a request without a hint (capped at its max_tokens), or None (no estimator,
        no prompt text, or a failure: the default length applies). Fills the row's ``hint_source``,
        ``estimated_tokens``, ``estimator_ms`` and ``estimator_batch``; counts the source in /metrics."""
        m = self.metrics
        if p.hint is not None:
            m.hints.inc(source="client")
            row["hint_source"] = "client"
            return None
        text = prompt_text(body, p.chat) if self.estimator is not None else None
        est = None
        if text is not None:
            assert self.estimator is not None
            t0 = time.perf_counter()
            try:
                e = await self.estimator.estimate(text)
            except (asyncio.TimeoutError, RuntimeError) as err:
                m.estimator_failures.inc()
                row["estimator_error"] = repr(err)
                row["estimator_ms"] = (time.perf_counter() - t0) * 1e3
                log.warning("length estimate failed, using the default: %r", err)
            else:
                est = e.tokens if p.max_tokens is None else min(e.tokens, p.max_tokens)
                row.update(estimated_tokens=e.tokens, estimator_ms=e.latency_ms, estimator_batch=e.batch_size)
                m.estimator_latency.observe(e.latency_ms / 1e3)
                m.estimator_batch.observe(e.batch_size)
        src = "estimator" if est is not None else "default"
        m.hints.inc(source=src)
        row["hint_source"] = src
        return est

    def _write_log(self, row: dict[str, Any]) -> None:
        """One JSON line per request, always: a row with a value JSON cannot carry is written with that value as
        its (truncated) repr, status ``internal_error`` and ``log_error`` naming the fields."""
        if self._log is not None:
            try:
                line = _dumps(row)
            except (TypeError, ValueError):  # orjson's JSONEncodeError is a TypeError
                line = _dumps(loggable_row(row))
            try:
                self._log.write(line.decode() + "\n")
            except (OSError, ValueError) as err:  # a full disk must not fail requests
                log.warning("cannot write the request log: %s", err)

    def finish(self, row: dict[str, Any], status: str, http_status: int, error: Optional[str] = None) -> None:
        row["status"] = status
        row["http_status"] = http_status
        row["finish_s"] = time.time()
        if error is not None:
            row["error"] = error
        self.metrics.requests.inc(status=status)
        self.metrics.n_inflight -= 1
        if self.provisioning is not None:  # the reactive trigger
            self.provisioning.on_finish(row)
        if status == ST_OK and wants_outcomes(self.policy_state):  # a policy that learns (vidur.outcomes)
            o = from_log_row(row, time.monotonic() - self.t0)
            if o is not None:
                deliver(self.policy_state, o)
        self._write_log(row)

    @staticmethod
    def block_headers(d: Optional[Decision], retries: int) -> dict[str, str]:
        if d is None:
            return {"x-block-retries": str(retries)}
        return {
            "x-block-instance": str(d.instance),
            "x-block-predicted-e2e-s": "nan" if math.isnan(d.predicted_e2e_s) else repr(d.predicted_e2e_s),
            "x-block-probe-ms": f"{d.probe_ms:.3f}",
            "x-block-decision-ms": f"{d.decision_ms:.3f}",
            "x-block-retries": str(retries),
            **({} if d.num_active is None else {"x-block-num-active": str(d.num_active)}),
        }

    async def open_upstream(self, d: Decision, path: str, raw: bytes, body: dict, p: Parsed,
                            request_id: str) -> tuple[Response, list[bytes], bool, Optional[AsyncIterator[bytes]]]:
        """Send the request to the chosen instance and read until its first token (streaming) or to the end.

        Returns (response, buffered chunks, finished, the body iterator to continue with). Raises
        :class:`UpstreamFailure` for a failure before the first token (``mark_down`` when the connection was
        refused or the predictor says its engine is down) and :class:`UpstreamRefused` for an error event the
        engine blames on the request (a 4xx ``code``). A 4xx answer is returned as is (the client's fault: not
        retried), and so is a 502 ``engine_failed`` (the engine failed after its first token: not retried either).
        """
        pool = self.pool
        assert pool is not None
        if p.hint_in_body and body.get(HINT_FIELD) != d.told_tokens:
            body = dict(body)
            body[HINT_FIELD] = d.told_tokens
            raw = _dumps(body)
        elif getattr(p, "coerced", False):  # parse_body rewrote fields with the values vLLM parses them to
            raw = _dumps(body)
        headers = {"content-type": "application/json", HINT_HEADER: str(d.told_tokens), "x-request-id": request_id,
                   **self._auth}
        try:
            resp = await pool.request("POST", self.instances[d.instance].origin, path, raw, headers,
                                      self.cfg.upstream_timeout_s)
        except UpstreamError as err:
            raise UpstreamFailure(f"instance {d.instance}: {err}", 502, mark_down=err.kind == "connect") from err
        chunks: list[bytes] = []
        try:
            if resp.status_code >= 500:
                data = await resp.read()
                kind = _error_type(data)
                if kind == ERR_ENGINE_FAILED:
                    return resp, [data], True, None
                raise UpstreamFailure(f"instance {d.instance} answered {resp.status_code}: "
                                      f"{data[:300].decode('utf-8', 'replace')}", 502,
                                      mark_down=kind == ERR_ENGINE_DOWN)
            if resp.status_code != 200 or not p.stream:
                return resp, [await resp.read()], True, None
            view = StreamView()
            it = resp.aiter_raw()
            while True:
                try:
                    chunk = await it.__anext__()
                except StopAsyncIteration:
                    if not chunks:
                        raise UpstreamFailure(f"instance {d.instance} ended the stream without any data", 502)
                    raise UpstreamFailure(f"instance {d.instance} ended the stream before the first token: "
                                          f"{b''.join(chunks)[-300:].decode('utf-8', 'replace')}", 502)
                if not chunk:
                    continue
                chunks.append(chunk)
                view.feed(chunk)
                if view.error is not None and not view.outputs:
                    status = client_error_status(view.error)
                    if status is not None:
                        raise UpstreamRefused(status, view.error)
                    raise UpstreamFailure(f"instance {d.instance} sent an error before the first token: "
                                          f"{error_message(view.error)[:300]}", 502)
                if view.outputs or view.finished or view.done:  # a token, or an answer complete without one
                    return resp, chunks, False, it
        except (UpstreamFailure, UpstreamRefused):
            await resp.aclose()
            raise
        except UpstreamError as err:
            await resp.aclose()
            raise UpstreamFailure(f"instance {d.instance} failed before the first token: {err}", 502) from err
        except BaseException:
            await resp.aclose()
            raise

    async def relay(self, resp: Response, it: AsyncIterator[bytes], chunks: list[bytes],
                    row: dict[str, Any]) -> AsyncIterator[bytes]:
        """Yield the buffered chunks, then the rest of the upstream stream; end the request's bookkeeping.

        The stream always ends with ``data: [DONE]``: an upstream that breaks or ends without it gets an error event
        (unless it sent one) and ``[DONE]``. An error event makes the row ``stream_error`` (``client_error`` when the
        engine blames the request: a 4xx ``code``)."""
        status, error = ST_OK, None
        view = StreamView(errors_only=True)
        try:
            first = b"".join(chunks)
            view.feed(first)
            yield first
            try:
                async for chunk in it:
                    if not chunk:
                        continue
                    view.feed(chunk)
                    yield chunk
            except UpstreamError as err:
                if row.get("_client_gone"):  # we cut the upstream because the client left
                    status, error = ST_DISCONNECTED, "client disconnected"
                    return
                status, error = ST_STREAM_ERROR, f"upstream failed after the first token: {err}"
                yield _event_break(view) + _error_event(f"upstream instance {row.get('instance')} failed after the "
                                                        f"first token: {err}", 502) + SSE_DONE
                return
            if view.error is not None:
                if client_error_status(view.error) is not None:
                    status = ST_CLIENT_ERROR
                    error = f"the engine refused the request during the stream: {error_message(view.error)}"
                else:
                    status = ST_STREAM_ERROR
                    error = f"the engine reported an error during the stream: {error_message(view.error)}"
            if not view.done:
                if view.error is None:
                    status, error = ST_STREAM_ERROR, "upstream stream ended without [DONE]"
                yield _event_break(view) + (b"" if view.error is not None else _error_event(
                    f"upstream instance {row.get('instance')} ended the stream early", 502)) + SSE_DONE
        except (asyncio.CancelledError, GeneratorExit):
            status, error = ST_DISCONNECTED, "client disconnected"
            raise
        except Exception as err:  # noqa: BLE001 - e.g. the client's socket broke
            status, error = ST_DISCONNECTED, f"client went away: {err!r}"
            raise
        finally:
            if status == ST_STREAM_ERROR:
                self.metrics.stream_errors.inc()
            await resp.aclose()
            row.pop("_client_gone", None)
            self.finish(row, status, 200, error)


class UpstreamRefused(Exception):
    """The engine refused the request inside its stream, before the first token (an error event with a 4xx code,
    e.g. vLLM's out-of-vocabulary token id): the client's fault, answered with that status, never retried."""

    def __init__(self, status: int, error: Any) -> None:
        super().__init__(error_message(error))
        self.status = status
        self.error = error


def _error_type(data: bytes) -> Optional[str]:
    """``error.type`` of a JSON error body (None if it is not one)."""
    try:
        e = _loads(data).get("error")
    except (ValueError, AttributeError, TypeError):
        return None
    return e.get("type") if isinstance(e, dict) else None


def _event_break(view: StreamView) -> bytes:
    """A blank line if the upstream stopped in the middle of an event (so what we append is an event of its own)."""
    return b"\n\n" if view.scanner.buf else b""


def _error_event(message: str, code: int) -> bytes:
    return error_event(message, "upstream_error", code)
