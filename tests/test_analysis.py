"""The figure modules (analysis.fig5, fig6, fig8, table2) on small real run records.

The records come from the simulator through its command line (``python -m experiments.run``), once per session:
a policy sweep (2 policies x 2 QPS), an accuracy run (2 QPS, 20 % of requests duplicated to every instance), and a
reactive auto-provisioning run beside a static one. Each module's ``main`` then runs on them.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import fig5, fig6, fig8, table2
from analysis.common import gaussian_smooth, label_policy, pick_qps, policy_labels
from analysis.records import Run

ROOT = Path(__file__).resolve().parents[1]
N = 150


def _sim(*overrides: str, multirun: bool = False) -> list[str]:
    return [sys.executable, "-m", "experiments.run", *(["-m"] if multirun else []), "progress=false",
            "cluster=local4", f"workload.num_requests={N}", *overrides]


@pytest.fixture(scope="session")
def records(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis_runs")
    jobs = [
        _sim(f"output_root={out}", "experiment_name=sweep", "policy=block_oracle,round_robin", "workload.qps=4,10",
             multirun=True),
        _sim(f"output_root={out}", "experiment_name=acc", "policy=random", "accuracy.sampling_rate=0.2",
             "workload.qps=4,8", multirun=True),
        _sim(f"output_root={out}", "experiment_name=prov", "cluster.num_instances=6", "policy=block_oracle",
             "provisioning=reactive", "provisioning.initial_instances=3", "provisioning.slo_s=5", "workload.qps=6"),
        _sim(f"output_root={out}", "experiment_name=prov", "cluster.num_instances=6", "policy=block_oracle",
             "workload.qps=6"),
    ]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in jobs]
    for cmd, p in zip(jobs, procs):
        log, _ = p.communicate(timeout=120)
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{log[-3000:]}"
    assert len(list(out.rglob("summary.json"))) == 8
    return out


def _summaries(d: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(d.rglob("summary.json")) if "figures" not in p.parts]


def _check_png(p: Path) -> None:
    import matplotlib.image as mpimg

    assert p.is_file() and p.stat().st_size > 15_000, p
    img = mpimg.imread(p)
    assert img.shape[0] > 300 and img.shape[1] > 400, img.shape
    assert float(np.std(img[..., :3])) > 0.02  # not a blank canvas
    assert p.with_suffix(".pdf").is_file() and p.with_suffix(".pdf").stat().st_size > 5_000


def _interp(qps: list[float], p99: list[float], slo: float) -> tuple[float, str]:
    """The capacity rule written out for two or more points: last upward crossing, else a bound."""
    pts = sorted(zip(qps, p99))
    if all(y <= slo for _, y in pts):
        return pts[-1][0], "lower"
    cap = None
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if y0 <= slo < y1 or y1 <= slo < y0:
            cap = x0 + (slo - y0) * (x1 - x0) / (y1 - y0)
    if cap is None:
        return pts[0][0], "upper"
    return cap, "exact"


# ------------------------------------------------------------------------------------------------ fig6
def test_fig6_outputs_and_tables(records, capsys):
    d = records / "sweep"
    assert fig6.main([str(d)]) == 0
    printed = capsys.readouterr().out.split()
    figs = d / "figures"
    for stem in ("fig6_qps", "fig6_cdf", "fig6_load", "fig6_overhead"):
        _check_png(figs / f"{stem}.png")
        assert str(figs / f"{stem}.png") in printed
    summ = pd.read_csv(figs / "fig6_summary.csv")
    assert len(summ) == 4 and set(summ["label"]) == {"Block", "Round Robin"}
    by = {(s["policy"], float(s["qps"])): s for s in _summaries(d)}
    for _, row in summ.iterrows():
        s = by[(row["policy"], row["qps"])]
        assert row["p99_ttft_s"] == pytest.approx(s["p99_ttft_ms"] / 1e3)
        assert row["mean_e2e_s"] == pytest.approx(s["mean_e2el_ms"] / 1e3)
        assert row["request_throughput"] == pytest.approx(s["request_throughput"])
        assert row["overhead_pct_e2e"] >= 0
    cap = pd.read_csv(figs / "fig6_capacity.csv")
    assert len(cap) == 2 and set(cap["label"]) == {"Block", "Round Robin"}  # one row per policy
    assert (cap["slo_s"] == 3.0).all()  # the runs' slo.ttft_s
    load = pd.read_csv(figs / "fig6_load.csv")
    assert set(load["qps"]) == {10.0} and set(load["label"]) == {"Block", "Round Robin"}


def test_fig6_capacity_matches_interpolation(records, tmp_path):
    d = records / "sweep"
    runs = _summaries(d)
    slo = float(np.median([s["p99_ttft_ms"] / 1e3 for s in runs]))  # inside the measured range: some crossings
    assert fig6.main([str(d), "--slo", str(slo), "--out", str(tmp_path), "--qps-list", "4"]) == 0
    cap = pd.read_csv(tmp_path / "fig6_capacity.csv").set_index("policy")
    for pol in ("block_oracle", "round_robin"):
        pts = [s for s in runs if s["policy"] == pol]
        want, bound = _interp([s["qps"] for s in pts], [s["p99_ttft_ms"] / 1e3 for s in pts], slo)
        assert cap.loc[pol, "capacity_qps"] == pytest.approx(want)
        assert cap.loc[pol, "bound"] == bound
        assert cap.loc[pol, "slo_s"] == pytest.approx(slo)


def test_fig6_capacity_from_bisection_searches(records, tmp_path, capsys):
    """--capacity-from: a policy with a search there gets the search's mean and interval; one without keeps its
    interpolated bar, marked; searches at another SLO are refused."""
    search = tmp_path / "searches"
    cmd = [sys.executable, "-m", "experiments.capacity", f"output_root={search}", "progress=false", "cluster=local4",
           f"workload.num_requests={N}", "policy=round_robin", "capacity.seeds=2", "capacity.lo=2",
           "capacity.hi=30", "capacity.tol=8", "capacity.slo_ttft_s=3"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    result = json.loads(next(search.rglob("capacity.json")).read_text())
    assert fig6.main([str(records / "sweep"), "--capacity-from", str(search), "--out", str(tmp_path / "f")]) == 0
    cap = pd.read_csv(tmp_path / "f" / "fig6_capacity.csv").set_index("policy")
    rr = cap.loc["round_robin"]
    assert rr["seeds"] == 2 and rr["capacity_qps"] == pytest.approx(result["capacity"])
    assert rr["ci_low"] == pytest.approx(result["ci_low"]) and rr["ci_high"] == pytest.approx(result["ci_high"])
    assert "bisection, 2 seeds" in rr["note"]
    assert cap.loc["block_oracle", "capacity_text"].endswith("interp.")  # no search of Block there
    capsys.readouterr()
    assert fig6.main([str(records / "sweep"), "--capacity-from", str(search), "--slo", "10",
                      "--out", str(tmp_path / "g")]) == 2
    assert "3 s SLO, the figure's is 10 s" in capsys.readouterr().err


def test_fig6_draws_one_request_count_when_a_folder_holds_two(records, tmp_path, caplog):
    """A sweep re-run at another scale writes beside the old one: the figure draws the larger runs only (mixing them
    averaged a 3,000- and a 10,000-request run as if they were two seeds) and says what it left out."""
    import shutil

    d = tmp_path / "sweep"
    shutil.copytree(records / "sweep", d)
    p = subprocess.run(_sim(f"output_root={tmp_path}", "experiment_name=sweep", "policy=round_robin", "workload.qps=4",
                            f"workload.num_requests={N // 2}"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert fig6.main([str(d), "--out", str(tmp_path / "f")]) == 0
    summ = pd.read_csv(tmp_path / "f" / "fig6_summary.csv")
    assert len(summ) == 4 and set(summ["completed"]) == {N}  # the four runs of N requests, not the short one
    assert f"leaving out 1 of {N // 2}" in caplog.text
    assert fig6.main([str(d), "--out", str(tmp_path / "g"), "--filter", f"workload.num_requests={N // 2}"]) == 0
    assert list(pd.read_csv(tmp_path / "g" / "fig6_summary.csv")["completed"]) == [N // 2]


# ------------------------------------------------------------------------------------------------ fig5
def test_fig5_outputs_and_ranks(records):
    d = records / "acc"
    assert fig5.main([str(d)]) == 0
    figs = d / "figures"
    _check_png(figs / "fig5.png")
    tab = pd.read_csv(figs / "fig5.csv")
    ranks = pd.read_csv(figs / "fig5_ranks.csv")
    assert sorted(tab["qps"]) == [4.0, 8.0]
    assert set(tab["config"]) == {"Chunked prefill"}
    summaries = {float(s["qps"]): s for s in _summaries(d)}
    for _, row in tab.iterrows():
        acc = pd.read_parquet(next(p for p in d.rglob("accuracy.parquet")
                                   if f"workload.qps={row['qps']:g}" in str(p)))
        assert row["samples"] == acc["sample"].nunique() > 0
        assert row["copies_per_sample"] == 4  # cluster=local4: every instance gets a copy
        hist = ranks[ranks["qps"] == row["qps"]]
        assert hist["count"].sum() == row["samples_with_pick"] == row["samples"]
        assert hist["percent"].sum() == pytest.approx(100.0)
        assert hist["rank"].tolist() == [1, 2, 3, 4]
        s = summaries[row["qps"]]
        assert row["mean_error_ratio"] == pytest.approx(s["mean_error_ratio"])
        assert row["fraction_rank1"] == pytest.approx(s["pick_fastest_fraction"])
        assert row["mean_rank"] == pytest.approx(s["mean_pick_rank"])


# ------------------------------------------------------------------------------------------------ fig8
def test_fig8_outputs_and_instances(records):
    d = records / "prov"
    assert fig8.main([str(d)]) == 0
    figs = d / "figures"
    _check_png(figs / "fig8.png")
    tab = pd.read_csv(figs / "fig8.csv").set_index("variant")
    assert set(tab.index) == {"static", "reactive"}
    assert tab.loc["static", "label"] == "Full provisioned" and tab.loc["reactive", "label"] == "Relief (reactive)"
    st, re_ = tab.loc["static"], tab.loc["reactive"]
    assert st["max_instances"] == 6 and st["initial_instances"] == 6
    assert st["instance_seconds"] == pytest.approx(6 * st["span_s"], rel=1e-6)
    assert re_["initial_instances"] == 3 and 3 <= re_["max_instances"] <= 6
    assert 3 * re_["span_s"] - 1e-6 <= re_["instance_seconds"] <= 6 * re_["span_s"] + 1e-6
    assert (tab["slo_s"] == 5.0).all()
    req = pd.read_parquet(next(p for p in d.rglob("requests.parquet") if "provisioning=reactive" in str(p)))
    assert re_["p99_e2e_s"] == pytest.approx(np.percentile(req["e2e_s"], 99))
    assert re_["frac_over_slo"] == pytest.approx((req["e2e_s"] > 5.0).mean())


# ------------------------------------------------------------------------------------------------ table2
def test_table2_outputs(records):
    d = records / "sweep"
    assert table2.main([str(d)]) == 0
    figs = d / "figures"
    _check_png(figs / "table2.png")
    tab = pd.read_csv(figs / "table2.csv")
    assert len(tab) == 2 and set(tab["label"]) == {"Block", "Round Robin"}
    assert tab["setting"].nunique() == 1 and (tab["batch_size"] == 48).all() and (tab["chunk_size"] == 512).all()
    assert (tab["slo_s"] == 3.0).all()
    assert set(tab["bound"]) <= {"exact", "lower", "upper"}
    assert (tab["lower_bound"] == (tab["bound"] == "lower")).all()
    assert (tab["seeds"] == 1).all() and tab["ci_low"].isna().all() and tab["ci_high"].isna().all()
    md = (figs / "table2.md").read_text()
    assert "| Setting | Block | Round Robin |" in md and "3 s" in md and "1 seed" in md and "±" not in md
    assert md.count("\n| Llama-2-7b") == 1


def test_table2_whole_tree_separates_settings(records, tmp_path):
    # the root holds the sweep (4 instances) and the static provisioning-comparison run (6 instances); the
    # auto-provisioning and accuracy runs are left out of a policy comparison
    assert table2.main([str(records), "--out", str(tmp_path)]) == 0
    tab = pd.read_csv(tmp_path / "table2.csv")
    assert set(tab["setting"].str.extract(r"(\d+) instances")[0].astype(int)) == {4, 6}
    assert "Random" not in set(tab["label"])



@pytest.fixture(scope="module")
def seed_records(tmp_path_factory) -> Path:
    """A policy sweep run with two seeds (2 policies x 3 QPS x seeds 0, 1), as ``seed=0,1`` on a preset would."""
    out = tmp_path_factory.mktemp("seed_runs")
    cmd = _sim(f"output_root={out}", "experiment_name=seeds", "policy=block_oracle,round_robin",
               "workload.qps=8,24,48", "seed=0,1", multirun=True)
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240,
                       check=False)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}"
    assert len(_summaries(out / "seeds")) == 12
    return out / "seeds"


def _t_interval(v: list[float]) -> tuple[float, float, float]:
    from scipy import stats

    m, half = float(np.mean(v)), float(stats.t.ppf(0.975, len(v) - 1) * np.std(v, ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


def test_table2_seeds_mean_interval_and_dots(seed_records, tmp_path):
    runs = _summaries(seed_records)
    curve: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for s in runs:
        curve.setdefault((s["policy"], s["seed"]), []).append((s["qps"], s["p99_ttft_ms"] / 1e3))
    curve = {k: sorted(v) for k, v in curve.items()}
    rr = [curve[("round_robin", sd)] for sd in (0, 1)]
    lo, hi = max(c[0][1] for c in rr), min(c[-1][1] for c in rr)
    assert lo < hi, rr  # the SLO between them: both seeds of round robin cross it, each at its own QPS
    slo = (lo + hi) / 2
    assert table2.main([str(seed_records), "--slo", str(slo), "--out", str(tmp_path)]) == 0
    _check_png(tmp_path / "table2.png")
    tab = pd.read_csv(tmp_path / "table2.csv").set_index("policy")
    per_seed = pd.read_csv(tmp_path / "table2_seeds.csv")
    assert len(tab) == 2 and len(per_seed) == 4 and (tab["seeds"] == 2).all()
    for pol in ("block_oracle", "round_robin"):
        want = [_interp(*zip(*curve[(pol, sd)]), slo) for sd in (0, 1)]
        got = per_seed[per_seed["policy"] == pol].sort_values("seed")
        assert got["capacity_qps"].tolist() == pytest.approx([w[0] for w in want])
        assert got["bound"].tolist() == [w[1] for w in want]
        row = tab.loc[pol]
        assert row["capacity_qps"] == pytest.approx(np.mean([w[0] for w in want]))
        if {w[1] for w in want} == {"exact"}:
            _, cl, ch = _t_interval([w[0] for w in want])
            assert (row["ci_low"], row["ci_high"]) == pytest.approx((cl, ch))
            assert row["bound"] == "exact" and "±" in row["capacity_text"]
        else:  # a seed that held the SLO throughout: the mean is a lower bound, not a number with an interval
            assert row["bound"] == "lower" and row["capacity_text"].startswith("≥")
            assert math.isnan(row["ci_low"]) and "lower bound" in row["note"]
    assert tab.loc["round_robin", "bound"] == "exact"
    md = (tmp_path / "table2.md").read_text()
    assert "2 seeds" in md and tab.loc["round_robin", "capacity_text"] in md

    # an SLO no point reaches: every seed is a lower bound, so is the mean, and no interval is claimed
    assert table2.main([str(seed_records), "--slo", "1000", "--out", str(tmp_path)]) == 0
    tab = pd.read_csv(tmp_path / "table2.csv")
    assert (tab["bound"] == "lower").all() and (tab["bound_seeds"] == 2).all() and tab["ci_low"].isna().all()
    assert (tab["capacity_text"] == "≥48.0").all()
    assert "| ≥ 48.0 | ≥ 48.0 |" in (tmp_path / "table2.md").read_text()


def test_seeds_capacity_keeps_bounds():
    from analysis.common import Capacity, seeds_capacity

    ex = [Capacity(30.0, "exact", 3), Capacity(34.0, "exact", 3), Capacity(35.0, "exact", 3)]
    sc = seeds_capacity(ex)
    m, lo, hi = _t_interval([30.0, 34.0, 35.0])
    assert (sc.qps, sc.low, sc.high, sc.seeds, sc.bound) == pytest.approx((m, lo, hi, 3, "exact"))
    assert sc.text() == f"{m:.1f} ± {(hi - lo) / 2:.1f}"
    low = seeds_capacity([ex[0], Capacity(36.0, "lower", 3)])
    assert low.bound == "lower" and low.qps == 33.0 and math.isnan(low.low) and low.text() == "≥33.0"
    assert low.bound_seeds == 1 and "1 of 2 seeds are bounds: the mean is a lower bound" in low.note
    up = seeds_capacity([ex[0], Capacity(20.0, "upper", 3)])
    assert up.bound == "upper" and up.text() == "<25.0" and math.isnan(up.high)
    mixed = seeds_capacity([Capacity(36.0, "lower", 3), ex[0], Capacity(20.0, "upper", 3)])
    assert mixed.bound == "mixed" and math.isnan(mixed.qps) and mixed.text() == "≥36.0 / 30.0 / <20.0"
    one = seeds_capacity([Capacity(36.0, "lower", 3)])
    assert one.text() == "≥36.0" and one.bound == "lower" and one.note == ""
    none = seeds_capacity([Capacity(math.nan, "none", 0), ex[1]])
    assert none.bound == "exact" and none.qps == 34.0 and none.seeds == 1 and "1 of 2 seeds without" in none.note


def test_fig6_capacity_bounded_seed_has_no_interval():
    # Fig 6 combines its seeds the same way: seed 1 never crossed the SLO (lower bound), so no t-interval
    tab = pd.DataFrame({"label": "Block", "policy": "block_oracle", "seed": [0, 0, 1, 1], "qps": [10, 20] * 2,
                        "p99_ttft_s": [1.0, 5.0, 1.0, 2.0]})
    cap = fig6.capacity_table(tab, 3.0).iloc[0]
    assert cap["bound"] == "lower" and cap["capacity_qps"] == pytest.approx((15.0 + 20.0) / 2)
    assert math.isnan(cap["ci_low"]) and cap["capacity_text"] == "≥17.5"

# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("module", [fig5, fig6, fig8, table2])
def test_no_runs_exits_2(module, tmp_path, capsys):
    assert module.main([str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "figures").exists()
    assert module.main([str(tmp_path / "missing")]) == 2


def test_runs_lacking_data_exit_2(records, capsys):
    assert fig5.main([str(records / "sweep")]) == 2  # no accuracy samples
    assert "accuracy" in capsys.readouterr().err
    assert fig8.main([str(records / "sweep")]) == 2  # no provisioning run
    assert "provisioning" in capsys.readouterr().err
    assert fig6.main([str(records / "acc")]) == 2  # only accuracy-sampling runs


def test_help(capsys):
    for module in (fig5, fig6, fig8, table2):
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0
    assert "--slo" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ helpers
def _run(policy: str, k=None, qps=10.0) -> Run:
    cfg = {"policy": {"name": policy, **({"k": k} if k is not None else {})}, "workload": {"qps": qps}}
    return Run(Path(f"/x/{policy}-{k}-{qps}"), {"policy": policy, "qps": qps}, cfg)


def test_policy_labels_add_k_only_when_it_varies():
    runs = [_run("block_oracle", 2), _run("block_oracle", 12), _run("block_star", 2), _run("llumnix"),
            _run("least_requests"), _run("llmd"), _run("block_nosim")]
    labels = sorted(set(policy_labels(runs).values()))
    assert labels == sorted(["Block (k=2)", "Block (k=12)", "Block*", "Llumnix-", "Least requests", "llm-d",
                             "Block-NoSim"])
    assert label_policy("Block (k=12)") == "block_oracle" and label_policy("Block (hint)") == "block"
    assert label_policy("Block (hint) (k=2)") == "block" and label_policy("Block* (k=2)") == "block_star"


def test_pick_qps_and_smoothing():
    assert pick_qps(range(20, 37)) == [20, 24, 28, 32, 36]
    assert pick_qps([4, 10]) == [4, 10]
    assert pick_qps(range(20, 37), [21.4, 21.6]) == [21, 22]
    y = gaussian_smooth(np.full(50, 3.0), 5)
    assert np.allclose(y, 3.0)
    z = gaussian_smooth(np.r_[np.zeros(20), np.ones(20)], 2)
    assert z[0] == pytest.approx(0) and z[-1] == pytest.approx(1) and 0 < z[20] < 1
    assert math.isclose(float(gaussian_smooth([1.0, np.nan, 3.0], 1)[1]), 2.0)
