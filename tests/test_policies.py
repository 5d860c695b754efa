"""The routing rules on hand-built candidates, the shared tie-break and noise, and every policy in a cluster run."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from block.policies import (POLICIES, argmax, argmin, describe_policies, inject_noise, make_policy, noisy_length,
                            policy_from_config, policy_names)
from block.policies import basic, heuristics, peers, predicted
from vidur.cluster import Cluster
from vidur.policy_contract import RoutingContext
from vidur.records import requests_frame
from vidur.types import Candidate, EngineConfig, InstanceStats, Prediction, Request

ROOT = Path(__file__).resolve().parents[1]


def _ctx(n=4, seed=0, now=0.0, index=0, state=None):
    return RoutingContext(now_s=now, num_instances=n, instance_ids=list(range(n)), rng=random.Random(seed),
                          request_index=index, state={} if state is None else state)


def _stats(i, running=0, waiting=0, free=1000, total=1000, wblocks=0, wtokens=0, unprocessed=0):
    return Candidate(i, stats=InstanceStats(i, running, waiting, free, total, waiting_prompt_blocks=wblocks,
                                            waiting_prompt_tokens=wtokens, unprocessed_tokens=unprocessed))


def _pred(i, e2e):
    return Candidate(i, prediction=Prediction(i, e2e_s=e2e, ttft_s=0.1, queue_s=0.0, free_blocks=100,
                                              num_requests=1))


REQ = Request(0, 0.0, prompt_tokens=100, output_tokens=50)


# ---------------------------------------------------------------- the rules, one by one

def test_block_takes_the_lowest_predicted_e2e_and_skips_failed_probes():
    cands = [_pred(0, 5.0), _pred(1, 2.0), _pred(2, 3.0), Candidate(3)]
    assert predicted.block(REQ, cands, _ctx()) == 1
    assert predicted.block(REQ, [_pred(0, 5.0), _pred(1, float("nan")), _pred(2, 3.0)], _ctx()) == 2
    # nobody answered: uniformly random over the active instances (Block's fallback)
    picks = {predicted.block(REQ, [Candidate(0), Candidate(1)], _ctx(seed=s)) for s in range(50)}
    assert picks == {0, 1, 2, 3}


def test_latency_noise_perturbs_the_argmin_but_not_the_predictions():
    cands = [_pred(0, 1.0), _pred(1, 1.05)]
    ctx = _ctx()
    assert {predicted.block(REQ, cands, ctx) for _ in range(200)} == {0}
    picks = Counter(predicted.block(REQ, cands, ctx, latency_noise_pct=30.0) for _ in range(2000))
    assert 0.2 < picks[1] / 2000 < 0.5  # noise sometimes flips a 5% gap
    assert [c.prediction.e2e_s for c in cands] == [1.0, 1.05]


def test_block_nosim_counts_unprocessed_plus_the_new_request_per_instance():
    cands = [_stats(0, unprocessed=1000), _stats(1, unprocessed=900), _stats(2, unprocessed=2000)]
    assert heuristics.block_nosim(REQ, cands, _ctx()) == 1
    # with per-instance (noisy) lengths of the new request the additive part can decide
    lengths = {0: 5, 1: 200, 2: 1}
    assert heuristics.block_nosim(REQ, cands, _ctx(), length_of=lengths.__getitem__) == 0


def test_llumnix_and_infaas_disagree_on_waiting_prompts():
    a = _stats(0, running=2, free=500, wblocks=400)  # llumnix -(500-400)/2 = -50 ; infaas -250
    b = _stats(1, running=2, free=300, wblocks=0)  # llumnix -150          ; infaas -150
    assert heuristics.llumnix(REQ, [a, b], _ctx()) == 1
    assert heuristics.infaas(REQ, [a, b], _ctx()) == 0
    # max(running, 1): an idle instance is judged by its free blocks alone
    idle = _stats(2, running=0, free=200)
    assert heuristics.infaas(REQ, [a, idle], _ctx()) == 0  # -250 < -200
    assert heuristics.llumnix(REQ, [a, idle], _ctx()) == 2  # -50 > -200


def test_least_requests_counts_running_and_waiting():
    cands = [_stats(0, running=1, waiting=5), _stats(1, running=4, waiting=0), _stats(2, running=3, waiting=2)]
    assert heuristics.least_requests(REQ, cands, _ctx()) == 1


def test_llmd_weighs_queue_and_kv_scores():
    cands = [_stats(0, waiting=0, free=100), _stats(1, waiting=3, free=900), _stats(2, waiting=1, free=500)]
    # queue: 1, 0, 2/3 ; kv: 0.1, 0.9, 0.5 ; 2*q + 2*kv: 2.2, 1.8, 2.33
    assert peers.llmd(REQ, cands, _ctx()) == 2
    assert heuristics.least_requests(REQ, cands, _ctx()) == 0  # a rule that disagrees
    # equal queues score 1.0 for everybody: KV decides
    eq = [_stats(0, waiting=2, free=100), _stats(1, waiting=2, free=700)]
    assert peers.llmd(REQ, eq, _ctx()) == 1
    # the weights are parameters: queue only
    assert peers.llmd(REQ, cands, _ctx(), kv_weight=0.0) == 0


def test_sglang_least_load_trades_queued_tokens_for_kv_pressure():
    a = _stats(0, unprocessed=8000, free=900)  # 8000/4000 + 0.1/0.9 = 2.11
    b = _stats(1, unprocessed=2000, free=100)  # 0.5 + 0.9/0.1 = 9.5
    assert peers.sglang_least_load(REQ, [a, b], _ctx()) == 0
    assert heuristics.block_nosim(REQ, [a, b], _ctx()) == 1  # disagrees
    assert peers.sglang_least_load(REQ, [a, b], _ctx(), kv_weight=0.0) == 1
    full = _stats(2, unprocessed=0, free=0)  # k clipped below 1: finite, and large
    assert peers.sglang_least_load(REQ, [a, full], _ctx()) == 0


def test_dynamo_kv_counts_committed_blocks():
    a = _stats(0, running=1, free=600, wblocks=300)  # used 400 + waiting 300 = 700
    b = _stats(1, running=1, free=400, wblocks=0)  # 600
    assert peers.dynamo_kv(REQ, [a, b], _ctx()) == 1
    assert heuristics.infaas(REQ, [a, b], _ctx()) == 0  # disagrees


def test_min_qpm_forgets_dispatches_older_than_the_window():
    state: dict = {}

    def send(t, i):
        ctx = _ctx(n=3, now=t, state=state)
        basic.min_qpm_observe(REQ, i, [], ctx)

    def pick(t, seed=0):
        ctx = _ctx(n=3, now=t, state=state, seed=seed)
        return basic.min_qpm(REQ, [Candidate(i) for i in range(3)], ctx)

    for _ in range(3):
        send(0.0, 0)
    send(30.0, 1)
    assert pick(50.0) == 2
    send(50.0, 2)
    send(50.0, 2)
    # counts 0:3 1:1 2:2 -> 1
    assert pick(59.9) == 1
    # at t=60 the three t=0 dispatches are older than 60 s: 0:0 1:1 2:2
    assert pick(60.0) == 0
    assert len(state["min_qpm"]["log"]) == 3
    assert pick(200.0) in {0, 1, 2} and len(state["min_qpm"]["log"]) == 0
    assert {pick(200.0, seed=s) for s in range(40)} == {0, 1, 2}  # all tied: random


def test_min_qpm_through_make_policy_spreads_dispatches():
    pol = make_policy("min_qpm")
    state: dict = {}
    counts = Counter()
    for j in range(40):
        ctx = _ctx(n=4, now=j * 0.5, index=j, state=state, seed=j)
        cands = [Candidate(i) for i in range(4)]
        c = pol.choose(REQ, cands, ctx)
        pol.observe(REQ, c, cands, ctx)
        counts[c] += 1
    assert sorted(counts.values()) == [10, 10, 10, 10]


def test_round_robin_and_random():
    cands = [Candidate(i) for i in range(4)]
    assert [basic.round_robin(REQ, cands, _ctx(index=j)) for j in range(6)] == [0, 1, 2, 3, 0, 1]
    assert {basic.random_choice(REQ, cands, _ctx(seed=s)) for s in range(50)} == {0, 1, 2, 3}


# ---------------------------------------------------------------- shared pieces

def test_tie_break_is_uniform():
    rng = random.Random(1)
    ids, scores = [10, 11, 12, 13], [2.0, 2.0, 2.0 * (1 + 1e-14), 2.5]
    counts = Counter(argmin(ids, scores, rng) for _ in range(2000))
    assert set(counts) == {10, 11, 12}
    assert all(0.25 <= counts[i] / 2000 <= 0.42 for i in (10, 11, 12))
    counts = Counter(argmax(ids, [-s for s in scores], rng) for _ in range(2000))
    assert set(counts) == {10, 11, 12}
    # a rule goes through the same helper
    cands = [_stats(i, running=2) for i in range(3)]
    counts = Counter(heuristics.least_requests(REQ, cands, _ctx(seed=s)) for s in range(2000))
    assert all(0.25 <= counts[i] / 2000 <= 0.42 for i in range(3))


def test_tie_tolerance_is_relative():
    rng = random.Random(0)
    assert {argmin([0, 1], [1e6, 1e6 + 1e-7], rng) for _ in range(100)} == {0, 1}
    assert {argmin([0, 1], [1.0, 1.0 + 1e-9], rng) for _ in range(100)} == {0}
    assert {argmin([0, 1], [-3.0, -3.0], rng) for _ in range(100)} == {0, 1}
    with pytest.raises(ValueError):
        argmin([], [], rng)


def test_inject_noise_mean_and_bounds():
    rng = random.Random(0)
    xs = np.array([inject_noise(100.0, 20.0, rng) for _ in range(20000)])
    assert abs(xs.mean() - 100.0) < 1.0
    assert 18.0 < xs.std() < 22.0
    wide = np.array([inject_noise(100.0, 300.0, rng) for _ in range(5000)])
    assert wide.min() >= 10.0 - 1e-9 and wide.max() <= 500.0 + 1e-9
    assert (wide == 10.0).any() and (wide == 500.0).any()  # both clips are reached
    assert inject_noise(7.5, 0.0, rng) == 7.5
    lens = [noisy_length(1, 300.0, rng) for _ in range(2000)] + [noisy_length(3, 90.0, rng) for _ in range(2000)]
    assert min(lens) >= 1 and all(isinstance(x, int) for x in lens)
    assert noisy_length(42, 0.0, rng) == 42
    m = np.mean([noisy_length(200, 25.0, rng) for _ in range(20000)])
    assert abs(m - 200) < 2


# ---------------------------------------------------------------- make_policy

def test_registry_table_and_errors():
    names = set(policy_names())
    assert names == {"block", "block_star", "block_oracle", "block_noisy", "block_nosim", "llumnix", "infaas",
                     "llumnix_full",
                     "min_qpm", "least_requests", "llmd", "sglang_least_load", "dynamo_kv", "round_robin", "random",
                     "lmetric", "llmd_latency", "routebalance", "block_residual", "block_social", "block_ttft"}
    assert set(describe_policies()) == names and all(describe_policies().values())
    with pytest.raises(ValueError, match="block_oracle"):
        make_policy("nope")
    with pytest.raises(ValueError, match="queue_weight"):
        make_policy("llmd", bogus=1)
    with pytest.raises(ValueError, match="latency_noise_pct"):
        make_policy("llumnix", latency_noise_pct=10)
    with pytest.raises(ValueError, match="length_noise_pct"):
        make_policy("block", length_noise_pct=-1)
    with pytest.raises(ValueError, match="k must be"):
        make_policy("block", k=0)
    assert make_policy("block", k=2).k == 2 and make_policy("block").k is None
    assert make_policy("random", k=2).k is None  # not a probing policy
    for n, spec in POLICIES.items():
        p = make_policy(n)
        assert p.signal == spec.signal and p.name == n


def test_lengths_per_policy():
    req = Request(5, 0.0, 100, output_tokens=300, predicted_output_tokens=120)
    bare = Request(6, 0.0, 100, output_tokens=300)
    ctx = _ctx()
    assert make_policy("block").expected_length is None  # the cluster's default: the hint
    assert req.expected_output_tokens() == 120 and bare.expected_output_tokens() == 300
    assert make_policy("block_star").expected_length(req, 0, ctx) == 120
    assert make_policy("block_oracle").expected_length(req, 0, ctx) == 300
    with pytest.raises(ValueError, match="predicted_length"):
        make_policy("block_star").expected_length(bare, 0, ctx)


def test_length_noise_is_per_request_and_instance_and_stable_within_a_decision():
    pol = make_policy("block_noisy")  # oracle + 25 %
    state: dict = {}
    req = Request(1, 0.0, 100, output_tokens=400)
    ctx = _ctx(state=state, index=0)
    first = [pol.expected_length(req, i, ctx) for i in range(4)]
    assert [pol.expected_length(req, i, ctx) for i in range(4)] == first  # cached within the decision
    assert len(set(first)) > 1  # independent per instance
    draws = []
    for j in range(1, 3001):
        draws.append(pol.expected_length(Request(j + 1, 0.0, 100, 400), 0, _ctx(state=state, index=j, seed=j)))
    draws = np.array(draws)
    assert abs(draws.mean() - 400) < 8 and 80 < draws.std() < 120
    assert make_policy("block_noisy", length_noise_pct=0).expected_length(req, 0, ctx) == 400


def test_noisy_probes_leave_the_chosen_engine_the_clean_length(toy_model):
    """Block draws length noise per probe but forwards the un-noised length to the engine it picks
    (``num_predicted_tokens``): in a simulated run every engine-side expected length is the true one, while the
    lengths the probes were told are noisy (with the draw kept by the engine, 25 % noise doubled the P99 damage)."""
    from vidur.engine import Engine, Seq
    from vidur.routing import Router
    from vidur.types import EngineConfig

    pol = make_policy("block_noisy", k=4, length_noise_pct=50.0)
    router = Router(pol, random.Random(0))
    told_noisy = kept_clean = 0
    for j in range(50):
        req = Request(j, 0.0, 100, output_tokens=300)
        turn = router.open(req, [0, 1, 2, 3], 0.0, j)
        lengths = turn.lengths()
        told_noisy += any(v != 300 for v in lengths.values())
        turn.decide([])  # no candidate answered: the random fallback picks, the length it keeps is what matters
        kept_clean += turn.told_tokens == 300
    assert told_noisy == 50 and kept_clean == 50
    assert make_policy("block_noisy", length_noise_pct=0).kept_length is None  # no noise: it keeps what it was told

    cfg = EngineConfig(num_blocks=2000, max_model_len=1024)
    engines = [Engine(cfg, toy_model, instance_id=i) for i in range(3)]
    cl = Cluster(engines, make_policy("block_noisy", k=2, length_noise_pct=100.0), seed=1)
    seen: list[Seq] = []
    for e in cl.engines:
        orig = e.add
        e.add = lambda seq, now, orig=orig: seen.append(seq) or orig(seq, now)
    reqs = [Request(i, i * 0.05, 50 + i % 7, output_tokens=20 + i % 13) for i in range(40)]
    cl.run(reqs)
    assert len(seen) == 40 and all(s.expected == s.out for s in seen)


def test_policy_from_config_reads_every_yaml():
    omegaconf = pytest.importorskip("omegaconf")
    # custom.yaml names a rule by import path (a plug-in): tests/test_policy_plugin.py
    files = sorted(f for f in (ROOT / "conf" / "policy").glob("*.yaml") if f.stem != "custom")
    assert {f.stem for f in files} == set(policy_names())
    for f in files:
        cfg = omegaconf.OmegaConf.create({"engine": {"block_size": 16}, "policy": omegaconf.OmegaConf.load(f)})
        d = omegaconf.OmegaConf.to_container(cfg.policy, resolve=True)
        assert d["name"] == f.stem and "k" in d and "length_noise_pct" in d and "latency_noise_pct" in d
        pol = policy_from_config(d)
        assert pol.name == f.stem
        assert pol.k == (2 if f.stem.startswith("block") else None)


# ---------------------------------------------------------------- in the simulator

def _requests(n=200, rate=10.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    prompt = rng.integers(16, 1200, n)
    out = np.minimum(rng.lognormal(5.0, 1.0, n).astype(int) + 1, 1500)
    pred = np.maximum(1, (out * rng.uniform(0.7, 1.3, n)).astype(int))
    return [Request(i, float(t[i]), int(prompt[i]), int(out[i]), predicted_output_tokens=int(pred[i]))
            for i in range(n)]


def _run(policy, model, reqs, n=4, blocks=600, seed=0):
    cl = Cluster.build(n, EngineConfig(num_blocks=blocks), model, policy, seed=seed, sample_interval_s=0)
    return requests_frame(cl.run(reqs).requests)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_completes_every_request(name, toy_model):
    reqs = _requests()
    kw = {"k": 2} if POLICIES[name].probes else {}
    if POLICIES[name].signal == "prediction":
        kw.update(length_noise_pct=10.0, latency_noise_pct=5.0)
    df = _run(make_policy(name, **kw), toy_model, reqs)
    assert len(df) == len(reqs) and (df["status"] == "ok").all()
    assert df["instance"].between(0, 3).all()
    if POLICIES[name].signal == "prediction":
        assert df["predicted_e2e_s"].notna().all() and (df["predicted_e2e_s"] > 0).all()
    else:
        assert df["predicted_e2e_s"].isna().all()


def test_block_star_without_predictions_fails_clearly(toy_model):
    reqs = [Request(i, 0.1 * i, 50, 20) for i in range(5)]
    with pytest.raises(ValueError, match="predicted_length"):
        _run(make_policy("block_star", k=2), toy_model, reqs)


def test_block_fanout_beats_random_when_overloaded(toy_model):
    # tight KV (260 blocks ~ 4 long requests per instance) at 6 req/s: random queues for ~3 s per request
    reqs = _requests(n=200, rate=6.0, seed=0)
    block = _run(make_policy("block", k=None), toy_model, reqs, blocks=260)
    rand = _run(make_policy("random"), toy_model, reqs, blocks=260)
    assert rand["queue_s"].mean() > 2.0  # overloaded
    assert block["e2e_s"].mean() < 0.8 * rand["e2e_s"].mean()
    assert block["queue_s"].mean() < 0.5 * rand["queue_s"].mean()
