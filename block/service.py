"""What every service (engine, predictor, scheduler) shares: app factory, auth, errors, limits, CLI and serving.

Why one module: the services must behave alike at their edges -- bind 127.0.0.1 unless told otherwise, accept an
optional bearer token, answer bad input with a 4xx and a JSON ``{"error": {"message", "type", "code"}}`` body (the
OpenAI error shape, so OpenAI clients show the message), refuse oversized bodies, and expose ``/health``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BODY = 4 * 1024 * 1024  # bytes
# JSON a client sends: nesting deeper than this is refused (an OpenAI body nests ~6 deep; orjson reads 1024 levels
# but writes only 255, so a deeper body that is read and forwarded would fail on the way out)
MAX_JSON_DEPTH = 64
INT64_MAX = 2**63 - 1  # integers a client sends must fit in 64 bits (vLLM's seed/priority bound; orjson writes them)
INT64_MIN = -(2**63)
TOKEN_ENV = "BLOCK_API_TOKEN"

log = logging.getLogger("block.service")


class ServiceError(Exception):
    """An error to return as JSON with ``status`` (4xx for the client's fault)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code if code is not None else status


def bad_request(message: str) -> ServiceError:
    """A 400 with OpenAI's ``BadRequestError`` type (what vLLM answers for a bad completion request)."""
    return ServiceError(400, message, "BadRequestError")


def show(v: Any, limit: int = 200) -> str:
    """A client's value for an error message, bounded (a 4 MB string must not come back 4 MB long)."""
    if isinstance(v, (list, tuple, dict)):
        return f"<{type(v).__name__} of {len(v)} items>"
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "...[truncated]"


def int_field(name: str, v: Any, lo: Optional[int] = None, hi: int = INT64_MAX) -> Optional[int]:
    """An integer request field (None stays None); integral floats and digit strings are accepted, as pydantic
    does; anything else, or a value outside ``[lo, hi]`` (64-bit by default), is a 400 that names the field."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise bad_request(f"{name} must be an integer, got {v!r}")
    if isinstance(v, float):
        if not v.is_integer():  # also nan and inf
            raise bad_request(f"{name} must be an integer, got {show(v)}")
        if abs(v) > 2.0**64:
            raise bad_request(f"{name} must be at most {hi}, got {show(v)}")
        v = int(v)
    if isinstance(v, str):
        s = v.strip()
        if len(s) > 24 or not s.lstrip("+-").isdigit():  # 24 chars: any 64-bit integer; no 5,000-digit parse
            raise bad_request(f"{name} must be an integer, got {show(v)}")
        v = int(s)
    if not isinstance(v, int):
        raise bad_request(f"{name} must be an integer, got {type(v).__name__}")
    if lo is not None and v < lo:
        raise bad_request(f"{name} must be at least {lo}, got {v}")
    if v > hi:
        raise bad_request(f"{name} must be at most {hi}, got {v}")
    return v


def error_body(message: str, type_: str = "invalid_request_error", code: Any = 400) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, type_, status), status_code=status)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 before reading them into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_bytes
                except ValueError:
                    too_big = True
                if too_big:
                    await error_response(413, f"request body larger than {self.max_bytes} bytes")(scope, receive,
                                                                                                 send)
                    return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise ServiceError(413, f"request body larger than {self.max_bytes} bytes")
            return msg

        await self.app(scope, limited, send)


class BearerAuth:
    """ASGI middleware: when a token is set, every path except /health needs ``Authorization: Bearer <token>``."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app: ASGIApp, token: Optional[str]) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.token or scope.get("path") in self.OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        got = ""
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                got = v.decode("latin-1")
        expected = f"Bearer {self.token}"
        if not hmac.compare_digest(got.encode(), expected.encode()):
            await error_response(401, "missing or invalid bearer token", "authentication_error")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(title: str, token: Optional[str] = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               health: Optional[Callable[[], dict[str, Any]]] = None) -> FastAPI:
    """A FastAPI app with the shared edges: JSON errors, auth, body limit and ``GET /health``."""
    app = FastAPI(title=title)

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return error_response(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                              else "server_error")

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(400, f"body is not valid JSON: {exc.msg} at position {exc.pos}")

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # the client (or the read deadline) closed the connection: nobody reads it

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:  # a bug still answers in JSON, never text/plain
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def _health() -> dict[str, Any]:
        return {"status": "ok", **(health() if health else {})}

    app.add_middleware(BearerAuth, token=token)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


class BadJSON(ValueError):
    """A client's JSON that we refuse to read (malformed, too deep); the message says why, for a 400."""


def _depth_over(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests containers more than ``limit`` deep (iterative: no recursion on hostile input)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            return True
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values() if isinstance(v, (dict, list)))
        else:
            stack.extend((v, d + 1) for v in o if isinstance(v, (dict, list)))
    return False


def loads_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON a client sent, bounded: the one reader of client JSON in every service.

    orjson refuses what the standard library lets through and later chokes on: invalid UTF-8 and lone surrogates
    (``"\\udc80"``, which a tokenizer or ``str.encode`` then fails on), numbers that overflow a double (a
    5,000-digit integer). Integers beyond 64 bits come back as floats, which ``int_field`` bounds. Nesting is
    bounded here: a body deeper than ``max_depth`` is refused, so everything we accept can be written back. The
    depth walk runs only when the body has more brackets than ``max_depth`` (never for ordinary requests)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        msg = str(err)
        if "recursion" in msg:
            raise BadJSON(f"JSON nested deeper than {max_depth} levels") from None
        raise BadJSON(f"body is not valid JSON: {msg}") from None
    if isinstance(obj, (dict, list)) and raw.count(b"[") + raw.count(b"{") > max_depth \
            and _depth_over(obj, max_depth):
        raise BadJSON(f"JSON nested deeper than {max_depth} levels")
    return obj


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object (``loads_json``), or a 400 that says what is wrong."""
    if not raw:
        raise bad_request("request body is empty; expected a JSON object")
    try:
        body = loads_json(raw)
    except BadJSON as err:
        raise bad_request(str(err)) from None
    if not isinstance(body, dict):
        raise bad_request(f"body must be a JSON object, got {type(body).__name__}")
    return body


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong."""
    return json_object(await request.body())


@dataclass(frozen=True)
class Limits:
    """How long and how much a client may take: what keeps slow or idle clients from holding a service's sockets.

    uvicorn has no deadline for a request's header or body: a connection that sends half a header, or trickles a
    chunked body, is held as long as the client likes (the file-descriptor limit is the only cap). ``serve`` adds
    both deadlines to whatever HTTP protocol runs (``guarded_protocol``) and passes the rest to uvicorn."""

    header_timeout_s: float = 10.0  # from the connection (or the end of the last answer's keep-alive) to the headers
    body_timeout_s: float = 60.0  # from the headers to the last byte of the body
    keep_alive_s: float = 5.0  # idle keep-alive connections are closed after this (uvicorn's timeout_keep_alive)
    limit_concurrency: int = 4096  # uvicorn's: requests past this many connections or tasks get a 503 (0 = none)
    max_header_bytes: int = 64 * 1024  # h11's max_incomplete_event_size: a longer header is a 400

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(f"{name}={v} must be a positive number of seconds")
        if self.limit_concurrency < 0:
            raise ValueError(f"limit_concurrency={self.limit_concurrency} must be >= 0 (0 = no limit)")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes={self.max_header_bytes} must be at least 1024")

    def uvicorn_options(self) -> dict[str, Any]:
        return {"timeout_keep_alive": self.keep_alive_s, "limit_concurrency": self.limit_concurrency or None,
                "h11_max_incomplete_event_size": self.max_header_bytes}


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s,
                  keep_alive_s=args.keep_alive_s, limit_concurrency=args.limit_concurrency,
                  max_header_bytes=args.max_header_bytes)


def guarded_protocol(base: type, limits: Limits) -> type:
    """``base`` (a uvicorn HTTP/1.1 protocol: h11, httptools, or the scheduler's corked one) with read deadlines.

    One timer per connection: armed for the header when the connection opens or a new request's first bytes come,
    re-armed for the body once the headers are in, cancelled when the request is complete (the answer, however
    long, is not bounded). When it fires, the connection is closed: the app sees ``http.disconnect`` (the
    scheduler logs the request as a disconnect), and a half-sent header costs nothing more. The checks run in
    ``data_received`` only -- a few attribute reads per read from the socket."""

    header_s, body_s = limits.header_timeout_s, limits.body_timeout_s

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        _deadline: Optional[asyncio.TimerHandle] = None
        _phase = ""  # "header" | "body" | "" (no deadline: request complete, or idle under keep-alive)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm("header", header_s)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            c = self.cycle
            if c is None or c.response_complete:
                if self._phase != "header":  # the next request's first bytes: the header clock starts
                    self._arm("header", header_s)
            elif c.more_body:
                if self._phase != "body":
                    self._arm("body", body_s)
            elif self._phase:
                self._disarm()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            c = self.cycle
            if self._phase and (c is None or c.response_complete):  # answered before its body was read
                self._disarm()

        def _arm(self, phase: str, after_s: float) -> None:
            self._disarm()
            self._phase = phase
            self._deadline = asyncio.get_running_loop().call_later(after_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self._phase = ""

        def _expired(self) -> None:
            phase, self._deadline, self._phase = self._phase, None, ""
            t = self.transport
            if t is None or t.is_closing():
                return
            c = self.cycle
            if phase == "header" and (c is None or c.response_complete):  # nothing started: say why, then close
                self._answer(408, f"request header not received within {header_s:g} s")
            log.info("closing a connection: request %s not received within %g s", phase,
                     header_s if phase == "header" else body_s)
            t.close()

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a request it cannot parse (e.g. a header over --max-header-bytes), in JSON."""
            self._answer(400, f"invalid HTTP request: {msg}")
            self.transport.close()

        def _answer(self, status: int, message: str) -> None:
            """A whole JSON error answer written raw (no request cycle exists), then the connection closes."""
            body = orjson.dumps(error_body(message, "invalid_request_error", status))
            reason = {400: b"Bad Request", 408: b"Request Timeout"}[status]
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (status, reason, len(body), body))

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def add_common_args(ap: argparse.ArgumentParser, default_port: int) -> None:
    ap.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: loopback only)")
    ap.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port}; 0 = any free)")
    ap.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                    help=f"require 'Authorization: Bearer <token>' (default: ${TOKEN_ENV}, unset = no auth)")
    ap.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest accepted request body")
    d = Limits()
    ap.add_argument("--header-timeout-s", type=float, default=d.header_timeout_s,
                    help="close a connection whose request header is not complete this long after it opened or "
                         f"its previous answer ended (default {d.header_timeout_s:g})")
    ap.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                    help="close a connection whose request body is not complete this long after its header "
                         f"(default {d.body_timeout_s:g})")
    ap.add_argument("--keep-alive-s", type=float, default=d.keep_alive_s,
                    help=f"close idle keep-alive connections after this (default {d.keep_alive_s:g})")
    ap.add_argument("--limit-concurrency", type=int, default=d.limit_concurrency,
                    help="answer 503 to requests beyond this many open connections or requests in flight "
                         f"(default {d.limit_concurrency}; 0 = no limit)")
    ap.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                    help=f"largest request header (default {d.max_header_bytes})")
    ap.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def serve(app: Any, host: str, port: int, log_level: str = "warning", limits: Optional[Limits] = None,
          **uvicorn_options: Any) -> None:
    """Run ``app`` with uvicorn until interrupted; print the bound address on stdout (orchestrators read it).

    ``limits`` (default ``Limits()``) bound what a client may hold; ``uvicorn_options`` go to ``uvicorn.Config``
    (the scheduler passes its corked HTTP protocol, which gets the read deadlines too)."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    limits = limits or Limits()
    opts = {**limits.uvicorn_options(), **uvicorn_options}
    opts["http"] = guarded_protocol(opts.get("http") or AutoHTTPProtocol, limits)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on", **opts)
    server = uvicorn.Server(config)
    if port == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto set: asyncio then disables Nagle
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        port = sock.getsockname()[1]
        print(f"listening on http://{host}:{port}", flush=True)
        server.run(sockets=[sock])
    else:
        print(f"listening on http://{host}:{port}", flush=True)
        server.run()


def run_cli(ap: argparse.ArgumentParser, make_service: Callable[[argparse.Namespace], Any],
            build_app: Callable[..., FastAPI], argv: Optional[list[str]] = None) -> None:
    """The ``main`` of a service: parse, configure logging, build (a ValueError is a usage error), serve."""
    args = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s %(message)s")
    try:
        limits = limits_from_args(args)
        service = make_service(args)
    except ValueError as err:
        ap.error(str(err))
    app = build_app(service, token=args.token, max_body_bytes=args.max_body_bytes)
    serve(app, args.host, args.port, args.log_level, limits)
