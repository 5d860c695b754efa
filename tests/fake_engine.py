"""A misbehaving OpenAI-compatible engine for tests: a real HTTP/1.1 server on loopback (asyncio, in a thread).

It answers ``POST /v1/completions`` and ``/v1/chat/completions`` as a stream in vLLM's format, badly on purpose: the
behaviour is the server's ``mode``, or the request's when its prompt (or last message) is ``"mode:<name>"``:

- ``good``: (chat: a role-only chunk,) three one-token chunks, the last with ``finish_reason``, usage, ``[DONE]``;
- ``role_close``: a chunk without output (chat: role only; completions: empty text), then a clean end (no ``[DONE]``);
- ``tokens_close``: two tokens, then a clean end;
- ``client_error``: vLLM's in-stream client error (HTTP 200, ``data: {"error": {... "code": 400}}``), ``[DONE]``;
- ``token_then_client_error``: one token, then that error event and ``[DONE]``;
- ``multi`` / ``multi_nousage``: chunks of three tokens each (``usage.completion_tokens`` in every chunk when the
  request asked ``continuous_usage_stats``, never for ``multi_nousage``); after three chunks it holds the stream
  until :meth:`FakeEngine.release` (``held`` is set meanwhile), then a last chunk of three, usage, ``[DONE]``.

``GET /health`` is 200, any other GET (``/metrics``, ``/state``) 404: a predictor in front of it runs in proxy mode
and pings ``/health``. Every request body is kept
in ``bodies``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Optional

CLIENT_ERROR = {"object": "error", "message": "token id 999999 is out of vocabulary", "type": "BadRequestError",
                "param": None, "code": 400}


class FakeEngine:
    def __init__(self, mode: str = "good") -> None:
        self.mode = mode
        self.bodies: list[dict[str, Any]] = []
        self.held = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._release: Optional[asyncio.Event] = None
        self._server: Optional[asyncio.AbstractServer] = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        started.wait(10)
        assert self._server is not None
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ control
    def release(self) -> None:
        """Let held ``multi`` streams finish."""
        self._loop.call_soon_threadsafe(self._release.set)  # type: ignore[union-attr]

    def close(self) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "FakeEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ server
    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._release = asyncio.Event()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        started.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                raw = await reader.readexactly(int(hdrs.get("content-length", "0")))
                if method == "GET":
                    status, body = (200, b"{}") if path in ("/health", "/v1/models") else \
                        (404, b'{"detail":"Not Found"}')
                    writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: "
                                 f"{len(body)}\r\n\r\n".encode() + body)
                    await writer.drain()
                    continue
                req = json.loads(raw)
                self.bodies.append(req)
                await self._answer(writer, req, path.endswith("/chat/completions"))
                return  # one streamed answer per connection (connection: close)
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _mode_of(self, req: dict[str, Any]) -> str:
        p = req.get("prompt")
        if req.get("messages"):
            p = req["messages"][-1].get("content")
        if isinstance(p, str) and p.startswith("mode:"):
            return p[5:]
        return self.mode

    async def _answer(self, w: asyncio.StreamWriter, req: dict[str, Any], chat: bool) -> None:
        mode = self._mode_of(req)
        so = req.get("stream_options") or {}
        cont = bool(so.get("continuous_usage_stats")) and mode != "multi_nousage"
        usage_end = bool(so.get("include_usage")) and mode != "multi_nousage"
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                b"connection: close\r\n\r\n")
        n = 0

        def usage(k: int) -> dict[str, int]:
            return {"prompt_tokens": 4, "total_tokens": 4 + k, "completion_tokens": k}

        def chunk(text: Optional[str], k: int = 0, finish: Optional[str] = None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish,
                          "stop_reason": None}
            obj: dict[str, Any] = {"id": "cmpl-fake", "object": "chat.completion.chunk" if chat else
                                   "text_completion", "created": 1, "model": "fake", "choices": [choice]}
            if cont:
                obj["usage"] = usage(k)
            elif not chat:
                obj["usage"] = None
            return obj

        async def send(obj: Any) -> None:
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            w.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await w.drain()

        async def end(done: bool = True) -> None:
            if done:
                if usage_end:
                    await send({"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": "fake",
                                "choices": [], "usage": usage(n)})
                await send(b"[DONE]")
            w.write(b"0\r\n\r\n")
            await w.drain()

        if chat:
            await send(chunk(None, 0, role=True))
        if mode == "role_close":
            if not chat:
                await send(chunk(""))
            return await end(done=False)
        if mode == "client_error":
            await send({"error": CLIENT_ERROR})
            return await end()
        if mode in ("tokens_close", "token_then_client_error", "good"):
            k = {"tokens_close": 2, "token_then_client_error": 1, "good": 3}[mode]
            for i in range(k):
                n += 1
                await send(chunk(f" t{n}", n, "length" if mode == "good" and i == k - 1 else None))
            if mode == "tokens_close":
                return await end(done=False)
            if mode == "token_then_client_error":
                await send({"error": CLIENT_ERROR})
            return await end()
        if mode in ("multi", "multi_nousage"):
            assert self._release is not None
            self._release.clear()  # each held stream waits for its own release
            for _ in range(3):
                n += 3
                await send(chunk(" a b c", n))
            self.held.set()
            await self._release.wait()
            n += 3
            await send(chunk(" a b c", n, "length"))
            return await end()
        raise ValueError(f"unknown mode {mode!r}")
