"""The pass-through proxy for one engine: forward OpenAI requests, track each one in flight, never lose an answer.

Streaming is preserved chunk by chunk; the engine's status codes and JSON errors pass through. Streams are requested
with ``continuous_usage_stats`` (exact token counts; stripped again for the client) and a non-streaming request is
sent upstream as a stream and reassembled, so the tracker sees its progress too. No silent loss (docs/services.md,
"Proxy"): an answer counts only if it ended properly ([DONE] or finish_reason). Before the first token a failure is
a prompt 502/503 ``engine_unavailable`` (nothing reached the client: the scheduler may retry elsewhere); after it,
502 ``engine_failed`` (non-streaming) or an SSE error event and [DONE]; an in-stream error with a 4xx code is the
client's (that status, or the event relayed).

Every tracked request ends in exactly one call of :meth:`Proxy._finish` with its outcome; the hooks in
:attr:`Proxy.on_finish` see it there as a :class:`Finished` (arrival, first token and finish on the tracker's clock,
tokens decoded, the expected length it was tracked with): the place to compare what was predicted with what
happened (prediction-error metrics, a residual correction).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

import anyio
import httpx
import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from block.engine.tokens import TokenCounter
from block.predictor.liveness import Liveness
from block.predictor.tracker import Reassembler, Tracked, Tracker, chunk_progress, shape_usage
from block.service import ServiceError, error_body, json_object
from block.sse import DONE, SSE_DONE, SSEScanner, client_error_status, error_event, error_message, parse_payload

log = logging.getLogger("block.predictor")

JSON = "application/json"
DROP_REQ_HEADERS = frozenset((
    b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"te", b"trailer", b"upgrade",
    b"proxy-authorization", b"proxy-connection", b"accept-encoding", b"authorization", b"expect",
))
PASS_RESP_HEADERS = ("x-request-id",)
NOT_FORCEABLE = ("logprobs", "top_logprobs", "echo", "prompt_logprobs", "tools", "functions", "best_of")


def error_json(status: int, message: str, type_: str, code: Any = None) -> Response:
    """An OpenAI-style JSON error (``code`` defaults to the status)."""
    return Response(orjson.dumps(error_body(message, type_, code or status)), status_code=status, media_type=JSON)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type=JSON)


class Upstream(Exception):
    """The engine could not be reached or did not answer: status 502 (transport) or 503 (timeout)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Finished:
    """A proxied request as it left the predictor (see the module docstring)."""

    tracked: Tracked
    outcome: str  # one of block.predictor.metrics.OUTCOMES
    finish_s: float  # the tracker's clock, like tracked.arrival_s and tracked.first_token_s

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.tracked.arrival_s

    @property
    def ttft_s(self) -> Optional[float]:
        ft = self.tracked.first_token_s
        return None if ft is None else ft - self.tracked.arrival_s


FinishHook = Callable[[Finished], None]


class Proxy:
    """Forwards one engine's OpenAI endpoints; ``client`` is set while the service runs (its start/stop)."""

    def __init__(self, *, engine_url: str, engine_token: Optional[str], tracker: Tracker, counter: TokenCounter,
                 live: Liveness, available: Callable[[], None], count: Callable[[str], None],
                 force_stream: bool = True, continuous_usage: bool = True, forward_client_auth: bool = False) -> None:
        self.engine_url = engine_url
        self.engine_token = engine_token
        self.tracker = tracker
        self.counter = counter
        self.live = live
        self.available = available  # raises the 503 ServiceError while the instance is unavailable
        self.count = count  # one proxied request's outcome (the metrics counter)
        self.force_stream = force_stream
        self.continuous_usage = continuous_usage
        self.forward_client_auth = forward_client_auth
        self.client: Optional[httpx.AsyncClient] = None
        self.on_finish: list[FinishHook] = []

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
            self.live.mark_err(f"POST {path}: {type(err).__name__}")
            raise Upstream(503, f"engine at {self.engine_url} did not answer in time ({type(err).__name__})") \
                from None
        except httpx.HTTPError as err:
            self.live.mark_err(f"POST {path}: {type(err).__name__}: {err}")
            raise Upstream(502, f"engine at {self.engine_url} unreachable: {type(err).__name__}: {err}") from None
        self.live.mark_ok()
        return resp

    def _finish(self, t: Tracked, outcome: str) -> None:
        """The one end of every tracked request: untrack, count, tell the hooks (a failing hook is logged)."""
        self.tracker.remove(t)
        self.count(outcome)
        if self.on_finish:
            done = Finished(t, outcome, self.tracker.now())
            for hook in self.on_finish:
                try:
                    hook(done)
                except Exception:  # noqa: BLE001 - an observer must not cost the client its answer
                    log.exception("on_finish hook %r failed", hook)

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
            self.live.mark_err(f"reading answer: {type(err).__name__}")
            self._finish(t, "unavailable")
            return error_json(502, f"engine failed while answering: {type(err).__name__}: {err}", "engine_unavailable")
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
            return error_json(status, f"{message} (before the first token)", "engine_unavailable")
        self._finish(t, "failed_midstream")
        return error_json(502, f"{message} (after {t.decoded} tokens)", "engine_failed")

    def _engine_error(self, t: Tracked, err: Any) -> Response:
        """An error event in an answer not relayed yet. An error the engine blames on the request (a 4xx ``code``,
        e.g. vLLM's out-of-vocabulary token id inside an HTTP 200 stream) is answered with that status and the
        engine's error object: the client's fault, never retried. Any other is the engine's failure (_broken)."""
        status = client_error_status(err)
        if status is not None:
            self._finish(t, "client_error")
            return json_response({"error": err}, status)
        if t.decoded == 0:
            self._finish(t, "engine_error")
            return error_json(502, f"engine failed before the first token: {error_message(err)}", "engine_unavailable")
        self._finish(t, "engine_error")
        return error_json(502, f"engine failed after {t.decoded} tokens: {error_message(err)}", "engine_failed")

    async def proxy(self, request: Request, path: str, chat: bool) -> Response:
        raw = await request.body()
        try:
            body = json_object(raw)  # bounded: what we read we can write back (the forced-stream rewrite)
        except ServiceError as err:
            self.count("bad_request")
            return error_json(400, err.message, "BadRequestError", 400)
        try:
            self.available()
        except ServiceError as err:
            self.count("unavailable")
            return error_json(err.status, err.message, err.type)
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
            return error_json(up.status, up.message, "engine_unavailable")
        except Exception as err:  # noqa: BLE001 - a bug must not cost the client a JSON answer
            log.exception("proxying %s failed", path)
            self._finish(t, "engine_error")
            return error_json(500, f"predictor error while proxying: {type(err).__name__}: {err}", "server_error")
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
        return error_json(499, "client disconnected", "ClientDisconnected", 499)

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
            self.live.mark_err(f"POST {path}: {type(e).__name__}")
            return self._broken(t, 503, f"engine at {self.engine_url} stopped answering ({type(e).__name__})")
        except httpx.HTTPError as e:
            self.live.mark_err(f"POST {path}: {type(e).__name__}: {e}")
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
            self.live.mark_err(f"POST {path}: {type(e).__name__}")
            raise Upstream(503, f"engine at {self.engine_url} did not answer in time ({type(e).__name__})") \
                from None
        except httpx.HTTPError as e:
            await resp.aclose()
            self.live.mark_err(f"POST {path}: {type(e).__name__}: {e}")
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
                    self.live.mark_err(f"POST {path}: {type(e).__name__}: {e}")
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
            self.live.mark_err(f"GET /v1/models: {type(err).__name__}")
            return error_json(503, f"engine at {self.engine_url} did not answer in time", "engine_unavailable")
        except httpx.HTTPError as err:
            self.live.mark_err(f"GET /v1/models: {type(err).__name__}: {err}")
            return error_json(502, f"engine at {self.engine_url} unreachable: {type(err).__name__}: {err}",
                        "engine_unavailable")
        self.live.mark_ok()
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", JSON))
