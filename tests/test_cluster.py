"""A short cluster run: the records are complete, consistent and reproducible."""

from __future__ import annotations

import gc
import json
import weakref

import numpy as np
import pandas as pd
import pytest

import vidur.cluster
from block.policies import make_policy
from vidur.cluster import Cluster
from vidur.outcomes import drain, open_outcomes
from vidur.policy_contract import RoutingPolicy
from vidur.records import (
    REQUEST_RECORD_COLUMNS,
    instance_columns,
    instances_frame,
    is_complete,
    load_run,
    request_columns,
    requests_frame,
    summarize,
    write_run,
)
from vidur.types import EngineConfig, Request


def _requests(n=400, rate=12.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    return [Request(i, float(t[i]), int(rng.integers(4, 800)), int(rng.integers(1, 300))) for i in range(n)]


def _run(policy="round_robin", seed=0, n=4, blocks=600, model=None):
    cl = Cluster.build(n, EngineConfig(num_blocks=blocks), model, make_policy(policy), seed=seed,
                       sample_interval_s=0.5)
    return cl.run(_requests())


def test_records_are_complete_and_consistent(toy_model):
    res = _run(model=toy_model)
    df = requests_frame(res.requests)
    assert list(df.columns[: len(REQUEST_RECORD_COLUMNS)]) == REQUEST_RECORD_COLUMNS
    assert len(df) == 400 and (df["status"] == "ok").all()
    assert sorted(df["id"]) == list(range(400))
    assert (df["first_token_s"] >= df["arrival_s"]).all()
    assert (df["finish_s"] >= df["first_token_s"]).all()
    np.testing.assert_allclose(df["e2e_s"], df["finish_s"] - df["arrival_s"])
    multi = df[df["output_tokens"] > 1]
    np.testing.assert_allclose(multi["tpot_s"], (multi["e2e_s"] - multi["ttft_s"]) / (multi["output_tokens"] - 1))
    # round robin: request i on instance i mod 4
    assert (df["instance"] == df["id"] % 4).all()
    inst = instances_frame(res.instances)
    assert set(inst["instance"]) == {0, 1, 2, 3}
    assert (inst["free_blocks"] >= 0).all() and (inst["free_blocks"] <= 600).all()
    assert inst["time_s"].is_monotonic_increasing
    s = summarize(df, policy="round_robin")
    assert s["completed"] == 400 and s["failed"] == 0
    assert s["p99_ttft_ms"] >= s["median_ttft_ms"] > 0
    assert s["request_throughput"] == pytest.approx(400 / s["duration"])


def test_records_written_from_columns_read_back_as_from_frames(toy_model, tmp_path):
    """A simulated run writes its records from numpy columns without pandas (``experiments.sim``); the files and the
    summary must be those the DataFrames give, rejected requests (NaN times, a second status) included."""
    cl = Cluster.build(2, EngineConfig(num_blocks=64, max_model_len=1024), toy_model, make_policy("round_robin"),
                       seed=0, sample_interval_s=0.5)
    reqs = _requests(120)
    reqs.append(Request(120, reqs[-1].arrival_s + 0.1, 1500, 20))  # 95 blocks of 16: never fits 64, rejected
    res = cl.run(reqs)
    cols, frame = request_columns(res.request_columns), requests_frame(res.requests)
    assert list(cols) == list(frame.columns) and set(frame["status"]) == {"ok", "rejected"}
    assert summarize(cols, policy="x") == summarize(frame, policy="x")
    a = write_run(tmp_path / "cols", "a: 1\n", cols, instance_columns(res.instances), {"n": 1})
    b = write_run(tmp_path / "frames", "a: 1\n", frame, instances_frame(res.instances), {"n": 1})
    ra, rb = load_run(a), load_run(b)
    pd.testing.assert_frame_equal(ra.requests(), rb.requests())
    pd.testing.assert_frame_equal(ra.instances(), rb.instances())
    back = ra.requests()
    assert back["finish_s"].isna().sum() == (back["status"] == "rejected").sum() >= 1


def test_same_seed_same_records(toy_model):
    a = requests_frame(_run("random", seed=3, model=toy_model).requests)
    b = requests_frame(_run("random", seed=3, model=toy_model).requests)
    c = requests_frame(_run("random", seed=4, model=toy_model).requests)
    cols = [c_ for c_ in a.columns if c_ != "decision_ms"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert not a["instance"].equals(c["instance"])


def test_prediction_signal_reaches_the_policy(toy_model):
    """A policy that asks for predictions gets what-ifs of the live engines and the pick is recorded."""
    def least_e2e(req, cands, ctx):
        return min(cands, key=lambda c: c.prediction.e2e_s).instance_id

    pol = RoutingPolicy("least_e2e", least_e2e, signal="prediction", k=None)
    cl = Cluster.build(3, EngineConfig(num_blocks=600), toy_model, pol, seed=0)
    df = requests_frame(cl.run(_requests(150)).requests)
    assert df["predicted_e2e_s"].notna().all()
    # the first request met an empty instance; later arrivals can only slow it down
    assert df.loc[0, "predicted_e2e_s"] <= df.loc[0, "e2e_s"] + 1e-9
    # predictions are good on average at this light load
    rel = (df["predicted_e2e_s"] - df["e2e_s"]).abs() / df["e2e_s"]
    assert rel.median() < 0.2


def test_fig5_copies_stay_out_of_the_request_records(toy_model):
    """With accuracy sampling every sampled request also runs as a copy on each other instance (Fig 5); the copies
    go to the accuracy table only: one record per request, each with the instance the policy picked and the times of
    the pick's copy."""
    def least_e2e(req, cands, ctx):
        return min(cands, key=lambda c: c.prediction.e2e_s).instance_id

    pol = RoutingPolicy("least_e2e", least_e2e, signal="prediction", k=None)
    cl = Cluster.build(3, EngineConfig(num_blocks=600), toy_model, pol, seed=0, accuracy_sampling_rate=0.3)
    res = cl.run(_requests(150))
    cols = res.request_columns
    assert cols["id"].tolist() == list(range(150))
    acc = pd.DataFrame(res.accuracy)
    assert acc["sample"].nunique() >= 20 and len(acc) == 3 * acc["sample"].nunique()
    picked = acc[acc["dispatched"]].set_index("id")
    assert (cols["instance"][picked.index] == picked["instance"].to_numpy()).all()
    e2e = cols["e2e_s"][picked.index]
    np.testing.assert_array_equal(e2e, picked["actual_e2e_s"].to_numpy())
    copies = sum(len(e.finished) for e in cl.engines)
    assert copies == 150 + 2 * acc["sample"].nunique()  # the copies ran (they load the cluster), unrecorded


def test_write_run_is_atomic_and_marks_completion(tmp_path, toy_model):
    res = _run(model=toy_model)
    df = requests_frame(res.requests)
    d = tmp_path / "run"
    write_run(d, "a: 1\n", df, instances_frame(res.instances), summarize(df))
    assert is_complete(d)
    assert pd.read_parquet(d / "requests.parquet").shape == df.shape
    assert json.loads((d / "summary.json").read_text())["completed"] == 400
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_the_next_arrival_hint_changes_no_decision(toy_model, monkeypatch):
    """The cluster tells the what-if when the engines are asked next (``predict_engine``'s ``next_query_s``); an
    overloaded Block* run with estimated lengths (overrun requests: a trajectory rarely outlives a step) makes the
    same decisions with the same predictions (1e-9) as without the hint, and records fewer futures."""
    from vidur import whatif

    made = []

    class CountedFuture(whatif.Future):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(whatif, "Future", CountedFuture)

    class WithoutHint(Cluster):
        _next_arrival = property(lambda self: None, lambda self, value: None)

    rng = np.random.default_rng(5)
    reqs = [Request(r.id, r.arrival_s, r.prompt_tokens, r.output_tokens,
                    predicted_output_tokens=max(1, int(r.output_tokens * rng.uniform(0.3, 1.2))))
            for r in _requests(500, rate=40.0, seed=2)]
    frames, futures = [], []
    for cls in (Cluster, WithoutHint):
        made.clear()
        cl = cls.build(3, EngineConfig(num_blocks=400), toy_model, make_policy("block_star"), seed=0)
        frames.append(requests_frame(cl.run(reqs).requests))
        futures.append(len(made))
    hinted, plain = frames
    assert plain["num_preemptions"].sum() > 0 and (plain["queue_s"] > 1.0).any()  # overloaded, KV pressure
    assert (hinted["instance"] == plain["instance"]).all()
    np.testing.assert_allclose(hinted["predicted_e2e_s"], plain["predicted_e2e_s"], rtol=1e-9)
    np.testing.assert_allclose(hinted["finish_s"], plain["finish_s"], rtol=1e-12)
    assert futures[0] < futures[1], futures


def test_finishes_reach_a_policy_from_the_decision_that_opens_its_outcome_queue(toy_model):
    """The engines report finished requests only once someone listens (``Cluster._listen``; the call per finish was
    a tenth of a cheap policy's loop): a policy that opens its outcome queue at its 100th decision must learn exactly
    what it learned when every finish was reported from the start (``deliver`` dropped those before the queue)."""
    def run(listen_from_start: bool) -> tuple[list[tuple[int, float]], Cluster]:
        seen: list[tuple[int, float]] = []

        def choose(req, cands, ctx):
            if ctx.request_index == 100:
                open_outcomes(ctx.state)
            if ctx.request_index >= 100:
                seen.extend((o.request_id, o.finish_s) for o in drain(ctx.state, ctx.now_s))
            return ctx.instance_ids[ctx.request_index % len(ctx.instance_ids)]

        cl = Cluster.build(4, EngineConfig(num_blocks=600), toy_model, RoutingPolicy("opens_late", choose), seed=0)
        if listen_from_start:
            cl._listen()
        cl.run(_requests())
        return seen, cl

    late, cl = run(False)
    always, _ = run(True)
    assert len(late) > 200 and late == always
    assert all(e.on_finish is not None for e in cl.engines)
    quiet = Cluster.build(4, EngineConfig(num_blocks=600), toy_model, make_policy("round_robin"), seed=0)
    quiet.run(_requests())
    assert all(e.on_finish is None for e in quiet.engines)  # nobody listened: no engine was asked


def test_a_queue_opened_while_lengths_are_told_gets_the_finishes_its_probes_cause(toy_model):
    """A policy may open its outcome queue in ``expected_length``, which runs before the decision's probes advance
    the engines: the finishes those probes commit are its outcomes too (the hook goes in before them, as it was
    always there before). With every instance probed and no sampling, what is queued between two decisions came
    from the second one's probes: the test opens the queue at the first decision past the 100th whose probes
    finish something."""
    def run(open_at: int, listen_from_start: bool) -> tuple[list[tuple[int, float]], list[int]]:
        seen: list[tuple[int, float]] = []
        fresh: list[int] = []  # per decision: outcomes queued since the previous one

        def length(req, instance, ctx):
            if ctx.request_index == open_at:
                open_outcomes(ctx.state)
            return req.output_tokens

        def choose(req, cands, ctx):
            got = drain(ctx.state) if ctx.request_index >= open_at else []  # everything queued (now_s = inf)
            fresh.append(len(got))
            seen.extend((o.request_id, o.finish_s) for o in got)
            return min(cands, key=lambda c: (c.prediction.e2e_s, c.instance_id)).instance_id

        policy = RoutingPolicy("opens_in_length", choose, signal="prediction", expected_length=length)
        cl = Cluster.build(4, EngineConfig(num_blocks=600), toy_model, policy, seed=0, sample_interval_s=0.0)
        if listen_from_start:
            cl._listen()
        cl.run(_requests())
        return seen, fresh

    _, fresh = run(0, True)
    j = next(i for i in range(101, len(fresh)) if fresh[i] > 0)
    late, fresh_late = run(j, False)
    always, _ = run(j, True)
    assert fresh_late[j] > 0 and len(late) > 200 and late == always


class _Collections:
    """Counts the cyclic collector's passes while it is installed (``gc.callbacks``)."""

    def __init__(self):
        self.passes = 0

    def __call__(self, phase, info):
        if phase == "start":
            self.passes += 1

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def test_the_collector_runs_rarely_during_a_run_and_its_thresholds_come_back(toy_model):
    """A run's survivors (one Seq and one routing record per request) used to trigger a collection every 700 of
    them; during ``Cluster.run`` the first threshold is raised, and restored after it, also when the run fails."""
    before = gc.get_threshold()
    reqs = _requests(3000, rate=40.0)
    cl = Cluster.build(4, EngineConfig(num_blocks=600), toy_model, make_policy("round_robin"), seed=0)
    with _Collections() as seen:
        cl.run(reqs)
    assert seen.passes <= 1 and gc.get_threshold() == before
    with _Collections() as seen:  # the same requests' survivors, built outside a run: the default pacing
        kept = [[r] for r in reqs] + [[r, r] for r in reqs]
    assert seen.passes >= 5 and len(kept) == 6000

    def broken(req, cands, ctx):
        raise RuntimeError("policy bug")

    bad = Cluster.build(2, EngineConfig(num_blocks=600), toy_model, RoutingPolicy("broken", broken), seed=0)
    with pytest.raises(RuntimeError, match="policy bug"):
        bad.run(reqs[:10])
    assert gc.get_threshold() == before


def test_cyclic_garbage_a_policy_makes_is_still_collected_during_a_run(toy_model, monkeypatch):
    """The collector stays on during a run: what a policy leaves in reference cycles is collected after about
    ``LOOP_GC_THRESHOLD`` new objects, not kept to the end of the run."""
    monkeypatch.setattr(vidur.cluster, "LOOP_GC_THRESHOLD", 1000)

    class Node:
        pass

    freed = []
    seen_at_last = []

    def cyclic(req, cands, ctx):
        node = Node()
        node.me = node  # garbage only the cyclic collector frees
        weakref.finalize(node, freed.append, req.id)
        if ctx.request_index == 3999:
            seen_at_last.append(len(freed))
        return ctx.instance_ids[ctx.request_index % len(ctx.instance_ids)]

    cl = Cluster.build(2, EngineConfig(num_blocks=600), toy_model, RoutingPolicy("cyclic", cyclic), seed=0)
    gc.collect()
    cl.run(_requests(4000, rate=40.0))
    # before the run ended, all but the last ~threshold's worth of the 3,999 earlier cycles were gone
    assert seen_at_last and seen_at_last[0] >= 2000
