"""The field's newer routers (LMetric, llm-d predicted latency, RouteBalance-style) and the residual-corrected Block:
their rules on hand-built candidates, the outcome channel the harness feeds, and online learning in a cluster run."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from block.policies import learned, make_policy, residual
from vidur.cluster import Cluster
from vidur.learned import FEATURES, OnlineGBDT, error_summary, features, save_samples
from vidur.outcomes import OUTCOMES_KEY, Outcome, deliver, drain, open_outcomes, wants_outcomes
from vidur.policy_contract import RoutingContext, RoutingPolicy
from vidur.records import requests_frame
from vidur.residual import ResidualCorrector, ResidualModel
from vidur.types import Candidate, EngineConfig, InstanceStats, Prediction, Request

try:
    import lightgbm  # noqa: F401
    HAVE_LGBM = True
except ImportError:  # pragma: no cover - the ml extra (CI installs it)
    HAVE_LGBM = False
needs_lightgbm = pytest.mark.skipif(not HAVE_LGBM, reason="the learned predictors need the ml extra (LightGBM)")


def _ctx(n=3, state=None, seed=0):
    return RoutingContext(now_s=0.0, num_instances=n, instance_ids=list(range(n)), rng=random.Random(seed),
                          request_index=0, state={} if state is None else state)


def _stats(i, running=0, waiting=0, free=1000, wtokens=0, unprocessed=0):
    return Candidate(i, stats=InstanceStats(i, running, waiting, free, 1000, waiting_prompt_tokens=wtokens,
                                            unprocessed_tokens=unprocessed))


def _requests(n, rate, seed=0):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    prompt = rng.integers(16, 1200, n)
    out = np.minimum(rng.lognormal(5.0, 1.0, n).astype(int) + 1, 1500)
    return [Request(i, float(t[i]), int(prompt[i]), int(out[i])) for i in range(n)]


def _cluster(policy, model, n=4, blocks=600):
    return Cluster.build(n, EngineConfig(num_blocks=blocks), model, policy, seed=0, sample_interval_s=0)


# ---------------------------------------------------------------- LMetric

def test_lmetric_multiplies_prefill_tokens_by_batch_size():
    req = Request(0, 0.0, prompt_tokens=100, output_tokens=10)
    # scores: (0 + 100) * (9 + 1) = 1000; (500 + 100) * (0 + 1 + 1) = 1200; (100 + 100) * (2 + 1) = 600
    cands = [_stats(0, running=9), _stats(1, waiting=1, wtokens=500), _stats(2, running=2, wtokens=100)]
    assert learned.lmetric(req, cands, _ctx()) == 2
    # a queue-length rule would pick instance 1 (1 request) -- LMetric weighs the prefill work it carries
    assert learned.lmetric(req, cands[:2], _ctx()) == 0


# ---------------------------------------------------------------- the outcome channel

def test_outcomes_are_delivered_only_to_a_policy_that_opened_the_queue():
    state: dict = {}
    o = Outcome(1, 0, 1.0, 1.5, 3.0, 10, 5)
    deliver(state, o)
    assert not wants_outcomes(state) and OUTCOMES_KEY not in state
    open_outcomes(state)
    deliver(state, o)
    assert drain(state) == [o] and drain(state) == []
    later = Outcome(2, 0, 1.0, 1.5, 9.0, 10, 5)
    deliver(state, o)
    deliver(state, later)
    assert drain(state, now_s=5.0) == [o]  # one that finishes after the decision waits for a later one
    assert drain(state, now_s=9.0) == [later]
    assert o.ttft_s == 0.5 and o.e2e_s == 2.0 and o.tpot_s == pytest.approx(1.5 / 4)


def test_the_simulator_hands_back_every_outcome_never_before_it_happens(toy_model):
    seen: list[tuple[float, Outcome]] = []

    def choose(req, cands, ctx):
        open_outcomes(ctx.state)
        seen.extend((ctx.now_s, o) for o in drain(ctx.state, ctx.now_s))
        return ctx.instance_ids[ctx.request_index % len(ctx.instance_ids)]

    reqs = _requests(300, 8.0)
    cl = _cluster(RoutingPolicy("probe", choose), toy_model)
    df = requests_frame(cl.run(reqs).requests).set_index("id")
    seen.extend((math.inf, o) for o in drain(cl.policy_state))  # what finished after the last arrival
    assert sorted(o.request_id for _, o in seen) == list(range(300))
    for now, o in seen:
        assert o.finish_s <= now  # never from the future
        row = df.loc[o.request_id]
        assert o.instance_id == row["instance"]
        assert o.e2e_s == pytest.approx(row["e2e_s"]) and o.ttft_s == pytest.approx(row["ttft_s"])


# ---------------------------------------------------------------- the learners

@needs_lightgbm
def test_online_gbdt_learns_a_latency_surface_and_refits_on_schedule():
    rng = np.random.default_rng(0)
    m = OnlineGBDT(min_samples=100, refit_every=100, window=2000)
    truth = lambda x: 0.05 + 0.002 * x[1] * (1 + x[3])  # noqa: E731 - prompt x queue depth
    rows = [(0.5, float(rng.integers(10, 1000)), 100.0, float(rng.integers(0, 8)), 4.0, 0.0, 0.0)
            for _ in range(1000)]
    for r in rows[:99]:
        m.add(r, truth(r))
    assert not m.ready
    for r in rows[99:]:
        m.add(r, truth(r))
    assert m.ready and m.fits == 10 and m.num_samples == 1000
    test = rows[:200]
    s = error_summary(m.predict(test), [truth(r) for r in test])
    assert s["median_error"] < 0.1 and s["p90_error"] < 0.3
    # monotone in every load feature, also past what it has seen (queues of 0-7 here)
    along = m.predict([(0.5, 500.0, 100.0, float(q), 4.0, 0.0, 0.0) for q in range(0, 30)])
    assert (np.diff(along) >= 0).all() and along[-1] > 2 * along[0]
    assert len(FEATURES) == len(features(InstanceStats(0, 1, 2, 3, 4), 5, 6))


def test_residual_model_learns_a_scale_error_and_the_switch_turns_the_correction_off():
    m = ResidualModel(min_samples=20)
    x = np.array([1.0, 1.0, 0.0, 5.0, 4.0, 1.0, 0.5])
    for _ in range(19):
        m.observe(x, 0.8, 1.0)  # the what-if says 0.8 s, the request takes 1.0 s: profile 20 % too fast
    assert not m.ready and m.factor(x) == 1.0
    m.observe(x, 0.8, 1.0)
    assert m.ready and m.factor(x) == pytest.approx(1.25, rel=0.02)
    p = Prediction(0, e2e_s=0.8, ttft_s=0.08, queue_s=0.0, free_blocks=500, num_requests=1, num_running=1)
    for enabled in (True, False):
        c = ResidualCorrector(enabled=enabled, min_samples=20)
        for _ in range(40):
            c.observe(p, 100, 50, actual_e2e_s=1.0, actual_ttft_s=0.1)
        got = c.correct(p, 100, 50)
        if enabled:
            assert got.e2e_s == pytest.approx(1.0, rel=0.02) and got.ttft_s == pytest.approx(0.1, rel=0.02)
        else:
            assert got is p
        assert c.raw_error.mean_abs_rel == pytest.approx(0.2)


# ---------------------------------------------------------------- in the simulator, learning online

@needs_lightgbm
@pytest.mark.parametrize("name", ["routebalance", "llmd_latency"])
def test_learned_policies_train_online_from_the_runs_outcomes_and_then_decide(name, toy_model):
    kw = dict(min_samples=40, refit_every=100)
    if name == "llmd_latency":
        kw.update(epsilon=0.0, slo_ttft_s=0.5, slo_tpot_s=0.05)
    pol = make_policy(name, **kw)
    reqs = _requests(800, 12.0)
    cl = _cluster(pol, toy_model)
    df = requests_frame(cl.run(reqs).requests)
    assert (df["status"] == "ok").all()
    st = cl.policy_state[name]
    # every routed request was either learned from (its outcome joined with the row it was routed on) or is one
    # still in flight at the last decision
    assert st.outcomes > 400 and st.outcomes + len(st.pending) == len(reqs)
    assert all(m.ready for m in st.models.values()) and st.decisions > 100  # the models, not the fallback, decided


@needs_lightgbm
def test_learned_policy_warm_starts_from_saved_samples(tmp_path, toy_model):
    rng = np.random.default_rng(1)
    rows = [tuple(float(v) for v in rng.uniform(0, 100, len(FEATURES))) for _ in range(300)]
    path = tmp_path / "samples.npz"
    save_samples(str(path), rows, [i % 2 for i in range(300)], [0.1] * 300, [0.01] * 300, [1.0] * 300)
    ctx = _ctx(n=2)
    req = Request(0, 0.0, 100, 10)
    learned.routebalance(req, [_stats(0), _stats(1, running=3)], ctx, min_samples=200, warm_start=str(path))
    assert ctx.state["routebalance"].model("e2e").ready  # decided by the model from the first request
    ctx2 = _ctx(n=2)
    learned.llmd_latency(req, [_stats(0), _stats(1)], ctx2, min_samples=100, warm_start=str(path), epsilon=0.0)
    st = ctx2.state["llmd_latency"]
    assert st.model(("ttft", 0)).ready and st.model(("tpot", 1)).ready and st.decisions == 1


@needs_lightgbm
def test_llmd_latency_draws_by_slo_headroom_as_llm_d_does(tmp_path):
    # models that know TTFT = 0.1 s x (queue + 1): instance queues 0, 5, 40 -> 0.1, 0.6, 4.1 s; TPOT 10 ms
    rows, inst, ttft = [], [], []
    for i, q in enumerate((0, 5, 40)):
        for _ in range(150):
            rows.append((0.1, 100.0, 10.0, float(q), 1.0, 0.0, 0.0))
            inst.append(i)
            ttft.append(0.1 * (q + 1))
    path = tmp_path / "s.npz"
    save_samples(str(path), rows, inst, ttft, [0.01] * len(rows), [1.0] * len(rows))
    req = Request(0, 0.0, 100, 10)
    cands = [_stats(0, waiting=0, running=1), _stats(1, waiting=5, running=1), _stats(2, waiting=40, running=1)]
    for c in cands:
        c.stats.free_blocks = 900

    def picks(n=300, **kw):
        kw.setdefault("epsilon", 0.0)
        return Counter(learned.llmd_latency(req, cands, _ctx(seed=s), warm_start=str(path), min_samples=100, **kw)
                       for s in range(n))

    # TTFT SLO 1 s: instances 0 and 1 meet it (headroom 0.9 and 0.4 s), 2 does not
    least = picks(slo_ttft_s=1.0)
    assert least[2] == 0 and least[1] > 0.8 * 300  # "least" (llm-d's default) packs: weight 91 vs 11
    most = picks(slo_ttft_s=1.0, selection="most")
    assert most[2] == 0 and most[0] > 0.8 * 300
    assert picks(n=20, slo_ttft_s=1.0, selection="best") == Counter({0: 20})  # ours: no draw
    # epsilon: the share of draws from the negative tier when both tiers exist
    assert picks(slo_ttft_s=1.0, epsilon=1.0) == Counter({2: 300})
    # nobody meets 50 ms: weights fall with the deficit (82, 74, 18 of 174)
    neg = picks(slo_ttft_s=0.05)
    assert neg[2] < neg[1] < neg[0] + 40 and neg[2] < 0.2 * 300
    # ... but an idle instance comes first
    cands[2].stats.num_running = 0
    assert picks(n=50, slo_ttft_s=0.05) == Counter({2: 50})


def test_block_residual_corrects_a_wrong_profile_in_the_simulator(toy_model):
    reqs = _requests(600, 10.0)
    errs = {}
    for on in (True, False):
        pol = make_policy("block_residual", k=2, whatif_scale=1.25, residual=on, min_samples=30)
        cl = _cluster(pol, toy_model)
        cl.run(reqs)
        st = cl.policy_state[residual.STATE_KEY]
        log = [(raw, used, act) for _, raw, used, act in st.log if math.isfinite(act)]
        assert len(log) > 400
        raw = error_summary([r for r, _, _ in log], [a for _, _, a in log])
        used = error_summary([u for _, u, _ in log[100:]], [a for _, _, a in log[100:]])
        errs[on] = (raw, used)
        assert st.corrector.raw_error.n == len(log)
        if not on:
            assert all(r == u for r, u, _ in log)  # switched off: it acts on the what-if as it is
    (raw_on, used_on), (_, used_off) = errs[True], errs[False]
    assert raw_on["median_error"] > 0.1  # the what-if is 25 % slow ...
    assert used_on["median_error"] < 0.6 * used_off["median_error"]  # ... and the correction removes much of it


# ---------------------------------------------------------------- training samples from run records

@needs_lightgbm
def test_samples_rebuilt_from_run_records_match_what_the_router_saw(toy_model, tmp_path):
    from vidur.learned_data import main as samples_main, samples_from_frames
    from vidur.records import instances_frame, summarize, write_run

    seen = {}

    def choose(req, cands, ctx):  # least requests, remembering the exact figures of the pick
        c = min(cands, key=lambda c: (c.stats.num_running + c.stats.num_waiting, c.instance_id))
        seen[req.id] = c.stats
        return c.instance_id

    reqs = _requests(400, 10.0)
    cl = Cluster.build(3, EngineConfig(num_blocks=600), toy_model, RoutingPolicy("probe", choose, signal="stats"),
                       seed=0, sample_interval_s=0.5)
    res = cl.run(reqs)
    req_df = requests_frame(res.requests)
    inst_df = instances_frame(res.instances)
    s = samples_from_frames(req_df, inst_df, 600)
    assert s["x"].shape == (400, len(FEATURES)) and (s["e2e"] > 0).all()
    by_id = dict(zip(req_df.sort_values(["instance", "dispatch_s"])["id"], range(400)))
    exact = np.array([seen[i].num_running + seen[i].num_waiting for i in by_id])
    rebuilt = s["x"][list(by_id.values()), 3] + s["x"][list(by_id.values()), 4]
    # requests in the instance at dispatch: the records tell it up to a request the engine finished within the
    # step that straddles the dispatch (the simulator runs whole steps)
    assert (np.abs(exact - rebuilt) <= 1).mean() > 0.98 and np.abs(exact - rebuilt).mean() < 0.2
    # the command line writes what a learned policy warm-starts from
    run = tmp_path / "run"
    write_run(run, "{}", req_df, inst_df, summarize(req_df, num_blocks=600))
    out = tmp_path / "samples.npz"
    samples_main([str(run), "-o", str(out)])
    ctx = _ctx(n=3)
    learned.routebalance(Request(0, 0.0, 100, 10), [_stats(0), _stats(1), _stats(2)], ctx, min_samples=200,
                         warm_start=str(out))
    assert ctx.state["routebalance"].model("e2e").ready and ctx.state["routebalance"].decisions == 1
