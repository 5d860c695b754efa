"""``block_residual``: Block whose what-if is corrected by a residual learned from the requests' outcomes.

The rule is Block's (argmin of the predicted e2e over the probed instances) applied to the predictions after
``vidur.residual.ResidualCorrector`` -- the same corrector the live predictor side-car applies with
``--residual-correction`` (``block/predictor/feedback.py``) -- has scaled them by what it learned from finished
requests (``log(actual / predicted)`` by load, queue depth and lengths; outcomes arrive through
``vidur.outcomes``). ``residual=False`` keeps recording the error but never corrects (the switch).

``whatif_scale`` deliberately mis-calibrates the what-if for experiments: every predicted time is multiplied by
``s``. For the simulator's step-time model that is what a profile scaled by ``s`` predicts (every step of the
what-if scales by ``s`` and nothing arrives during it; only the remainder of a step already in flight is not
scaled), so ``whatif_scale=0.8`` / ``1.25`` stand for a profile 20 % too fast / 25 % too slow.

What it records, per request (``ResidualState.log``): the raw (mis-calibrated) what-if, the corrected value the
rule acted on, and -- once finished -- the actual e2e; ``benchmarks/learned_vs_whatif.py`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from block.policies.common import inject_noise, min_by, with_prediction
from vidur.outcomes import drain, open_outcomes
from vidur.policy_contract import RoutingContext
from vidur.residual import ResidualCorrector
from vidur.types import Candidate, Prediction, Request

LengthOf = Callable[[int], int]
STATE_KEY = "block_residual"
MAX_PENDING = 50_000
MAX_LOG = 1_000_000


@dataclass
class ResidualState:
    corrector: ResidualCorrector
    last: tuple[int, dict[int, tuple[Prediction, float, int]]] = (-1, {})
    pending: dict[int, tuple[int, Prediction, float, int, int]] = field(default_factory=dict)
    log: list[tuple[int, float, float, float]] = field(default_factory=list)  # id, raw, used, actual e2e
    _row: dict[int, int] = field(default_factory=dict)  # request id -> index in log


def residual_state(ctx: RoutingContext, residual: bool, decay: float, min_samples: int) -> ResidualState:
    st = ctx.state.get(STATE_KEY)
    if st is None:
        st = ctx.state[STATE_KEY] = ResidualState(ResidualCorrector(enabled=residual, decay=decay,
                                                                    min_samples=min_samples))
        open_outcomes(ctx.state)
    return st


def scaled(p: Prediction, s: float) -> Prediction:
    return p if s == 1.0 else replace(p, e2e_s=p.e2e_s * s, ttft_s=p.ttft_s * s, queue_s=p.queue_s * s)


def block_residual(request: Request, candidates: list[Candidate], ctx: RoutingContext, *,
                   length_of: Optional[LengthOf] = None, residual: bool = True, whatif_scale: float = 1.0,
                   decay: float = 0.999, min_samples: int = 50, latency_noise_pct: float = 0.0) -> int:
    """Block's argmin over residual-corrected predictions (module docstring)."""
    if not whatif_scale > 0:
        raise ValueError(f"block_residual: whatif_scale={whatif_scale} must be > 0")
    st = residual_state(ctx, residual, decay, min_samples)
    for o in drain(ctx.state, ctx.now_s):
        hit = st.pending.pop(o.request_id, None)
        if hit is None or hit[0] != o.instance_id:
            continue
        _, raw, used, prompt, told = hit
        st.corrector.observe(raw, prompt, told, o.e2e_s, o.ttft_s, used_e2e_s=used)
        k = st._row.pop(o.request_id, None)
        if k is not None:
            rid, r, u, _ = st.log[k]
            st.log[k] = (rid, r, u, o.e2e_s)
    cands = with_prediction(candidates)
    seen: dict[int, tuple[Prediction, float, int]] = {}
    scores = []
    for c in cands:
        told = length_of(c.instance_id) if length_of is not None else request.expected_output_tokens()
        raw = scaled(c.prediction, whatif_scale)
        used = st.corrector.correct(raw, request.prompt_tokens, told).e2e_s
        seen[c.instance_id] = (raw, used, told)
        scores.append(inject_noise(used, latency_noise_pct, ctx.rng))
    st.last = (request.id, seen)
    return min_by(cands, scores, ctx)


def residual_observe(request: Request, chosen: int, candidates: list[Candidate], ctx: RoutingContext) -> None:
    """Keep the chosen instance's raw and used prediction until the request's outcome comes back."""
    st: Optional[ResidualState] = ctx.state.get(STATE_KEY)
    if st is None:
        return
    rid, seen = st.last
    if rid != request.id or chosen not in seen:
        return
    raw, used, told = seen[chosen]
    if len(st.pending) >= MAX_PENDING:
        st.pending.pop(next(iter(st.pending)))
    st.pending[request.id] = (chosen, raw, used, request.prompt_tokens, told)
    if len(st.log) < MAX_LOG:
        st._row[request.id] = len(st.log)
        st.log.append((request.id, raw.e2e_s, used, float("nan")))
