"""Emulated vLLM engine: the simulator's engine scheduler run in real time behind vLLM's OpenAI API.

``python -m block.engine --help`` for the command line; docs/services.md ("Emulated engine") for the behaviour.
Heavy modules (FastAPI, the execution model) are imported lazily so ``--help`` stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EngineService", "RealTimeEngine", "build_app", "build_setup", "make_service"]


def __getattr__(name: str) -> Any:
    if name in ("EngineService", "build_app"):
        from block.engine import app

        return getattr(app, name)
    if name == "RealTimeEngine":
        from block.engine.runner import RealTimeEngine

        return RealTimeEngine
    if name == "build_setup":
        from block.engine.config import build_setup

        return build_setup
    if name == "make_service":
        from block.engine.cli import make_service

        return make_service
    raise AttributeError(name)
