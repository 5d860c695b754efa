"""Engine invariants, and exact agreement of the fast (closed-form, lazy) engine with a naive step-by-step one."""

from __future__ import annotations

import math
import random

import pytest

from reference_engine import RefEngine, RSeq
from vidur.engine import Engine, Seq
from vidur.types import EngineConfig


def _workload(n, rate, seed, max_prompt=900, max_out=400):
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate)
        out.append((i, t, rng.randint(4, max_prompt), rng.randint(1, max_out)))
    return out


def _run_fast(cfg, model, wl, check=None):
    e = Engine(cfg, model)
    for i, t, p, o in wl:
        e.sync(t)
        if check:
            check(e)
        e.add(Seq(i, p, o, t), t)
    e.run_until_idle()
    return e


def _run_ref(cfg, model, wl):
    e = RefEngine(cfg, model)
    for i, t, p, o in wl:
        e.sync(t)
        e.add(RSeq(i, p, o, t), t)
    e.run_until_idle()
    return e


CONFIGS = [
    EngineConfig(num_blocks=2000),  # plenty of memory: no preemption
    EngineConfig(num_blocks=300),  # tight: preemptions
    EngineConfig(num_blocks=260, max_num_seqs=8, chunk_size=64, max_num_batched_tokens=4096),
    EngineConfig(num_blocks=2000, chunked_prefill=False),
    EngineConfig(num_blocks=300, chunked_prefill=False),
    EngineConfig(num_blocks=400, chunked_prefill=False, max_num_seqs=16, block_size=32, watermark=0.05),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"chunked{c.chunked_prefill}-blocks{c.num_blocks}-seqs{c.max_num_seqs}")
@pytest.mark.parametrize("rate", [2.0, 8.0])
def test_fast_engine_matches_naive_engine(cfg, rate, toy_model):
    wl = _workload(250, rate, seed=int(rate * 10) + cfg.num_blocks)
    fast = _run_fast(cfg, toy_model, wl)
    ref = _run_ref(cfg, toy_model, wl)
    assert len(fast.finished) == len(ref.finished) == len(wl)
    f = {s.id: s for s in fast.finished}
    for r in ref.finished:
        s = f[r.id]
        assert s.preemptions == r.preemptions, r.id
        assert math.isclose(s.first_token, r.first_token, rel_tol=1e-9, abs_tol=1e-9), r.id
        assert math.isclose(s.finish, r.finish, rel_tol=1e-9, abs_tol=1e-9), r.id
    assert fast.num_preemptions == ref.num_preemptions


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"chunked{c.chunked_prefill}-blocks{c.num_blocks}")
def test_invariants(cfg, toy_model):
    """Blocks never over-committed, exact output lengths, preempted requests recompute."""
    seen = {"min_free": cfg.num_blocks}

    def check(e):
        held = sum(e.blocks_held(s) for s in e.running.values())
        assert e.free >= 0
        assert held + e.free == e.total_blocks
        assert len(e.running) <= cfg.max_num_seqs
        assert e.dg_count == sum(1 for s in e.running.values() if s.in_decode)
        for s in e.waiting:
            assert s.computed == 0  # a waiting (or preempted) request holds no KV: it recomputes
        seen["min_free"] = min(seen["min_free"], e.free)

    wl = _workload(300, 6.0, seed=7)
    e = _run_fast(cfg, toy_model, wl, check)
    assert e.free == e.total_blocks
    assert len(e.finished) == len(wl)
    for s in e.finished:
        assert s.generated == s.out
        assert s.computed == s.prompt + s.out - 1
        assert s.arrival <= s.first_sched <= s.first_token <= s.finish
    if cfg.num_blocks <= 300:
        assert e.num_preemptions > 0
        assert sum(s.preemptions for s in e.finished) == e.num_preemptions


def test_preempted_request_recomputes_its_tokens(toy_model):
    """A preempted request's recompute prefill covers its prompt plus what it had generated."""
    cfg = EngineConfig(num_blocks=260, max_num_seqs=4, chunk_size=512, max_num_batched_tokens=4096)
    e = Engine(cfg, toy_model)
    seqs = [Seq(i, 1000, 1500, 0.0) for i in range(4)]
    for s in seqs:
        e.add(s, 0.0)
    prefill_tokens = []
    orig = toy_model.step_time

    def spy(chunks, nd, kv):
        prefill_tokens.extend(n for n, _ in chunks)
        return orig(chunks, nd, kv)

    toy_model.step_time = spy
    e.run_until_idle()
    assert e.num_preemptions > 0
    assert all(s.generated == 1500 for s in seqs)
    # every token that was computed before a preemption is computed again afterwards
    assert sum(prefill_tokens) > 4 * 1000


def test_sync_commits_only_steps_started_before_t(toy_model):
    cfg = EngineConfig(num_blocks=2000)
    e = Engine(cfg, toy_model)
    e.add(Seq(0, 100, 1000, 0.0), 0.0)
    e.sync(1.0)
    assert e.time >= 1.0
    # the last committed step started before t=1.0
    c, k = toy_model.decode_coeffs(1)
    assert e.time - (c + k * (e.computed_of(e.running[0]))) < 1.0
