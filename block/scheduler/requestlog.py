"""The request log: one JSON line per finished request, with its status (``STATUSES``), always written -- a value
JSON cannot carry is logged as its repr and the row marked -- and never failing a request (a full disk is a warning).
"""

from __future__ import annotations

import logging
import reprlib
from typing import Any, Mapping, Optional

from block.scheduler.jsonio import dumps

log = logging.getLogger("block.scheduler")

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
            dumps(v)
            out[key] = v
        except (TypeError, ValueError):
            try:
                r = _REPR.repr(v)  # bounded; repr escapes lone surrogates (they are not printable)
            except ValueError:  # e.g. an int past sys.get_int_max_str_digits()
                r = f"<{type(v).__name__}>"
            out[key] = r if len(r) <= limit else r[:limit] + "...[truncated]"
            bad.append(key)
    try:
        dumps(out.get("status"))
        out["logged_status"] = out.get("status")
    except (TypeError, ValueError):
        pass
    out["status"] = ST_INTERNAL
    out["log_error"] = "not JSON-serialisable, written as repr: " + ", ".join(map(ascii, bad))
    return out


class RequestLog:
    """Appends rows to ``path`` (line-buffered); no path: rows are dropped."""

    def __init__(self, path: Optional[str]) -> None:
        self._f = open(path, "a", buffering=1) if path else None

    def write(self, row: dict[str, Any]) -> None:
        """One JSON line per request, always: a row with a value JSON cannot carry is written with that value as
        its (truncated) repr, status ``internal_error`` and ``log_error`` naming the fields."""
        if self._f is not None:
            try:
                line = dumps(row)
            except (TypeError, ValueError):  # orjson's JSONEncodeError is a TypeError
                line = dumps(loggable_row(row))
            try:
                self._f.write(line.decode() + "\n")
            except (OSError, ValueError) as err:  # a full disk must not fail requests
                log.warning("cannot write the request log: %s", err)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
