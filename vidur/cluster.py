"""N simulated engines behind a global scheduler: the event loop of ``mode=sim``.

The loop walks the arrivals in time order. For each request the global-scheduler hook offers the policy a set of
candidate instances (all of them, or ``k`` sampled at random: Po2 when k=2) with the signals the policy declared:
nothing, cheap load figures (``InstanceStats``), or a what-if ``Prediction`` computed by ``vidur.whatif`` on the
engine's live state. The policy returns an instance id; the request joins that engine. Engines advance lazily: an
engine is only simulated up to the moment somebody looks at it (see ``Engine.sync``), so the cost follows the
engines' own events, not the number of instances.

The policy is passed in by the caller (``block.policies`` or a plain function): the simulator does not import it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from vidur.engine import Engine, Seq, StepTimeModel
from vidur.types import Candidate, EngineConfig, InstanceStats, Prediction, Request
from vidur.whatif import predict

SIGNALS = ("none", "stats", "prediction")


@dataclass
class RoutingContext:
    """What a policy may know besides its candidates. ``state`` is the policy's own memory (one per scheduler)."""

    now_s: float
    num_instances: int
    instance_ids: list[int]
    rng: random.Random
    request_index: int
    state: dict[str, Any] = field(default_factory=dict)


ChooseFn = Callable[[Request, list[Candidate], RoutingContext], int]


@dataclass
class RoutingPolicy:
    """A routing rule plus what it needs: ``signal`` in SIGNALS, ``k`` instances probed (None = all)."""

    name: str
    choose: ChooseFn
    signal: str = "none"
    k: Optional[int] = None
    # called after the decision with (request, chosen id, candidates, ctx): lets a policy keep history (min-QPM)
    observe: Optional[Callable[[Request, int, list[Candidate], RoutingContext], None]] = None
    # maps a request to the output length the what-if should assume (noise injection, estimators); None = hint
    expected_length: Optional[Callable[[Request, int, RoutingContext], int]] = None

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"policy {self.name!r}: signal must be one of {SIGNALS}, got {self.signal!r}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"policy {self.name!r}: k must be >= 1 or None (all), got {self.k}")


@dataclass
class ClusterResult:
    """Everything a run records (``vidur.records`` turns it into tables)."""

    requests: list[dict[str, Any]]
    instances: list[tuple[float, int, int, int, int, int]]
    duration_s: float
    wall_s: float
    num_instances: int
    engine_stats: list[dict[str, Any]]


class Cluster:
    """N engines and the hook that routes each request (see the module docstring)."""

    def __init__(self, engines: Sequence[Engine], policy: RoutingPolicy, *, seed: int = 0,
                 sample_interval_s: float = 1.0, record_predictions: bool = True) -> None:
        if not engines:
            raise ValueError("a cluster needs at least one engine")
        self.engines = list(engines)
        for i, e in enumerate(self.engines):
            e.instance_id = i
        self.policy = policy
        self.rng = random.Random(seed)
        self.sample_interval_s = sample_interval_s
        self.record_predictions = record_predictions
        self.active: list[int] = list(range(len(self.engines)))
        self.policy_state: dict[str, Any] = {}
        self._samples: list[tuple[float, int, int, int, int, int]] = []
        self._next_sample = 0.0
        self._meta: dict[int, tuple[int, float, float, float]] = {}  # id -> (instance, dispatch, pred e2e, ms)

    @classmethod
    def build(cls, n: int, config: EngineConfig, model: StepTimeModel, policy: RoutingPolicy, **kw: Any) -> "Cluster":
        return cls([Engine(config, model, i) for i in range(n)], policy, **kw)

    # ------------------------------------------------------------------ routing
    def _candidates(self, req: Request, t: float, ctx: RoutingContext) -> list[Candidate]:
        pol = self.policy
        ids = self.active
        if pol.k is not None and pol.k < len(ids):
            ids = self.rng.sample(ids, pol.k)
        if pol.signal == "none":
            return [Candidate(i) for i in ids]
        cands = []
        for i in ids:
            eng = self.engines[i]
            eng.sync(t)
            if pol.signal == "stats":
                cands.append(Candidate(i, stats=eng.stats()))
            else:
                exp = pol.expected_length(req, i, ctx) if pol.expected_length is not None else None
                p = predict(eng.snapshot(t), req, eng.model, instance_id=i, expected_output_tokens=exp)
                cands.append(Candidate(i, stats=None, prediction=p))
        return cands

    def route(self, req: Request, index: int) -> int:
        t = req.arrival_s
        w0 = time.perf_counter()
        ctx = RoutingContext(now_s=t, num_instances=len(self.active), instance_ids=self.active, rng=self.rng,
                             request_index=index, state=self.policy_state)
        cands = self._candidates(req, t, ctx)
        choice = self.policy.choose(req, cands, ctx)
        if choice not in self.active:
            raise ValueError(f"policy {self.policy.name!r} chose instance {choice}, not one of {self.active}")
        if self.policy.observe is not None:
            self.policy.observe(req, choice, cands, ctx)
        pred_e2e = float("nan")
        for c in cands:
            if c.instance_id == choice and c.prediction is not None:
                pred_e2e = c.prediction.e2e_s
        ms = (time.perf_counter() - w0) * 1e3
        self._meta[req.id] = (choice, t, pred_e2e, ms)
        return choice

    # ------------------------------------------------------------------ the loop
    def _sample_until(self, t: float) -> None:
        dt = self.sample_interval_s
        if dt <= 0:
            return
        while self._next_sample <= t:
            ts = self._next_sample
            for e in self.engines:
                e.sync(ts)
                self._samples.append((ts, e.instance_id, len(e.running), len(e.waiting), e.free, e.num_preemptions))
            self._next_sample = ts + dt

    def run(self, requests: Sequence[Request], progress: Optional[Callable[[int], None]] = None) -> ClusterResult:
        """Simulate ``requests`` (sorted by arrival) to completion and return the records."""
        w0 = time.perf_counter()
        engines = self.engines
        last_t = -1.0
        for idx, req in enumerate(requests):
            t = req.arrival_s
            if t < last_t:
                raise ValueError(f"requests must be sorted by arrival_s (request {req.id} at {t} < {last_t})")
            last_t = t
            self._sample_until(t)
            i = self.route(req, idx)
            eng = engines[i]
            eng.sync(t)
            exp = req.expected_output_tokens()
            eng.add(Seq(req.id, req.prompt_tokens, req.output_tokens, t, expected=exp, tag=req), t)
            if progress is not None and idx % 1000 == 999:
                progress(1000)
        if progress is not None:
            progress(len(requests) % 1000)
        if self.sample_interval_s > 0:
            while any(e.has_work() for e in engines):
                self._sample_until(self._next_sample)
        for e in engines:
            e.run_until_idle()
        end = max([e.time for e in engines] + [last_t, 0.0])
        return ClusterResult(
            requests=self._request_rows(),
            instances=self._samples,
            duration_s=end,
            wall_s=time.perf_counter() - w0,
            num_instances=len(engines),
            engine_stats=[{"instance": e.instance_id, "steps": e.num_steps, "busy_s": e.busy_s,
                           "preemptions": e.num_preemptions} for e in engines],
        )

    def _request_rows(self) -> list[dict[str, Any]]:
        rows = []
        nan = float("nan")
        for e in self.engines:
            for s in list(e.finished) + list(e.rejected):
                req: Request = s.tag
                inst, dispatch, pred, ms = self._meta.get(s.id, (e.instance_id, s.arrival, nan, nan))
                ok = s.finish is not None
                ttft = s.first_token - req.arrival_s if ok else nan
                e2e = s.finish - req.arrival_s if ok else nan
                tpot = (e2e - ttft) / (s.out - 1) if ok and s.out > 1 else nan
                rows.append({
                    "id": req.id, "instance": inst, "arrival_s": req.arrival_s, "dispatch_s": dispatch,
                    "first_token_s": s.first_token if ok else nan, "finish_s": s.finish if ok else nan,
                    "prompt_tokens": req.prompt_tokens, "output_tokens": req.output_tokens,
                    "predicted_tokens": req.predicted_output_tokens if req.predicted_output_tokens is not None else -1,
                    "ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e, "predicted_e2e_s": pred,
                    "num_preemptions": s.preemptions, "status": "ok" if ok else "rejected",
                    "queue_s": (s.first_sched - req.arrival_s) if s.first_sched is not None else nan,
                    "decision_ms": ms,
                })
        rows.sort(key=lambda r: r["id"])
        return rows
