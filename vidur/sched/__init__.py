"""Scheduling rules of the simulated engine: the seam where a vLLM scheduler version plugs in.

A rule decides what the next step of an engine (``vidur.engine.Engine``) holds -- which running requests get tokens,
which waiting ones are admitted, who is preempted -- and commits it with the engine's shared primitives
(``mixed_step`` for a step with prefill tokens, ``decode_run`` for a closed-form run of decode-only steps), so every
rule keeps the fast lazy decode group. ``EngineConfig.scheduler`` names the rule:

* ``v0``: vLLM V0 as Block ran it (``vidur.sched.v0``);
* ``v1``: current vLLM's V1 scheduler (``vidur.sched.v1``).

A new rule is a class with the ``SchedulingRule`` shape, built from an ``EngineConfig`` (reading only the settings in
``make_rule``'s cache key) and registered in ``RULES``, plus its naive step-by-step twin in
``tests/reference_engine.py`` that the fast engine is checked against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from vidur.sched.v0 import V0Rule
from vidur.sched.v1 import V1Rule

if TYPE_CHECKING:
    from vidur.engine import Engine
    from vidur.types import EngineConfig


class SchedulingRule(Protocol):
    """What the engine needs from a rule."""

    # whether a running prefill holds blocks for all its known tokens (V0) or only for those computed so far (V1)
    prefill_holds_known: bool
    # whether ``vidur.candidate`` may walk a candidate's life over the recorded steps (its room: ``Engine.room_at_reject``)
    closed_form: bool

    def advance(self, e: "Engine", until: float) -> None:
        """Form the next step of ``e`` at ``e.time`` and commit it (or the part of a decode run starting < until)."""
        ...

    def may_reach_back(self, e: "Engine") -> bool:
        """False only if the next step's admission loop surely stops before the last waiting request."""
        ...

    def settle(self, e: "Engine") -> None:
        """Commit the part of the next step that comes before its admission loop and never looks at the waiting
        queue (V0 chunked: the decodes' preemptions), so that ``may_reach_back`` judges the queue admission sees."""
        ...


RULES: dict[str, type] = {"v0": V0Rule, "v1": V1Rule}


def make_rule(config: "EngineConfig") -> SchedulingRule:
    """The rule ``config.scheduler`` names.

    A rule keeps no reference to its engine (the engine passes itself in): an engine must not sit in a reference
    cycle, or every what-if engine would wait for the cyclic garbage collector instead of dying at once.
    """
    key = (config.scheduler, config.chunked_prefill, config.long_prefill_token_threshold)
    rule = _MADE.get(key)
    if rule is None:  # rules hold only these three settings, so engines share them (a what-if builds one per call)
        try:
            cls = RULES[config.scheduler]
        except KeyError:
            raise ValueError(f"unknown scheduler {config.scheduler!r}: use one of {sorted(RULES)}") from None
        rule = _MADE[key] = cls(config)
    return rule


_MADE: dict[tuple, SchedulingRule] = {}
