"""What every service (engine, predictor, scheduler) shares: app factory, auth, errors, limits, CLI and serving.

Why one module: the services must behave alike at their edges -- bind 127.0.0.1 unless told otherwise, accept an
optional bearer token, answer bad input with a 4xx and a JSON ``{"error": {"message", "type", "code"}}`` body (the
OpenAI error shape, so OpenAI clients show the message), refuse oversized bodies, and expose ``/health``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import socket
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BODY = 4 * 1024 * 1024  # bytes
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


def int_field(name: str, v: Any, lo: Optional[int] = None) -> Optional[int]:
    """An integer request field (None stays None); integral floats and digit strings are accepted, as pydantic
    does; anything else, or a value under ``lo``, is a 400 that names the field."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise bad_request(f"{name} must be an integer, got {v!r}")
    if isinstance(v, float):
        if not v.is_integer():
            raise bad_request(f"{name} must be an integer, got {v!r}")
        v = int(v)
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            raise bad_request(f"{name} must be an integer, got {v!r}") from None
    if not isinstance(v, int):
        raise bad_request(f"{name} must be an integer, got {type(v).__name__}")
    if lo is not None and v < lo:
        raise bad_request(f"{name} must be at least {lo}, got {v}")
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

    @app.get("/health")
    async def _health() -> dict[str, Any]:
        return {"status": "ok", **(health() if health else {})}

    app.add_middleware(BearerAuth, token=token)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong."""
    raw = await request.body()
    if not raw:
        raise ServiceError(400, "request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ServiceError(400, f"body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise ServiceError(400, f"body must be a JSON object, got {type(body).__name__}")
    return body


def add_common_args(ap: argparse.ArgumentParser, default_port: int) -> None:
    ap.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: loopback only)")
    ap.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port}; 0 = any free)")
    ap.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                    help=f"require 'Authorization: Bearer <token>' (default: ${TOKEN_ENV}, unset = no auth)")
    ap.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest accepted request body")
    ap.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def free_port(host: str = DEFAULT_HOST) -> int:
    """A currently free TCP port on ``host`` (for tests and local orchestration)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(app: FastAPI, host: str, port: int, log_level: str = "warning", **uvicorn_options: Any) -> None:
    """Run ``app`` with uvicorn until interrupted; print the bound address on stdout (orchestrators read it).

    ``uvicorn_options`` go to ``uvicorn.Config`` (the scheduler passes its corked HTTP protocol)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            **uvicorn_options)
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
        service = make_service(args)
    except ValueError as err:
        ap.error(str(err))
    app = build_app(service, token=args.token, max_body_bytes=args.max_body_bytes)
    serve(app, args.host, args.port, args.log_level)
