"""One reader of OpenAI-style server-sent event streams (vLLM's ``/v1/completions`` and ``/v1/chat/completions``).

Shared by the predictor (tracking and relaying), the scheduler (holding a stream until its first token) and the
benchmark client (TTFT and ITL), so the three agree on what a token, an error, a finished and a complete stream
are. Why it matters: a stream that ends without ``[DONE]``, or carries an error event, must never count as served.

- :class:`SSEScanner` splits a byte stream (any chunking) into events; :func:`parse_payload` reads one ``data:``
  payload (JSON, or :data:`DONE`).
- :func:`has_output` -- a chunk with non-empty output (text, content, reasoning or tool calls);
  :func:`error_of` -- the error object of an error event; :func:`client_error_status` -- its 4xx status when the
  engine says the request itself was bad (vLLM: ``data: {"error": {..., "code": 400}}`` inside an HTTP 200 stream).
- :class:`StreamView` -- the incremental state of one answer: output chunks, finished, ``[DONE]``, error.
"""

from __future__ import annotations

from typing import Any, Optional

import orjson

DONE = "[DONE]"  # parse_payload's value for the stream terminator
SSE_DONE = b"data: [DONE]\n\n"
MAX_PENDING = 1 << 22  # bytes kept waiting for the end of an event: not SSE beyond this, do not grow without bound


class SSEScanner:
    """Split a byte stream into SSE events (an event ends with a blank line; CRLF tolerated)."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def _split(self, chunk: bytes) -> list[bytes]:
        buf = self.buf + chunk if self.buf else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        out: list[bytes] = []
        start = 0
        while True:
            i = buf.find(b"\n\n", start)
            if i < 0:
                break
            out.append(buf[start:i])
            start = i + 2
        self.buf = buf[start:] if start < len(buf) else b""
        if len(self.buf) > MAX_PENDING:
            self.buf = b""
        return out

    def feed(self, chunk: bytes) -> list[bytes]:
        """The ``data:`` payloads of the events completed by ``chunk`` (one per data line, stripped)."""
        out: list[bytes] = []
        for ev in self._split(chunk):
            for line in ev.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(line[5:].strip())
        return out

    def events(self, chunk: bytes) -> list[tuple[bytes, Optional[bytes]]]:
        """(the event's bytes with its blank line, its first ``data:`` payload or None) per completed event."""
        out: list[tuple[bytes, Optional[bytes]]] = []
        for ev in self._split(chunk):
            data = None
            for line in ev.split(b"\n"):
                if line.startswith(b"data:"):
                    data = line[5:].strip()
                    break
            out.append((ev + b"\n\n", data))
        return out

    def rest(self) -> bytes:
        """The bytes of an unfinished event (what a stream that stops mid-event leaves behind)."""
        out, self.buf = self.buf, b""
        return out


def parse_payload(p: bytes) -> Any:
    """A data payload as JSON (:data:`DONE` for the terminator, None if unparsable)."""
    if p == b"[DONE]":
        return DONE
    try:
        return orjson.loads(p)
    except orjson.JSONDecodeError:
        return None


def choice_has_output(c: Any) -> bool:
    if not isinstance(c, dict):
        return False
    if c.get("text"):
        return True
    d = c.get("delta")
    if isinstance(d, dict):
        return bool(d.get("content") or d.get("reasoning_content") or d.get("reasoning") or d.get("tool_calls"))
    return False


def has_output(obj: Any) -> bool:
    """True for a chunk that carries output (a role-only or usage-only chunk does not)."""
    if not isinstance(obj, dict):
        return False
    choices = obj.get("choices")
    return isinstance(choices, list) and any(choice_has_output(c) for c in choices)


def is_finished(obj: Any) -> bool:
    """True for a chunk in which a choice ends (``finish_reason`` set)."""
    if not isinstance(obj, dict):
        return False
    return any(isinstance(c, dict) and c.get("finish_reason") for c in obj.get("choices") or ())


def error_of(obj: Any) -> Optional[Any]:
    """The error object of an error event (``{"error": {...}}`` without choices), else None."""
    if isinstance(obj, dict) and obj.get("error") is not None and not obj.get("choices"):
        return obj["error"]
    return None


def error_message(err: Any) -> str:
    return str(err.get("message", err)) if isinstance(err, dict) else str(err)


def client_error_status(err: Any) -> Optional[int]:
    """The 4xx status of an error the engine blames on the request (its ``code``), else None (the engine's fault)."""
    if not isinstance(err, dict):
        return None
    code = err.get("code")
    if isinstance(code, str) and code.strip().isdigit():
        code = int(code.strip())
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 500:
        return code
    return None


def error_event(message: str, type_: str, code: int) -> bytes:
    """An SSE error event in vLLM's shape."""
    return b"data: " + orjson.dumps({"error": {"message": message, "type": type_, "code": code}}) + b"\n\n"


class StreamView:
    """What one streamed answer has said so far: feed it the raw chunks; it parses complete events only.

    ``errors_only``: parse only error events and ``[DONE]`` (a relay past the first token needs nothing else; a
    token chunk then costs a byte comparison, not a JSON parse); ``outputs`` and ``finished`` are not kept.
    """

    __slots__ = ("scanner", "outputs", "done", "finished", "error", "errors_only")

    def __init__(self, errors_only: bool = False) -> None:
        self.errors_only = errors_only
        self.scanner = SSEScanner()
        self.outputs = 0  # chunks with output
        self.done = False  # [DONE] seen
        self.finished = False  # a choice ended (finish_reason)
        self.error: Optional[Any] = None  # the first error event's error object

    def feed(self, chunk: bytes) -> list[Any]:
        """Update the view from ``chunk``; the parsed payloads of the events it completed (in order)."""
        objs = []
        for p in self.scanner.feed(chunk):
            if self.errors_only and not p.startswith(b'{"error"') and p != b"[DONE]":
                continue
            obj = parse_payload(p)
            objs.append(obj)
            if obj == DONE:
                self.done = True
                continue
            err = error_of(obj)
            if err is not None:
                if self.error is None:
                    self.error = err
                continue
            if has_output(obj):
                self.outputs += 1
            if is_finished(obj):
                self.finished = True
        return objs

    @property
    def complete(self) -> bool:
        """The answer ended properly: ``[DONE]`` after no error."""
        return self.done and self.error is None
