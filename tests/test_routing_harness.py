"""One routing decision for sim and live (``vidur.routing``): the simulated cluster and the live scheduler, fed the
same signals, make the same choices and tell the instances the same lengths.

The simulator runs a real cluster (engines, what-ifs); every signal it computes is recorded. The live scheduler then
routes the same requests against real HTTP servers on loopback -- one per instance, answering ``POST /predict`` and
``GET /stats`` as a predictor does, with the very signals the simulator computed for that request and instance --
through its real probe path (connection pool, JSON, concurrent probes). Both must pick the same instance, probe the
same sample, tell every probed instance the same output length and record the same predicted latency.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from block.policies import make_policy
from block.scheduler.core import Scheduler, SchedulerConfig
from vidur.cluster import Cluster
from vidur.policy_contract import RoutingPolicy
from vidur.routing import InvalidChoice, Router
from vidur.types import Candidate, EngineConfig, Request

N = 4
SEED = 11


def _requests(n: int = 48) -> list[Request]:
    """Arrivals within 60 s (min-QPM's window sees every one of them, in sim and live alike); some requests carry
    a predicted length of 0, i.e. "no prediction": the hint is then the true length."""
    rng = np.random.default_rng(3)
    t = np.cumsum(rng.exponential(1 / 4.0, n))
    return [Request(i, float(t[i]), int(rng.integers(8, 600)), int(rng.integers(1, 200)),
                    int(rng.integers(0, 3)) * int(rng.integers(1, 200)))
            for i in range(n)]


def _shrinking(policy: RoutingPolicy) -> RoutingPolicy:
    """``policy`` telling every third request a length of 0 tokens (an estimator that predicts nothing): the
    harness clamps it to 1 on both sides."""
    def expected_length(req: Request, i: int, ctx: Any) -> int:
        return 0 if req.id % 3 == 0 else req.expected_output_tokens()
    return replace(policy, name=policy.name + "+zero", expected_length=expected_length)


POLICIES = {
    "block": lambda: make_policy("block", k=2),
    "block_all": lambda: make_policy("block", k=None),
    "block_noisy": lambda: make_policy("block_noisy", k=3),  # random length noise per probed instance
    "block_zero": lambda: _shrinking(make_policy("block", k=2)),
    "least_requests": lambda: make_policy("least_requests", k=2),
    "llmd": lambda: make_policy("llmd", k=None),
    "block_nosim_noisy": lambda: make_policy("block_nosim", k=2, length_noise_pct=30.0),  # stats + drawn lengths
    "min_qpm": lambda: make_policy("min_qpm"),
    "round_robin": lambda: make_policy("round_robin"),
}


class RecordingCluster(Cluster):
    """The real cluster, noting every signal it computes: (request, instance) -> (told length, candidate)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.signals: dict[tuple[int, int], tuple[int, Candidate]] = {}
        self.decisions: dict[int, tuple[int, list[int], int, float]] = {}

    def _signal(self, req: Request, i: int, t: float, kind: str, told: int) -> Candidate:
        c = super()._signal(req, i, t, kind, told)
        self.signals.setdefault((req.id, i), (told, c))
        return c

    def route(self, req: Request, index: int):
        out = super().route(req, index)
        r = self._routed
        self.decisions[req.id] = (r.instance, list(r.probed), r.told_tokens, r.predicted_e2e_s)
        return out


def _simulate(policy: RoutingPolicy, model: Any, reqs: list[Request]) -> RecordingCluster:
    cl = RecordingCluster.build(N, EngineConfig(num_blocks=400), model, policy, seed=SEED, sample_interval_s=0)
    cl.run(reqs)
    return cl


class Predictors:
    """``N`` loopback HTTP servers answering /predict and /stats with the signals the simulator recorded."""

    def __init__(self, signals: dict[tuple[int, int], tuple[int, Candidate]]) -> None:
        self.signals = signals
        self.current = -1  # the request being routed (a /stats probe names none)
        self.told: dict[tuple[int, int], int] = {}
        self.servers: list[asyncio.base_events.Server] = []

    async def start(self) -> list[str]:
        for i in range(N):
            self.servers.append(await asyncio.start_server(lambda r, w, i=i: self._serve(i, r, w), "127.0.0.1", 0))
        return [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in self.servers]

    async def close(self) -> None:
        for s in self.servers:
            s.close()
            await s.wait_closed()

    async def _serve(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if method == "POST" and path == "/predict":
                    q = json.loads(body)
                    rid = int(q["id"])
                    self.told[(rid, i)] = q["expected_output_tokens"]
                    out = self.signals[(rid, i)][1].prediction.to_dict()
                else:
                    assert (method, path) == ("GET", "/stats")
                    out = self.signals[(self.current, i)][1].stats.to_dict()
                data = json.dumps(out).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(data)).encode() + b"\r\n\r\n" + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _route_live(policy: RoutingPolicy, reqs: list[Request], signals) -> tuple[list, Predictors]:
    preds = Predictors(signals)
    urls = await preds.start()
    sched = Scheduler(SchedulerConfig(instances=urls, policy=policy, seed=SEED, tokenizer="none",
                                      probe_timeout_s=30.0))
    await sched.start()
    try:
        out = []
        for n, req in enumerate(reqs):
            preds.current = req.id
            out.append(await sched.route(req, n))
        return out, preds
    finally:
        await sched.close()
        await preds.close()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_sim_and_live_route_alike(name, toy_model):
    reqs = _requests()
    sim = _simulate(POLICIES[name](), toy_model, reqs)
    live, preds = asyncio.run(_route_live(POLICIES[name](), reqs, sim.signals))
    signal = POLICIES[name]().signal
    for req, d in zip(reqs, live):
        choice, probed, told, pred = sim.decisions[req.id]
        assert (d.instance, d.probed, d.told_tokens) == (choice, probed, told), f"request {req.id}"
        assert d.predicted_e2e_s == pred or (np.isnan(pred) and np.isnan(d.predicted_e2e_s))
        assert not d.fallback and d.answered == (probed if signal != "none" else d.probed)
        assert told >= 1
        if signal == "prediction":  # every probe carried the length the simulator's what-if assumed
            assert {i: preds.told[(req.id, i)] for i in probed} == {i: sim.signals[(req.id, i)][0] for i in probed}
    chosen = [sim.decisions[r.id][0] for r in reqs]
    assert len(set(chosen)) > 1  # the requests were spread: the comparison had choices to get wrong
    if name == "block_zero":
        assert min(sim.signals[(r.id, i)][0] for r in reqs for i in sim.decisions[r.id][1] if r.id % 3 == 0) == 1


def _rogue(req: Request, cands: list[Candidate], ctx: Any) -> int:
    return 99 if req.id == 5 else cands[0].instance_id


def test_an_invalid_choice_is_one_error_in_sim_and_live(toy_model):
    pol = RoutingPolicy("rogue", _rogue, signal="none")
    reqs = _requests(8)
    with pytest.raises(InvalidChoice, match="rogue.*chose instance 99"):
        _simulate(pol, toy_model, reqs)
    with pytest.raises(InvalidChoice, match="rogue.*chose instance 99"):
        asyncio.run(_route_live(pol, reqs, {}))


def test_a_told_length_is_drawn_once_per_instance_and_at_least_one():
    import random

    draws = []

    def length(req: Request, i: int, ctx: Any) -> int:
        draws.append(i)
        return -5 if i == 0 else 7

    pol = RoutingPolicy("p", lambda req, cands, ctx: min(c.instance_id for c in cands), signal="prediction", k=None,
                        expected_length=length)

    def gather(kind, ids, told):
        assert kind == "prediction" and dict(told) == {0: 1, 1: 7, 2: 7}
        return [Candidate(i) for i in ids]

    r = Router(pol, random.Random(0)).route(Request(1, 0.0, 10, 10), [0, 1, 2], 0.0, 0, gather)
    assert (r.instance, r.told_tokens, r.told(2), draws) == (0, 1, 7, [0, 1, 2])
