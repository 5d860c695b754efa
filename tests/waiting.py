"""Waiting on observable state, never on a wall-clock guess: the tests run on busy shared CI machines (issue 14).

A condition is polled until it holds; the timeout is only a generous bound against a hang, never a race the test
depends on (a condition that holds returns at once, however loaded the machine)."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_until(fn: Callable[[], Any], timeout: float = 60.0, every: float = 0.02) -> Any:
    """Poll ``fn()`` every ``every`` seconds until it returns a truthy value or ``timeout`` passed; return its last
    value (the caller asserts it, so a failure shows what was seen)."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(every)
