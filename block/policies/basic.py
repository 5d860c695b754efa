"""Policies that look at no engine signal: round-robin, random and min-QPM (the scheduler's own history)."""

from __future__ import annotations

from collections import deque

from block.policies.common import min_by
from vidur.policy_contract import RoutingContext
from vidur.types import Candidate, Request

QPM_WINDOW_S = 60.0


def round_robin(request: Request, candidates: list[Candidate], ctx: RoutingContext) -> int:
    """Instance ``request_index mod N`` among the active instances (Block: ``instances[request_id % len]``)."""
    ids = ctx.instance_ids
    return ids[ctx.request_index % len(ids)]


def random_choice(request: Request, candidates: list[Candidate], ctx: RoutingContext) -> int:
    """Uniform over the active instances."""
    return ctx.rng.choice(ctx.instance_ids)


def _qpm_state(ctx: RoutingContext, window_s: float) -> dict:
    """min-QPM memory in ``ctx.state``: a time-ordered deque of (dispatch time, instance) and per-instance counts.

    Pruning pops from the left, so each dispatch is added and removed once: amortised O(1) per request.
    """
    st = ctx.state.get("min_qpm")
    if st is None:
        st = ctx.state["min_qpm"] = {"log": deque(), "count": {}}
    log, count = st["log"], st["count"]
    horizon = ctx.now_s - window_s
    while log and log[0][0] <= horizon:
        _, i = log.popleft()
        count[i] -= 1
    return st


def min_qpm(request: Request, candidates: list[Candidate], ctx: RoutingContext, *,
            window_s: float = QPM_WINDOW_S) -> int:
    """Fewest requests dispatched by this scheduler in the last ``window_s`` seconds (Block's
    ``request_per_seconds``, min-QPM); random tie-break. The history is written by ``min_qpm_observe``."""
    count = _qpm_state(ctx, window_s)["count"]
    return min_by(candidates, [count.get(c.instance_id, 0) for c in candidates], ctx)


def min_qpm_observe(request: Request, chosen: int, candidates: list[Candidate], ctx: RoutingContext, *,
                    window_s: float = QPM_WINDOW_S) -> None:
    """Record one dispatch to ``chosen`` at ``ctx.now_s`` (``RoutingPolicy.observe`` hook)."""
    st = _qpm_state(ctx, window_s)
    st["log"].append((ctx.now_s, chosen))
    st["count"][chosen] = st["count"].get(chosen, 0) + 1
