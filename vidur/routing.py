"""One routing decision, the same in the simulator (``vidur.cluster``) and in the live scheduler (``block.scheduler``).

Both used to write the steps out themselves and the copies drifted (one clamped the told length to >= 1, the other
did not; they raised different errors for an invalid choice). This module owns them; the callers supply only what
differs -- how the signals are gathered (a what-if on a simulated engine, or HTTP probes of the predictors), an
optional override (auto-provisioning) and, live, the fallback when no probe answered:

1. sample ``k`` of the routable instances with the caller's rng (all of them when ``k`` is None or >= their number);
2. with a ``prediction`` signal, fix the output length told to each sampled instance (in sampling order, so random
   length noise is drawn the same way on both sides), then gather the signals through the caller's callable;
   ``none`` gathers nothing (bare candidates), ``stats`` gathers load figures;
3. the caller's override, if any, takes the request; else no candidate at all -> the caller's fallback; else the
   policy's ``choose``, whose answer must be one of the routable instances (:class:`InvalidChoice` otherwise);
4. the policy's ``observe`` hook, the chosen candidate's predicted e2e (NaN without a prediction) and the length the
   chosen instance keeps as the request's expected length (Block's ``num_predicted_tokens``): the one it was told,
   or, when the policy draws length noise per probe, the un-noised one (``RoutingPolicy.kept_length``), as Block
   forwards the client's length to the engine whatever noise its probes carried.

A told length is drawn once per (decision, instance) -- the what-if and the chosen engine see the same number -- and
is at least 1 token: an engine cannot be told to expect an empty answer.
"""

from __future__ import annotations

import math
import random
from typing import Any, Awaitable, Callable, Mapping, Optional

from vidur.policy_contract import RoutingContext, RoutingPolicy
from vidur.types import Candidate, Request

# (signal kind, instance ids, length told to each id -- prediction only) -> the candidates that answered
Gather = Callable[[str, list[int], Mapping[int, int]], list[Candidate]]
AsyncGather = Callable[[str, list[int], Mapping[int, int]], Awaitable[list[Candidate]]]
Force = Callable[[list[Candidate]], Optional[int]]  # an instance that takes the request regardless, or None
Fallback = Callable[[list[int]], int]  # (probed ids) -> an instance, when none of them answered


_BARE: dict[tuple[int, ...], tuple[Candidate, ...]] = {}  # probed instances -> their signal-less candidates (``bare``)


class InvalidChoice(ValueError):
    """A policy chose an instance that is not one of the routable ones (a bug in the policy, not in the request)."""


class Turn:
    """One decision: its context and sampled instances, the lengths told so far and, once decided, its outcome.

    The outcome fields are set by :meth:`decide` (one object per decision: the simulator makes one per request).
    """

    __slots__ = ("policy", "req", "ctx", "ids", "probed", "_told", "instance", "candidates", "told_tokens",
                 "predicted_e2e_s", "fallback", "forced")

    def __init__(self, policy: RoutingPolicy, req: Request, ctx: RoutingContext, ids: list[int],
                 probed: list[int]) -> None:
        self.policy = policy
        self.req = req
        self.ctx = ctx
        self.ids = ids  # the routable instances
        self.probed = probed  # the sampled ones
        self._told: dict[int, int] = {}
        # the outcome, set by decide: instance (chosen), candidates (what the policy saw: the probes that answered),
        # told_tokens (the length the chosen instance keeps: ``kept``), predicted_e2e_s (the chosen candidate's what-if e2e, NaN
        # without one), fallback (nobody answered: the caller's fallback chose), forced (the caller's override chose)
        self.instance: int
        self.candidates: list[Candidate]
        self.told_tokens: int
        self.predicted_e2e_s: float
        self.fallback: bool
        self.forced: bool

    def told(self, instance: int) -> int:
        """The output length told to ``instance`` for this request: drawn once, at least 1."""
        exp = self._told.get(instance)
        if exp is None:
            pol = self.policy
            exp = int(pol.expected_length(self.req, instance, self.ctx)) if pol.expected_length is not None \
                else self.req.expected_output_tokens()
            exp = self._told[instance] = max(1, exp)
        return exp

    def kept(self, instance: int) -> int:
        """The output length ``instance`` keeps as the request's expected one if it runs it: the policy's un-noised
        length when it draws noise per probe (as Block forwards ``num_predicted_tokens``), else the told one."""
        keep = self.policy.kept_length
        return max(1, int(keep(self.req))) if keep is not None else self.told(instance)

    def lengths(self) -> dict[int, int]:
        """The lengths the probes carry: one per sampled instance, in sampling order, for a prediction signal."""
        if self.policy.signal != "prediction":
            return {}
        return {i: self.told(i) for i in self.probed}

    def bare(self) -> list[Candidate]:
        """The candidates of a policy that looks at no signal: a new list, each instance's one signal-less
        ``Candidate`` (they carry nothing that changes and policies only read them; building four per request was a
        fifth of a round-robin decision). The list for a set of instances is kept and copied: the same instances
        are probed decision after decision."""
        key = tuple(self.probed)
        cands = _BARE.get(key)
        if cands is None:
            if len(_BARE) >= 4096:  # random samples of a large cluster: keep the memory bounded
                _BARE.clear()
            cands = _BARE[key] = tuple(map(Candidate, key))
        return list(cands)

    def decide(self, cands: list[Candidate], force: Optional[Force] = None,
               fallback: Optional[Fallback] = None) -> "Turn":
        """Steps 3 and 4 of the module docstring; returns this turn, decided."""
        pol, req, ctx = self.policy, self.req, self.ctx
        forced = force(cands) if force is not None else None
        self.forced = forced is not None
        self.fallback = False
        if forced is not None:
            choice = forced
        elif not cands and fallback is not None:
            choice = fallback(self.probed)
            self.fallback = True
        else:
            choice = pol.choose(req, cands, ctx)
            if choice not in self.ids:
                raise InvalidChoice(f"policy {pol.name!r} chose instance {choice!r}, not one of {self.ids}")
        if pol.observe is not None:
            pol.observe(req, choice, cands, ctx)
        pred = math.nan
        if pol.signal == "prediction":  # only then may a candidate carry one
            for c in cands:
                if c.instance_id == choice and c.prediction is not None:
                    pred = c.prediction.e2e_s
        self.predicted_e2e_s = pred
        self.instance = choice
        self.candidates = cands
        self.told_tokens = self.kept(choice)
        return self


class Router:
    """Routes requests with one policy, one rng and the policy's memory (one per simulated or live scheduler)."""

    __slots__ = ("policy", "rng", "state")

    def __init__(self, policy: RoutingPolicy, rng: random.Random, state: Optional[dict[str, Any]] = None) -> None:
        self.policy = policy
        self.rng = rng
        self.state: dict[str, Any] = {} if state is None else state

    def open(self, req: Request, ids: list[int], now_s: float, index: int) -> Turn:
        """Steps 1 (the context and the sample) of a decision among the routable instances ``ids``."""
        rng = self.rng
        ctx = RoutingContext(now_s, len(ids), ids, rng, index, self.state)  # positional: its fields' order
        k = self.policy.k
        probe = rng.sample(ids, k) if k is not None and k < len(ids) else ids
        return Turn(self.policy, req, ctx, ids, probe)

    def route(self, req: Request, ids: list[int], now_s: float, index: int, gather: Gather, *,
              force: Optional[Force] = None, fallback: Optional[Fallback] = None) -> Turn:
        """A whole decision with a synchronous ``gather`` (the simulator)."""
        turn = self.open(req, ids, now_s, index)
        sig = self.policy.signal
        cands = turn.bare() if sig == "none" else gather(sig, turn.probed, turn.lengths())
        return turn.decide(cands, force, fallback)

    async def aroute(self, req: Request, ids: list[int], now_s: float, index: int, gather: AsyncGather, *,
                     force: Optional[Force] = None, fallback: Optional[Fallback] = None) -> Turn:
        """A whole decision with an asynchronous ``gather`` (the live scheduler's concurrent probes)."""
        turn = self.open(req, ids, now_s, index)
        sig = self.policy.signal
        cands = turn.bare() if sig == "none" else await gather(sig, turn.probed, turn.lengths())
        return turn.decide(cands, force, fallback)


__all__ = ["AsyncGather", "Fallback", "Force", "Gather", "InvalidChoice", "Router", "Turn"]
