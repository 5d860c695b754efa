"""Engine invariants, and exact agreement of the fast (closed-form, lazy) engine with a naive step-by-step one."""

from __future__ import annotations

import math
from pathlib import Path
import random

import pytest

from reference_engine import RefEngine, RSeq
from vidur.engine import Engine, Seq
from vidur.types import EngineConfig, InstanceState, SeqState


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

# vLLM V1 (vidur/sched/v1.py): one budget of max_num_batched_tokens, per-chunk KV, tail preemption
V1_CONFIGS = [
    EngineConfig(scheduler="v1", num_blocks=2000, max_num_batched_tokens=512, watermark=0.0),
    EngineConfig(scheduler="v1", num_blocks=300, max_num_batched_tokens=512, watermark=0.0),  # heavy preemption
    EngineConfig(scheduler="v1", num_blocks=260, max_num_seqs=8, max_num_batched_tokens=64, watermark=0.01),
    # threshold-capped chunks interleave prefills with decodes: the general (in running order) path
    EngineConfig(scheduler="v1", num_blocks=300, max_num_batched_tokens=256, long_prefill_token_threshold=100,
                 watermark=0.0),
    EngineConfig(scheduler="v1", num_blocks=2000, max_num_seqs=16, max_num_batched_tokens=128,
                 long_prefill_token_threshold=48, watermark=0.0),
    EngineConfig(scheduler="v1", num_blocks=400, chunked_prefill=False, max_num_seqs=16, block_size=32,
                 watermark=0.05),
]


def _cfg_id(c):
    return (f"{c.scheduler}-chunked{c.chunked_prefill}-blocks{c.num_blocks}-seqs{c.max_num_seqs}"
            f"-tokens{c.token_budget}-thr{c.long_prefill_token_threshold}")


@pytest.mark.parametrize("cfg", CONFIGS + V1_CONFIGS, ids=_cfg_id)
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


@pytest.mark.parametrize("cfg", CONFIGS + V1_CONFIGS, ids=_cfg_id)
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


def _mixed_order_state(seed, spare_blocks):
    """A V1 state whose running order puts long prefills *ahead of* decodes (as a predictor may see it)."""
    rng = random.Random(seed)
    bs, n = 16, 22
    running = []
    for i in range(n):
        p = rng.randint(20, 900)
        if i % 3 == 0:  # a prefill part-way through its prompt
            running.append(SeqState(i, p, rng.randint(1, 300), computed_tokens=rng.randint(1, p - 1)))
        else:
            d = rng.randint(1, 200)
            running.append(SeqState(i, p, d + rng.randint(1, 200), computed_tokens=p + d - 1, decoded_tokens=d))
    used = sum(-(-s.computed_tokens // bs) for s in running)
    cfg = EngineConfig(scheduler="v1", num_blocks=used + spare_blocks, max_num_seqs=n + 2,
                       max_num_batched_tokens=256, block_size=bs, watermark=0.0)
    return InstanceState(running=running, waiting=[], free_blocks=spare_blocks, total_blocks=cfg.num_blocks,
                         config=cfg)


def _ref_from_state(state, model):
    """The naive engine in the same state (V1 block accounting: a prefill holds blocks for its computed tokens)."""
    e = RefEngine(state.config, model)
    e.free = state.free_blocks
    for st in state.running:
        s = RSeq(st.id, st.prompt_tokens, st.expected_output_tokens, 0.0)
        s.computed, s.generated = st.computed_tokens, st.decoded_tokens
        s.blocks = -(-s.computed // e.bs)
        s.prefill_done = st.decoded_tokens > 0
        e.running.append(s)
    return e


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("spare_blocks", [2000, 12])
def test_v1_running_order_with_prefills_ahead_of_decodes(seed, spare_blocks, toy_model):
    """Prefill chunks ahead of decodes in running order spend the budget first: the decodes behind them sit the step
    out (the general path), and the tail is preempted when a chunk's blocks do not fit -- exactly as the naive V1."""
    state = _mixed_order_state(seed, spare_blocks)
    fast = Engine.from_state(state, toy_model)
    fast.keep_finished = True
    ref = _ref_from_state(state, toy_model)
    steps = []
    orig = toy_model.step_time
    toy_model.step_time = lambda chunks, nd, kv: steps.append(nd) or orig(chunks, nd, kv)
    ref.step()
    toy_model.step_time = orig
    n_decodes = sum(1 for s in state.running if s.decoded_tokens > 0)
    assert steps[0] < n_decodes  # the first step left decodes out: the budget ran out in running order
    ref.run_until_idle()
    fast.run_until_idle()
    assert fast.num_preemptions == ref.num_preemptions
    if spare_blocks < 100:
        assert ref.num_preemptions > 0
    f = {s.id: s for s in fast.finished}
    assert len(f) == len(ref.finished) == len(state.running)
    for r in ref.finished:
        assert f[r.id].preemptions == r.preemptions, r.id
        assert math.isclose(f[r.id].finish, r.finish, rel_tol=1e-9, abs_tol=1e-9), r.id
        if r.first_token is not None and f[r.id].first_token is not None:
            assert math.isclose(f[r.id].first_token, r.first_token, rel_tol=1e-9, abs_tol=1e-9), r.id


@pytest.mark.parametrize("scheduler", ["v0", "v1"])
def test_abort_frees_blocks_and_leaves_the_rest_running(scheduler, toy_model):
    """Engine.abort(request_id): a decoding, a prefilling and a waiting request leave; blocks add up; others finish."""
    cfg = EngineConfig(scheduler=scheduler, num_blocks=400, max_num_seqs=8, chunk_size=256, max_num_batched_tokens=256,
                       watermark=0.0)
    e = Engine(cfg, toy_model)
    for i in range(12):
        e.add(Seq(i, 1000 if i % 2 else 100, 200, 0.0), 0.0)
    while not (e.dg_count and e.prefilling and e.waiting):  # step by step into a state with all three kinds
        e.sync(e.time + 1e-9)
    dec = next(s for s in e.running.values() if s.in_decode)
    pre = e.prefilling[0]
    wait = e.waiting[-1]
    assert e.abort(dec.id) is dec and e.abort(pre.id) is pre and e.abort(wait.id) is wait
    assert (dec.status, pre.status, wait.status) == ("aborted", "aborted", "aborted")
    assert e.abort(dec.id) is None and e.abort(12345) is None  # twice, or unknown: nothing happens
    assert dec.id not in e.running and pre not in e.prefilling and wait not in e.waiting
    assert e.free + sum(e.blocks_held(s) for s in e.running.values()) == e.total_blocks
    assert e.dg_count == sum(1 for s in e.running.values() if s.in_decode)
    e.run_until_idle()
    assert e.free == e.total_blocks
    assert sorted(s.id for s in e.finished) == sorted(set(range(12)) - {dec.id, pre.id, wait.id})


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[4], V1_CONFIGS[1]], ids=_cfg_id)
def test_stats_kept_with_the_queue_equal_a_recount(cfg, toy_model):
    """``stats`` reads the waiting queue's figures kept as requests enter and leave it (admission, preemption back to
    the head, rejection of a prompt that never fits, abort, arrival): at every step they equal counting the queue
    afresh (a fork counts afresh), with expected lengths that differ from the true ones."""
    rng = random.Random(5)
    e = Engine(cfg, toy_model)
    kinds = set()
    never = cfg.num_blocks * cfg.block_size + 1  # a prompt that can never fit: rejected when admission reaches it
    t = 0.0
    for i in range(400):
        t += rng.expovariate(8.0)
        e.sync(t)
        assert e.stats() == e.fork().stats(), i
        if i % 37 == 36 and e.waiting:
            assert e.abort(e.waiting[len(e.waiting) // 2].id) is not None
            kinds.add("abort")
            assert e.stats() == e.fork().stats(), i
        prompt = never if i % 97 == 50 else rng.randint(4, 900)
        out = rng.randint(1, 400)
        e.add(Seq(i, prompt, out, t, expected=max(1, out + rng.randint(-150, 150))), t)
        assert e.stats() == e.fork().stats(), i
    while e.has_work():
        e.sync(e.time + 1e-9)
        assert e.stats() == e.fork().stats()
    kinds |= {"preemption"} if e.num_preemptions else set()
    kinds |= {"rejection"} if e.rejected else set()
    assert kinds == {"abort", "preemption", "rejection"}
    assert e.stats().waiting_prompt_tokens == e.wq_tokens == 0 and e.wq_blocks == e.wq_unprocessed == 0


def test_scheduler_flag_selects_the_rule(toy_model):
    """The engine config names the rule; a state carries it into a what-if engine; unknown names are refused."""
    from vidur.sched.v0 import V0Rule
    from vidur.sched.v1 import V1Rule

    assert isinstance(Engine(EngineConfig(), toy_model).rule, V0Rule)
    e = Engine(EngineConfig(scheduler="v1", max_num_batched_tokens=2048, max_num_seqs=256), toy_model)
    assert isinstance(e.rule, V1Rule) and e.budget == 2048
    again = InstanceState.from_dict(e.snapshot(0.0).to_dict())
    assert isinstance(Engine.from_state(again, toy_model).rule, V1Rule)
    with pytest.raises(ValueError, match="scheduler"):
        EngineConfig(scheduler="v2").validate()
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(scheduler="v1", max_num_batched_tokens=64, max_num_seqs=128).validate()
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        EngineConfig(long_prefill_token_threshold=64).validate()  # a V1 knob on V0


def test_v1_admits_nothing_in_a_step_that_preempted(toy_model):
    """vLLM V1 skips the waiting queue in a step whose running loop preempted (and a head must fit whole, so the
    victim cannot come straight back); V0's KV rule differs too: the same workload schedules differently."""
    wl = _workload(200, 8.0, seed=3)
    kw = dict(num_blocks=300, max_num_batched_tokens=512, chunk_size=512, watermark=0.0)
    v0 = _run_fast(EngineConfig(**kw), toy_model, wl)
    v1 = _run_fast(EngineConfig(scheduler="v1", **kw), toy_model, wl)
    assert [s.finish for s in v0.finished] != [s.finish for s in v1.finished]
    e = Engine(EngineConfig(scheduler="v1", num_blocks=270, max_num_seqs=3, max_num_batched_tokens=256,
                            watermark=0.0), toy_model)
    seqs = [Seq(i, 1300, 1500, 0.0) for i in range(3)] + [Seq(3, 10, 5, 0.0)]  # 3 fits easily, but waits
    for s in seqs:
        e.add(s, 0.0)
    preempting_steps = 0
    while e.has_work():
        running_before, preempted_before = set(e.running), {s.id: s.preemptions for s in seqs}
        e.sync(e.time + 1e-9)
        victims = [s for s in seqs if s.preemptions > preempted_before[s.id]]
        if victims:
            preempting_steps += 1
            assert set(e.running) <= running_before  # nobody joined
            assert all(v.status == "waiting" and v.computed == 0 for v in victims)
    assert preempting_steps > 0 and all(s.generated == s.out for s in seqs)


def test_engine_configs_name_their_rule():
    """engine=vllm_v1 gives the V1 rule with vLLM's serve defaults; Block's configs keep V0 (the predictor and the
    emulated engine build their EngineConfig from these files)."""
    from block.engine.config import build_setup

    v1 = build_setup("llama2_7b", "a30", "vllm_v1").engine
    assert (v1.scheduler, v1.max_num_seqs, v1.token_budget, v1.watermark_blocks) == ("v1", 256, 2048, 0)
    assert build_setup("llama2_7b", "a30", "vllm_chunked").engine.scheduler == "v0"
    bigger = build_setup("llama2_7b", "a30", "vllm_v1", max_num_batched_tokens=8192, max_num_seqs=1024).engine
    assert bigger.token_budget == 8192


def _vllm_python():
    """The Python of the vLLM install (``python -m block.engine.vllm_install``), or None."""
    from block.engine.vllm_install import default_venv, venv_bin

    py = venv_bin(default_venv(), "python")
    return py if py.is_file() else None


def _vidur_v1_steps(case, model):
    """Our V1 engine stepped like vLLM's scheduler loop: per step the tokens each request got and who was preempted."""
    cfg = EngineConfig(scheduler="v1", max_num_seqs=case["max_num_seqs"],
                       max_num_batched_tokens=case["max_num_batched_tokens"], block_size=case["block_size"],
                       num_blocks=case["num_blocks"], watermark=case["watermark"], max_model_len=case["max_model_len"],
                       long_prefill_token_threshold=case["long_prefill_token_threshold"])
    e = Engine(cfg, model)
    pending = sorted(case["requests"], key=lambda r: (r[3], r[0]))
    seqs, steps = [], []
    while pending or e.has_work():
        while pending and pending[0][3] <= len(steps):
            rid, prompt, out, _ = pending.pop(0)
            seqs.append(e.add(Seq(rid, prompt, out, e.time), e.time))
        before = [(e.computed_of(s), s.preemptions) for s in seqs]
        if e.has_work():
            e._advance(e.time + 1e-9)  # one scheduler iteration: one step (a preemption-only one commits none)
        tokens, preempted = {}, []
        for s, (c, p) in zip(seqs, before):
            if s.preemptions > p:
                preempted.append(str(s.id))
            elif e.computed_of(s) > c:
                tokens[str(s.id)] = e.computed_of(s) - c
        steps.append({"tokens": tokens, "preempted": sorted(preempted)})
    return steps


def test_v1_rule_matches_vllm_scheduler(tmp_path, toy_model):
    """vLLM's own V1 scheduler (the installed vLLM, driven by tests/vllm_v1_schedule.py with no model) and our V1
    rule schedule the same tokens for the same requests in every step, and preempt the same requests, under heavy
    preemption, with a long-prefill threshold and with a watermark. Skipped where vLLM is not installed."""
    import json
    import subprocess

    py = _vllm_python()
    if py is None:
        pytest.skip("vLLM is not installed (python -m block.engine.vllm_install, or set BLOCK_VLLM_VENV)")
    from block.engine.config import load_conf
    from block.engine.vllm import prepare_model_dir

    model_dir = prepare_model_dir(load_conf("model", "llama_tiny"), tmp_path / "model")
    rng = random.Random(11)
    cases = []
    # (blocks, threshold, watermark); at 34 blocks and 10% the longest requests fit only into an empty engine
    for nblocks, thr, wm in ((40, 0, 0.0), (40, 24, 0.0), (60, 0, 0.05), (34, 0, 0.1), (400, 0, 0.0)):
        reqs = []
        for i in range(40):
            p = 500 if i % 10 == 0 else rng.randint(1, 300)
            reqs.append([i, p, rng.randint(1, min(200, 512 - p)), rng.randint(0, 400)])
        cases.append({"max_num_seqs": 8, "max_num_batched_tokens": 64, "block_size": 16, "num_blocks": nblocks,
                      "watermark": wm, "long_prefill_token_threshold": thr, "max_model_len": 512, "requests": reqs})
    res = subprocess.run([str(py), str(Path(__file__).with_name("vllm_v1_schedule.py"))],
                         input=json.dumps({"model_dir": str(model_dir), "cases": cases}), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    for case, vllm_steps in zip(cases, theirs):
        ours = _vidur_v1_steps(case, toy_model)
        assert sum(len(s["preempted"]) for s in ours) > 0 or case["num_blocks"] > 100
        for k, (a, b) in enumerate(zip(ours, vllm_steps)):
            assert a == b, (case["num_blocks"], case["long_prefill_token_threshold"], k, a, b)
        assert len(ours) == len(vllm_steps)
