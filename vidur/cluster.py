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

    requests: Any  # pandas.DataFrame, one row per request (see vidur.records)
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
        self._sent: dict[tuple[int, int], int] = {}  # (request, instance) -> length told to it, this decision
        self._chosen_expected = 0

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
                exp = self._expected(req, i, ctx)
                p = predict(eng.snapshot(t), req, eng.model, instance_id=i, expected_output_tokens=exp)
                cands.append(Candidate(i, stats=None, prediction=p))
        return cands

    def _expected(self, req: Request, instance: int, ctx: RoutingContext) -> int:
        """The output length the scheduler tells ``instance`` (and its predictor) for ``req``.

        The chosen instance keeps it as the request's expected length, as Block's vLLM fork stores
        ``num_predicted_tokens``: later what-ifs on that instance use it for the in-flight request.
        """
        key = (req.id, instance)
        exp = self._sent.get(key)
        if exp is None:
            pol = self.policy
            exp = int(pol.expected_length(req, instance, ctx)) if pol.expected_length is not None \
                else req.expected_output_tokens()
            self._sent[key] = exp
        return exp

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
        self._chosen_expected = self._expected(req, choice, ctx)
        self._sent.clear()
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
            eng.add(Seq(req.id, req.prompt_tokens, req.output_tokens, t, expected=self._chosen_expected, tag=req), t)
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

    def _request_rows(self) -> "pd.DataFrame":
        """The per-request table (DESIGN's columns plus ``queue_s`` and ``decision_ms``), built column-wise."""
        import numpy as np
        import pandas as pd

        seqs = [s for e in self.engines for s in (*e.finished, *e.rejected)]
        seqs.sort(key=lambda s: s.id)
        nan = float("nan")
        meta = self._meta
        default = (-1, nan, nan, nan)
        m = [meta.get(s.id, default) for s in seqs]
        reqs = [s.tag for s in seqs]
        arrival = np.array([r.arrival_s for r in reqs], dtype=float)
        first = np.array([nan if s.first_token is None or s.finish is None else s.first_token for s in seqs], float)
        finish = np.array([nan if s.finish is None else s.finish for s in seqs], dtype=float)
        out = np.array([r.output_tokens for r in reqs], dtype=np.int64)
        ttft = first - arrival
        e2e = finish - arrival
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(out > 1, (e2e - ttft) / np.maximum(out - 1, 1), nan)
        return pd.DataFrame({
            "id": np.array([r.id for r in reqs], dtype=np.int64),
            "instance": np.array([x[0] for x in m], dtype=np.int64),
            "arrival_s": arrival,
            "dispatch_s": np.array([x[1] for x in m], dtype=float),
            "first_token_s": first,
            "finish_s": finish,
            "prompt_tokens": np.array([r.prompt_tokens for r in reqs], dtype=np.int64),
            "output_tokens": out,
            "predicted_tokens": np.array([-1 if r.predicted_output_tokens is None else r.predicted_output_tokens
                                          for r in reqs], dtype=np.int64),
            "ttft_s": ttft,
            "tpot_s": tpot,
            "e2e_s": e2e,
            "predicted_e2e_s": np.array([x[2] for x in m], dtype=float),
            "num_preemptions": np.array([s.preemptions for s in seqs], dtype=np.int64),
            "status": ["ok" if s.finish is not None else "rejected" for s in seqs],
            "queue_s": np.array([nan if s.first_sched is None else s.first_sched for s in seqs], float) - arrival,
            "decision_ms": np.array([x[3] for x in m], dtype=float),
        })
