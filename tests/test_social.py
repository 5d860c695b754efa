"""Policies beyond Block (block/policies/social.py) and the what-if answer they read: the delay a request adds to
the requests already on an instance (``Prediction.others_delay_s``) equals the full simulation's, in the simulator
and in the live predictor's /predict."""

from __future__ import annotations

import json
import math
import random

import pytest

from block.policies import make_policy
from block.predictor.predict import parse_predict_options, whatif
from block.service import ServiceError
from vidur.cluster import Cluster
from vidur.engine import Engine, Seq
from vidur.policy_contract import RoutingContext, RoutingPolicy
from vidur.types import Candidate, EngineConfig, Prediction, Request
from vidur.whatif import predict, predict_engine

SCHEDULERS = {
    "v0": {},
    "v1": {"scheduler": "v1", "max_num_batched_tokens": 512, "watermark": 0.0},
}


def _loaded(cfg: EngineConfig, model, n: int, seed: int) -> tuple[Engine, float, random.Random]:
    rng = random.Random(seed)
    e = Engine(cfg, model)
    t = 0.0
    for i in range(n):
        t += rng.expovariate(6.0)
        e.sync(t)
        e.add(Seq(i, rng.randint(4, 900), rng.randint(1, 400), t), t)
    t += 0.0123
    e.sync(t)
    return e, t, rng


def _finish_sum(e: Engine, skip: int | None = None) -> float:
    """Run a fork of ``e`` to idle; the sum of its requests' finish times (``skip``'s excepted)."""
    total = [0.0]

    def on_finish(s: Seq) -> None:
        if s.id != skip:
            total[0] += s.finish

    e.on_finish = on_finish
    e.run_until_idle()
    return total[0]


@pytest.mark.parametrize("blocks", [2000, 350])  # 350: KV runs out, the candidate preempts others
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_others_delay_matches_full_simulation(scheduler, blocks, seed, toy_model):
    cfg = EngineConfig(num_blocks=blocks, **SCHEDULERS[scheduler])
    e, t, rng = _loaded(cfg, toy_model, 120, seed)
    assert e.num_running > 0
    req = Request(id=10_000, arrival_s=t, prompt_tokens=rng.randint(4, 900), output_tokens=rng.randint(1, 400))
    without = _finish_sum(e.fork())
    with_ = e.fork()
    with_.add(Seq(req.id, req.prompt_tokens, req.output_tokens, t), t)
    truth = _finish_sum(with_, skip=req.id) - without
    assert truth >= 0
    for p in (predict(e.snapshot(t), req, toy_model, others_delay=True),
              predict_engine(e, t, req, others_delay=True)):
        assert math.isclose(p.others_delay_s, truth, rel_tol=1e-9, abs_tol=1e-9)
        plain = predict(e.snapshot(t), req, toy_model)
        assert plain.others_delay_s == 0.0  # not asked: not computed
        assert math.isclose(p.e2e_s, plain.e2e_s, rel_tol=1e-12)  # the other answers do not move


def test_others_delay_grows_with_the_instance_load(toy_model):
    cfg = EngineConfig(num_blocks=2000)
    light, t1, _ = _loaded(cfg, toy_model, 5, 4)
    heavy, t2, _ = _loaded(cfg, toy_model, 150, 4)
    req = Request(id=10_000, arrival_s=0.0, prompt_tokens=500, output_tokens=200)
    dl = predict(light.snapshot(t1), req, toy_model, others_delay=True).others_delay_s
    dh = predict(heavy.snapshot(t2), req, toy_model, others_delay=True).others_delay_s
    assert 0 <= dl < dh


def _cand(i: int, e2e: float, ttft: float, delay: float) -> Candidate:
    return Candidate(i, prediction=Prediction(i, e2e, ttft, 0.0, 100, 1, others_delay_s=delay))


def _ctx() -> RoutingContext:
    return RoutingContext(0.0, 2, [0, 1], random.Random(0), 0)


def test_rules_weigh_what_block_ignores():
    req = Request(0, 0.0, 10, 10)
    # instance 0: the request's own e2e is lower, but it delays the others there by far more
    cands = [_cand(0, 1.0, 0.5, 5.0), _cand(1, 1.5, 0.2, 0.1)]
    assert make_policy("block", k=None).choose(req, cands, _ctx()) == 0
    assert make_policy("block_social", k=None).choose(req, cands, _ctx()) == 1
    assert make_policy("block_social", k=None, weight=0.0).choose(req, cands, _ctx()) == 0  # weight 0 = Block
    assert make_policy("block_ttft", k=None).choose(req, cands, _ctx()) == 1


def test_only_policies_that_need_it_pay_for_it(toy_model):
    """The cluster asks the what-if for others_delay exactly when the policy needs it."""
    seen: dict[str, list[float]] = {}

    def spy(name: str, needs: tuple[str, ...]) -> RoutingPolicy:
        def choose(req, cands, ctx):
            seen.setdefault(name, []).extend(c.prediction.others_delay_s for c in cands)
            return cands[0].instance_id
        return RoutingPolicy(name, choose, "prediction", None, needs=needs)

    rng = random.Random(3)
    reqs = [Request(i, i * 0.05, rng.randint(50, 500), rng.randint(20, 200)) for i in range(60)]
    for name, needs in (("plain", ()), ("delay", ("others_delay",))):
        Cluster.build(2, EngineConfig(num_blocks=2000), toy_model, spy(name, needs)).run(reqs)
    assert all(d == 0.0 for d in seen["plain"])
    assert any(d > 0 for d in seen["delay"])
    with pytest.raises(ValueError, match="needs"):
        RoutingPolicy("x", lambda r, c, x: 0, "stats", needs=("others_delay",))
    with pytest.raises(ValueError, match="needs"):
        RoutingPolicy("x", lambda r, c, x: 0, "prediction", needs=("nope",))


def test_live_predict_answers_others_delay(toy_model):
    """/predict's body "others_delay": true fills others_delay_s (the same what-if); anything but a boolean is a 400."""
    e, t, _ = _loaded(EngineConfig(num_blocks=2000), toy_model, 120, 7)
    st = e.snapshot(t)
    prompt, expected, others = parse_predict_options(
        json.dumps({"prompt_tokens": 300, "expected_output_tokens": 100, "others_delay": True}).encode())
    assert (prompt, expected, others) == (300, 100, True)
    d = whatif(st, prompt, expected, toy_model, instance_id=0, overrun_tokens=10, others_delay=others)
    ref = predict(st, Request(-2, 0.0, 300, 100), toy_model, others_delay=True)
    assert d["others_delay_s"] > 0 and math.isclose(d["others_delay_s"], ref.others_delay_s, rel_tol=1e-9)
    assert parse_predict_options(b'{"prompt_tokens": 3, "expected_output_tokens": 1}')[2] is False
    with pytest.raises(ServiceError) as err:
        parse_predict_options(b'{"prompt_tokens": 3, "expected_output_tokens": 1, "others_delay": "yes"}')
    assert err.value.status == 400
