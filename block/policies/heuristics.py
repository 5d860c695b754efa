"""Load heuristics on cheap engine figures (``InstanceStats``), as Block's baselines and ablation define them.

Each rule scores its candidates (lower wins) and takes the argmin with a random tie-break. Candidates without
stats (a failed probe) are skipped; if none is left the pick is uniformly random, as in Block's scheduler.
"""

from __future__ import annotations

from typing import Callable, Optional

from block.policies.common import min_by, with_stats
from vidur.policy_contract import RoutingContext
from vidur.types import Candidate, InstanceStats, Request

LengthOf = Callable[[int], int]  # instance id -> output length the scheduler tells that instance


def block_nosim(request: Request, candidates: list[Candidate], ctx: RoutingContext, *,
                length_of: Optional[LengthOf] = None) -> int:
    """Block-NoSim: the instance's unprocessed tokens (sum over its requests of max(0, prompt + expected output -
    computed)) + the new prompt + the new request's expected output; lower wins.

    The new request's part is the same on every instance unless length noise draws it per instance (as Block's
    scheduler does); it is kept for fidelity to ``min_total_unprocessed_tokens``.
    """
    cands = with_stats(candidates)
    def new(i: int) -> int:
        return request.prompt_tokens + (length_of(i) if length_of is not None else request.expected_output_tokens())
    return min_by(cands, [c.stats.unprocessed_tokens + new(c.instance_id) for c in cands], ctx)


def llumnix_freeness(stats: InstanceStats) -> float:
    """Llumnix's freeness: (free blocks - blocks the waiting prompts need) / max(running, 1), its "virtual usage"
    view of free memory per running request. Dispatch goes to the freest instance; migration (``llumnix_full``)
    moves requests from instances below a threshold to the freest."""
    return (stats.free_blocks - stats.waiting_prompt_blocks) / max(stats.num_running, 1)


def llumnix(request: Request, candidates: list[Candidate], ctx: RoutingContext) -> int:
    """Llumnix- (dispatch only): -freeness (``llumnix_freeness``); lower wins."""
    cands = with_stats(candidates)
    return min_by(cands, [-llumnix_freeness(c.stats) for c in cands], ctx)


def infaas(request: Request, candidates: list[Candidate], ctx: RoutingContext) -> int:
    """INFaaS++: -free blocks / max(running, 1); lower wins."""
    cands = with_stats(candidates)
    return min_by(cands, [-c.stats.free_blocks / max(c.stats.num_running, 1) for c in cands], ctx)


def least_requests(request: Request, candidates: list[Candidate], ctx: RoutingContext) -> int:
    """Fewest running + waiting requests."""
    cands = with_stats(candidates)
    return min_by(cands, [c.stats.num_running + c.stats.num_waiting for c in cands], ctx)
