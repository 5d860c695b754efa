"""Block: route to the instance whose what-if predicts the lowest e2e latency for the new request.

The variants differ only in the output length the what-if assumes for the new request (the scheduler tells each
probed instance a length; ``RoutingPolicy.expected_length`` supplies it):

* ``block``        -- the hint the workload/client sends, ``Request.expected_output_tokens()`` (the predicted
                      length when the workload has one, else the true length). This is the deploy-time default:
                      the scheduler only uses what the client gave it.
* ``block_star``   -- the length estimator's prediction (``Request.predicted_output_tokens``; required). The
                      paper's "Block*".
* ``block_oracle`` -- the true length (``Request.output_tokens``). The paper's "Block" used oracle lengths.
* ``block_noisy``  -- the true length with Block's length noise (default 25 %): a stand-in for Block* that needs
                      no estimator.
"""

from __future__ import annotations

from block.policies.common import inject_noise, min_by, with_prediction
from vidur.policy_contract import RoutingContext
from vidur.types import Candidate, Request


def block(request: Request, candidates: list[Candidate], ctx: RoutingContext, *,
          latency_noise_pct: float = 0.0) -> int:
    """argmin over the probed instances of the predicted e2e of the new request; random tie-break.

    With ``latency_noise_pct`` each candidate's prediction is scaled by Block's noise before the argmin; the
    ``Prediction`` objects are not touched, so what the scheduler records as ``predicted_e2e_s`` stays the
    un-noised what-if. Candidates without a usable prediction are skipped (none left: uniformly random).
    """
    cands = with_prediction(candidates)
    scores = [inject_noise(c.prediction.e2e_s, latency_noise_pct, ctx.rng) for c in cands]
    return min_by(cands, scores, ctx)


def hint_length(request: Request) -> int:
    """What the client tells the scheduler: the predicted length if any, else the true one."""
    return request.expected_output_tokens()


def oracle_length(request: Request) -> int:
    return int(request.output_tokens)


def predicted_length(request: Request) -> int:
    p = request.predicted_output_tokens
    if p is None:
        raise ValueError(
            f"policy block_star needs predicted response lengths but request {request.id} has none "
            "(predicted_output_tokens is None): use a dataset with predictions and dataset.predicted_length=column "
            "(e.g. dataset=sharegpt_predicted), or policy=block_noisy / block_oracle")
    return max(1, int(p))
