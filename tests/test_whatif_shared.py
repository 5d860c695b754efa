"""The what-if's shared trajectory (``vidur.whatif.Trajectory``, ``predict_engine``) is the full simulation, exactly.

Deep queues (over a thousand waiting), tight KV (preemption), V0 and V1 rules, with and without chunked prefill:
every prediction must equal running the engine itself with the candidate added (1e-9), and the queue ahead of the
candidate must be simulated once per state, not once per candidate.
"""

from __future__ import annotations

import math
import random

import pytest

from vidur.engine import Engine, Seq
from vidur.types import EngineConfig, Request
from vidur.whatif import EngineWhatIf, WhatIf, predict, predict_engine

RULES = {
    "v0": {},
    "v1": dict(scheduler="v1", max_num_batched_tokens=512, watermark=0.0),
    "v1-threshold": dict(scheduler="v1", max_num_batched_tokens=256, long_prefill_token_threshold=96),
}


def _cfg(rule: str, chunked: bool, blocks: int) -> EngineConfig:
    kw = dict(RULES[rule])
    if not chunked and kw:
        kw["max_num_batched_tokens"] = 4096  # without chunked prefill the budget must hold a whole prompt
    return EngineConfig(num_blocks=blocks, chunked_prefill=chunked, max_model_len=1024, **kw)


def _arrivals(n: int, rate: float, seed: int, noisy: bool = False) -> list[tuple[float, int, int, int]]:
    """(time, prompt, true output, expected output) of ``n`` Poisson arrivals."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        o = rng.randint(1, 300)
        exp = max(1, int(o * rng.uniform(0.5, 1.5))) if noisy else o
        out.append((t, rng.randint(4, 700), o, exp))
    return out


def _replay(cfg, model, arrivals, upto: int, t: float, cand: tuple[int, int]) -> Seq:
    """The full simulation: a fresh engine gets the first ``upto`` arrivals, then the candidate at ``t``."""
    e = Engine(cfg, model)
    for i, (ta, p, o, x) in enumerate(arrivals[:upto]):
        e.sync(ta)
        e.add(Seq(i, p, x, ta), ta)  # the engine runs the lengths a predictor assumes
    e.sync(t)
    s = e.add(Seq(10**6, cand[0], cand[1], t), t)
    e.run_until_idle()
    return s


def _forked(e: Engine, t: float, cand: tuple[int, int]) -> Seq:
    """The full simulation of the engine itself: a copy whose requests run to the lengths a predictor assumes
    (the expected one, or 10 more once overrun), plus the candidate, run until it finishes."""
    f = e.fork()
    for q in f.running.values():
        if q.in_decode:
            f.leave_decode(q)  # materialise, then rejoin with the assumed length
    for q in (*f.running.values(), *f.waiting):
        q.out = q.expected if q.generated < q.expected else q.generated + 10
    for q in f.running.values():
        if q.computed >= q.known - 1 and q.generated > 0 and q not in f.prefilling:
            f.join_decode(q)
    s = f.add(Seq(10**6, cand[0], cand[1], t), t)
    f.run_until_finished(s)
    return s


def _ambiguous(e: Engine) -> bool:
    """A request re-prefilling after preemption with one token left looks exactly like a decoding one in an
    ``InstanceState`` (computed = known - 1): the snapshot's what-if takes it for a decode, the engine does not."""
    return any(not s.in_decode and s.generated > 0 and s.computed >= s.known - 1 for s in e.running.values())


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) or (math.isinf(a) and math.isinf(b))


def _same(pred, s: Seq, t: float) -> None:
    if s.finish is None:
        assert math.isinf(pred.e2e_s)
        return
    assert _close(pred.e2e_s, s.finish - t), (pred.e2e_s, s.finish - t)
    assert _close(pred.ttft_s, s.first_token - t), (pred.ttft_s, s.first_token - t)
    assert _close(pred.queue_s, s.first_sched - t), (pred.queue_s, s.first_sched - t)


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("blocks", [3000, 300])
@pytest.mark.parametrize("rule", list(RULES))
def test_deep_queue_matches_full_simulation(rule, chunked, blocks, toy_model):
    """1,100 requests arrive within about a second: over a thousand wait. Several candidates share one state."""
    cfg = _cfg(rule, chunked, blocks)
    arr = _arrivals(1100, 1000.0, seed=7 + blocks)
    e = Engine(cfg, toy_model)
    for i, (ta, p, o, x) in enumerate(arr):
        e.sync(ta)
        e.add(Seq(i, p, x, ta), ta)
    t = arr[-1][0] + 0.0123
    e.sync(t)
    state = e.snapshot(t)
    assert len(state.waiting) >= 1000
    w = WhatIf(state, toy_model)
    rng = random.Random(blocks)
    for j in range(3):
        cand = (rng.randint(4, 700), rng.randint(1, 300))
        req = Request(id=10**6, arrival_s=t, prompt_tokens=cand[0], output_tokens=cand[1])
        ref = _replay(cfg, toy_model, arr, len(arr), t, cand)
        _same(w.predict(req), ref, t)
        if j == 0:
            _same(predict(state, req, toy_model), ref, t)
            _same(predict_engine(e, t, req), ref, t)


def test_queue_is_simulated_once_per_state(toy_model):
    """The second candidate costs no step of the queue ahead: the trajectory's engine does not move."""
    cfg = _cfg("v0", True, 1052)
    arr = _arrivals(600, 1000.0, seed=3)
    e = Engine(cfg, toy_model)
    for i, (ta, p, o, x) in enumerate(arr):
        e.sync(ta)
        e.add(Seq(i, p, x, ta), ta)
    t = arr[-1][0]
    e.sync(t)
    w = WhatIf(e.snapshot(t), toy_model)
    w.predict(Request(1, t, 100, 50))
    traj = w._traj
    steps = traj.s.num_steps
    assert steps > 500  # the queue ahead was simulated once ...
    for p in (10, 300, 700):
        w.predict(Request(1, t, p, 80))
    assert traj.s.num_steps == steps  # ... and never again


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("rule", list(RULES))
def test_engine_whatif_follows_the_engine(rule, chunked, seed, toy_model):
    """A live engine probed at every arrival of a cluster and receiving some of them (as the cluster does): the
    kept trajectory, extended by each request it receives and carried across time, predicts exactly what the full
    simulation gives; overload and tight KV (preemptions) included, estimated lengths (unfaithful: rebuilt) on
    odd seeds."""
    noisy = seed % 2 == 1
    blocks = (250, 600, 4000)[seed % 3]
    cfg = _cfg(rule, chunked, blocks)
    rng = random.Random(seed)
    share = (0.3, 1.0, 0.6)[seed % 3]  # the part of the cluster's arrivals this instance receives
    cluster = _arrivals(int(260 / share), (4.0, 60.0)[seed % 2 == 0] / share, seed=100 + seed, noisy=noisy)
    mine = [rng.random() < share for _ in cluster]
    arr = [a for a, m in zip(cluster, mine) if m]
    e = Engine(cfg, toy_model)
    kept = 0
    i = 0
    for (ta, p, o, x), received in zip(cluster, mine):
        e.sync(ta)
        for probe in range(2):
            cand = (rng.randint(4, 700), rng.randint(1, 300))
            req = Request(id=10**6, arrival_s=ta, prompt_tokens=cand[0], output_tokens=cand[1])
            before = e.whatif
            pred = predict_engine(e, ta, req)
            kept += e.whatif is before
            if i % 13 == 0 and probe == 0 and not noisy:  # (estimated lengths: the engine is not its own what-if)
                _same(pred, _replay(cfg, toy_model, arr, i, ta, cand), ta)
            _same(pred, _forked(e, ta, cand), ta)
            if not _ambiguous(e):  # the snapshot's what-if is the full simulation (the deep-queue test above)
                ref = predict(e.snapshot(ta), req, toy_model)
                assert _close(pred.e2e_s, ref.e2e_s) and _close(pred.ttft_s, ref.ttft_s)
                assert _close(pred.queue_s, ref.queue_s)
        if received:
            e.add(Seq(i, p, o, ta, expected=x), ta)
            i += 1
    if not noisy and rule != "v1-threshold":
        assert kept > 1.5 * len(cluster)  # kept across time and arrivals, not only between probes at one moment


def test_estimated_lengths_are_carried_until_the_engine_parts(toy_model):
    """With a length estimate that differs from the true one (50 assumed, 400 true), the engine's own steps are the
    kept trajectory's until the request could reach 50 tokens: the trajectory is reused before that step and
    rebuilt after it, and every prediction is the snapshot's."""
    cfg = _cfg("v0", True, 2000)
    e = Engine(cfg, toy_model)
    e.add(Seq(0, 100, 400, 0.0, expected=50), 0.0)
    req = Request(1, 0.0, 100, 50)
    assert not EngineWhatIf(e, 0.0, 10).faithful
    predict_engine(e, 0.0, req)
    first = e.whatif
    assert first is not None and first.n_div == 50
    reused = rebuilt = 0
    t = 0.0
    while e.num_steps < 70:
        t += 0.004
        e.sync(t)
        before = e.whatif
        p = predict_engine(e, t, req)
        assert _close(p.e2e_s, predict(e.snapshot(t), req, toy_model).e2e_s), (t, e.num_steps)
        if e.num_steps < 50:
            reused += e.whatif is first
        else:
            rebuilt += e.whatif is not before or before is not first
    assert reused > 5 and rebuilt > 5, (reused, rebuilt)
    assert e.whatif is not first


def test_fork_copies_every_engine_attribute(toy_model):
    """``Engine.fork`` spells the attributes out (for speed): one added to ``Engine.__init__`` must be added there."""
    e = Engine(_cfg("v0", True, 1052), toy_model)
    e.add(Seq(0, 100, 20, 0.0), 0.0)
    e.sync(0.05)
    f = e.fork()
    assert set(vars(f)) == set(vars(e))
    assert f.running[0] is not e.running[0] and f.free == e.free and f.time == e.time


@pytest.mark.parametrize("chunked", [True, False])
def test_v0_may_reach_back_is_exact_under_kv_pressure(chunked, toy_model):
    """V0's ``may_reach_back`` (after ``settle``) says True exactly when the next step's admission reaches a request
    queued last: the whole queue ahead fits (seats, blocks above the watermark, budget), not just its head. Checked
    at every step of an overloaded engine whose KV pool forces preemptions; a looser test (the head only) would
    checkpoint the shared trajectory early and make every candidate simulate the queue ahead of it."""
    from vidur.engine import INF
    from vidur.sched import make_rule
    from vidur.whatif import BACK_ID, _NEVER_FITS

    cfg = _cfg("v0", chunked, 600)
    rule = make_rule(cfg)
    e = Engine(cfg, toy_model)
    arr = _arrivals(400, 8.0, seed=11)
    said = {True: 0, False: 0}
    for i, (ta, p, o, x) in enumerate(arr):
        e.sync(ta)
        e.add(Seq(i, p, x, ta), ta)
        f = e.fork()
        back = Seq(BACK_ID, _NEVER_FITS, 1)
        f.waiting.append(back)
        rule.settle(f)
        may = rule.may_reach_back(f)
        f._advance(INF)
        assert may == (back.status == "rejected"), (i, len(e.running), len(e.waiting), f.free)
        said[may] += 1
    assert e.num_preemptions > 0 and said[True] > 20 and said[False] > 20, (e.num_preemptions, said)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("blocks", [250, 600])
def test_closed_form_life_is_the_simulation_preemptions_included(blocks, seed, toy_model):
    """``vidur.candidate``: the candidate's life walked over the trajectory's recorded steps equals simulating it
    on a fork (1e-9) -- admission behind the queue, prefill in the budget the others leave, decode runs one sequence
    wider, and evictions (it is the first victim when its blocks run the pool dry, then re-queued and recomputed)
    -- and it answers nearly every probe of an overloaded instance with tight KV, evicted candidates included."""
    from vidur.whatif import TARGET_ID

    cfg = _cfg("v0", True, blocks)
    rng = random.Random(seed)
    cluster = _arrivals(300, (8.0, 30.0)[seed % 2], seed=200 + seed)
    e = Engine(cfg, toy_model)
    answered = evicted = falls = 0
    for i, (ta, p, o, x) in enumerate(cluster):
        e.sync(ta)
        for _ in range(2):
            cand = (rng.randint(4, 700), rng.randint(1, 300))
            predict_engine(e, ta, Request(id=10**6, arrival_s=ta, prompt_tokens=cand[0], output_tokens=cand[1]))
            got = e.whatif.traj.closed(ta, Seq(TARGET_ID, cand[0], cand[1]))
            ref = _forked(e, ta, cand)
            if got is None:
                falls += 1
                continue
            assert _close(got[0], ref.finish - ta), (i, got, ref.finish - ta)
            assert _close(got[1], ref.first_token - ta), (i, got, ref.first_token - ta)
            assert _close(got[2], ref.first_sched - ta), (i, got, ref.first_sched - ta)
            answered += 1
            evicted += ref.preemptions > 0
        if rng.random() < 0.5:
            e.add(Seq(i, p, o, ta), ta)
    assert falls <= 0.02 * (answered + falls), (answered, falls)
    if blocks == 250 or seed % 2:  # the pool is tight or the instance overloaded: candidates get evicted
        assert evicted >= 5, (answered, evicted)


def test_a_trajectory_the_engine_leaves_before_the_next_query_is_used_once(toy_model):
    """``next_query_s`` (the cluster's next arrival): with an overrun request running the trajectory parts from the
    engine at its next step, so when that step starts before the next query nothing is kept for later (no recorded
    future); when it does not, the trajectory is kept. The answers are the full simulation's either way."""
    cfg = _cfg("v0", True, 300)
    e = Engine(cfg, toy_model)
    e.add(Seq(0, 100, 400, 0.0, expected=20), 0.0)  # overruns its estimate after 20 tokens
    for i in range(1, 41):
        e.add(Seq(i, 300, 50, 0.0), 0.0)
    t = 0.0
    while not (e.running.get(0) is not None and e.running[0].in_decode and e.generated_of(e.running[0]) > 20):
        t += 0.01
        e.sync(t)
    assert len(e.waiting) >= 8  # a queue deep enough for a kept trajectory without the hint
    req = Request(10**6, t, 200, 60)
    ref = _forked(e, t, (200, 60))
    _same(predict_engine(e, t, req, next_query_s=e.time + 0.5), ref, t)
    assert e.whatif is None  # the engine steps before anyone asks again
    _same(predict_engine(e, t, req, next_query_s=e.time), ref, t)
    kept = e.whatif
    assert kept is not None and kept.traj.future is not None  # asked again within the step: recorded once
    _same(predict_engine(e, t, Request(10**6, t, 50, 200), next_query_s=e.time), _forked(e, t, (50, 200)), t)
    assert e.whatif is kept


@pytest.mark.parametrize("blocks", [250, 600, 4000])
def test_decode_runs_recorded_directly_are_the_rules_steps(blocks, toy_model):
    """``Future.extend`` commits a decode run with only the sentinel waiting directly (``Future.fast_runs``): every
    segment it records -- times, batch, KV, the room a request queued last would find, blocks -- is the one stepping
    the rule records, under light load and under tight KV (preemptions, re-admissions)."""
    from vidur.candidate import Future

    cfg = _cfg("v0", True, blocks)
    rng = random.Random(blocks)
    e = Engine(cfg, toy_model)
    fast = compared = 0
    for i, (ta, p, o, x) in enumerate(_arrivals(200, 20.0, seed=blocks)):
        e.sync(ta)
        if i % 5 == 0:
            predict_engine(e, ta, Request(10**6, ta, rng.randint(4, 700), rng.randint(1, 300)))
            traj = e.whatif.traj
            k = traj.reach(ta)
            a, b = Future(k, traj.rule, traj.version), Future(k, traj.rule, traj.version)
            b.fast_runs = False
            while a.extend():
                assert b.extend()
            assert not b.extend()
            assert a.segs == b.segs and a.hold == b.hold and a.sa == b.sa and a.sk == b.sk and a.skp == b.skp
            fast += sum(1 for s in a.segs if s[0] == 1 and s[10] is not None)
            compared += len(a.segs)
        e.add(Seq(i, p, o, ta), ta)
    assert compared > 200 and fast > 100, (compared, fast)


def _steps(f, n0: int) -> dict:
    """A recorded future step by step from step ``n0``: (start, duration, batch, KV tokens, room a request queued
    last finds, blocks free after, prefill chunks, begins by preempting)."""
    out = {}
    bs = f.bs
    for seg in f.segs:
        if seg[0] == 0:  # MIXED
            out[seg[1]] = (seg[2], seg[3] - seg[2], seg[5], seg[6], seg[7], seg[8], tuple(seg[4]), seg[9])
            continue
        _, s0, t0, m, B, S1, c, k, a, b, room, free0, cum, pre, _, _, free_end = seg
        for i in range(m):
            x = i + 1
            fa = free0 - x // bs * B - cum[x % bs]  # after the step's reservation (the room's blocks)
            r = None if room is None else (room[0], room[1], fa)
            out[s0 + i] = (t0 + b * i + a * i * i, c + k * (S1 + B * i), B, S1 + B * i, r,
                           free_end if i == m - 1 else fa, (), pre and i == 0)
    return {s: v for s, v in out.items() if s >= n0}


@pytest.mark.parametrize("seed", range(6))
def test_a_received_request_is_overlaid_onto_the_recorded_future(seed, toy_model):
    """``Future.overlay``: when the engine receives a request, its trajectory's recorded future takes the request in
    (admission, prefill chunks, decode runs one sequence wider, evictions and re-admission, the others' steps later
    by what it cost) instead of being recorded again. Step by step it is the future recorded afresh from the same
    checkpoint: same batches, KV, chunks, rooms, free blocks and preemptions, times to 1e-9; light load, overload
    and tight KV (the received request evicted) alike, and nearly every request received is overlaid."""
    from vidur.candidate import Future

    blocks = (250, 600, 4000)[seed % 3]
    cfg = _cfg("v0", True, blocks)
    rng = random.Random(seed)
    e = Engine(cfg, toy_model)
    adds = compared = evicted_steps = 0
    for i, (ta, p, o, x) in enumerate(_arrivals(400, (8.0, 30.0, 60.0)[seed % 3], seed=300 + seed)):
        e.sync(ta)
        predict_engine(e, ta, Request(10**6, ta, rng.randint(4, 700), rng.randint(1, 300)))
        traj = e.whatif.traj
        f = traj.future
        if f is not None and f.version == traj.version:
            k = traj.reach(ta)
            fresh = Future(k, traj.rule, traj.version)
            while fresh.end < f.end and fresh.extend():
                pass
            got, ref = _steps(f, k.num_steps), _steps(fresh, k.num_steps)
            assert set(ref) <= set(got) or set(got) <= set(ref)
            for s in set(got) & set(ref):
                u, v = got[s], ref[s]
                assert _close(u[0], v[0]) and math.isclose(u[1], v[1], rel_tol=1e-9), (i, s, u, v)
                assert u[2:] == v[2:], (i, s, u, v)
                compared += 1
                evicted_steps += u[7]
        if rng.random() < 0.6:
            e.add(Seq(i, p, o, ta), ta)
            adds += 1
    assert e.whatif.traj.overlaid >= 0.6 * adds, (e.whatif.traj.overlaid, adds)
    assert compared > 50_000
    if blocks == 250:
        assert e.num_preemptions > 0 and evicted_steps > 0


def test_overlaid_and_recorded_futures_answer_alike(toy_model):
    """A trajectory that records its future again after each request received (``overlays`` False, as before) and
    one that overlays the request give the same answers to every probe (1e-9), under KV pressure."""
    cfg = _cfg("v0", True, 300)
    rng = random.Random(7)
    engines = [Engine(cfg, toy_model), Engine(cfg, toy_model)]
    overlaid = 0
    for i, (ta, p, o, x) in enumerate(_arrivals(300, 30.0, seed=77)):
        preds = []
        cand = [(rng.randint(4, 700), rng.randint(1, 300)) for _ in range(3)]
        for n, e in enumerate(engines):
            e.sync(ta)
            if e.whatif is not None and n == 1:
                e.whatif.traj.overlays = False
            preds.append([predict_engine(e, ta, Request(10**6, ta, *c)) for c in cand])
            if n == 0 and e.whatif is not None:
                overlaid = e.whatif.traj.overlaid
        for a, b in zip(*preds):
            assert _close(a.e2e_s, b.e2e_s) and _close(a.ttft_s, b.ttft_s) and _close(a.queue_s, b.queue_s)
        if rng.random() < 0.7:
            for e in engines:
                e.add(Seq(i, p, o, ta), ta)
    assert engines[1].whatif.traj.overlaid == 0 and overlaid > 100, overlaid
    assert engines[0].num_preemptions > 0
