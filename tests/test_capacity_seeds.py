"""Honest capacity (issue 17): several seeds with a t-interval, the exact early stop of probes certain to exceed the
SLO, ``--dry-run`` and the comparison table at the end of a sweep. Real simulated runs through the command lines
(4 instances, a few hundred requests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from subprocess_run import run_module

from analysis.capacity import capacity_results, capacity_table, mean_interval
from experiments.capacity import violations_needed

ROOT = Path(__file__).resolve().parents[1]
RUN = ["cluster=local4", "policy=round_robin", "workload.num_requests=300", "progress=false"]
EARLY = ["cluster=local4", "policy=round_robin", "workload.num_requests=1000", "progress=false"]
SLO = 3.0


def _run(*args, timeout=300, check=True):
    return run_module(*args, timeout=timeout, check=check)


# ---------------------------------------------------------------------- the numbers
def test_t_interval_matches_students_t():
    ci = mean_interval([10.0, 11.0, 12.0, 13.0, 14.0])
    # sd = 1.5811, t(0.975, 4) = 2.7764 -> half width 1.9632
    assert ci.mean == pytest.approx(12.0) and ci.n == 5
    assert ci.half_width == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert ci.text() == "12.0 ± 2.0"
    one = mean_interval([7.0, None, float("nan")])
    assert one.n == 1 and one.mean == 7.0 and math.isnan(one.low) and one.text() == "7.0"


@pytest.mark.parametrize("n", [1, 2, 3, 99, 100, 101, 150, 199, 200, 201, 300, 1000, 9777, 10000])
def test_violations_needed_is_exactly_numpys_p99_rule(n):
    """violations_needed(n) values above a level make numpy's P99 exceed it whatever the others are, and one fewer
    does not always: the least favourable case (the others at 0, the violators just above the level) decides."""
    need = violations_needed(n)
    for c in (need - 1, need):
        if c < 0 or c > n:
            continue
        least = np.concatenate([np.zeros(n - c), np.full(c, 1.0 + 1e-6)])
        assert (np.percentile(least, 99) > 1.0) == (c >= need), (n, c)
    assert all(violations_needed(m + 1) >= violations_needed(m) for m in range(1, 3000))


# ---------------------------------------------------------------------- early stop on real runs
@pytest.fixture(scope="module")
def early(tmp_path_factory):
    """The same overloaded probe with and without early stop, and a probe below capacity with early stop on."""
    out = tmp_path_factory.mktemp("early")
    # 1,000 requests: at QPS 40 the queues pass the SLO while requests still arrive (the watch runs at arrivals)
    common = [*EARLY, f"capacity.slo_ttft_s={SLO}", "capacity.seeds=1", "capacity.tol=40"]
    # lo=2 (within), hi=40 (far over): the search ends after the two probes
    _run("experiments.capacity", f"output_root={out}/on", *common, "capacity.lo=2", "capacity.hi=40")
    _run("experiments.capacity", f"output_root={out}/off", *common, "capacity.lo=2", "capacity.hi=40",
         "capacity.early_stop=false")
    return out


def _result(root: Path) -> dict:
    files = list(root.glob("default/capacity/*/capacity.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_an_overloaded_probe_stops_early_and_the_verdict_is_exact(early):
    on, off = _result(early / "on"), _result(early / "off")
    by_on = {p["qps"]: p for p in on["probes"]}
    by_off = {p["qps"]: p for p in off["probes"]}
    stop = by_on[40.0]["early_stop"]
    assert stop is not None and not by_on[40.0]["within_slo"]
    assert stop["arrived"] < 1000 and stop["violations"] >= stop["needed"] == violations_needed(1000)
    assert on["stopped_early"] == 1 and off["stopped_early"] == 0
    # the stopped run left no records (not a complete run), only its verdict
    run_dir = Path(by_on[40.0]["run_dir"])
    assert not (run_dir / "summary.json").exists()
    assert (early / "on" / "default" / "capacity" / "early_stop" / f"{run_dir.name}.json").is_file()
    # the full run agrees: its P99 TTFT is over the SLO
    assert by_off[40.0]["early_stop"] is None and by_off[40.0]["p99_ttft_s"] > SLO
    assert on["status"] == off["status"] == "converged"


def test_watching_a_run_changes_none_of_its_numbers(early):
    """The probe within the SLO ran to the end under the watch (which syncs every engine every 100 arrivals): its
    records equal the unwatched run's up to float rounding (committing a decode run in two parts sums the same
    steps in another order: ~1e-13 s)."""
    a = json.loads((Path(_result(early / "on")["probes"][0]["run_dir"]) / "summary.json").read_text())
    b = json.loads((Path(_result(early / "off")["probes"][0]["run_dir"]) / "summary.json").read_text())
    for k in ("completed", "p99_ttft_ms", "mean_ttft_ms", "mean_e2el_ms", "p99_e2el_ms", "num_preemptions",
              "duration"):
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-9), k


def test_a_rerun_reuses_the_early_stop_verdict(early):
    p = _run("experiments.capacity", f"output_root={early}/on", *EARLY, f"capacity.slo_ttft_s={SLO}",
             "capacity.seeds=1", "capacity.tol=40", "capacity.lo=2", "capacity.hi=40")
    assert "stopped_early=1" in p.stdout
    # the verdict was read, not rerun: still no summary for qps=40
    stop = _result(early / "on")["probes"][1]
    assert not (Path(stop["run_dir"]) / "summary.json").exists()


# ---------------------------------------------------------------------- seeds
@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    p = _run("experiments.capacity", f"output_root={out}", *RUN, f"capacity.slo_ttft_s={SLO}", "capacity.seeds=3",
             "capacity.lo=2", "capacity.hi=16", "capacity.tol=1", "capacity.grid=0.5")
    return out, p.stdout


def test_capacity_over_seeds_has_a_t_interval(seeded):
    out, stdout = seeded
    r = _result(out)
    assert [s["seed"] for s in r["seeds"]] == [0, 1, 2]
    caps = [s["capacity"] for s in r["seeds"]]
    assert all(c is not None for c in caps)
    ci = mean_interval(caps)
    assert r["capacity"] == pytest.approx(ci.mean) and r["ci_low"] == pytest.approx(ci.low)
    assert r["ci_high"] == pytest.approx(ci.high) and r["confidence"] == 0.95
    assert "[" in stdout and "3 seeds" in stdout
    # seed 0 probes the plain run folder (shared with `experiments.run <overrides>`), the others add seed=<s>
    for s in r["seeds"]:
        for pr in s["probes"]:
            name = Path(pr["run_dir"]).name
            assert ("seed=" in name) == (s["seed"] != 0), name
            assert pr["early_stop"] or (Path(pr["run_dir"]) / "summary.json").is_file()
    # analysis reads the search (capacity_results) and the probe runs themselves (per-seed interpolation)
    df = capacity_results(out / "default")
    assert len(df) == 1 and df.iloc[0]["seeds"] == 3 and df.iloc[0]["capacity"] == pytest.approx(ci.mean)
    tab = capacity_table(out / "default", slo_s=SLO, group_by=["policy.name"])
    assert tab.iloc[0]["seeds"] == 3 and tab.iloc[0]["ci_low"] <= tab.iloc[0]["capacity"] <= tab.iloc[0]["ci_high"]


def test_bad_seeds_are_a_configuration_error(tmp_path):
    p = _run("experiments.capacity", f"output_root={tmp_path}", *RUN, "capacity.seeds=0", check=False)
    assert p.returncode == 2 and "capacity.seeds=0" in p.stderr


# ---------------------------------------------------------------------- dry run and the comparison table
def test_dry_run_lists_runs_and_skips_and_writes_nothing(tmp_path):
    sweep = ["-m", f"output_root={tmp_path}", "experiment_name=dry", *RUN, "workload.qps=2,4"]
    p = _run("experiments.run", *sweep)
    assert "comparison" in p.stdout and "steady_req_s" in p.stdout  # the table at the end of the sweep
    assert "capacity (P99 TTFT" in p.stdout  # two QPS points of one configuration: its capacity too
    assert (tmp_path / "dry" / "comparison.txt").is_file()
    before = sorted(str(x) for x in tmp_path.rglob("*"))
    p = _run("experiments.run", *sweep[:-1], "workload.qps=2,4,6", "--dry-run")
    lines = p.stdout.splitlines()
    assert sum(ln.startswith("skip") for ln in lines) == 2 and sum(ln.startswith("would run") for ln in lines) == 1
    assert any(ln.startswith("would run") and ln.rstrip().endswith("workload.qps=6") for ln in lines)
    assert "1 of 3 run(s) would run, 2 would be skipped" in lines[-1]
    assert sorted(str(x) for x in tmp_path.rglob("*")) == before  # nothing was run or written
    # without -m: the one run's folder
    p = _run("experiments.run", f"output_root={tmp_path}", "experiment_name=dry", *RUN, "workload.qps=2",
             "--dry-run")
    assert p.stdout.splitlines()[0].startswith("skip") and "0 of 1 run(s) would run" in p.stdout
    # a finished run made under another execution model would be done again, and the dry run says so (its summary
    # is edited as a change of profiles would leave it; editing it is the only write here)
    summary = Path(next(ln for ln in lines if ln.startswith("skip")).split()[1]) / "summary.json"
    assert summary.is_file()
    s = json.loads(summary.read_text())
    summary.write_text(json.dumps({**s, "execution_model": "0123456789abcdef"}))
    p = _run("experiments.run", *sweep[:-1], "workload.qps=2,4,6", "--dry-run")
    again = [ln for ln in p.stdout.splitlines() if "(again: its execution model changed" in ln]
    assert len(again) == 1 and str(summary.parent) in again[0] and "2 of 3 run(s) would run" in p.stdout
    p = _run("experiments.run", "-m", "experiment=fig6", f"output_root={tmp_path}", "--dry-run")
    assert "119 of 119 run(s) would run" in p.stdout
    p = _run("experiments.run", "nosuchkey=1", "--dry-run", check=False)
    assert p.returncode == 2 and "configuration error" in p.stderr


def test_a_run_sweep_whose_config_has_capacity_keys_prints_its_runs(tmp_path):
    """Presets set ``capacity`` keys for the search (nablation, burstiness, ...); a plain run sweep of them still gets
    its per-run table (it once looked for capacity searches there and printed nothing)."""
    p = _run("experiments.run", "-m", f"output_root={tmp_path}", "experiment_name=withcap", *RUN, "workload.qps=2,4",
             "+capacity.seeds=2")
    assert "comparison" in p.stdout and "steady_req_s" in p.stdout
    assert "steady_req_s" in (tmp_path / "withcap" / "comparison.txt").read_text()


def test_capacity_searches_dry_run_then_table(tmp_path):
    """``experiments.capacity --dry-run`` writes nothing and bounds the probe runs; after the searches it counts
    the probes it would reuse; the sweep of searches ends with their capacity table."""
    search = ["-m", f"output_root={tmp_path}", *RUN, f"capacity.slo_ttft_s={SLO}", "capacity.seeds=2",
              "capacity.lo=2", "capacity.hi=16", "capacity.tol=4", "policy=round_robin,random"]
    p = _run("experiments.capacity", *search, "--dry-run")
    lines = p.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines[:-1]] == [["would", "search"]] * 2
    assert "policy=round_robin" in lines[0] and "policy=random" in lines[1]
    assert "2 seed(s), QPS 2-16 to 4: at most 4 probe runs per seed" in lines[0]
    assert lines[-1].startswith("dry run: 2 search(es), at most 16 probe run(s)")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing was run or written

    p = _run("experiments.capacity", *search)
    assert "== sweep default: comparison ==" in p.stdout and "ci_low" in p.stdout
    assert (tmp_path / "default" / "capacity" / "comparison.txt").is_file()
    results = {str(f.parent): json.loads(f.read_text()) for f in tmp_path.glob("default/capacity/*/capacity.json")}
    assert sorted(results) == sorted(ln.split()[2] for ln in lines[:-1])  # the folders the dry run named
    for r in results.values():
        assert all(len(s["probes"]) <= 4 for s in r["seeds"])  # within the bound the dry run gave

    p = _run("experiments.capacity", *search, "--dry-run")
    for line in p.stdout.splitlines()[:-1]:
        kept = sum(len(s["probes"]) for s in results[line.split()[2]]["seeds"])
        assert f"; {kept} probe run(s) of its last search on disk, reused" in line, line
    p = _run("experiments.capacity", f"output_root={tmp_path}", *RUN, "capacity.seeds=[3,7]", "--dry-run")
    assert "(2 seed(s), QPS 10-60 to 0.1" in p.stdout  # a list of seeds counts its seeds (the default bracket)
    p = _run("experiments.capacity", "nosuchkey=1", "--dry-run", check=False)
    assert p.returncode == 2 and "configuration error" in p.stderr


def test_bisection_on_a_decimal_grid_gives_clean_numbers():
    from experiments.capacity import bisect

    r = bisect(lambda q: {"p99_ttft_ms": 1000.0 * q / 28.73 * 3.0}, 3.0, 16, 40, 0.1)  # crosses 3 s at 28.73
    assert r["capacity"] == 28.7 and r["bracket"] == [28.7, 28.8]  # not 28.700000000000003
    assert all(p["qps"] == round(p["qps"], 9) for p in r["probes"])
