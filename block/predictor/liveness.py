"""Is the engine behind this predictor alive? The latest news from it (a poll or a forwarded request) decides.

Kept apart from the state sources because every path that talks to the engine reports here -- the poll loop, the
state fetches, the proxy -- and ``/predict``, ``/stats`` and the proxy all ask the same question before working.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, Optional

from block.service import ServiceError


class Liveness:
    """The engine's last success and last failure on one clock; "down" is a fact derived from them."""

    def __init__(self, engine_url: str, down_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine_url = engine_url
        self.down_after_s = down_after_s
        self.clock = clock
        self.last_ok: Optional[float] = None
        self.last_err: Optional[float] = None
        self.last_err_msg: Optional[str] = None

    def mark_ok(self) -> None:
        self.last_ok = self.clock()

    def mark_err(self, msg: str) -> None:
        self.last_err = self.clock()
        self.last_err_msg = msg

    def ok(self) -> bool:
        """The engine answered, after its last failure, within ``down_after_s`` (``/health``'s ``engine_ok``)."""
        if self.last_ok is None:
            return False
        if self.last_err is not None and self.last_err >= self.last_ok:
            return False
        return self.clock() - self.last_ok <= self.down_after_s

    def down(self) -> bool:
        """The engine is known to be down: its latest news is a failure, or it has been silent for ``down_after_s``.

        While it is, the instance is unavailable: ``/predict``, ``/stats`` and the proxy answer 503 ``engine_down``
        at once, so a scheduler leaves it out when probing instead of paying a failed forward per request. The poll
        loop brings it back as soon as the engine answers. Nothing heard yet (just started) is not "down": the
        first poll or request decides.
        """
        if self.last_err is not None and (self.last_ok is None or self.last_err >= self.last_ok):
            return True
        return self.last_ok is not None and self.clock() - self.last_ok > self.down_after_s

    async def ping(self, get: Callable[[str], Awaitable[Any]]) -> None:
        """Ask the engine's ``/health`` (``/v1/models`` where it has none): any answer below 500 means alive."""
        r = await get("/health")
        if r.status_code == 404:
            r = await get("/v1/models")
        if r.status_code < 500:
            self.mark_ok()
        else:
            self.mark_err(f"GET /health: HTTP {r.status_code}")

    def check(self) -> None:
        """Raise the 503 ``engine_down`` error while the engine is down."""
        if self.down():
            raise ServiceError(503, f"engine at {self.engine_url} is down ({self.last_err_msg or 'no answer'}); "
                                    f"this instance is unavailable until it answers again", "engine_down")
