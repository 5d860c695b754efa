"""Serving the scheduler with uvicorn, writes corked: one ``send`` per event-loop step instead of one per message.

uvicorn writes the status line and headers of an answer, each body piece and the end of a chunked body with
separate ``transport.write`` calls, each a ``send`` system call (on loopback each one also runs the receiver's TCP
path and wakes it: 50-90 us on the 2-core dev VM). Through the scheduler a streamed answer whose first token has
already arrived is head + first piece in the same loop step, and a short answer is head + body + end: corking
merges them into one write per step. Nothing waits: the buffer is flushed by ``loop.call_soon``, i.e. before the
loop polls for I/O again.

``serve`` is ``block.service.serve`` with this protocol (same binding rules and "listening on" line).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI


class CorkedTransport:
    """Wraps an asyncio transport: ``write`` appends to a buffer flushed once per loop step; the rest delegates."""

    __slots__ = ("_t", "_buf", "_loop", "_armed")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._t = transport
        self._buf: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._armed = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._buf.append(data)
        if not self._armed:
            self._armed = True
            self._loop.call_soon(self._flush)

    def writelines(self, lines: Any) -> None:
        for x in lines:
            self.write(x)

    def _flush(self) -> None:
        self._armed = False
        if self._buf:
            data = b"".join(self._buf) if len(self._buf) > 1 else self._buf[0]
            self._buf.clear()
            if not self._t.is_closing():
                self._t.write(data)

    def close(self) -> None:
        self._flush()
        self._t.close()

    def abort(self) -> None:
        self._buf.clear()
        self._t.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


def corked_protocol_class() -> type:
    """uvicorn's HTTP/1.1 protocol (httptools when installed, else h11) writing through a CorkedTransport."""
    try:
        import httptools  # noqa: F401

        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class CorkedProtocol(Base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(CorkedTransport(transport))  # type: ignore[arg-type]

    return CorkedProtocol


def serve(app: FastAPI, host: str, port: int, log_level: str = "warning", **options: Any) -> None:
    """Run ``app`` (block.service.serve) with the corked protocol and no ``server`` header; ``options`` (e.g.
    ``limits``) go to block.service.serve."""
    from block.service import serve as serve_app

    serve_app(app, host, port, log_level, http=corked_protocol_class(), server_header=False, **options)
