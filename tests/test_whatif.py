"""The what-if agrees with running the full simulation, and follows Block's rules for stale length estimates."""

from __future__ import annotations

import math
import random

import pytest

from vidur.engine import Engine, Seq
from vidur.types import EngineConfig, InstanceState, Request, SeqState
from vidur.whatif import predict


def _loaded_engine(cfg, model, n, rate, seed):
    rng = random.Random(seed)
    e = Engine(cfg, model)
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        e.sync(t)
        e.add(Seq(i, rng.randint(4, 900), rng.randint(1, 400), t), t)
    return e, t, rng


SCHEDULERS = {
    "v0": {},
    "v1": dict(scheduler="v1", max_num_batched_tokens=512, watermark=0.0),
    "v1-threshold": dict(scheduler="v1", max_num_batched_tokens=256, long_prefill_token_threshold=96),
}


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("blocks", [2000, 350])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_whatif_matches_full_simulation(scheduler, chunked, blocks, seed, toy_model):
    kw = dict(SCHEDULERS[scheduler])
    if not chunked and kw:
        kw["max_num_batched_tokens"] = 4096  # vLLM without chunked prefill: the budget must hold a whole prompt
    cfg = EngineConfig(num_blocks=blocks, chunked_prefill=chunked, **kw)
    e, t, rng = _loaded_engine(cfg, toy_model, 120, 6.0, seed)
    t += 0.0123
    e.sync(t)
    state = e.snapshot(t)
    assert state.num_requests > 0
    req = Request(id=10_000, arrival_s=t, prompt_tokens=rng.randint(4, 900), output_tokens=rng.randint(1, 400))
    pred = predict(state, req, toy_model)
    s = e.add(Seq(req.id, req.prompt_tokens, req.output_tokens, t), t)
    e.run_until_idle()
    assert math.isclose(pred.e2e_s, s.finish - t, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(pred.ttft_s, s.first_token - t, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(pred.queue_s, s.first_sched - t, rel_tol=1e-9, abs_tol=1e-9)
    assert 0 <= pred.queue_s <= pred.ttft_s <= pred.e2e_s
    assert pred.num_requests == state.num_requests and pred.free_blocks == state.free_blocks


def test_state_roundtrips_through_json(toy_model):
    cfg = EngineConfig(num_blocks=500)
    e, t, rng = _loaded_engine(cfg, toy_model, 80, 6.0, 5)
    state = e.snapshot(t)
    again = InstanceState.from_dict(state.to_dict())
    req = Request(id=1, arrival_s=t, prompt_tokens=100, output_tokens=50)
    assert predict(state, req, toy_model).e2e_s == predict(again, req, toy_model).e2e_s


def test_overrun_rule_assumes_ten_more_tokens(toy_model):
    """A request that already decoded past its estimate is assumed to end within 10 more tokens."""
    cfg = EngineConfig(num_blocks=2000)
    over = SeqState(id=0, prompt_tokens=100, expected_output_tokens=50, computed_tokens=100 + 80 - 1, decoded_tokens=80)
    exact = SeqState(id=0, prompt_tokens=100, expected_output_tokens=90, computed_tokens=100 + 80 - 1, decoded_tokens=80)
    req = Request(id=1, arrival_s=0.0, prompt_tokens=10, output_tokens=200)
    mk = lambda s: InstanceState(running=[s], waiting=[], free_blocks=2000 - 12, total_blocks=2000, config=cfg)
    a = predict(mk(over), req, toy_model, overrun_tokens=10)
    b = predict(mk(exact), req, toy_model)
    assert a.e2e_s == pytest.approx(b.e2e_s, rel=1e-12)


def test_longer_queue_predicts_longer_latency(toy_model):
    cfg = EngineConfig(num_blocks=1052)
    req = Request(id=1, arrival_s=0.0, prompt_tokens=200, output_tokens=300)
    preds = []
    for n_wait in (0, 8, 32):
        running = [SeqState(i, 300, 400, 300 + 100 - 1, 100) for i in range(16)]
        waiting = [SeqState(100 + i, 500, 300) for i in range(n_wait)]
        st = InstanceState(running=running, waiting=waiting, free_blocks=1052 - 16 * 25, total_blocks=1052, config=cfg)
        preds.append(predict(st, req, toy_model))
    assert preds[0].e2e_s < preds[1].e2e_s < preds[2].e2e_s
    assert preds[0].queue_s < preds[2].queue_s


def test_busy_for_delays_the_start(toy_model):
    cfg = EngineConfig(num_blocks=1052)
    req = Request(id=1, arrival_s=0.0, prompt_tokens=200, output_tokens=30)
    st = InstanceState(running=[], waiting=[], free_blocks=1052, total_blocks=1052, config=cfg)
    a = predict(st, req, toy_model)
    st.busy_for_s = 0.5
    b = predict(st, req, toy_model)
    assert b.e2e_s == pytest.approx(a.e2e_s + 0.5)
    assert b.queue_s == pytest.approx(0.5)
