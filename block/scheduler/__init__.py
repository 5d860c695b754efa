"""Global scheduler: a stateless OpenAI-compatible front door that routes each request with a ``block.policies``
rule on signals gathered from the instances' predictors, and streams the answer back through the chosen one.

``python -m block.scheduler --help`` for the command line; docs/services.md ("Global scheduler") for the behaviour.
Heavy modules (FastAPI) are imported lazily so ``--help`` stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Scheduler", "SchedulerConfig", "build_app", "make_scheduler"]


def __getattr__(name: str) -> Any:
    if name in ("Scheduler", "SchedulerConfig"):
        from block.scheduler import core

        return getattr(core, name)
    if name == "build_app":
        from block.scheduler.app import build_app

        return build_app
    if name == "make_scheduler":
        from block.scheduler.cli import make_scheduler

        return make_scheduler
    raise AttributeError(name)
