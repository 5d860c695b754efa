"""The predictor side-car's HTTP face: a pass-through proxy for one engine, the what-if ``/predict``, load figures.

Endpoints (docs/services.md, "Predictor side-car"):

- ``POST /v1/completions``, ``POST /v1/chat/completions`` -- forwarded to the engine, every request tracked while
  in flight (:mod:`block.predictor.proxy`). While the engine is known to be down (:mod:`block.predictor.liveness`),
  ``/predict``, ``/stats`` and the proxy answer 503 ``engine_down`` at once.
- ``GET /v1/models`` -- passthrough.
- ``POST /predict`` -- ``vidur.whatif.predict`` on the current state -> ``Prediction.to_dict()``
  (:mod:`block.predictor.predict`).
- ``GET /stats`` (``InstanceStats``), ``GET /state`` (the ``InstanceState`` used, plus source and age:
  :mod:`block.predictor.sources`), ``GET /metrics`` (Prometheus: :mod:`block.predictor.metrics`), ``GET /health``.
- ``POST /debug/state`` / ``DELETE /debug/state`` -- only with ``--debug-allow-state-injection``.

:class:`PredictorService` wires those parts together and owns what they share: the HTTP client to the engine, the
poll loop, the tracker. Everything runs on one asyncio loop (no locks); the what-if is synchronous and takes well
under a millisecond.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response

from block import prom
from block.engine.tokens import TokenCounter
from block.predictor.feedback import Feedback
from block.predictor.liveness import Liveness
from block.predictor.metrics import PredictorMetrics
from block.predictor.predict import parse_predict, parse_predict_options, whatif
from block.predictor.proxy import Proxy, json_response
from block.predictor.sources import StateView
from block.predictor.tracker import Tracker
from block.service import DEFAULT_MAX_BODY, create_app
from vidur.engine import Engine, StepTimeModel
from vidur.types import EngineConfig, InstanceState, InstanceStats

__all__ = ["PredictorService", "build_app", "parse_predict"]


class PredictorService:
    """One engine's predictor: liveness, state sources, metrics, what-if and proxy, sharing one tracker."""

    def __init__(self, config: EngineConfig, model: StepTimeModel, *, engine_url: str,
                 engine_token: Optional[str] = None, state_source: str = "proxy", metrics_interval_s: float = 0.5,
                 state_interval_s: float = 0.05, connect_timeout_s: float = 2.0, read_timeout_s: float = 300.0,
                 instance_id: int = 0, overrun_tokens: int = 10, tokenizer: str = "none", force_stream: bool = True,
                 continuous_usage: bool = True, num_blocks_fixed: bool = False, engine_down_after_s: float = 0.0,
                 allow_state_injection: bool = False, forward_client_auth: bool = False,
                 residual_correction: bool = False, feedback_time_scale: float = 1.0,
                 clock=time.monotonic) -> None:
        self.model = model
        self.engine_url = engine_url.rstrip("/")
        self.engine_token = engine_token
        self.timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s,
                                     pool=connect_timeout_s)
        self.poll_timeout = httpx.Timeout(max(connect_timeout_s, 2.0))
        self.instance_id = instance_id
        self.overrun = overrun_tokens
        self.allow_injection = allow_state_injection
        self.clock = clock
        self.tracker = Tracker(config.max_model_len, clock)
        self.live = Liveness(self.engine_url, 0.0, clock)
        self.states = StateView(config, self.tracker, state_source, get=self._get, live=self.live,
                                metrics_interval_s=metrics_interval_s, state_interval_s=state_interval_s,
                                num_blocks_fixed=num_blocks_fixed, clock=clock)
        poll = self.states.poll_interval_s
        self.liveness_interval_s = poll if poll > 0 else 1.0
        self.live.down_after_s = engine_down_after_s if engine_down_after_s > 0 \
            else max(3.0, 5 * self.liveness_interval_s)
        self.metrics = PredictorMetrics()
        self.proxy = Proxy(engine_url=self.engine_url, engine_token=engine_token, tracker=self.tracker,
                           counter=TokenCounter(tokenizer), live=self.live, available=self.check_available,
                           count=self.metrics.proxied, force_stream=force_stream, continuous_usage=continuous_usage,
                           forward_client_auth=forward_client_auth)
        # predicted vs actual of every served request, /metrics, the optional residual (block/predictor/feedback.py)
        self.feedback = Feedback(self.metrics.registry, correct=residual_correction, total_blocks=config.num_blocks,
                                 time_scale=feedback_time_scale, clock=clock)
        self.proxy.on_finish.append(self.feedback.on_finish)
        self.client: Optional[httpx.AsyncClient] = None
        self._task: Optional[asyncio.Task] = None

    @property
    def config(self) -> EngineConfig:
        """The engine config in force (its block count follows the engine's /metrics unless fixed)."""
        return self.states.config

    # ------------------------------------------------------------------ lifecycle
    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.engine_token}"} if self.engine_token else {}

    async def start(self) -> None:
        gc.freeze()  # startup objects (pandas, the execution model) out of the collector's way: shorter GC pauses
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.timeout, headers=self._headers(),
                                            limits=httpx.Limits(max_connections=4096, max_keepalive_connections=512,
                                                                keepalive_expiry=30.0))
            self.proxy.client = self.client
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
            self.client = self.proxy.client = None

    async def _poll_loop(self) -> None:
        while True:
            t0 = self.clock()
            try:
                await self.states.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - keep polling; staleness is reported
                self.live.mark_err(f"{type(err).__name__}: {err}")
            await asyncio.sleep(max(0.0, self.liveness_interval_s - (self.clock() - t0)))

    async def _get(self, path: str) -> httpx.Response:
        assert self.client is not None
        try:
            r = await self.client.get(self.engine_url + path, timeout=self.poll_timeout)
        except httpx.HTTPError as err:
            self.live.mark_err(f"GET {path}: {type(err).__name__}: {err}")
            raise
        return r

    def check_available(self) -> None:
        """Raise the 503 ``engine_down`` error while the engine is down (an injected state answers regardless)."""
        if self.states.injected.state is None:
            self.live.check()

    # ------------------------------------------------------------------ state, stats, health, metrics
    async def current_state(self) -> tuple[InstanceState, str, float]:
        return await self.states.current_state()

    def stats_of(self, st: InstanceState) -> InstanceStats:
        s = Engine.from_state(st, self.model, overrun_tokens=self.overrun).stats()
        s.instance_id = self.instance_id
        return s

    async def state_doc(self) -> dict[str, Any]:
        st, source, age = await self.current_state()
        d = st.to_dict()
        d["source"] = source
        d["age_s"] = age
        d["instance_id"] = self.instance_id
        d["engine_ok"] = self.live.ok()
        d.update(self.states.details(source))
        return d

    def health(self) -> dict[str, Any]:
        now = self.clock()
        live = self.live
        ok = live.ok()
        down = live.down()
        return {"status": "ok" if ok else "degraded", "engine_url": self.engine_url, "engine_ok": ok,
                "engine_down": down, "available": not down or self.states.injected.state is not None,
                "engine_last_ok_s_ago": None if live.last_ok is None else round(now - live.last_ok, 3),
                "engine_last_error": live.last_err_msg if not ok else None, "state_source": self.states.source,
                "state_age_s": self.states.age_s(), "tracked_requests": len(self.tracker.entries)}

    async def render_metrics(self) -> str:
        st, _, age = await self.current_state()
        return self.metrics.render(st, age, len(self.tracker.entries), self.live.ok())

    # ------------------------------------------------------------------ /predict
    async def predict(self, raw: bytes) -> dict[str, Any]:
        t0 = time.perf_counter()
        prompt, expected, others = parse_predict_options(raw)
        self.check_available()
        st, _, _ = await self.current_state()
        d = whatif(st, prompt, expected, self.model, instance_id=self.instance_id, overrun_tokens=self.overrun,
                   others_delay=others)
        d = self.feedback.answer(d, prompt, min(expected, max(1, st.config.max_model_len - prompt)))
        dt = time.perf_counter() - t0
        d["predict_ms"] = dt * 1e3
        self.metrics.predicted(dt)
        return d


def build_app(service: PredictorService, token: Optional[str] = None,
              max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    app = create_app("block predictor", token=token, max_body_bytes=max_body_bytes, health=service.health)
    app.state.predictor = service
    proxy = service.proxy

    @app.post("/predict")
    async def predict_ep(request: Request) -> Response:
        return json_response(await service.predict(await request.body()))

    @app.get("/stats")
    async def stats() -> Response:
        service.check_available()
        st, _, _ = await service.current_state()
        return json_response(service.stats_of(st).to_dict())

    @app.get("/state")
    async def state() -> Response:
        return json_response(await service.state_doc())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await service.render_metrics(), media_type=prom.CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy.proxy(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await proxy.proxy(request, "/v1/chat/completions", chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await proxy.models(request)

    if service.allow_injection:
        @app.post("/debug/state")
        async def inject(request: Request) -> Response:
            return json_response(service.states.injected.inject(await request.body(), service.config))

        @app.delete("/debug/state")
        async def clear() -> Response:
            service.states.injected.clear()
            return json_response({"injected": False})

    app.router.on_startup.append(service.start)
    app.router.on_shutdown.append(service.stop)
    return app
