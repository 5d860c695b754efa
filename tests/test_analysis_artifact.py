"""The artifact-suite analysis modules (nablation, burstiness, error_heatmap, overhead, capacity_refine), the figure
stamp and steady-state throughput, on tiny real runs of the presets scaled down from the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from subprocess_run import run_module

from analysis import (
    burstiness,
    capacity_refine,
    error_heatmap,
    fig6,
    nablation,
    overhead,
)
from analysis.common import seeds_text, shared_seeds, stamp_text, steady_throughput
from analysis.records import find_runs

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["cluster=local4", "workload.num_requests=150", "progress=false"]
CAP = ["capacity.seeds=2", "capacity.lo=2", "capacity.hi=30", "capacity.tol=8"]


def _run(*args, timeout=600):
    return run_module(*args, timeout=timeout)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    o = tmp_path_factory.mktemp("artifact")
    jobs = [
        ("experiments.run", "-m", "experiment=nablation", "block_k=2,4", "workload.qps=6"),
        ("experiments.capacity", "-m", "experiment=nablation", "block_k=2,4", "policy=block_star", *CAP),
        ("experiments.run", "-m", "experiment=burstiness", "workload.burstiness=0.5,1", "policy=llumnix",
         "workload.qps=6"),
        ("experiments.capacity", "-m", "experiment=burstiness", "workload.burstiness=0.5,1", "policy=llumnix", *CAP),
        ("experiments.run", "-m", "experiment=error_heatmap", "policy.length_noise_pct=0,100",
         "policy.latency_noise_pct=0,100", "workload.qps=6"),
        ("experiments.capacity", "-m", "experiment=error_heatmap", "policy.length_noise_pct=0,100",
         "policy.latency_noise_pct=0", *CAP),
        ("experiments.run", "-m", "experiment=overhead", "block_k=2", "workload.qps=4,8"),
    ]
    for job in jobs:
        _run(*job, f"output_root={o}", *SMALL)
    return o


def _check_png(p: Path) -> None:
    assert p.is_file() and p.stat().st_size > 10_000 and p.with_suffix(".pdf").is_file(), p


def test_nablation_draws_latency_and_capacity_per_k_beside_the_published(out):
    assert nablation.main([str(out / "nablation")]) == 0
    fig = out / "nablation" / "figures"
    _check_png(fig / "nablation.png")
    lat = pd.read_csv(fig / "nablation.csv")
    assert set(lat["k"]) == {2, 4} and set(lat["policy"]) == {"block_star", "block_oracle"}
    cap = pd.read_csv(fig / "nablation_capacity.csv")
    assert set(cap["k"]) == {2, 4} and (cap["seeds"] == 2).all()
    assert cap.loc[cap["k"] == 2, "published"].iloc[0] == nablation.PUBLISHED[("block_star", 2)]
    assert cap.loc[cap["k"] == 4, "published"].iloc[0] == nablation.PUBLISHED[("block_star", 4)]


def test_latency_panels_compare_the_same_request_sample(tmp_path):
    # Block at seeds 0 and 1, Llumnix- at seed 1 only (as a capacity search's probe leaves it): the panels must set
    # seed 1 beside seed 1, not Block's mean over two request samples beside Llumnix-'s one
    _run("experiments.run", "-m", "experiment=nablation", "block_k=2", "policy=block_oracle", "seed=0,1",
         "workload.qps=6", f"output_root={tmp_path}", *SMALL)
    _run("experiments.run", "experiment=nablation", "policy=llumnix", "seed=1", "workload.qps=6",
         f"output_root={tmp_path}", *SMALL)
    assert nablation.main([str(tmp_path / "nablation")]) == 0
    lat = pd.read_csv(tmp_path / "nablation" / "figures" / "nablation.csv").set_index("policy")
    assert set(lat.index) == {"block_oracle", "llumnix"} and set(lat["seeds"]) == {"seed 1"}
    by_seed = {(r.config["policy"]["name"], r.get("seed")): r.summary["p99_ttft_ms"] / 1e3
               for r in find_runs(tmp_path / "nablation")}
    assert by_seed[("block_oracle", 0)] != by_seed[("block_oracle", 1)]  # else the test proves nothing
    assert lat.loc["block_oracle", "p99_ttft"] == pytest.approx(by_seed[("block_oracle", 1)])


def test_shared_seeds_leaves_out_a_configuration_of_another_sample():
    df = pd.DataFrame({"policy": ["a", "a", "b", "c"], "seed": [0, 1, 0, 4], "v": [1.0, 2.0, 3.0, 4.0]})
    kept, seeds = shared_seeds(df, ["policy"])
    assert seeds == [0] and list(kept["policy"]) == ["a", "b"] and list(kept["v"]) == [1.0, 3.0]
    assert seeds_text(seeds) == "seed 0" and seeds_text([0, 1]) == "seeds 0, 1"


def test_nablation_gain_over_llumnix_pairs_the_same_seeds():
    # Llumnix- searched seeds 0-4, Block seeds 0-1: the gain is over seeds 0 and 1 only (0.5 and 0.5), not against
    # Llumnix-'s 5-seed mean (29.43), which would mix request samples: 29.85 - 29.43 = 0.42
    block = pd.Series({"per_seed": "29.4;30.3", "seed_ids": "0;1"})
    llumnix = pd.Series({"per_seed": "28.9;29.8;30.3;28.7;30.05", "seed_ids": "0;1;2;3;4"})
    gain, n = nablation.gain_over(block, llumnix)
    assert n == 2 and gain == pytest.approx(0.5)
    assert math.isnan(nablation.gain_over(block, None)[0])


def test_latency_panels_take_the_sweeps_qps_not_a_capacity_probes(tmp_path):
    # a full search probes every configuration at its bracket end (16) at seed 0, as many configurations as the sweep
    # runs at 30: without the searches' probe list the tie picks 16 (the panels then show an idle cluster)
    from analysis.capacity_refine import sweep_qps
    from analysis.records import Run

    runs = [Run(tmp_path / f"policy={p},workload.qps={q}", {"qps": q}, {"policy": {"name": p}})
            for p in ("block_oracle", "llumnix") for q in (16, 30)]
    cap = tmp_path / "capacity" / "x"
    cap.mkdir(parents=True)
    probes = [{"qps": 16, "run_dir": f"outputs/nablation/policy={p},workload.qps=16"} for p in ("block_oracle", "llumnix")]
    (cap / "capacity.json").write_text(json.dumps({"seeds": [{"seed": 0, "probes": probes}]}))
    assert sweep_qps(runs, tmp_path) == 30
    assert sweep_qps(runs[::2], tmp_path / "capacity" / "x") == 16  # nothing but probes: fall back to all runs


def test_burstiness_capacity_change_is_relative_to_poisson_like_b1(out):
    assert burstiness.main([str(out / "burstiness")]) == 0
    fig = out / "burstiness" / "figures"
    _check_png(fig / "burstiness.png")
    cap = pd.read_csv(fig / "burstiness_capacity.csv")
    assert sorted(cap["burstiness"]) == [0.5, 1.0]
    assert cap.loc[cap["burstiness"] == 1.0, "change_vs_b1_pct"].iloc[0] == pytest.approx(0.0)
    lat = pd.read_csv(fig / "burstiness.csv")
    assert sorted(lat["burstiness"]) == [0.5, 1.0]


def test_burstiness_change_against_b1_goes_seed_by_seed(out):
    # the change read against the published +-1 % is the mean of the per-seed changes against b = 1's search (the
    # same requests at every b), with its t-interval: not only the ratio of the two means
    from analysis.capacity import mean_interval

    assert burstiness.main([str(out / "burstiness")]) == 0
    cap = pd.read_csv(out / "burstiness" / "figures" / "burstiness_capacity.csv").set_index("burstiness")
    per_seed = {b: [float(v) for v in str(cap.at[b, "per_seed"]).split(";")] for b in cap.index}
    want = mean_interval([(a / c - 1) * 100 for a, c in zip(per_seed[0.5], per_seed[1.0])])
    assert cap.at[0.5, "paired_seeds"] == 2 and cap.at[0.5, "paired_change_pct"] == pytest.approx(want.mean)
    assert (cap.at[0.5, "paired_ci_low"], cap.at[0.5, "paired_ci_high"]) == pytest.approx((want.low, want.high))
    assert (cap.at[1.0, "paired_change_pct"], cap.at[1.0, "paired_ci_low"], cap.at[1.0, "paired_ci_high"]) == (
        pytest.approx(0.0), pytest.approx(0.0), pytest.approx(0.0))


def test_error_heatmap_cells(out):
    assert error_heatmap.main([str(out / "error_heatmap")]) == 0
    fig = out / "error_heatmap" / "figures"
    _check_png(fig / "error_heatmap.png")
    t = pd.read_csv(fig / "error_heatmap.csv")
    cells = set(zip(t["policy.length_noise_pct"], t["policy.latency_noise_pct"]))
    assert cells == {(0, 0), (0, 100), (100, 0), (100, 100)}
    base = t[(t["policy.length_noise_pct"] == 0) & (t["policy.latency_noise_pct"] == 0)].iloc[0]
    assert base["change_pct"] == pytest.approx(0.0) and base["seeds"] == 2


def test_overhead_reads_decision_times(out):
    assert overhead.main([str(out / "overhead")]) == 0
    fig = out / "overhead" / "figures"
    _check_png(fig / "overhead.png")
    t = pd.read_csv(fig / "overhead.csv")
    assert sorted(t["qps"]) == [4, 8] and (t["mean_ms"] > 0).all() and (t["p99_ms"] >= t["median_ms"]).all()


def test_capacity_refine_bars_with_intervals(out):
    assert capacity_refine.main([str(out / "nablation")]) == 0
    t = pd.read_csv(out / "nablation" / "figures" / "capacity_refine.csv")
    assert len(t) == 2 and (t["seeds"] == 2).all()
    assert sorted(t["label"]) == ["Block* (k=2)", "Block* (k=4)"]
    # the seeds' spread beside the artifact's stated +-0.3 QPS per run
    assert (t["published_tolerance"] == 0.3).all()
    assert t["half_interval"].to_numpy() == pytest.approx(((t["ci_high"] - t["ci_low"]) / 2).to_numpy())


def test_capacity_refine_gains_pair_the_seeds_against_the_one_llumnix_search():
    from analysis.capacity_refine import gains_over_llumnix

    df = pd.DataFrame({"policy": ["block_oracle", "llumnix"], "per_seed": ["28;29.4;30.2", "27.2;28.3;29.4;27.4"],
                       "seed_ids": ["0;1;2", "0;1;2;3"]})
    g = gains_over_llumnix(df)
    assert g.loc[0, "gain_over_llumnix_qps"] == pytest.approx((0.8 + 1.1 + 0.8) / 3)  # seeds 0-2 only
    assert g.loc[0, "gain_ci_low"] < g.loc[0, "gain_over_llumnix_qps"] < g.loc[0, "gain_ci_high"]
    assert g.loc[1, "gain_over_llumnix_qps"] == 0
    two = pd.concat([df, df.iloc[[1]]], ignore_index=True)  # which Llumnix- is the reference? none
    assert "gain_over_llumnix_qps" not in gains_over_llumnix(two).columns
    assert "gain_over_llumnix_qps" not in gains_over_llumnix(df.iloc[[0]]).columns


def test_no_capacity_search_is_a_clear_error(tmp_path, capsys):
    assert capacity_refine.main([str(tmp_path)]) == 2
    assert "python -m experiments.capacity" in capsys.readouterr().err


def test_every_figure_says_what_it_is(out):
    runs = find_runs(out / "overhead")
    text = stamp_text(runs)
    assert text.startswith("SIMULATED") and "4 x A30" in text and "Llama-2-7b-hf" in text
    assert "150 requests per point" in text and "seed 0" in text and "2 runs" in text
    # the analysis CLI wrote it into the PNG's figure: compare against the same figure without it
    import matplotlib.pyplot as plt

    from analysis.common import stamp

    fig, _ = plt.subplots()
    stamp(fig, runs, "note")
    assert any("SIMULATED" in t.get_text() and "note" in t.get_text() for t in fig.texts)
    plt.close(fig)


def test_steady_throughput_drops_warm_up_and_drain():
    # 1,000 arrivals at 10 req/s, each served in 30 s: completions over the whole run (drain included) are far below
    # the offered load, the steady-state window sees exactly the arrival rate
    arrival = np.arange(1000) / 10.0
    req = pd.DataFrame({"arrival_s": arrival, "finish_s": arrival + 30.0, "status": "ok"})
    whole = len(req) / (req["finish_s"].max() - req["arrival_s"].min())
    assert whole < 8.0
    assert steady_throughput(req) == pytest.approx(10.0, rel=0.02)
    # past capacity: a server finishing 5 req/s whatever arrives
    req2 = req.assign(finish_s=np.arange(1000) / 5.0 + 1.0)
    assert steady_throughput(req2) == pytest.approx(5.0, rel=0.02)
    assert math.isnan(steady_throughput(req.iloc[:0]))


def test_fig6_draws_steady_throughput(out):
    assert fig6.main([str(out / "overhead")]) == 0
    s = pd.read_csv(out / "overhead" / "figures" / "fig6_summary.csv")
    assert "steady_throughput" in s.columns
    # below capacity the steady-state throughput is the offered load; the whole-run one sits below it
    for _, row in s.iterrows():
        assert row["steady_throughput"] == pytest.approx(row["achieved_qps"], rel=0.3)
        assert row["request_throughput"] < row["steady_throughput"]


def _add_narrower_search(root: Path, **config) -> dict:
    """Beside the search of ``config`` under ``root``, the same configuration searched earlier with its first seed
    only (as ``capacity.seeds=1`` then ``capacity.seeds=2`` leave it; the earlier one also had force=True)."""
    for f in sorted((root / "capacity").rglob("capacity.json")):
        wide = json.loads(f.read_text())
        if all(wide["config"].get(k) == v for k, v in config.items()):
            break
    else:
        raise AssertionError(f"no search of {config} under {root}")
    narrow = {**wide, "seeds": wide["seeds"][:1], "capacity": wide["seeds"][0]["capacity"], "ci_low": None,
              "ci_high": None, "overrides": [*wide["overrides"], "force=True"]}
    d = root / "capacity" / "earlier"
    d.mkdir()
    (d / "capacity.json").write_text(json.dumps(narrow))
    return wide


def test_widest_searches_keeps_the_search_with_the_most_seeds(caplog):
    from analysis.common import widest_searches

    cap = pd.DataFrame({"path": ["a2", "a5", "b2", "c1"], "policy.name": ["x", "x", "y", "x"],
                        "policy.k": [2.0, 2.0, 2.0, math.nan], "progress": ["False", None, "false", "False"],
                        "capacity": [29.85, 29.9, 30.0, 28.0], "seed_ids": ["0;1", "0;1;2;3;4", "0;1", "0"],
                        "per_seed": ["29.4;30.3", "29.4;30.3;31;29.7;29.1", "30;30", "28"]})
    kept = widest_searches(cap)
    assert list(kept["path"]) == ["a5", "b2", "c1"]  # k = null (all instances) is another configuration
    assert not caplog.records
    cap.loc[0, "per_seed"] = "29.4;30.2"  # the 2-seed search disagrees on seed 1: searched under other code
    assert list(widest_searches(cap)["path"]) == ["a5", "b2", "c1"]
    assert "disagrees" in caplog.text and "a2" in caplog.text


def test_artifact_figures_take_one_search_per_configuration(out, tmp_path):
    # a search re-run with more seeds leaves the narrower capacity.json beside the wider one: one bar per k and one
    # heatmap cell value, the wider search's (not both bars, not the mean of the two means)
    import shutil

    for exp in ("nablation", "error_heatmap", "burstiness"):
        shutil.copytree(out / exp, tmp_path / exp, ignore=shutil.ignore_patterns("figures"))
    wide = _add_narrower_search(tmp_path / "nablation", **{"policy.k": 2})
    assert nablation.main([str(tmp_path / "nablation")]) == 0
    cap = pd.read_csv(tmp_path / "nablation" / "figures" / "nablation_capacity.csv")
    assert sorted(cap["k"]) == [2, 4] and (cap["seeds"] == 2).all()
    assert cap.loc[cap["k"] == 2, "capacity"].iloc[0] == pytest.approx(wide["capacity"])
    assert capacity_refine.main([str(tmp_path / "nablation")]) == 0  # its bars too: one per configuration
    bars = pd.read_csv(tmp_path / "nablation" / "figures" / "capacity_refine.csv")
    assert len(bars) == len(cap) and bars["capacity"].round(6).isin(cap["capacity"].round(6)).all()

    wide = _add_narrower_search(tmp_path / "error_heatmap", **{"policy.length_noise_pct": 100.0})
    assert error_heatmap.main([str(tmp_path / "error_heatmap")]) == 0
    t = pd.read_csv(tmp_path / "error_heatmap" / "figures" / "error_heatmap.csv")
    cell = t[(t["policy.length_noise_pct"] == 100) & (t["policy.latency_noise_pct"] == 0)]
    assert len(cell) == 1 and cell["seeds"].iloc[0] == 2 and cell["paired_seeds"].iloc[0] == 2
    assert cell["capacity"].iloc[0] == pytest.approx(wide["capacity"])

    wide = _add_narrower_search(tmp_path / "burstiness", **{"workload.burstiness": 0.5})
    assert burstiness.main([str(tmp_path / "burstiness")]) == 0
    cap = pd.read_csv(tmp_path / "burstiness" / "figures" / "burstiness_capacity.csv")
    assert sorted(cap["burstiness"]) == [0.5, 1.0] and (cap["seeds"] == 2).all() and (cap["paired_seeds"] == 2).all()
    assert cap.loc[cap["burstiness"] == 0.5, "capacity"].iloc[0] == pytest.approx(wide["capacity"])


def test_paired_changes_go_seed_by_seed_with_their_interval():
    # 100 % length noise against none on 5 seeds: the seeds move both cells alike (29.4..31.0), so the paired change
    # has a far tighter interval than either cell's; a cell searched on 2 seeds pairs on those 2
    from analysis.capacity import mean_interval

    clean = pd.Series({"per_seed": "29.4;30.3;31;29.7;30.6", "seed_ids": "0;1;2;3;4"})
    noisy = pd.Series({"per_seed": "28.2;28.9;30.1;28.6;29.2", "seed_ids": "0;1;2;3;4"})
    c = error_heatmap.paired_change(noisy, clean)
    per_seed = [(n / b - 1) * 100 for n, b in zip([28.2, 28.9, 30.1, 28.6, 29.2], [29.4, 30.3, 31, 29.7, 30.6])]
    want = mean_interval(per_seed)
    assert c["paired_seeds"] == 5 and c["paired_change_pct"] == pytest.approx(want.mean)
    assert (c["paired_ci_low"], c["paired_ci_high"]) == pytest.approx((want.low, want.high))
    assert c["paired_ci_high"] - c["paired_ci_low"] < 2.0  # the cells' own intervals are about 3 QPS (10 %) wide
    two = error_heatmap.paired_change(pd.Series({"per_seed": "28.2;28.9", "seed_ids": "0;1"}), clean)
    assert two["paired_seeds"] == 2 and two["paired_change_pct"] == pytest.approx(np.mean(per_seed[:2]))
    assert math.isnan(error_heatmap.paired_change(noisy, None)["paired_change_pct"])
    # the N-ablation's gain over Llumnix- in QPS, the same way
    llumnix = pd.Series({"per_seed": "28.5;29.6;30.3;28.7;30.05", "seed_ids": "0;1;2;3;4"})
    g = nablation.paired_gain(clean, llumnix)
    diffs = [a - b for a, b in zip([29.4, 30.3, 31, 29.7, 30.6], [28.5, 29.6, 30.3, 28.7, 30.05])]
    d = mean_interval(diffs)
    assert g.n == 5 and (g.mean, g.low, g.high) == pytest.approx((d.mean, d.low, d.high))
    assert nablation.gain_over(clean, llumnix) == (pytest.approx(g.mean), 5)
