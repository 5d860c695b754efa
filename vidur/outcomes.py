"""Completed requests handed back to a routing policy that learns from them (the feedback channel).

A policy that learns online (``block/policies/learned.py``, ``block/policies/residual.py``) needs the outcome of
the requests it routed: when each really got its first token and finished. The harness -- the simulated cluster
or the live scheduler -- knows that; the policy does not. Rather than widening the policy contract with one more
hook, the harness *supplies the outcomes as data*: a policy that wants them opens a bounded queue in its own
memory (``RoutingContext.state``, one per scheduler) with :func:`open_outcomes`, the harness appends an
:class:`Outcome` for every finished request with :func:`deliver` (a no-op when no queue is open, so policies that
do not learn cost nothing), and the policy drains the queue at its next decision with :func:`drain`.

Outcomes arrive no earlier than they happen (the simulator delivers a finish when the engine is advanced past
it; the live scheduler when the stream ends), so a policy that learns this way never sees the future.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping, MutableMapping, Optional

OUTCOMES_KEY = "_outcomes"  # the queue's key in RoutingContext.state
MAX_PENDING = 100_000  # a policy that stops draining cannot grow the queue without bound


@dataclass(slots=True)
class Outcome:
    """One finished request as the harness saw it; times in seconds on the harness's clock."""

    request_id: int
    instance_id: int
    dispatch_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.dispatch_s

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.dispatch_s

    @property
    def tpot_s(self) -> float:
        """(e2e - TTFT) / (tokens - 1), as ``vllm bench serve`` computes it; 0 for a one-token answer."""
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def open_outcomes(state: MutableMapping[str, Any]) -> deque:
    """The policy's outcome queue in ``state``, created on first use (from then on the harness fills it)."""
    q = state.get(OUTCOMES_KEY)
    if q is None:
        q = state[OUTCOMES_KEY] = deque(maxlen=MAX_PENDING)
    return q


def wants_outcomes(state: MutableMapping[str, Any]) -> bool:
    return state.get(OUTCOMES_KEY) is not None


def deliver(state: MutableMapping[str, Any], outcome: Outcome) -> None:
    """Hand one finished request to the policy whose memory is ``state`` (nothing if it asked for none)."""
    q: Optional[deque] = state.get(OUTCOMES_KEY)
    if q is not None:
        q.append(outcome)


def drain(state: MutableMapping[str, Any], now_s: float = math.inf) -> list[Outcome]:
    """Every outcome delivered since the last drain that finished by ``now_s``, in delivery order.

    The simulator advances an engine step by step, so it may deliver a finish that lies up to one step after the
    decision being made; such an outcome stays queued until a decision at or after its finish: a policy never
    learns from the future.
    """
    q = open_outcomes(state)
    if not q:
        return []
    out = [o for o in q if o.finish_s <= now_s]
    if len(out) == len(q):
        q.clear()
    else:
        keep = [o for o in q if o.finish_s > now_s]
        q.clear()
        q.extend(keep)
    return out


def from_log_row(row: Mapping[str, Any], now_s: float) -> Optional[Outcome]:
    """The outcome of a request the live scheduler answered in full, from its log row (``block.scheduler``: id
    ``index``, ``instance``, wall-clock ``arrival_s`` / ``first_token_s`` / ``finish_s``, ``prompt_tokens``,
    ``output_tokens`` when counted, else the length it told the instance, ``told_tokens``), on the routing
    clock: ``now_s`` is that clock's reading at the finish (the wall-clock times only give the durations). None
    when a field is missing."""
    try:
        if row.get("status") != "ok":
            return None
        out = row.get("output_tokens") or row.get("told_tokens") or row.get("hint")
        fin = float(row["finish_s"])
        ft = row.get("first_token_s")
        ft = fin if ft is None else float(ft)
        return Outcome(int(row["index"]), int(row["instance"]), now_s - (fin - float(row["arrival_s"])),
                       now_s - (fin - ft), now_s, int(row["prompt_tokens"]), int(out) if out else 1)
    except (KeyError, TypeError, ValueError):
        return None
