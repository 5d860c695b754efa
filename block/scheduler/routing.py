"""The scheduler's routing: the decision is ``vidur.routing``'s (the simulator's too); this part gathers its signals
by probing the sampled instances' predictors concurrently (``POST /predict`` with the length told to that instance,
or ``GET /stats``) within ``probe_timeout_s`` -- probes that fail or time out are left out, a refused connection or
an engine said to be down marks the instance down -- and falls back to a random healthy instance when none answers.

``RoutingMixin`` is that part of ``block.scheduler.core.Scheduler`` (it reads ``pool``, ``instances``, ``router``,
``rng``, ``metrics``, ``provisioning``, ``cfg`` and ``t0`` and uses ``eligible``/``mark_down``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

from block.http import Pool, UpstreamError
from block.scheduler.errors import ERR_ENGINE_DOWN, UpstreamFailure, error_type
from block.scheduler.jsonio import dumps, loads
from vidur.routing import Router
from vidur.types import Candidate, InstanceStats, Prediction, Request

if TYPE_CHECKING:
    from block.scheduler.config import SchedulerConfig
    from block.scheduler.health import Instance
    from block.scheduler.metrics import Metrics

log = logging.getLogger("block.scheduler")


@dataclass
class Decision:
    instance: int
    told_tokens: int  # output length the chosen instance keeps (the hint header; un-noised, as Block forwards it)
    predicted_e2e_s: float
    probe_ms: float
    decision_ms: float
    fallback: bool
    probed: list[int]
    answered: list[int]
    num_active: Optional[int] = None  # routable instances at dispatch, with auto-provisioning (else None)


def _finite(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.inf
    return v if math.isfinite(v) else math.inf


class RoutingMixin:
    """Probing and routing of the Scheduler (see the module docstring)."""

    cfg: "SchedulerConfig"
    instances: list["Instance"]
    pool: Optional[Pool]
    router: Router
    rng: random.Random
    metrics: "Metrics"
    provisioning: Any
    t0: float
    _auth: dict[str, str]
    _json_headers: dict[str, str]

    eligible: Callable[[Iterable[int]], list[int]]  # HealthMixin's
    mark_down: Callable[[int], None]  # HealthMixin's

    async def _probe_one(self, kind: str, i: int, req: Request, told: Optional[int], rid: str) -> Candidate:
        inst = self.instances[i]
        pool = self.pool
        assert pool is not None
        # no per-read timer: _probe bounds the whole probe (and cancels it) with asyncio.wait
        if kind == "prediction":
            body = {"prompt_tokens": req.prompt_tokens, "expected_output_tokens": told, "id": rid}
            if "others_delay" in self.policy.needs:
                body["others_delay"] = True
            payload = dumps(body)
            r = await pool.request("POST", inst.origin, "/predict", payload, self._json_headers, None)
        else:
            r = await pool.request("GET", inst.origin, "/stats", b"", self._auth, None)
        body = await r.read()
        if r.status_code != 200:
            down = r.status_code == 503 and error_type(body) == ERR_ENGINE_DOWN  # its engine is down
            raise UpstreamError("down" if down else "status", f"{'/predict' if kind == 'prediction' else '/stats'}"
                                                              f" answered {r.status_code}")
        d = loads(body)
        d["instance_id"] = i
        if kind == "prediction":
            d["e2e_s"] = _finite(d.get("e2e_s"))
            return Candidate(i, prediction=Prediction.from_dict(d))
        return Candidate(i, stats=InstanceStats.from_dict(d))

    async def _probe(self, kind: str, ids: list[int], req: Request, told: Mapping[int, int],
                     rid: str) -> list[Candidate]:
        """Probe ``ids`` concurrently (a prediction probe carries the length ``told`` to that instance); return the
        candidates that answered in time (failures are left out)."""
        tasks = [asyncio.ensure_future(self._probe_one(kind, i, req, told.get(i), rid)) for i in ids]
        try:
            done, pending = await asyncio.wait(tasks, timeout=self.cfg.probe_timeout_s)
        except BaseException:  # cancelled (the client left): no probe outlives the request
            for t in tasks:
                t.cancel()
            raise
        for t in pending:
            t.cancel()
        out = []
        for i, t in zip(ids, tasks):
            if t in done and t.exception() is None:
                out.append(t.result())
            else:
                self._probe_failed(i, t.exception() if t in done else asyncio.TimeoutError())
        return out

    def _probe_failed(self, i: int, err: Optional[BaseException]) -> None:
        self.metrics.probe_failures.inc(instance=str(i))
        if isinstance(err, UpstreamError) and err.kind in ("connect", "down"):
            self.mark_down(i)
        log.debug("probe of instance %d failed: %r", i, err)

    async def route(self, req: Request, index: int, exclude: Sequence[int] = ()) -> Decision:
        """Choose the instance for ``req`` among the eligible ones (``exclude``: instances that already failed it).

        The decision is ``vidur.routing``'s, as in the simulator; this supplies the probes, the fallback when no
        probe answered (a random healthy instance, never one whose probe just failed) and auto-provisioning's
        override (a slot routable now takes the request, as in sim)."""
        w0 = time.perf_counter()
        ids = self.eligible(exclude)
        if not ids:
            raise UpstreamFailure("no instance left to try", 503)
        probe_ms = 0.0

        async def gather(kind: str, probe_ids: list[int], told: Mapping[int, int]) -> list[Candidate]:
            nonlocal probe_ms
            p0 = time.perf_counter()
            cands = await self._probe(kind, probe_ids, req, told, str(req.id))
            probe_ms = (time.perf_counter() - p0) * 1e3
            self.metrics.probe.observe(probe_ms / 1e3)
            return cands

        def fallback(probed: list[int]) -> int:
            self.metrics.fallbacks.inc()
            rest = [i for i in self.eligible(exclude) if i not in probed] or ids
            return self.rng.choice(rest)

        force = None
        if self.provisioning is not None:
            prov = self.provisioning

            def force(cands: list[Candidate]) -> Optional[int]:
                forced = prov.before_route(req, cands)
                return forced if forced is not None and forced not in exclude else None

        r = await self.router.aroute(req, ids, time.monotonic() - self.t0, index, gather, force=force,
                                     fallback=fallback)
        ms = (time.perf_counter() - w0) * 1e3
        self.metrics.decision.observe(ms / 1e3)
        self.metrics.routed.inc(instance=str(r.instance))
        return Decision(r.instance, r.told_tokens, r.predicted_e2e_s, probe_ms, ms, r.fallback, list(r.probed),
                        [c.instance_id for c in r.candidates],
                        None if self.provisioning is None else self.provisioning.num_active())
