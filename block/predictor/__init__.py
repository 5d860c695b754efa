"""Predictor side-car: one per engine; proxies the engine's OpenAI API, tracks the instance state, answers what-ifs.

``python -m block.predictor --help`` for the command line; docs/services.md ("Predictor side-car") for the
behaviour. Heavy modules (FastAPI, httpx, the execution model) are imported lazily so ``--help`` stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PredictorService", "Tracker", "build_app", "make_service"]


def __getattr__(name: str) -> Any:
    if name in ("PredictorService", "build_app"):
        from block.predictor import app

        return getattr(app, name)
    if name == "Tracker":
        from block.predictor.tracker import Tracker

        return Tracker
    if name == "make_service":
        from block.predictor.cli import make_service

        return make_service
    raise AttributeError(name)
