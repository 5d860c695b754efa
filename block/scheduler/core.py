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

The parts live in their own modules and this one puts them together: ``config`` (SchedulerConfig, instance lists),
``request`` (1: parsing, hints), ``routing`` (2: probes and the decision, which is ``vidur.routing``'s), ``health``
(down marks, eligibility, ``/health``), ``relay`` (3 and 4: forward, first token, SSE relay), ``errors`` (what a
failed forward means), ``requestlog`` (statuses, the log line) and ``metrics``. The HTTP face is ``app``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import time
from typing import Any, Mapping, Optional

from block.http import Origin, Pool
from block.scheduler.config import SchedulerConfig, normalize_url, read_instances_file
from block.scheduler.errors import ERR_ENGINE_DOWN, ERR_ENGINE_FAILED, UpstreamFailure, UpstreamRefused
from block.scheduler.health import HealthMixin, Instance
from block.scheduler.metrics import Metrics
from block.scheduler.relay import RelayMixin
from block.scheduler.request import (
    FALLBACK_OUTPUT_TOKENS,
    HINT_FIELD,
    HINT_HEADER,
    Parsed,
    PromptCounter,
    parse_body,
    prompt_text,
)
from block.scheduler.requestlog import (
    HINT_SOURCES,
    ST_CLIENT_ERROR,
    ST_DISCONNECTED,
    ST_INTERNAL,
    ST_OK,
    ST_STREAM_ERROR,
    ST_UPSTREAM_ERROR,
    STATUSES,
    RequestLog,
    loggable_row,
)
from block.scheduler.routing import Decision, RoutingMixin
from vidur.outcomes import deliver, from_log_row, wants_outcomes
from vidur.routing import Router
from vidur.types import Request

log = logging.getLogger("block.scheduler")


class Scheduler(RoutingMixin, HealthMixin, RelayMixin):
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
        self.request_log = RequestLog(cfg.log_file)
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
        self.request_log.close()

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
        self.request_log.write(row)


__all__ = ["ERR_ENGINE_DOWN", "ERR_ENGINE_FAILED", "FALLBACK_OUTPUT_TOKENS", "HINT_FIELD", "HINT_HEADER", "HINT_SOURCES",
           "STATUSES", "ST_CLIENT_ERROR", "ST_DISCONNECTED", "ST_INTERNAL", "ST_OK", "ST_STREAM_ERROR",
           "ST_UPSTREAM_ERROR", "Decision", "Instance", "Metrics", "Parsed", "PromptCounter", "Scheduler",
           "SchedulerConfig", "UpstreamFailure", "UpstreamRefused", "loggable_row", "normalize_url", "parse_body",
           "prompt_text", "read_instances_file"]
