"""Forwarding a routed request and relaying the answer: open the upstream and read to its first token (a failure
before it may be retried elsewhere, an error the engine blames on the request is the client's), then relay the
stream chunk by chunk; it always ends with ``data: [DONE]`` (an error event first when the upstream broke off).

``RelayMixin`` is that part of ``block.scheduler.core.Scheduler`` (it reads ``pool``, ``instances``, ``cfg``,
``metrics`` and ``_auth`` and calls ``finish``).
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional

from block.http import Pool, Response, UpstreamError
from block.scheduler.errors import ERR_ENGINE_DOWN, ERR_ENGINE_FAILED, UpstreamFailure, UpstreamRefused, error_type
from block.scheduler.jsonio import dumps
from block.scheduler.request import HINT_FIELD, HINT_HEADER, Parsed
from block.scheduler.requestlog import ST_CLIENT_ERROR, ST_DISCONNECTED, ST_OK, ST_STREAM_ERROR
from block.scheduler.routing import Decision
from block.sse import SSE_DONE, StreamView, client_error_status, error_event, error_message

if TYPE_CHECKING:
    from block.scheduler.config import SchedulerConfig
    from block.scheduler.health import Instance
    from block.scheduler.metrics import Metrics


class RelayMixin:
    """Forward and relay of the Scheduler (see the module docstring)."""

    cfg: "SchedulerConfig"
    instances: list["Instance"]
    pool: Optional[Pool]
    metrics: "Metrics"
    _auth: dict[str, str]

    finish: Callable[..., None]  # the Scheduler's: ends a request's bookkeeping

    @staticmethod
    def block_headers(d: Optional[Decision], retries: int) -> dict[str, str]:
        if d is None:
            return {"x-block-retries": str(retries)}
        return {
            "x-block-instance": str(d.instance),
            "x-block-predicted-e2e-s": "nan" if math.isnan(d.predicted_e2e_s) else repr(d.predicted_e2e_s),
            "x-block-probe-ms": f"{d.probe_ms:.3f}",
            "x-block-decision-ms": f"{d.decision_ms:.3f}",
            "x-block-retries": str(retries),
            **({} if d.num_active is None else {"x-block-num-active": str(d.num_active)}),
        }

    async def open_upstream(self, d: Decision, path: str, raw: bytes, body: dict, p: Parsed,
                            request_id: str) -> tuple[Response, list[bytes], bool, Optional[AsyncIterator[bytes]]]:
        """Send the request to the chosen instance and read until its first token (streaming) or to the end.

        Returns (response, buffered chunks, finished, the body iterator to continue with). Raises
        :class:`UpstreamFailure` for a failure before the first token (``mark_down`` when the connection was
        refused or the predictor says its engine is down) and :class:`UpstreamRefused` for an error event the
        engine blames on the request (a 4xx ``code``). A 4xx answer is returned as is (the client's fault: not
        retried), and so is a 502 ``engine_failed`` (the engine failed after its first token: not retried either).
        """
        pool = self.pool
        assert pool is not None
        if p.hint_in_body and body.get(HINT_FIELD) != d.told_tokens:
            body = dict(body)
            body[HINT_FIELD] = d.told_tokens
            raw = dumps(body)
        elif getattr(p, "coerced", False):  # parse_body rewrote fields with the values vLLM parses them to
            raw = dumps(body)
        headers = {"content-type": "application/json", HINT_HEADER: str(d.told_tokens), "x-request-id": request_id,
                   **self._auth}
        try:
            resp = await pool.request("POST", self.instances[d.instance].origin, path, raw, headers,
                                      self.cfg.upstream_timeout_s)
        except UpstreamError as err:
            raise UpstreamFailure(f"instance {d.instance}: {err}", 502, mark_down=err.kind == "connect") from err
        chunks: list[bytes] = []
        try:
            if resp.status_code >= 500:
                data = await resp.read()
                kind = error_type(data)
                if kind == ERR_ENGINE_FAILED:
                    return resp, [data], True, None
                raise UpstreamFailure(f"instance {d.instance} answered {resp.status_code}: "
                                      f"{data[:300].decode('utf-8', 'replace')}", 502,
                                      mark_down=kind == ERR_ENGINE_DOWN)
            if resp.status_code != 200 or not p.stream:
                return resp, [await resp.read()], True, None
            view = StreamView()
            it = resp.aiter_raw()
            while True:
                try:
                    chunk = await it.__anext__()
                except StopAsyncIteration:
                    if not chunks:
                        raise UpstreamFailure(f"instance {d.instance} ended the stream without any data", 502)
                    raise UpstreamFailure(f"instance {d.instance} ended the stream before the first token: "
                                          f"{b''.join(chunks)[-300:].decode('utf-8', 'replace')}", 502)
                if not chunk:
                    continue
                chunks.append(chunk)
                view.feed(chunk)
                if view.error is not None and not view.outputs:
                    status = client_error_status(view.error)
                    if status is not None:
                        raise UpstreamRefused(status, view.error)
                    raise UpstreamFailure(f"instance {d.instance} sent an error before the first token: "
                                          f"{error_message(view.error)[:300]}", 502)
                if view.outputs or view.finished or view.done:  # a token, or an answer complete without one
                    return resp, chunks, False, it
        except (UpstreamFailure, UpstreamRefused):
            await resp.aclose()
            raise
        except UpstreamError as err:
            await resp.aclose()
            raise UpstreamFailure(f"instance {d.instance} failed before the first token: {err}", 502) from err
        except BaseException:
            await resp.aclose()
            raise

    async def relay(self, resp: Response, it: AsyncIterator[bytes], chunks: list[bytes],
                    row: dict[str, Any]) -> AsyncIterator[bytes]:
        """Yield the buffered chunks, then the rest of the upstream stream; end the request's bookkeeping.

        The stream always ends with ``data: [DONE]``: an upstream that breaks or ends without it gets an error event
        (unless it sent one) and ``[DONE]``. An error event makes the row ``stream_error`` (``client_error`` when the
        engine blames the request: a 4xx ``code``)."""
        status, error = ST_OK, None
        view = StreamView(errors_only=True)
        try:
            first = b"".join(chunks)
            view.feed(first)
            yield first
            try:
                async for chunk in it:
                    if not chunk:
                        continue
                    view.feed(chunk)
                    yield chunk
            except UpstreamError as err:
                if row.get("_client_gone"):  # we cut the upstream because the client left
                    status, error = ST_DISCONNECTED, "client disconnected"
                    return
                status, error = ST_STREAM_ERROR, f"upstream failed after the first token: {err}"
                yield _event_break(view) + _error_event(f"upstream instance {row.get('instance')} failed after the "
                                                        f"first token: {err}", 502) + SSE_DONE
                return
            if view.error is not None:
                if client_error_status(view.error) is not None:
                    status = ST_CLIENT_ERROR
                    error = f"the engine refused the request during the stream: {error_message(view.error)}"
                else:
                    status = ST_STREAM_ERROR
                    error = f"the engine reported an error during the stream: {error_message(view.error)}"
            if not view.done:
                if view.error is None:
                    status, error = ST_STREAM_ERROR, "upstream stream ended without [DONE]"
                yield _event_break(view) + (b"" if view.error is not None else _error_event(
                    f"upstream instance {row.get('instance')} ended the stream early", 502)) + SSE_DONE
        except (asyncio.CancelledError, GeneratorExit):
            status, error = ST_DISCONNECTED, "client disconnected"
            raise
        except Exception as err:  # noqa: BLE001 - e.g. the client's socket broke
            status, error = ST_DISCONNECTED, f"client went away: {err!r}"
            raise
        finally:
            if status == ST_STREAM_ERROR:
                self.metrics.stream_errors.inc()
            await resp.aclose()
            row.pop("_client_gone", None)
            self.finish(row, status, 200, error)


def _event_break(view: StreamView) -> bytes:
    """A blank line if the upstream stopped in the middle of an event (so what we append is an event of its own)."""
    return b"\n\n" if view.scanner.buf else b""


def _error_event(message: str, code: int) -> bytes:
    return error_event(message, "upstream_error", code)
