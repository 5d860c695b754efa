"""Policies of ours beyond Block: what the new request does to the others, and the TTFT the SLO is about.

Block (``block.policies.predicted.block``) sends a request where *its own* predicted e2e is lowest. Two things it
leaves out, both of which the what-if can see:

* ``block_social`` -- **total added latency**. Joining an instance also slows down the requests already there:
  every step the newcomer shares is longer (its prefill chunks, its decode token), it takes a seat of the batch cap
  and KV blocks (which can preempt a running request, whose recomputation delays it further). The what-if runs the
  instance to idle with and without the candidate (``Prediction.others_delay_s``, ``vidur.whatif``), and the rule
  minimises ``e2e + weight x others_delay``: with ``weight = 1`` the increase of the sum of all latencies on the
  instance, the greedy step of minimising mean latency (Block is ``weight = 0``). The cost is a run to idle per
  candidate plus one per instance (the reference), about 2-4x Block's what-if.
* ``block_ttft`` -- **the SLO's own quantity**. Capacity is set by P99 TTFT, not e2e. Block's e2e adds the
  candidate's decode time, which differs between instances by their batch size, and can prefer an instance with a
  longer queue but a lighter batch. This rule minimises the predicted TTFT (queueing + prefill), with the e2e as a
  small tie-break (``e2e_weight``).

Both read the same length Block is told (the client's hint: the estimator's prediction where the dataset has one),
so on ``dataset=sharegpt_predicted`` they run with estimated lengths, like Block*.
"""

from __future__ import annotations

from block.policies.common import inject_noise, min_by, with_prediction
from vidur.policy_contract import RoutingContext
from vidur.types import Candidate, Request


def block_social(request: Request, candidates: list[Candidate], ctx: RoutingContext, *, weight: float = 1.0,
                 latency_noise_pct: float = 0.0) -> int:
    """argmin of predicted e2e + weight x the delay the request adds to the others on the instance."""
    cands = with_prediction(candidates)
    scores = [inject_noise(c.prediction.e2e_s + weight * c.prediction.others_delay_s, latency_noise_pct, ctx.rng)
              for c in cands]
    return min_by(cands, scores, ctx)


def block_ttft(request: Request, candidates: list[Candidate], ctx: RoutingContext, *, e2e_weight: float = 0.01,
               latency_noise_pct: float = 0.0) -> int:
    """argmin of predicted TTFT + e2e_weight x predicted e2e (the SLO's quantity first)."""
    cands = with_prediction(candidates)
    scores = [inject_noise(c.prediction.ttft_s + e2e_weight * c.prediction.e2e_s, latency_noise_pct, ctx.rng)
              for c in cands]
    return min_by(cands, scores, ctx)
