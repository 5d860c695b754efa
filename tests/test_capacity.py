"""Capacity: the paper's linear interpolation over a sweep (analysis.capacity) and the bisection search
(experiments.capacity), both on real simulated runs (4 instances, a few hundred requests, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from subprocess_run import run_module

from analysis.capacity import capacity_table, crossings, interpolate_capacity
from experiments.capacity import bisect, fmt_qps

ROOT = Path(__file__).resolve().parents[1]
RUN = ["cluster=local4", "policy=round_robin", "workload.num_requests=300", "progress=false"]
GRID = [2, 5, 8, 11, 14]
SLO = 3.0


def _run(*args, timeout=120):
    return run_module(*args, timeout=timeout)


# ---------------------------------------------------------------------- interpolation rule
def test_single_crossing_is_interpolated_linearly():
    c = interpolate_capacity([20, 24, 28], [1.0, 2.0, 6.0], 3.0)
    assert c.capacity == pytest.approx(25.0) and c.crossings == 1
    assert not c.lower_bound and not c.exceeds_at_min


def test_last_crossing_wins_and_order_of_points_does_not_matter():
    qps, y = [28, 20, 24, 32, 36], [2.0, 1.0, 4.0, 5.0, 7.0]  # 20:1 24:4 28:2 32:5 36:7 -> 22.67, 26, 29.33
    assert crossings(sorted(qps), [1.0, 4.0, 2.0, 5.0, 7.0], 3.0) == pytest.approx([20 + 8 / 3, 26.0, 28 + 4 / 3])
    c = interpolate_capacity(qps, y, 3.0)
    assert c.capacity == pytest.approx(28 + 4 / 3) and c.crossings == 3 and "non-monotone" in c.note


def test_never_crossed_is_a_lower_bound():
    c = interpolate_capacity([20, 24, 28], [0.5, 1.0, 2.9], 3.0)
    assert c.capacity == 28 and c.lower_bound and c.crossings == 0 and ">= 28" in c.note


def test_first_point_above_slo_is_flagged():
    c = interpolate_capacity([20, 24], [4.0, 9.0], 3.0)
    assert c.capacity == 20 and c.exceeds_at_min and not c.lower_bound and "capacity < 20" in c.note
    c = interpolate_capacity([20, 24, 28], [4.0, 2.0, 9.0], 3.0)  # dips below, then crosses up
    assert c.exceeds_at_min and c.capacity == pytest.approx(24 + 4 / 7)


def test_touching_the_slo_and_missing_points():
    assert interpolate_capacity([20, 24, 28], [1.0, 3.0, 5.0], 3.0).capacity == 24
    c = interpolate_capacity([20, 24, 24, 28], [1.0, 2.0, 4.0, None], 3.0)  # 24 averaged to 3.0; None = violation
    assert c.capacity == 24 and c.num_points == 3
    with pytest.raises(ValueError):
        interpolate_capacity([1], [1], 0)


# ---------------------------------------------------------------------- bisection logic (a synthetic curve)
def _curve(q):  # p99 TTFT (s) rising with QPS, crossing 3 s at 17.1
    return {"p99_ttft_ms": 1000.0 * (0.2 * q - 0.42), "completed": 1, "failed": 0}


def test_bisection_converges_on_a_grid():
    r = bisect(_curve, 3.0, 5, 40, 0.25)
    assert r["status"] == "converged" and r["capacity"] == 17 and r["bracket"] == [17, 17.25]
    assert r["bracket"][1] - r["bracket"][0] <= 0.25
    assert all(p["qps"] * 4 == round(p["qps"] * 4) for p in r["probes"])  # multiples of the 0.25 grid
    assert r["capacity_interpolated"] == pytest.approx(17.1)
    assert len(r["probes"]) <= 2 + math.ceil(math.log2(35 / 0.25)) + 1


def test_bisection_bounds():
    r = bisect(_curve, 3.0, 20, 40, 1)
    assert r["status"] == "below_lo" and r["capacity"] is None and len(r["probes"]) == 1
    r = bisect(_curve, 3.0, 5, 10, 1)
    assert r["status"] == "at_least_hi" and r["capacity"] == 10 and len(r["probes"]) == 2
    r = bisect(lambda q: {"p99_ttft_ms": None}, 3.0, 5, 10, 1)  # nothing completed: a violation
    assert r["status"] == "below_lo"
    from experiments.wiring import ConfigError

    with pytest.raises(ConfigError, match="capacity.lo"):
        bisect(_curve, 3.0, 10, 5, 1)
    with pytest.raises(ConfigError, match="capacity.tol"):
        bisect(_curve, 3.0, 1, 5, 0)


# ---------------------------------------------------------------------- both methods on real simulated runs
@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("cap")
    _run("experiments.run", "-m", f"output_root={out}", *RUN, "workload.qps=" + ",".join(map(str, GRID)))
    return out


def test_interpolated_capacity_of_a_real_sweep(grid_sweep):
    table = capacity_table(grid_sweep / "default", slo_s=SLO)
    assert list(table["policy.name"]) == ["round_robin"]
    row = table.iloc[0]
    assert row["num_points"] == len(GRID) and row["min_qps"] == 2 and row["max_qps"] == 14
    assert 2 < row["capacity"] < 14 and not row["lower_bound"] and not row["exceeds_at_min"]
    # the CLI writes the table as CSV
    _run("analysis.capacity", str(grid_sweep / "default"), "--slo", str(SLO))
    assert (grid_sweep / "default" / "figures" / f"capacity_slo{SLO:g}s.csv").is_file()


def test_bisection_on_real_runs_reuses_and_resumes(grid_sweep):
    root = grid_sweep / "default"
    sweep_dir = root / "cluster=local4,policy=round_robin,workload.num_requests=300,workload.qps=2"
    mtime = (sweep_dir / "summary.json").stat().st_mtime_ns
    args = ["experiments.capacity", f"output_root={grid_sweep}", *RUN, f"capacity.slo_ttft_s={SLO}",
            "capacity.lo=2", "capacity.hi=14", "capacity.tol=0.5", "capacity.seeds=1"]
    p = _run(*args)
    files = list((root / "capacity").glob("*/capacity.json"))
    assert len(files) == 1 and "capacity=" in p.stdout
    r = json.loads(files[0].read_text())
    assert r["method"] == "bisection" and r["slo_ttft_s"] == SLO and r["status"] == "converged"
    lo, hi = r["bracket"]
    assert hi - lo <= 0.5 and r["capacity"] == lo
    by_qps = {p["qps"]: p for p in r["probes"]}
    assert by_qps[lo]["within_slo"] and not by_qps[hi]["within_slo"]
    # every probe is an ordinary run directory (or, stopped early once certain to exceed the SLO, a verdict and no
    # records); the sweep's qps=2 run was reused, not rerun
    for pr in r["probes"]:
        d = Path(pr["run_dir"])
        assert d.parent == root and d.name.endswith(f"workload.qps={fmt_qps(pr['qps'])}")
        if pr["early_stop"]:
            assert not pr["within_slo"] and not (d / "summary.json").exists()
            assert (root / "capacity" / "early_stop" / f"{d.name}.json").is_file()
        else:
            assert (d / "summary.json").is_file() and (d / "requests.parquet").is_file()
    assert (sweep_dir / "summary.json").stat().st_mtime_ns == mtime
    # the interpolation over the sweep's grid agrees with the bisection within the grid's resolution
    grid_cap = capacity_table(root, slo_s=SLO, group_by=["policy.name"]).iloc[0]["capacity"]
    assert lo - 3 <= grid_cap <= hi + 3
    # resume: a second search reruns nothing and finds the same answer
    mtimes = {pr["run_dir"]: (Path(pr["run_dir"]) / "summary.json").stat().st_mtime_ns for pr in r["probes"]
              if not pr["early_stop"]}
    _run(*args)
    r2 = json.loads(files[0].read_text())
    assert r2["capacity"] == r["capacity"] and [p["qps"] for p in r2["probes"]] == [p["qps"] for p in r["probes"]]
    assert all((Path(d) / "summary.json").stat().st_mtime_ns == m for d, m in mtimes.items())
    # an early-stop verdict records the execution model it was reached under; one reached under another model (the
    # profiles changed) is not reused: that probe runs again (and stops early again), the others are kept
    verdicts = sorted((root / "capacity" / "early_stop").glob("*.json"))
    assert verdicts
    fingerprint = json.loads((sweep_dir / "summary.json").read_text())["execution_model"]
    assert all(json.loads(v.read_text())["execution_model"] == fingerprint for v in verdicts)
    v = json.loads(verdicts[0].read_text())
    verdicts[0].write_text(json.dumps({**v, "execution_model": "0123456789abcdef"}))
    _run(*args)
    assert json.loads(verdicts[0].read_text())["execution_model"] == fingerprint
    assert json.loads(files[0].read_text())["capacity"] == r["capacity"]
    assert all((Path(d) / "summary.json").stat().st_mtime_ns == m for d, m in mtimes.items())


def test_capacity_help():
    p = _run("experiments.capacity", "--help")
    assert "capacity.slo_ttft_s" in p.stdout and "capacity.tol" in p.stdout
