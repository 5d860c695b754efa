"""The scheduler's HTTP face: OpenAI ``/v1/completions`` and ``/v1/chat/completions`` (streaming or not),
``GET /v1/models`` (from the first instance that answers), ``/health``, ``/metrics`` and ``/instances``.

The two generation endpoints are the hot path and are served as plain ASGI (:class:`SchedulerApp`) with the same
edges as every service (bearer token, body limit, the JSON error body of ``block.service``), checked inline so that
refused requests are counted and logged too: no routing, request object, exception middleware or per-response task
group in between (on the 2-core dev box Starlette's ``StreamingResponse`` alone cost ~0.17 ms of CPU per request).
Everything else is the FastAPI app from ``block.service.create_app``.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import math
import os
import time
from typing import Any, Optional

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from block import prom
from block.scheduler.core import Scheduler
from block.scheduler.errors import UpstreamFailure, UpstreamRefused
from block.scheduler.jsonio import dumps as _dumps
from block.scheduler.request import HINT_HEADER, parse_body
from block.scheduler.requestlog import (
    ST_CLIENT_ERROR,
    ST_DISCONNECTED,
    ST_INTERNAL,
    ST_OK,
    ST_STREAM_ERROR,
    ST_UPSTREAM_ERROR,
)
from block.scheduler.routing import Decision
from block.http import UpstreamError
from block.service import DEFAULT_MAX_BODY, ServiceError, create_app, error_body

log = logging.getLogger("block.scheduler")
HOT_PATHS = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> chat
_JSON = (b"content-type", b"application/json")
_SSE = (b"content-type", b"text/event-stream")


def _hdrs(h: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in h.items()]


async def _send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [_JSON, (b"content-length", str(len(body)).encode())] + headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, status: int, message: str, type_: str, headers: dict[str, str]) -> None:
    await _send_json(send, status, _dumps(error_body(message, type_, status)), _hdrs(headers))


class SchedulerApp:
    """ASGI entry: the generation endpoints here, everything else to the FastAPI app (``self.app``)."""

    def __init__(self, sched: Scheduler, app: FastAPI, token: Optional[str], max_body_bytes: int) -> None:
        self.sched = sched
        self.app = app
        self.state = app.state
        self.token = f"Bearer {token}".encode() if token else None
        self.max_body = max_body_bytes
        self._ids = itertools.count()
        self._prefix = f"s{os.getpid():x}-"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in HOT_PATHS and scope["method"] == "POST":
            await self.generate(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # ------------------------------------------------------------------ one request
    async def generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        sched = self.sched
        arrival_wall = time.time()
        path = scope["path"]
        rid = hint = clen = None
        auth = b""
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = v.decode("latin-1")
            elif k == b"x-expected-output-tokens":
                hint = v.decode("latin-1")
            elif k == b"authorization":
                auth = v
            elif k == b"content-length":
                clen = v
        rid = rid or self._prefix + str(next(self._ids))
        sched.metrics.n_inflight += 1
        row: dict[str, Any] = {"id": rid, "index": None, "arrival_s": arrival_wall, "path": path,
                               "instance": -1, "predicted_e2e_s": None, "probe_ms": 0.0, "decision_ms": 0.0,
                               "retries": 0, "fallback": False}
        try:
            if self.token is not None and not hmac.compare_digest(auth, self.token):
                raise ServiceError(401, "missing or invalid bearer token", "authentication_error")
            if clen is not None and (not clen.isdigit() or int(clen) > self.max_body):
                raise ServiceError(413, f"request body larger than {self.max_body} bytes")
            raw = await _read_body(receive, self.max_body)
            await self._generate(raw, {HINT_HEADER: hint} if hint is not None else {}, path, rid, row, receive,
                                 send)
        except ServiceError as err:  # e.g. the body limit
            if "status" not in row:
                sched.finish(row, ST_CLIENT_ERROR, err.status, err.message)
            await _send_error(send, err.status, err.message, err.type, {"x-request-id": rid})
        except ClientGone:
            if "status" not in row:
                sched.finish(row, ST_DISCONNECTED, 499, "client disconnected before the answer started")
        except (asyncio.CancelledError, GeneratorExit):
            if "status" not in row:
                sched.finish(row, ST_DISCONNECTED, 499, "client disconnected before the answer started")
            raise
        except Exception as err:  # noqa: BLE001 - a bug must still end the request clearly and be counted
            log.exception("request %s failed", rid)
            if "status" not in row:
                sched.finish(row, ST_INTERNAL, 500, f"{type(err).__name__}: {err}")
            try:
                await _send_error(send, 500, f"scheduler error: {type(err).__name__}: {err}", "server_error",
                                  {"x-request-id": rid})
            except Exception:  # noqa: BLE001 - the answer had already started
                pass

    async def _generate(self, raw: bytes, headers: dict[str, str], path: str, rid: str, row: dict[str, Any],
                        receive: Receive, send: Send) -> None:
        sched = self.sched
        try:
            body, p = parse_body(raw, headers, HOT_PATHS[path], sched.counter)
        except ServiceError as err:
            sched.finish(row, ST_CLIENT_ERROR, err.status, err.message)
            await _send_error(send, err.status, err.message, err.type, {"x-request-id": rid})
            return
        estimated = await sched.estimate_length(body, p, row)  # None unless an estimator gave the length
        index = row["index"] = sched.n  # the RoutingContext's request_index: routed requests only
        sched.n += 1
        req = sched.make_request(index, time.monotonic() - sched.t0, p, estimated)
        row.update(prompt_tokens=p.prompt_tokens, hint=p.hint if p.hint is not None else estimated, stream=p.stream)
        # the client leaving before its answer has started cancels the dispatch (one watcher task per request: a
        # task per await would cost ~30% of the decisions per second)
        me = asyncio.current_task()
        gone: list[bool] = []
        watcher = asyncio.ensure_future(_cancel_when_gone(receive, me, gone))
        try:
            await self._dispatch(req, index, body, p, path, raw, rid, row, estimated, watcher, receive, send)
        except asyncio.CancelledError:
            if not gone:
                raise
            uncancel = getattr(me, "uncancel", None)  # Python >= 3.11 counts cancellations
            if uncancel is not None:
                uncancel()
            raise ClientGone() from None
        finally:
            watcher.cancel()

    async def _dispatch(self, req: Any, index: int, body: dict, p: Any, path: str, raw: bytes, rid: str,
                        row: dict[str, Any], estimated: Optional[int], watcher: asyncio.Future, receive: Receive,
                        send: Send) -> None:
        """Route, forward, retry and answer. Until ``watcher`` is cancelled (before anything is sent), a client that
        leaves cancels routing and forwarding: their cleanup closes the upstream request, so the predictor and the
        engine abort it (ClientGone)."""
        sched = self.sched
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
                last_error, last_status = (f"{last_error}; {err}", 502) if tried else (str(err), 503)
                break
            fallback_any = fallback_any or d.fallback
            decision_ms += d.decision_ms
            probe_ms += d.probe_ms
            row.update(instance=d.instance, told_tokens=d.told_tokens,
                       predicted_e2e_s=None if math.isnan(d.predicted_e2e_s) else d.predicted_e2e_s,
                       probe_ms=probe_ms, decision_ms=decision_ms, fallback=fallback_any, probed=d.probed,
                       answered=d.answered, dispatch_s=time.time(), num_active=d.num_active)
            try:
                resp, chunks, finished, it = await sched.open_upstream(d, path, raw, body, p, rid)
            except UpstreamRefused as err:  # the engine blamed the request inside its stream: that 4xx, once
                watcher.cancel()
                hdrs = sched.block_headers(d, retries)
                hdrs["x-request-id"] = rid
                sched.finish(row, ST_CLIENT_ERROR, err.status, str(err))
                await _send_json(send, err.status, _dumps({"error": err.error}), _hdrs(hdrs))
                return
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
            row["first_token_s"] = time.time()  # streams: the first token is in; others: the answer is complete
            hdrs = sched.block_headers(d, retries)
            hdrs["x-request-id"] = rid
            if estimated is not None:
                hdrs["x-block-estimated-output-tokens"] = str(estimated)
                hdrs["x-block-estimator-ms"] = f"{row['estimator_ms']:.3f}"
            if fallback_any:
                hdrs["x-block-fallback"] = "1"
            watcher.cancel()  # from here on the answer's own path notices a disconnect
            if finished or it is None:
                data = b"".join(chunks)
                code = resp.status_code
                status = ST_OK if code < 400 else ST_CLIENT_ERROR if code < 500 else ST_STREAM_ERROR
                if status == ST_STREAM_ERROR:  # the predictor's engine_failed: the engine broke after a token
                    sched.metrics.stream_errors.inc()
                sched.finish(row, status, code, None if status == ST_OK else data[:500].decode("utf-8", "replace"))
                ctype = resp.headers.get("content-type", "application/json").encode("latin-1")
                await send({"type": "http.response.start", "status": resp.status_code,
                            "headers": [(b"content-type", ctype), (b"content-length", str(len(data)).encode())]
                            + _hdrs(hdrs)})
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return
            await self._stream(resp, it, chunks, row, hdrs, receive, send)
            return
        # every try failed before the first token
        watcher.cancel()
        row["tried"] = tried
        sched.finish(row, ST_UPSTREAM_ERROR, last_status,
                     f"{last_error} (after {retries} retr{'y' if retries == 1 else 'ies'})")
        hdrs = sched.block_headers(d, retries)
        hdrs["x-request-id"] = rid
        await _send_error(send, last_status, f"no instance could serve the request: {last_error} (instances tried: "
                                             f"{tried}, retries: {retries})", "upstream_error", hdrs)

    async def _stream(self, resp: Any, it: Any, chunks: list[bytes], row: dict[str, Any], hdrs: dict[str, str],
                      receive: Receive, send: Send) -> None:
        """Relay an SSE answer; a watcher cuts the upstream (the engine aborts) as soon as the client leaves."""
        gen = self.sched.relay(resp, it, chunks, row)
        done = False

        async def watch() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    break
            if not done:  # the client left mid-stream: stop the upstream request
                row["_client_gone"] = True
                await resp.aclose()

        watcher = asyncio.ensure_future(watch())
        try:
            first = await gen.__anext__()
            await send({"type": "http.response.start", "status": 200, "headers": [_SSE] + _hdrs(hdrs)})
            await send({"type": "http.response.body", "body": first, "more_body": True})
            async for chunk in gen:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            done = True
            watcher.cancel()
            await gen.aclose()  # ends the bookkeeping if the loop was left early
            if "status" not in row:
                await resp.aclose()
                self.sched.finish(row, ST_DISCONNECTED, 499, "client disconnected")


class ClientGone(Exception):
    """The client disconnected before its request was complete."""


async def _disconnected(receive: Receive) -> None:
    """Return when the client disconnects (the request body has been read: nothing else can arrive)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


async def _cancel_when_gone(receive: Receive, task: Optional[asyncio.Task], gone: list[bool]) -> None:
    """Cancel ``task`` (the request's dispatch) when the client disconnects; ``gone`` tells why it was cancelled."""
    await _disconnected(receive)
    gone.append(True)
    if task is not None:
        task.cancel()


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts = []
    n = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        b = msg.get("body", b"")
        n += len(b)
        if n > limit:
            raise ServiceError(413, f"request body larger than {limit} bytes")
        parts.append(b)
        if not msg.get("more_body"):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def build_app(sched: Scheduler, token: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY) -> SchedulerApp:
    """The scheduler's ASGI application (serve it with uvicorn, e.g. ``block.scheduler.serving.serve``)."""
    app = create_app("block global scheduler", token=token, max_body_bytes=max_body_bytes, health=sched.health)
    app.state.scheduler = sched

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

    @app.post("/v1/completions")
    async def _never_completions() -> None:  # pragma: no cover - served by SchedulerApp; listed for the docs
        raise ServiceError(500, "routed past the scheduler's fast path")

    @app.post("/v1/chat/completions")
    async def _never_chat() -> None:  # pragma: no cover
        raise ServiceError(500, "routed past the scheduler's fast path")

    async def _start() -> None:
        await sched.start()

    async def _stop() -> None:
        await sched.close()

    app.router.on_startup.append(_start)  # FastAPI's default lifespan runs these (as block/engine/app.py does)
    app.router.on_shutdown.append(_stop)
    return SchedulerApp(sched, app, token, max_body_bytes)
