"""Pieces every rule shares: argmin/argmax with a uniform random tie-break, and Block's noise injection.

All randomness comes from the ``rng`` passed in (the scheduler's ``RoutingContext.rng``), so a run is fixed by the
scheduler's seed and the rules stay pure functions of their inputs.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

from vidur.policy_contract import RoutingContext
from vidur.types import Candidate

TIE_RTOL = 1e-12  # scores equal within this relative tolerance are ties
NOISE_CLIP = (0.1, 5.0)  # Block's inject_noise clips the multiplicative factor to this range


def _pick(ids: Sequence[int], scores: Sequence[float], rng: random.Random, sign: float) -> int:
    if not ids:
        raise ValueError("no candidate to choose from")
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} ids but {len(scores)} scores")
    best = min(sign * s for s in scores)
    tied = [i for i, s in zip(ids, scores) if abs(sign * s - best) <= TIE_RTOL * max(abs(s), abs(best))]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def argmin(ids: Sequence[int], scores: Sequence[float], rng: random.Random) -> int:
    """The id with the lowest score; ties (equal within ``TIE_RTOL`` relative) broken uniformly with ``rng``."""
    return _pick(ids, scores, rng, 1.0)


def argmax(ids: Sequence[int], scores: Sequence[float], rng: random.Random) -> int:
    """The id with the highest score; ties broken uniformly with ``rng``."""
    return _pick(ids, scores, rng, -1.0)


def inject_noise(v: float, pct: float, rng: random.Random) -> float:
    """Block's ``inject_noise``: ``v * clip(1 + N(0, pct/100), 0.1, 5.0)``; ``pct <= 0`` returns ``v`` unchanged."""
    if pct <= 0:
        return v
    lo, hi = NOISE_CLIP
    return v * min(hi, max(lo, 1.0 + rng.gauss(0.0, pct / 100.0)))


def noisy_length(tokens: int, pct: float, rng: random.Random) -> int:
    """A response length with Block's noise, rounded, at least 1 token."""
    if pct <= 0:
        return max(1, int(tokens))
    return max(1, int(round(inject_noise(float(tokens), pct, rng))))


def fallback(ctx: RoutingContext) -> int:
    """No candidate answered (Block: all predictors failed): a uniformly random active instance."""
    return ctx.rng.choice(ctx.instance_ids)


def with_stats(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates that carry load figures (the live scheduler drops instances whose probe failed)."""
    return [c for c in candidates if c.stats is not None]


def with_prediction(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates with a usable what-if (a finite, non-negative predicted e2e)."""
    return [c for c in candidates if c.prediction is not None and math.isfinite(c.prediction.e2e_s)
            and c.prediction.e2e_s >= 0]


def ids_of(candidates: Sequence[Candidate]) -> list[int]:
    return [c.instance_id for c in candidates]


def min_by(candidates: Sequence[Candidate], scores: Sequence[float], ctx: RoutingContext) -> int:
    """argmin over candidates, or the random fallback when there are none."""
    return argmin(ids_of(candidates), scores, ctx.rng) if candidates else fallback(ctx)


def max_by(candidates: Sequence[Candidate], scores: Sequence[float], ctx: RoutingContext) -> int:
    return argmax(ids_of(candidates), scores, ctx.rng) if candidates else fallback(ctx)


def check_pct(name: str, pct: Optional[float]) -> float:
    p = 0.0 if pct is None else float(pct)
    if not math.isfinite(p) or p < 0:
        raise ValueError(f"{name}={pct} must be a finite percentage >= 0")
    return p
