"""JSON in and out of the scheduler: orjson when present (the predictor's dependency too; faster), else the
standard library. Bytes in, bytes out, the same on both paths."""

from __future__ import annotations

import json
from typing import Any

try:  # orjson (the predictor's dependency too) is faster; the standard library is the fallback
    import orjson as _orjson

    def loads(b: bytes) -> Any:
        return _orjson.loads(b)

    def dumps(obj: Any) -> bytes:
        return _orjson.dumps(obj)
except ImportError:  # pragma: no cover - depends on the environment
    def loads(b: bytes) -> Any:
        return json.loads(b)

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()
