"""How a forward fails: the exceptions that decide between retrying a request elsewhere and answering the client,
and the predictor's error types they are read from (block/predictor/app.py)."""

from __future__ import annotations

from typing import Any, Optional

from block.scheduler.jsonio import loads
from block.sse import error_message

# error types of a predictor's answer (block/predictor/app.py) that decide what the scheduler does
ERR_ENGINE_DOWN = "engine_down"  # 503: its engine is known to be down -> retried elsewhere, instance marked down
ERR_ENGINE_FAILED = "engine_failed"  # 502: its engine failed after the first token -> relayed, not retried


class UpstreamFailure(Exception):
    """The chosen instance failed before the first token: the request may be retried elsewhere."""

    def __init__(self, message: str, status: int = 502, mark_down: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.mark_down = mark_down


class UpstreamRefused(Exception):
    """The engine refused the request inside its stream, before the first token (an error event with a 4xx code,
    e.g. vLLM's out-of-vocabulary token id): the client's fault, answered with that status, never retried."""

    def __init__(self, status: int, error: Any) -> None:
        super().__init__(error_message(error))
        self.status = status
        self.error = error


def error_type(data: bytes) -> Optional[str]:
    """``error.type`` of a JSON error body (None if it is not one)."""
    try:
        e = loads(data).get("error")
    except (ValueError, AttributeError, TypeError):
        return None
    return e.get("type") if isinstance(e, dict) else None
