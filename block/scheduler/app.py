"""The scheduler's HTTP face: OpenAI ``/v1/completions`` and ``/v1/chat/completions`` (streaming or not),
``GET /v1/models`` (from the first instance that answers), ``/health``, ``/metrics`` and ``/instances``.

The two generation endpoints are plain Starlette routes (no FastAPI dependency resolution on the hot path); the
shared edges (bearer token, body limit, JSON errors) come from ``block.service.create_app``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from typing import Any, Optional

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from block import prom
from block.scheduler.core import (
    ST_CLIENT_ERROR,
    ST_DISCONNECTED,
    ST_INTERNAL,
    ST_OK,
    ST_UPSTREAM_ERROR,
    Decision,
    Scheduler,
    UpstreamFailure,
    parse_body,
)
from block.scheduler.upstream import UpstreamError
from block.service import DEFAULT_MAX_BODY, ServiceError, create_app, error_body

_PASS_HEADERS = ("content-type",)
log = logging.getLogger("block.scheduler")


def _json_error(status: int, message: str, type_: str, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(error_body(message, type_, status), status_code=status, headers=headers)


class _Relay(StreamingResponse):
    """A streaming answer that always ends its request's bookkeeping, even if the client left before it started."""

    def __init__(self, sched: Scheduler, upstream: Any, row: dict[str, Any], *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._sched = sched
        self._upstream = upstream
        self._row = row

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            it = self.body_iterator
            if hasattr(it, "aclose"):
                await it.aclose()  # runs the relay's own cleanup if it was left suspended
            if "status" not in self._row:  # the relay never started: the client left first
                await self._upstream.aclose()
                self._sched.finish(self._row, ST_DISCONNECTED, 499, "client disconnected before the stream started")


def build_app(sched: Scheduler, token: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    app = create_app("block global scheduler", token=token, max_body_bytes=max_body_bytes, health=sched.health)
    app.state.scheduler = sched
    ids = itertools.count()
    prefix = f"s{os.getpid():x}-"

    async def generate(request: Request, path: str, chat: bool) -> Response:
        arrival_wall = time.time()
        raw = await request.body()
        headers = request.headers
        rid = headers.get("x-request-id") or prefix + str(next(ids))
        sched.metrics.n_inflight += 1
        row: dict[str, Any] = {"id": rid, "index": None, "arrival_s": arrival_wall, "path": path,
                               "instance": -1, "predicted_e2e_s": None, "probe_ms": 0.0, "decision_ms": 0.0,
                               "retries": 0, "fallback": False}
        try:
            return await _generate(raw, headers, path, chat, rid, row)
        except (asyncio.CancelledError, GeneratorExit):
            if "status" not in row:
                sched.finish(row, ST_DISCONNECTED, 499, "client disconnected before the answer started")
            raise
        except Exception as err:  # noqa: BLE001 - a bug must still end the request clearly and be counted
            log.exception("request %s failed", rid)
            if "status" not in row:
                sched.finish(row, ST_INTERNAL, 500, f"{type(err).__name__}: {err}")
            return _json_error(500, f"scheduler error: {type(err).__name__}: {err}", "server_error",
                               {"x-request-id": rid})

    async def _generate(raw: bytes, headers: Any, path: str, chat: bool, rid: str, row: dict[str, Any]) -> Response:
        try:
            body, p = parse_body(raw, headers, chat, sched.counter)
        except ServiceError as err:
            sched.finish(row, ST_CLIENT_ERROR, err.status, err.message)
            return _json_error(err.status, err.message, err.type, {"x-request-id": rid})
        index = row["index"] = sched.n  # the RoutingContext's request_index: routed requests only
        sched.n += 1
        req = sched.make_request(index, time.monotonic() - sched.t0, p)
        row.update(prompt_tokens=p.prompt_tokens, hint=p.hint, stream=p.stream)
        tried: list[int] = []
        retries = 0
        d: Optional[Decision] = None
        last_error = "no instance"
        last_status = 502
        fallback_any = False
        decision_ms = probe_ms = 0.0
        while True:
            try:
                d = await sched.route(req, index, tried)
            except UpstreamFailure as err:
                last_error, last_status = f"{last_error}; {err}" if tried else str(err), 503 if not tried else 502
                break
            fallback_any = fallback_any or d.fallback
            decision_ms += d.decision_ms
            probe_ms += d.probe_ms
            row.update(instance=d.instance, told_tokens=d.told_tokens,
                       predicted_e2e_s=None if math.isnan(d.predicted_e2e_s) else d.predicted_e2e_s,
                       probe_ms=probe_ms, decision_ms=decision_ms, fallback=fallback_any, probed=d.probed,
                       answered=d.answered, dispatch_s=time.time())
            try:
                resp, chunks, finished, it = await sched.open_upstream(d, path, raw, body, p, rid)
            except UpstreamFailure as err:
                sched.metrics.upstream_failures.inc(instance=str(d.instance))
                if err.mark_down:
                    sched.mark_down(d.instance)
                tried.append(d.instance)
                last_error, last_status = str(err), err.status
                if retries >= sched.cfg.max_retries:
                    break
                retries += 1
                sched.metrics.retries.inc()
                row["retries"] = retries
                continue
            hdrs = sched.block_headers(d, retries)
            hdrs["x-request-id"] = rid
            if fallback_any:
                hdrs["x-block-fallback"] = "1"
            for h in _PASS_HEADERS:
                v = resp.headers.get(h)
                if v is not None:
                    hdrs[h] = v
            if finished or it is None:
                status = ST_OK if resp.status_code < 400 else ST_CLIENT_ERROR
                err_msg = None if status == ST_OK else b"".join(chunks)[:500].decode("utf-8", "replace")
                sched.finish(row, status, resp.status_code, err_msg)
                return Response(b"".join(chunks), status_code=resp.status_code, headers=hdrs)
            hdrs["cache-control"] = "no-cache"
            hdrs["x-accel-buffering"] = "no"
            return _Relay(sched, resp, row, sched.relay(resp, it, chunks, row), status_code=200, headers=hdrs,
                          media_type="text/event-stream")
        # every try failed before the first token
        row["tried"] = tried
        sched.finish(row, ST_UPSTREAM_ERROR, last_status,
                     f"{last_error} (after {retries} retr{'y' if retries == 1 else 'ies'})")
        hdrs = sched.block_headers(d, retries)
        hdrs["x-request-id"] = rid
        return _json_error(last_status, f"no instance could serve the request: {last_error} (instances tried: "
                                        f"{tried}, retries: {retries})", "upstream_error", hdrs)

    async def completions(request: Request) -> Response:
        return await generate(request, "/v1/completions", False)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, "/v1/chat/completions", True)

    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> Response:
        assert sched.pool is not None
        errors = []
        for i in sched.eligible():
            inst = sched.instances[i]
            try:
                r = await sched.pool.request("GET", inst.origin, "/v1/models", b"", sched._auth,
                                             max(5.0, sched.cfg.probe_timeout_s))
                content = await r.read()
            except UpstreamError as err:
                errors.append(f"instance {i}: {err}")
                continue
            if r.status_code == 200:
                return Response(content, media_type="application/json", headers={"x-block-instance": str(i)})
            errors.append(f"instance {i}: HTTP {r.status_code}")
        raise ServiceError(502, "no instance answered /v1/models: " + "; ".join(errors), "upstream_error")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(sched.render_metrics(), media_type=prom.CONTENT_TYPE)

    @app.get("/instances")
    async def instances() -> dict[str, Any]:
        now = time.monotonic()
        return {"instances": [{"index": x.index, "url": x.url, "down_for_s": max(0.0, x.down_until - now)}
                              for x in sched.instances]}

    async def _start() -> None:
        await sched.start()

    async def _stop() -> None:
        await sched.close()

    app.router.on_startup.append(_start)  # FastAPI's default lifespan runs these (as block/engine/app.py does)
    app.router.on_shutdown.append(_stop)

    return app
