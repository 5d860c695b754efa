"""N simulated engines behind a global scheduler: the event loop of ``mode=sim``.

The loop walks the arrivals in time order. For each request the global-scheduler hook offers the policy a set of
candidate instances (all of them, or ``k`` sampled at random: Po2 when k=2) with the signals the policy declared:
nothing, cheap load figures (``InstanceStats``), or a what-if ``Prediction`` computed by ``vidur.whatif`` on the
engine's live state. The policy returns an instance id; the request joins that engine. Engines advance lazily: an
engine is only simulated up to the moment somebody looks at it (see ``Engine.sync``), so the cost follows the
engines' own events, not the number of instances.

The policy is passed in by the caller (``block.policies`` or a plain function): the simulator does not import it.
The decision itself (sampling, told lengths, choose, observe) is ``vidur.routing``'s, the live scheduler's too; this
module supplies the signals (``_signal``) and the provisioning controller's override.
"""

from __future__ import annotations

import gc
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

from vidur.engine import INF, Engine, Seq, StepTimeModel, outcome_columns
from vidur.migration import Migrator
from vidur.outcomes import Outcome, deliver, wants_outcomes
from vidur.policy_contract import RoutingContext, RoutingPolicy
from vidur.routing import Router, Turn
from vidur.types import Candidate, EngineConfig, Request
from vidur.whatif import predict_engine

if TYPE_CHECKING:
    import pandas as pd


class Controller(Protocol):
    """An auto-provisioning controller (``block.provisioning``): it grows or shrinks the set of routable instances.

    ``start`` sets the initial pool; ``before_route`` sees each request with its candidates (and may return an
    instance to send it to, e.g. one it just added); ``on_finish`` sees each finished request (reactive triggers).
    """

    def start(self, cluster: "Cluster") -> None: ...

    def before_route(self, cluster: "Cluster", req: Request, cands: list[Candidate], t: float) -> Optional[int]: ...

    def on_finish(self, cluster: "Cluster", seq: Seq, t: float) -> None: ...


@dataclass
class ClusterResult:
    """Everything a run records (``vidur.records`` turns it into tables)."""

    request_columns: dict[str, Any]  # one numpy array per column, one entry per request (see vidur.records)
    instances: list[tuple[float, int, int, int, int, int]]
    duration_s: float
    wall_s: float
    num_instances: int
    engine_stats: list[dict[str, Any]]
    accuracy: list[dict[str, Any]] = field(default_factory=list)  # Fig 5 samples (duplicated requests)
    provisioning: list[tuple[float, str, int, int]] = field(default_factory=list)  # (time, event, instance, active)
    migrations: list[dict[str, Any]] = field(default_factory=list)  # vidur.migration.Migration rows

    @cached_property
    def requests(self) -> "pd.DataFrame":
        """The request records as a pandas DataFrame, built once (pandas imported here; a run's writer uses the
        columns)."""
        import pandas as pd

        return pd.DataFrame(self.request_columns)


# The cyclic collector's first threshold while the event loop runs (``rare_collections``).
LOOP_GC_THRESHOLD = 200_000


@contextmanager
def rare_collections(threshold: Optional[int] = None) -> Iterator[None]:
    """Run the cyclic garbage collector rarely inside the block (first threshold ``threshold``, by default
    ``LOOP_GC_THRESHOLD``, if that is above the current one); the thresholds are restored afterwards.

    Why: a run's requests, their ``Seq`` and their routing records live to its end. With the default threshold (700)
    the collector ran about 500 times in a 100,000-request run (the workload's requests, then every arrival's
    survivors), each pass reading young objects again and finding nothing: 80-110 ms of a 1.4 s process, against
    about 25 ms now. The collector stays on, so what a policy leaves as cyclic garbage (the learned policies' models:
    ``routebalance`` about 3 objects per request, ``llmd_latency`` about 23; the simulator itself leaves none) is still
    collected, after about ``threshold`` new objects instead of 700.
    """
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], LOOP_GC_THRESHOLD if threshold is None else threshold), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


class Cluster:
    """N engines and the hook that routes each request (see the module docstring).

    ``accuracy_sampling_rate``: the fraction of requests that are also *duplicated* to every active instance (as
    Block's ``--profiling_sampling_rate`` does for Fig 5): the copies really run, so they load the cluster; the
    policy's pick is the request's record, and every copy's predicted and actual latency goes to ``accuracy``.
    """

    def __init__(self, engines: Sequence[Engine], policy: RoutingPolicy, *, seed: int = 0,
                 sample_interval_s: float = 1.0, accuracy_sampling_rate: float = 0.0,
                 controller: Optional[Controller] = None, migrator: Optional[Migrator] = None) -> None:
        if not engines:
            raise ValueError("a cluster needs at least one engine")
        if not 0.0 <= accuracy_sampling_rate <= 1.0:
            raise ValueError(f"accuracy_sampling_rate={accuracy_sampling_rate} must be in [0, 1]")
        self.engines = list(engines)
        for i, e in enumerate(self.engines):
            e.instance_id = i
        # the engines call ``_on_finish`` once someone listens: a controller from the start, a learning policy from
        # the decision that opened its outcome queue (``_listen``); until then a finish would be delivered to nobody,
        # and the call costs about a tenth of a cheap policy's event loop
        self._listening = False
        self.policy = policy
        self.rng = random.Random(seed)
        self.acc_rng = random.Random(seed * 7919 + 17)  # its own stream: sampling must not change routing draws
        self.sample_interval_s = sample_interval_s
        self.accuracy_sampling_rate = accuracy_sampling_rate
        self.controller = controller
        self.migrator = migrator  # live migration between engines (policy llumnix_full), on its own clock
        self.active: list[int] = list(range(len(self.engines)))
        self.warming: dict[int, float] = {}  # instance -> time it becomes routable (cold start)
        self.policy_state: dict[str, Any] = {}
        self.now = 0.0
        self._next_arrival: Optional[float] = None  # the next request's arrival, while ``run`` goes (``_signal``)
        self._samples: list[tuple[float, int, int, int, int, int]] = []
        self._next_sample = 0.0
        # id -> (instance, dispatch, predicted e2e, decision ms, active instances)
        self._meta: dict[int, tuple[int, float, float, float, int]] = {}
        self.router = Router(policy, self.rng, self.policy_state)
        self._routed: Optional[Turn] = None  # the last decision (its told lengths serve Fig 5's duplicates)
        self._dups: list[tuple[int, Request, int, float, bool, bool, Seq]] = []
        self._events: list[tuple[float, str, int, int]] = []
        self._deciding: Optional[Request] = None  # the request ``route`` is deciding
        if controller is not None:
            self._listen()
            controller.start(self)

    @classmethod
    def build(cls, n: int, config: EngineConfig, model: StepTimeModel, policy: RoutingPolicy, **kw: Any) -> "Cluster":
        return cls([Engine(config, model, i) for i in range(n)], policy, **kw)

    # ------------------------------------------------------------------ pool (provisioning)
    def set_active(self, ids: Sequence[int]) -> None:
        self.active = sorted(ids)
        self._events.append((self.now, "initial", -1, len(self.active)))

    def back_pool(self) -> list[int]:
        """Instances neither routable nor warming up."""
        return [i for i in range(len(self.engines)) if i not in self.active and i not in self.warming]

    def add_instance(self, i: int, t: float, cold_start_s: float = 0.0) -> None:
        """Make instance ``i`` routable at ``t + cold_start_s``."""
        if cold_start_s > 0:
            self.warming[i] = t + cold_start_s
            self._events.append((t, "start", i, len(self.active)))
        else:
            self.active = sorted(self.active + [i])
            self._events.append((t, "add", i, len(self.active)))

    def remove_instance(self, i: int, t: float) -> None:
        """Stop routing to ``i``; it finishes the requests it has (drains)."""
        self.active = [a for a in self.active if a != i]
        self._events.append((t, "remove", i, len(self.active)))

    def _promote_warm(self, t: float) -> None:
        for i, ready in list(self.warming.items()):
            if ready <= t:
                del self.warming[i]
                self.active = sorted(self.active + [i])
                self._events.append((ready, "ready", i, len(self.active)))

    def _listen(self) -> None:
        """Have every engine report its finished requests to ``_on_finish`` from now on."""
        self._listening = True
        for e in self.engines:
            e.on_finish = self._on_finish

    def _listen_if_asked(self) -> None:
        """``_listen`` once the policy has opened its outcome queue (``vidur.outcomes``): checked before the run,
        before a decision's probes advance the engines and after each decision."""
        if not self._listening and wants_outcomes(self.policy_state):
            self._listen()

    def _on_finish(self, seq: Seq) -> None:
        if self.controller is not None and not isinstance(seq.tag, tuple):
            self.controller.on_finish(self, seq, seq.finish)
        if wants_outcomes(self.policy_state) and not isinstance(seq.tag, tuple):  # a learning policy (vidur.outcomes)
            deliver(self.policy_state, Outcome(seq.id, self._meta[seq.id][0], seq.tag.arrival_s, seq.first_token,
                                               seq.finish, seq.prompt, seq.out))

    # ------------------------------------------------------------------ routing
    def _signal(self, req: Request, i: int, t: float, kind: str, told: int) -> Candidate:
        """Instance ``i``'s signal for ``req`` at ``t``: its load figures, or a what-if assuming ``told`` tokens."""
        eng = self.engines[i]
        eng.sync(t)
        if kind == "stats":
            return Candidate(i, stats=eng.stats())
        p = predict_engine(eng, t, req, instance_id=i, expected_output_tokens=told,  # = predict(eng.snapshot(t))
                           others_delay="others_delay" in self.policy.needs, next_query_s=self._next_arrival)
        return Candidate(i, stats=None, prediction=p)

    def _gather(self, kind: str, ids: list[int], told: Mapping[int, int]) -> list[Candidate]:
        """The routing harness's ``gather`` for the request being decided (``route``): each probe's signal."""
        self._listen_if_asked()  # opened while telling lengths: the probes' finishes are the policy's
        req = self._deciding
        t = req.arrival_s
        return [self._signal(req, i, t, kind, told.get(i, 0)) for i in ids]

    def route(self, req: Request, index: int) -> tuple[int, list[Candidate], RoutingContext]:
        """Pick the instance for ``req`` (the global scheduler's decision: ``vidur.routing``, as the live one).

        The chosen instance keeps the length it was told as the request's expected length, as Block's vLLM fork
        stores ``num_predicted_tokens``: later what-ifs on that instance use it for the in-flight request.
        """
        t = req.arrival_s
        w0 = time.perf_counter()
        self._deciding = req  # (``_gather``: a method, not a closure made for every decision)
        force = None
        if self.controller is not None:
            ctl = self.controller

            def force(cands: list[Candidate]) -> Optional[int]:
                return ctl.before_route(self, req, cands, t)

        r = self._routed = self.router.route(req, self.active, t, index, self._gather, force=force)
        ms = (time.perf_counter() - w0) * 1e3
        self._meta[req.id] = (r.instance, t, r.predicted_e2e_s, ms, len(self.active))
        if not self._listening and self.policy_state:  # opened in choose or observe (an empty memory opened nothing)
            self._listen_if_asked()
        return r.instance, r.candidates, r.ctx

    def _duplicate(self, req: Request, choice: int, cands: list[Candidate], ctx: RoutingContext, sample: int) -> None:
        """Fig 5: predict on every active instance and run a copy of ``req`` on each (the pick's copy is the request)."""
        t = req.arrival_s
        have = {c.instance_id: c.prediction for c in cands if c.prediction is not None}
        told, kept = self._routed.told, self._routed.kept
        preds = {i: have.get(i) or self._signal(req, i, t, "prediction", told(i)).prediction for i in self.active}
        best = min(preds.values(), key=lambda p: p.e2e_s).instance_id
        for i, p in preds.items():
            eng = self.engines[i]
            eng.sync(t)
            if i == choice:
                seq = self._dispatched_seq
            else:
                seq = Seq(req.id, req.prompt_tokens, req.output_tokens, t, expected=kept(i), tag=("dup", req))
                eng.add(seq, t)
            self._dups.append((sample, req, i, p.e2e_s, i == best, i == choice, seq))

    # ------------------------------------------------------------------ the loop
    def _sample_until(self, t: float) -> None:
        dt = self.sample_interval_s
        if dt <= 0:
            return
        out = self._samples
        while self._next_sample <= t:
            ts = self._next_sample
            for e in self.engines:
                e.sample(ts, out)  # = e.sync(ts), then its row
            self._next_sample = ts + dt

    def _advance_until(self, t: float) -> None:
        """Take the samples and the migrator's events (ticks, stage ends) up to ``t``, in time order."""
        mig = self.migrator
        if mig is not None:
            while (tm := mig.next_time()) <= t:
                self._sample_until(tm)
                mig.step(self.engines, self.active)
        self._sample_until(t)

    def run(self, requests: Sequence[Request], progress: Optional[Callable[[int], None]] = None) -> ClusterResult:
        """Simulate ``requests`` (sorted by arrival) to completion and return the records."""
        with rare_collections():
            return self._run(requests, progress)

    def _run(self, requests: Sequence[Request], progress: Optional[Callable[[int], None]]) -> ClusterResult:
        w0 = time.perf_counter()
        engines = self.engines
        last_t = -1.0
        rate = self.accuracy_sampling_rate
        samples = 0
        mig = self.migrator
        self._listen_if_asked()  # opened before the run
        for idx, req in enumerate(requests):
            t = req.arrival_s
            # when the engines are asked next (the what-if's speed hint: a trajectory an engine leaves before then
            # is used once); a later request out of order is refused below before anything uses it
            self._next_arrival = requests[idx + 1].arrival_s if idx + 1 < len(requests) else INF
            if t < last_t:
                raise ValueError(f"requests must be sorted by arrival_s (request {req.id} at {t} < {last_t})")
            last_t = t
            self.now = t
            if mig is not None or t >= self._next_sample:  # most arrivals have neither a sample nor a migration due
                self._advance_until(t)
            if self.controller is not None:
                for e in engines:  # deliver every finish up to now to the controller (reactive triggers)
                    e.sync(t)
                self._promote_warm(t)
            i, cands, ctx = self.route(req, idx)
            eng = engines[i]
            eng.sync(t)
            self._dispatched_seq = eng.add(
                Seq(req.id, req.prompt_tokens, req.output_tokens, t, expected=self._routed.told_tokens, tag=req), t)
            if rate > 0 and self.acc_rng.random() < rate:
                self._duplicate(req, i, cands, ctx, samples)
                samples += 1
            if progress is not None and idx % 100 == 99:
                progress(100)
        if progress is not None:
            progress(len(requests) % 100)
        while mig is not None and (mig.in_progress or any(e.has_work() for e in engines)):
            self._advance_until(mig.next_time())  # migration goes on while the engines drain
        if self.sample_interval_s > 0:
            while any(e.has_work() for e in engines):
                self._sample_until(self._next_sample)
        for e in engines:
            e.run_until_idle()
        end = max([e.time for e in engines] + [last_t, 0.0])
        return ClusterResult(
            request_columns=self._request_rows(),
            instances=self._samples,
            duration_s=end,
            wall_s=time.perf_counter() - w0,
            num_instances=len(engines),
            engine_stats=[{"instance": e.instance_id, "steps": e.num_steps, "busy_s": e.busy_s,
                           "preemptions": e.num_preemptions} for e in engines],
            accuracy=self._accuracy_rows(),
            provisioning=list(self._events),
            migrations=self.migrator.rows() if self.migrator is not None else [],
        )

    def _accuracy_rows(self) -> list[dict[str, Any]]:
        nan = float("nan")
        return [{"sample": k, "id": req.id, "instance": i, "predicted_e2e_s": pred,
                 "actual_e2e_s": (seq.finish - req.arrival_s) if seq.finish is not None else nan,
                 "block_pick": best, "dispatched": chosen}
                for k, req, i, pred, best, chosen, seq in self._dups]

    def _request_rows(self) -> dict[str, Any]:
        """The per-request table (DESIGN's columns plus ``queue_s`` and ``decision_ms``) as numpy columns.

        The engine side in one pass over the sequences (``outcome_columns``), the request side one column per pass
        streamed into numpy (``fromiter``: no intermediate list), the routing metadata as one stream of floats; a
        missing time (never scheduled, rejected) is NaN (``outcome_columns``). At 100,000 requests
        this was 145 ms of a 1.5 s process, mostly reading objects scattered over the heap: each pass counts.
        """
        import numpy as np

        seqs: list[Seq] = []
        for e in self.engines:
            seqs += e.finished
            seqs += e.rejected
        if self._dups:  # Fig 5's copies are not requests of the run
            seqs = [s for s in seqs if not isinstance(s.tag, tuple)]
        seqs.sort(key=attrgetter("id"))
        n = len(seqs)
        nan = float("nan")
        meta = self._meta
        default = (-1, nan, nan, nan, 0)
        # (instance, dispatch, predicted e2e, decision ms, active) per request as one stream of floats: numpy reads
        # it several times faster than five columns of tuples (the counts are small integers: exact as floats)
        m = np.fromiter(chain.from_iterable([meta.get(s.id, default) for s in seqs]), dtype=np.float64,
                        count=5 * n).reshape(n, 5)
        ids, first_token, finish, first_sched, preemptions, reqs = outcome_columns(seqs)

        def col(attr: str, dtype: Any) -> np.ndarray:
            return np.fromiter(map(attrgetter(attr), reqs), dtype=dtype, count=n)

        def meta_col(j: int, dtype: Any) -> np.ndarray:
            return m[:, j].astype(dtype)

        arrival = col("arrival_s", float)
        done = ~np.isnan(finish)
        first = np.where(done, first_token, nan)
        out = col("output_tokens", np.int64)
        ttft = first - arrival
        e2e = finish - arrival
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(out > 1, (e2e - ttft) / np.maximum(out - 1, 1), nan)
        status = np.full(n, "ok", dtype=object)
        status[~done] = "rejected"
        return {
            "id": ids,
            "instance": meta_col(0, np.int64),
            "arrival_s": arrival,
            "dispatch_s": meta_col(1, float),
            "first_token_s": first,
            "finish_s": finish,
            "prompt_tokens": col("prompt_tokens", np.int64),
            "output_tokens": out,
            "predicted_tokens": np.array([-1 if p is None else p
                                          for p in map(attrgetter("predicted_output_tokens"), reqs)], dtype=np.int64),
            "ttft_s": ttft,
            "tpot_s": tpot,
            "e2e_s": e2e,
            "predicted_e2e_s": meta_col(2, float),
            "num_preemptions": preemptions,
            "status": status,
            "queue_s": first_sched - arrival,
            "decision_ms": meta_col(3, float),
            "num_active": meta_col(4, np.int64),
        }
