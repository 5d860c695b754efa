"""A run's start and end: ``python -m experiments.run`` composes its config once, imports no pandas in a simulated run
and ends without the interpreter's teardown, and what it writes and prints does not depend on either.

Hydra 1.3 composes the whole config a second time only to read ``hydra.mode``; ``experiments.run`` skips that probe
where the key cannot be set (see ``experiments.run.mode_probe_needed``). The run is a real subprocess; a small
wrapper counts Hydra's compositions in it and holds an object that says when the interpreter tears it down.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.run import covering_jobs, may_exit_now, mode_probe_needed

ROOT = Path(__file__).resolve().parents[1]

# Runs experiments.run as `python -m` does, counting Hydra.compose_config calls (printed at exit).
COUNTING_RUN = """
import atexit, gc, runpy, sys, types
class Teardown:
    def __del__(self):
        sys.__stdout__.write("TEARDOWN\\n")
        sys.__stdout__.flush()
marker = types.ModuleType("teardown_marker")
marker.obj = Teardown()
sys.modules["teardown_marker"] = marker
from hydra._internal.hydra import Hydra
calls = []
compose_config = Hydra.compose_config
gc_at_compose = []
def counted(self, *args, **kwargs):
    calls.append(kwargs.get("run_mode"))
    gc_at_compose.append((gc.isenabled(), gc.get_freeze_count()))
    return compose_config(self, *args, **kwargs)
Hydra.compose_config = counted
atexit.register(lambda: print(f"COMPOSITIONS={len(calls)} GC={gc_at_compose[0][0]} FROZEN={gc_at_compose[0][1]} "
                              f"PANDAS={'pandas' in sys.modules} TQDM={'tqdm' in sys.modules} "
                              f"MA={'numpy.ma' in sys.modules} FROZEN_END={gc.get_freeze_count()} "
                              f"KEPT={len(getattr(sys.modules.get('experiments.sim'), '_KEPT', []))}", flush=True))
sys.argv = ["experiments/run.py", *sys.argv[1:]]
sys.orig_argv = [sys.executable, "-m", "experiments.run", *sys.argv[1:]]  # what `python -m experiments.run` has
runpy.run_module("experiments.run", run_name="__main__", alter_sys=True)
"""


def _run(tmp_path: Path, *overrides: str) -> tuple[dict[str, str], Path, str]:
    run_dir = tmp_path / "run"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", COUNTING_RUN, f"output_root={tmp_path}", "workload.num_requests=30",
                        "workload.qps=8", "cluster.num_instances=2", "policy=round_robin", "progress=false",
                        f"hydra.run.dir={run_dir}", *overrides],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    counts = [line for line in p.stdout.splitlines() if line.startswith("COMPOSITIONS=")]
    assert counts, p.stdout[-2000:]
    return dict(kv.split("=") for kv in counts[-1].split()), run_dir, p.stdout


def test_a_run_composes_its_config_once_and_ends_without_teardown(tmp_path):
    seen, run_dir, out = _run(tmp_path)
    assert seen["COMPOSITIONS"] == "1"
    # the run collects garbage as usual; what start-up imported is frozen out of the collections
    assert seen["GC"] == "True" and int(seen["FROZEN"]) > 30_000
    # a simulated run reads its workload (a bundled CSV) and writes its records without pandas (~0.2 s of start-up)
    assert seen["PANDAS"] == "False"
    # nor tqdm for a progress bar nobody sees (it would still take a multiprocessing lock)
    assert seen["TQDM"] == "False"
    # nor numpy's masked arrays, which np.median / np.percentile import (vidur.records.order_stats)
    assert seen["MA"] == "False"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] == 30 and summary["num_instances"] == 2
    assert "completed=30 failed=0" in out  # the summary line reached the pipe (flushed before the exit)
    assert "TEARDOWN" not in out  # the process ended after its exit handlers, before the module teardown
    # the run's objects (cluster, requests, result) kept for the exit to release instead of freed one by one, and out
    # of the collector's way once the run's pacing of it ends (frozen: no pass reads them again before the exit)
    assert seen["KEPT"] == "3" and int(seen["FROZEN_END"]) > int(seen["FROZEN"]) + 1000


def test_a_sweep_frees_each_runs_objects(tmp_path):
    """In a sweep every run of the process frees its objects as it ends: nothing is kept for the exit (the mode set
    by an override, as a preset may set it, rather than by -m)."""
    seen, _, out = _run(tmp_path, "hydra.mode=MULTIRUN", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert out.count("completed=30 failed=0") == 2
    # nothing of theirs frozen either (frozen start-up objects may have been freed since: the count can only fall)
    assert seen["KEPT"] == "0" and int(seen["FROZEN_END"]) <= int(seen["FROZEN"])


def test_a_profiler_running_the_module_still_writes_its_profile(tmp_path):
    """``python -m cProfile -m experiments.run`` has work after the run (writing the profile): no early exit there."""
    prof = tmp_path / "run.prof"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "experiments.run",
                        f"output_root={tmp_path}", "workload.num_requests=10", "progress=false",
                        f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()
    assert prof.is_file() and prof.stat().st_size > 0


def test_a_live_thread_keeps_the_normal_exit(monkeypatch):
    """Python's exit waits for non-daemon threads; ``exit_now`` must not cut one short."""
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "experiments.run", "policy=random"])
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        assert not may_exit_now()
    finally:
        release.set()
        worker.join()
    idle = threading.Event()
    daemon = threading.Thread(target=idle.wait, daemon=True)
    daemon.start()
    try:
        assert may_exit_now()
    finally:
        idle.set()
        daemon.join()


def test_the_default_config_leaves_hydra_mode_unset():
    """What the skipped probe would have read: conf/config.yaml and its default groups never set hydra.mode."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.mode is None


def test_arguments_that_can_set_the_mode_keep_the_probe():
    assert not mode_probe_needed(["policy=block", "workload.qps=24", "-m", "hydra.run.dir=/tmp/x"])
    for arg in ("experiment=fig6", "+experiment=mine", "hydra.mode=MULTIRUN", "++hydra.mode=RUN",
                "hydra/launcher=ray_cluster", "--config-dir=/mine", "-cd", "--config-name=capacity_search"):
        assert mode_probe_needed(["policy=block", arg]), arg


def test_writing_a_file_whole_imports_no_pandas(tmp_path):
    """The services, launchers and caches import ``vidur.records`` for ``write_atomic``: that costs them no pandas,
    numpy or yaml (a few hundred milliseconds of start-up); the run records' functions still import what they use."""
    code = ("import sys; from pathlib import Path; from vidur.records import write_atomic, is_complete, write_text;"
            f"write_atomic(Path({str(tmp_path)!r}) / 'a.bin', b'x'); write_text(Path({str(tmp_path)!r}) / 's.json', '{{}}');"
            "print(sorted(m for m in ('pandas', 'numpy', 'yaml', 'pyarrow') if m in sys.modules));"
            "from vidur.records import requests_frame, summarize;"
            "print(summarize(requests_frame([]))['completed'])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["[]", "0"]
    assert (tmp_path / "a.bin").read_bytes() == b"x" and (tmp_path / "s.json").read_text() == "{}"


def test_a_sweep_checks_a_cover_of_its_jobs():
    """Before launching, a sweep composes jobs that carry every override at least once (17 of fig6's 119), in order."""
    policies = [f"policy={p}" for p in ("block_oracle", "block_star", "llumnix", "infaas", "round_robin", "min_qpm",
                                        "random")]
    qps = [f"workload.qps={q}" for q in range(20, 37)]
    grid = [list(job) for job in itertools.product(policies, qps)]
    cover = covering_jobs(grid)
    assert len(cover) == 17
    assert {o for job in cover for o in job} == set(policies) | set(qps)
    assert [grid.index(job) for job in cover] == sorted(grid.index(job) for job in cover)  # the sweep's order
    assert covering_jobs([["a=1", "b=1"], ["a=1", "b=1"], ["a=2", "b=1"]]) == [["a=1", "b=1"], ["a=2", "b=1"]]
    assert covering_jobs([[]]) == []


def test_a_bad_value_in_the_last_job_of_a_sweep_fails_before_any_run(tmp_path):
    """The cover composes every override: a misspelt value met only by the sweep's last job still stops the sweep
    before its first run starts (no run directory is made)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "experiments.run", "-m", "policy=round_robin,no_such_policy",
                        "workload.qps=1,2", "workload.num_requests=20", f"output_root={tmp_path}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "no_such_policy" in p.stderr
    assert not list(tmp_path.rglob(".hydra")) and not list(tmp_path.rglob("summary.json"))


def test_the_whole_process_benchmarks_compile_bytecode_first(tmp_path, monkeypatch):
    """``benchmarks.bytecode.compile_tree`` writes the ``__pycache__`` a timed run then imports (also where
    PYTHONDONTWRITEBYTECODE is set, as on the project's VM), and names a file that does not compile."""
    from benchmarks.bytecode import compile_tree

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("X = 1\n")
    assert compile_tree(tmp_path, ("pkg", "absent")) == [tmp_path / "pkg"]
    assert [p.name.split(".")[0] for p in (tmp_path / "pkg" / "__pycache__").iterdir()] == ["mod"]
    (tmp_path / "pkg" / "broken.py").write_text("def f(:\n")
    with pytest.raises(RuntimeError, match="broken.py"):
        compile_tree(tmp_path, ("pkg",))


def test_the_phases_benchmark_accounts_for_a_run_and_splits_its_loop(tmp_path, capsys, monkeypatch):
    """``benchmarks.phases`` runs the vs_vidur command in marked processes: every phase is there, in order, the
    replay of the run's decisions into bare engines is the run's simulation, routing at no cost is less than the
    process, and it says that the second process took Hydra's composition from the cache the first one filled."""
    from benchmarks.phases import PHASES, main
    from experiments import compose_cache

    monkeypatch.setenv(compose_cache.ENV_DIR, str(tmp_path / "compose-cache"))
    monkeypatch.delenv(compose_cache.ENV_SWITCH, raising=False)
    lines = ["arrival_s,prompt_tokens,output_tokens"] + [f"{0.25 * i!r},{64 + i % 7},{8 + i % 5}" for i in range(200)]
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    assert main(["--case", "vllm-r4-10k", "--requests", str(tmp_path / "r.csv"), "--num-requests", "200",
                 "--repeat", "2", "--out", str(tmp_path / "out"), "--no-compile", "--vidur-s", "10"]) == 0
    out = capsys.readouterr().out
    for name, _, _ in PHASES:
        assert f"  {name} " in out
    assert "replay differs" not in out and "speed-up against Vidur's 10.0 s" in out
    assert "came from its cache (experiments/compose_cache.py) in 1 of 2 process(es)" in out, out
    runs = json.loads((tmp_path / "out" / "vllm-r4-10k.json").read_text())["runs"]
    assert [r["compose_cache"]["hits"] for r in runs] == [0, 1]
    for run in runs:
        marks = run["marks"]
        order = [m for _, a, b in PHASES for m in (a, b)]
        assert all(marks[a] <= marks[b] for a, b in itertools.pairwise(order) if a != b), marks
        assert run["replay_same"] and 0 < run["engines_alone_s"] < marks["rows<"] - marks["run<"] + 1.0
        assert run["kept_for_exit"]  # as ``python -m experiments.run`` does: freeing the run is not in its phases


def test_the_phases_replay_tells_a_different_simulation_apart(toy_model):
    """The replay check compares finish times: a run whose records say otherwise is not split."""
    from benchmarks.phases import _engines_alone
    from block.policies.registry import make_policy
    from vidur.cluster import Cluster
    from vidur.types import EngineConfig, Request

    reqs = [Request(i, 0.1 * i, 100 + 10 * (i % 9), 20 + i % 11) for i in range(120)]
    cluster = Cluster.build(2, EngineConfig(num_blocks=400), toy_model, make_policy("round_robin"))
    result = cluster.run(reqs)
    assert _engines_alone((cluster, reqs), result)["replay_same"]
    result.request_columns["finish_s"][7] += 1e-6
    assert not _engines_alone((cluster, reqs), result)["replay_same"]


def test_vs_vidur_says_when_a_reused_vidur_time_was_measured(tmp_path, capsys):
    """``--reuse`` divides by a Vidur time from another sitting (which moved by 40 % between sittings here): the
    printout and the CSV say when it was measured; and the range of our runs beside their median."""
    import numpy as np

    from benchmarks.vs_vidur import main

    n = 10_000  # the case's size: our run replays exactly the requests Vidur ran
    rng = np.random.default_rng(0)
    metrics = tmp_path / "request_metrics.csv"
    metrics.write_text("Request Id,request_inter_arrival_delay,request_num_prefill_tokens,request_num_decode_tokens,"
                       "request_e2e_time,prefill_e2e_time\n"
                       + "".join(f"{i},{0.5 * rng.random()!r},{int(rng.integers(16, 512))},{int(rng.integers(2, 64))},"
                                 f"2.0,0.1\n" for i in range(n)))
    case = tmp_path / "out" / "vllm-r1-10k"
    case.mkdir(parents=True)
    (case / "vidur.json").write_text(json.dumps({"wall_s": 30.0, "cpu_s": 29.0, "metrics_csv": str(metrics),
                                                 "measured_at": "2026-12-01T08:00:00"}))
    assert main(["--vidur-src", "/nonexistent", "--vidur-python", "/nonexistent", "--out", str(tmp_path / "out"),
                 "--reuse", "--only", "vllm-r1-10k", "--repeat", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Vidur's 30.0 s was measured at 2026-12-01T08:00:00 (--reuse)" in printed
    assert "(median of 2, " in printed  # with the range of our runs: one pairing's median hides the machine's noise
    row = (tmp_path / "out" / "vs_vidur.csv").read_text().splitlines()
    got = dict(zip(row[0].split(","), row[1].split(",")))
    assert got["vidur_reused"] == "True" and got["vidur_measured_at"] == "2026-12-01T08:00:00"
    # which interpreter ran our side, and the first process's time (it composed the config: a new --out)
    assert got["ours_python"] == sys.executable and got["ours_in_venv"] == str(sys.prefix != sys.base_prefix)
    walls = [float(w) for w in got["ours_walls_s"].split()]
    assert len(walls) == 2 and float(got["ours_first_wall_s"]) == pytest.approx(walls[0], abs=1e-3)
    assert float(got["ours_wall_min_s"]) == pytest.approx(min(walls), abs=1e-3)
    assert float(got["ours_wall_min_s"]) <= float(got["ours_wall_s"])
    assert float(got["ours_wall_s"]) <= float(got["ours_wall_max_s"]) == pytest.approx(max(walls), abs=1e-3)
