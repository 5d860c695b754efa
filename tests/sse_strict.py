"""A strict reader of a whole SSE body for the tests: every event must be one ``data: `` line (what vLLM and our
services send), so a test that compares streams also checks their framing. The services themselves read streams with
block/sse.py, which is lenient on purpose."""

from __future__ import annotations

import json


def sse_events(raw: bytes) -> list:
    """The events of ``raw`` in order: parsed JSON objects, and the string ``"[DONE]"``."""
    out = []
    for ev in raw.split(b"\n\n"):
        if ev.strip():
            assert ev.startswith(b"data: "), ev
            p = ev[6:]
            out.append(p.decode() if p == b"[DONE]" else json.loads(p))
    return out
