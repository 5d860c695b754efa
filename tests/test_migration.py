"""Live migration (``vidur.migration``, policy ``llumnix_full``): the engine's hand-over primitives against the naive
reference engine, the staged copy's timing and aborts, Llumnix's pairing, whole cluster runs and the preset."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from reference_engine import RefEngine, RSeq

from block.policies import make_policy
from block.policies.llumnix_full import make_migrator, pair_migrations
from experiments import wiring
from vidur.cluster import Cluster
from vidur.engine import Engine, Seq
from vidur.migration import MigrationConfig, Migrator
from vidur.types import EngineConfig, InstanceStats, Request

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- Engine.adopt
class MovingRefEngine(RefEngine):
    """The naive engine plus the two hand-over steps, written the obvious way."""

    def take_out(self, rid):
        s = next(s for s in self.running if s.id == rid)
        self.running.remove(s)
        self.free += s.blocks
        s.blocks = 0
        return s

    def take_in(self, s, now):
        need = self._ceil(s.computed)
        if not self.running and not self.waiting and self.time < now:
            self.time = now
        self.free -= need
        s.blocks = need
        self.running.append(s)


def _decoding(e):
    if isinstance(e, Engine):
        return sorted(s.id for s in e.running.values() if s.in_decode)
    return sorted(s.id for s in e.running if s.prefill_done)


def _fits(e, rid, src):
    """Whether ``rid`` (running on ``src``) fits on ``e`` now: its blocks and a batch slot."""
    if isinstance(e, Engine):
        need = -(-src.computed_of(src.running[rid]) // e.bs)
        return need <= e.free and len(e.running) < e.max_seqs
    s = next(s for s in src.running if s.id == rid)
    return e._ceil(s.computed) <= e.free and len(e.running) < e.cfg.max_num_seqs


def _simulate(cfg, model, wl, moves, fast):
    """Arrivals go 3:1 to engines A and B; at each move time the decoding request with the lowest id leaves A and
    joins B (when it fits there). Returns both engines."""
    a, b = (Engine(cfg, model, 0), Engine(cfg, model, 1)) if fast else (MovingRefEngine(cfg, model),
                                                                        MovingRefEngine(cfg, model))
    events = sorted([(t, 0, i) for i, t, _, _ in wl] + [(t, 1, k) for k, t in enumerate(moves)])
    by_id = {i: (i, t, p, o) for i, t, p, o in wl}
    moved = 0
    for t, kind, x in events:
        a.sync(t)
        b.sync(t)
        if kind == 0:
            i, _, p, o = by_id[x]
            e = b if i % 4 == 3 else a
            e.add(Seq(i, p, o, t) if fast else RSeq(i, p, o, t), t)
            continue
        ids = _decoding(a)
        if not ids or not _fits(b, ids[0], a):
            continue
        if fast:
            s = a.abort(ids[0])
            assert s is not None and s.computed == s.prompt + s.generated - 1
            b.adopt(s, t)
        else:
            b.take_in(a.take_out(ids[0]), t)
        moved += 1
    a.run_until_idle()
    b.run_until_idle()
    return a, b, moved


CFGS = [
    EngineConfig(num_blocks=2000),
    EngineConfig(num_blocks=300),  # tight: the adopted request is preempted first
    EngineConfig(num_blocks=2000, chunked_prefill=False),
    EngineConfig(scheduler="v1", num_blocks=300, max_num_batched_tokens=512, watermark=0.0),
]


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: f"{c.scheduler}-chunked{c.chunked_prefill}-{c.num_blocks}")
def test_adopt_after_abort_matches_naive_engine(cfg, toy_model):
    """A request taken out of one engine mid-decode and adopted by another continues exactly as the naive engines
    say: same first token, finish and preemptions for every request (1e-9)."""
    rng = random.Random(cfg.num_blocks)
    t, wl = 0.0, []
    for i in range(160):
        t += rng.expovariate(6.0)
        wl.append((i, t, rng.randint(4, 700), rng.randint(2, 300)))
    moves = [0.5 * k for k in range(1, int(t / 0.5) + 20)]
    fa, fb, fmoved = _simulate(cfg, toy_model, wl, moves, fast=True)
    ra, rb, rmoved = _simulate(cfg, toy_model, wl, moves, fast=False)
    assert fmoved == rmoved > 10
    fast = {s.id: s for s in fa.finished + fb.finished}
    ref = {s.id: s for s in ra.finished + rb.finished}
    assert sorted(fast) == sorted(ref) == [w[0] for w in wl]
    for i, r in ref.items():
        s = fast[i]
        assert s.generated == s.out
        assert s.preemptions == r.preemptions, i
        assert math.isclose(s.first_token, r.first_token, rel_tol=1e-9, abs_tol=1e-9), i
        assert math.isclose(s.finish, r.finish, rel_tol=1e-9, abs_tol=1e-9), i
    for e in (fa, fb):
        assert e.free == e.total_blocks
    if cfg.num_blocks == 300:
        assert fa.num_preemptions + fb.num_preemptions > 0


def test_adopt_refuses_what_cannot_continue(toy_model):
    e = Engine(EngineConfig(num_blocks=300, max_num_seqs=2), toy_model)
    with pytest.raises(ValueError, match="not mid-decode"):
        e.adopt(Seq(1, 100, 10), 0.0)  # never prefilled: it has no KV to bring
    s = Seq(2, 4000, 50, computed=4000, generated=1)  # 250 blocks
    e.free -= 200  # what a migration pre-allocated for it
    with pytest.raises(ValueError, match="does not fit"):
        e.adopt(s, 0.0)  # without counting the pre-allocated blocks: 250 > 100 free
    e.adopt(s, 0.0, reserved_blocks=200)
    assert e.free == 300 - 250 and list(e.running) == [2] and s.in_decode and s.status == "running"
    with pytest.raises(ValueError, match="already running"):
        e.adopt(s, 0.0)
    e.adopt(Seq(3, 10, 5, computed=10, generated=1), 0.0)
    e.adopt(Seq(4, 10, 5, computed=10, generated=1), 0.0)  # past max_num_seqs=2, as vLLM's running queue allows
    e.add(Seq(5, 10, 5), 0.0)
    e.sync(1e-9)
    assert len(e.running) == 3 and [x.id for x in e.waiting] == [5]  # no admission while over the cap
    e.run_until_idle()
    assert [x.id for x in e.finished] == [3, 4, 5, 2] and e.free == 300


# ---------------------------------------------------------------------------------------------- the migrator
def _two_engines(toy_model, cfg=None):
    cfg = cfg or EngineConfig(num_blocks=2000)
    return [Engine(cfg, toy_model, 0), Engine(cfg, toy_model, 1)]


def _drive(mig, engines, until=60.0):
    """Run the migrator's events in time order until both engines are idle (what the cluster's loop does)."""
    while mig.in_progress or any(e.has_work() for e in engines):
        assert mig.next_time() < until
        mig.step(engines, [0, 1])
    for e in engines:
        e.run_until_idle()


def test_staged_migration_timing(toy_model):
    """The request decodes on the source during the background stage, then pays exactly the last stage's copy: it
    finishes ``downtime`` later than it would have without moving; bytes are blocks x block size x bytes/token."""
    base = Engine(EngineConfig(num_blocks=2000), toy_model)
    base.add(Seq(7, 600, 400), 0.0)
    base.run_until_idle()
    base_finish = base.finished[0].finish

    engines = _two_engines(toy_model)
    seq = engines[0].add(Seq(7, 600, 400), 0.0)
    cfg = MigrationConfig(kv_bytes_per_token=1000.0, bandwidth_gbps=0.002, interval_s=0.5)
    mig = Migrator(cfg, lambda stats: [(0, 1)])
    _drive(mig, engines)
    (rec,) = mig.records
    assert rec.status == "done" and (rec.src, rec.dst, rec.id) == (0, 1, 7)
    assert rec.start_s == 0.5 and rec.stages == 2  # 37+ full blocks in the background, then a few blocking
    assert seq in engines[1].finished and seq.generated == 400
    assert rec.bytes == rec.blocks * 16 * 1000.0
    first = (600 + 0 + 1) // 16  # lower bound of the full blocks at 0.5 s
    assert rec.blocks > first + 1  # the source kept decoding: more blocks than at the start were copied
    last_blocks = round((rec.downtime_s * cfg.bandwidth_gbps * 1e9) / (16 * 1000.0))
    assert 0 < last_blocks <= cfg.last_stage_max_blocks
    assert math.isclose(rec.downtime_s, cfg.copy_s(last_blocks, 16), rel_tol=1e-12)
    assert math.isclose(seq.finish, base_finish + rec.downtime_s, rel_tol=1e-9)
    assert all(e.free == e.total_blocks for e in engines)
    assert mig.summary()["num_migrations"] == 1


def test_migration_aborts_when_the_request_finishes_first(toy_model):
    """A request that ends during a background stage finishes on its source; the blocks the destination had
    pre-allocated come back."""
    engines = _two_engines(toy_model)
    engines[0].add(Seq(1, 900, 40), 0.0)
    cfg = MigrationConfig(kv_bytes_per_token=1000.0, bandwidth_gbps=0.0002, interval_s=0.2)  # ~0.08 s per block
    mig = Migrator(cfg, lambda stats: [(0, 1)])
    seen = []
    while mig.in_progress or any(e.has_work() for e in engines):
        mig.step(engines, [0, 1])
        if mig.in_progress:
            seen.append(engines[1].free)
    (rec,) = mig.records
    assert rec.status == "aborted: finished"
    assert min(seen) < engines[1].total_blocks  # the destination really held blocks meanwhile
    assert engines[1].free == engines[1].total_blocks and not engines[1].finished
    assert engines[0].finished[0].id == 1


def test_migration_config_is_checked():
    with pytest.raises(ValueError, match="bandwidth_gbps"):
        MigrationConfig(kv_bytes_per_token=1.0, bandwidth_gbps=0.0)
    with pytest.raises(ValueError, match="request_policy"):
        MigrationConfig(kv_bytes_per_token=1.0, bandwidth_gbps=1.0, request_policy="FIFO")


# ---------------------------------------------------------------------------------------------- Llumnix's rules
def _stats(i, free, running, waiting_blocks=0):
    return InstanceStats(instance_id=i, num_running=running, num_waiting=0, free_blocks=free, total_blocks=1000,
                         waiting_prompt_blocks=waiting_blocks)


def test_pairing_sends_least_free_to_freest():
    stats = [_stats(0, 100, 10), _stats(1, 20, 10, waiting_blocks=40), _stats(2, 900, 3), _stats(3, 25, 10),
             _stats(4, 500, 2)]
    # freeness: 10, -2, 300, 2.5, 250 -> below 3: 1 (-2), 3 (2.5); above: 2 (300), 4 (250), 0 (10)
    assert pair_migrations(stats) == [(1, 2), (3, 4)]
    assert pair_migrations(stats, threshold=20.0) == [(1, 2), (3, 4)]  # 0 (10) is below too, but unmatched
    assert pair_migrations([_stats(0, 100, 1), _stats(1, 90, 1)]) == []


def test_llumnix_full_dispatches_as_llumnix():
    from vidur.policy_contract import RoutingContext
    from vidur.types import Candidate

    full, plain = make_policy("llumnix_full"), make_policy("llumnix")
    assert full.signal == plain.signal == "stats"
    cands = [Candidate(0, stats=_stats(0, 100, 10)), Candidate(1, stats=_stats(1, 300, 10))]
    req = Request(0, 0.0, 10, 10)
    for pol in (full, plain):
        ctx = RoutingContext(now_s=0.0, num_instances=2, instance_ids=[0, 1], rng=random.Random(0), request_index=0)
        assert pol.choose(req, cands, ctx) == 1
    with pytest.raises(ValueError, match="no parameter"):
        make_policy("llumnix_full", migrate_out_treshold=2.0)


def _cluster_run(toy_model, migrate):
    rng = random.Random(3)
    t, reqs = 0.0, []
    for i in range(400):
        t += rng.expovariate(9.0)
        reqs.append(Request(i, t, rng.randint(50, 900), rng.randint(20, 400)))
    cfg = EngineConfig(num_blocks=400)
    engines = [Engine(cfg, toy_model, i) for i in range(2)]
    mig = make_migrator({}, kv_bytes_per_token=1000.0, bandwidth_gbps=1.0) if migrate else None
    cl = Cluster(engines, make_policy("llumnix_full" if migrate else "llumnix"), seed=1, migrator=mig)
    return cl.run(reqs), engines, reqs


def test_cluster_runs_llumnix_with_migration(toy_model):
    """Under load, full Llumnix migrates; every request still finishes once with its exact length, no block leaks."""
    res, engines, reqs = _cluster_run(toy_model, migrate=True)
    df = res.requests
    assert len(df) == len(reqs) and (df["status"] == "ok").all()
    done = [r for r in res.migrations if r["status"] == "done"]
    assert len(done) > 5
    finished = {s.id: (e.instance_id, s) for e in engines for s in e.finished}
    assert len(finished) == len(reqs)
    for r in done[:20]:
        assert r["end_s"] - r["start_s"] >= r["downtime_s"] > 0
    assert any(finished[r["id"]][0] == r["dst"] for r in done)
    assert all(s.generated == s.out for _, s in finished.values())
    assert all(e.free == e.total_blocks for e in engines)
    plain, _, _ = _cluster_run(toy_model, migrate=False)
    assert not plain.migrations
    assert not math.isclose(df["e2e_s"].mean(), plain.requests["e2e_s"].mean(), rel_tol=1e-9)


# ---------------------------------------------------------------------------------------------- the preset
@pytest.fixture(scope="module")
def composer():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield lambda overrides: compose("config", overrides=list(overrides))


def test_preset_is_llama70b_tp4_on_two_a100_40gb_instances(composer):
    from experiments.sim import migrator_of

    cfg = composer(["experiment=llumnix_full", "policy=llumnix_full"])
    assert cfg.cluster.num_instances == 2 and cfg.engine.tensor_parallel == 4
    assert cfg.model.num_kv_heads == 8 and cfg.model.num_layers == 80 and cfg.gpu.memory_gb == 40
    ecfg = wiring.validate(cfg)
    assert 1000 < ecfg.num_blocks < 5000  # 70B over 4 x 40 GB leaves a few GB of KV per GPU
    mig = migrator_of(cfg)
    # 80 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes / 4 GPUs = 81,920 bytes per token per GPU
    assert mig.cfg.kv_bytes_per_token == 80 * 8 * 128 * 2 * 2 / 4
    assert mig.cfg.bandwidth_gbps == cfg.cluster.migration_gbps
    assert migrator_of(composer(["experiment=llumnix_full", "policy=llumnix"])) is None


def test_live_modes_refuse_llumnix_full(composer, tmp_path):
    from experiments.run import run_one

    cfg = composer(["policy=llumnix_full", "mode=emulate"])
    with pytest.raises(wiring.ConfigError, match="only mode=sim"):
        run_one(cfg, tmp_path / "run")


def test_analysis_draws_ours_beside_the_published_points(composer, tmp_path):
    import pandas as pd

    from analysis.llumnix_full import main
    from experiments.run import run_one

    root = tmp_path / "llumnix_full"
    for pol in ("llumnix_full", "block_oracle"):
        cfg = composer(["experiment=llumnix_full", f"policy={pol}", "workload.qps=36", "workload.num_requests=60",
                        "progress=false"])
        run_one(cfg, root / pol)
    assert main([str(root)]) == 0
    tab = pd.read_csv(root / "figures" / "llumnix_full.csv")
    assert sorted(tab["policy"]) == ["block_oracle", "llumnix_full"] and (tab["qps"] == 36).all()
    assert tab.set_index("policy").loc["llumnix_full", "num_migrations"] >= 0
    assert tab.set_index("policy").loc["block_oracle", "num_migrations"] == 0
    assert (root / "figures" / "llumnix_full.png").stat().st_size > 0
    from analysis.common import stamp_text
    from analysis.records import find_runs

    assert "no profile: roofline step times" in stamp_text(find_runs(root))  # the A100 has no measured profile


def test_live_scheduler_refuses_llumnix_full():
    from block.scheduler.cli import build_parser, make_policy_from_args

    ap = build_parser()
    with pytest.raises(ValueError, match="only the simulator"):
        make_policy_from_args(ap.parse_args(["--instances", "http://a:1", "--policy", "llumnix_full"]))
    pol, _ = make_policy_from_args(ap.parse_args(["--instances", "http://a:1", "--policy", "llumnix"]))
    assert pol.name == "llumnix"


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: f"{c.scheduler}-chunked{c.chunked_prefill}-{c.num_blocks}")
def test_migration_under_pressure_keeps_every_request_and_block(cfg, toy_model):
    """Many migrations, with tight memory (preemptions, destinations out of blocks) or roomy, V0 and V1 rules, a
    slow link: every request finishes once with its exact length, the engines end with all their blocks (nothing
    left pre-allocated), and each migration switched or was aborted for one of the known reasons."""
    tight = cfg.num_blocks <= 300
    # tight: preemptions everywhere, destinations out of blocks; roomy: a threshold between the instances' freeness
    rate, gbps, thr = (25.0, 0.01, 5.0) if tight else (7.0, 0.05, 400.0)
    rng = random.Random(cfg.num_blocks + 7)
    t, reqs = 0.0, []
    for i in range(300):
        t += rng.expovariate(rate)
        reqs.append(Request(i, t, rng.randint(20, 700), rng.randint(5, 300)))
    engines = [Engine(cfg, toy_model, i) for i in range(3)]
    mig = make_migrator({"migrate_out_threshold": thr, "migration_interval_s": 0.02, "last_stage_max_blocks": 2,
                         "request_migration_policy": "LJF"}, kv_bytes_per_token=1000.0, bandwidth_gbps=gbps)
    res = Cluster(engines, make_policy("llumnix_full"), seed=2, migrator=mig).run(reqs)
    assert (res.requests["status"] == "ok").all() and len(res.requests) == len(reqs)
    finished = [s for e in engines for s in e.finished]
    assert sorted(s.id for s in finished) == [r.id for r in reqs]
    assert all(s.generated == s.out for s in finished)
    assert all(e.free == e.total_blocks for e in engines)
    assert not mig.busy and not mig.in_progress
    done = [r for r in mig.records if r.status == "done"]
    assert len(done) >= 5
    if tight:
        assert sum(e.num_preemptions for e in engines) > 0
    assert {r.status for r in mig.records} <= {"done", "aborted: finished", "aborted: preempted on the source",
                                               "aborted: destination out of KV blocks"}
    for r in done:
        assert r.start_s < r.end_s and r.stages >= 1 and r.bytes == r.blocks * cfg.block_size * 1000.0
