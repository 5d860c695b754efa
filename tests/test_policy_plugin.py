"""A routing policy from a package outside the repository, exactly as docs/adding_a_policy.md walks through it.

The package is written to ``tmp_path`` and reaches the processes only through ``PYTHONPATH`` (and, for the entry
point, an installed distribution's metadata next to it): a simulated sweep under ``hydra/launcher=joblib`` (whose
workers build the policy from their config and import the rule themselves) routes with it, and so does the live
scheduler started from its command line. DESIGN.md's policy table is the registry's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest

from block.policies import make_policy
from block.policies.registry import POLICIES, policy_table
from experiments.local_stack import TOKEN_VARS, LocalStack

ROOT = Path(__file__).resolve().parents[1]

# the page's example, word for word (tests/test_policy_plugin.py checks the page still shows it)
RULE = '''\
"""My routing rule: the instance with the fewest waiting requests, then the fewest running ones."""

from block.policies import argmin


def choose(request, candidates, ctx, *, running_weight: float = 0.5) -> int:
    """fewest waiting + running_weight x running requests, lower wins"""
    scores = [c.stats.num_waiting + running_weight * c.stats.num_running for c in candidates]
    return argmin([c.instance_id for c in candidates], scores, ctx.rng)


choose.signal = "stats"  # what the rule reads: none | stats | prediction


def last(request, candidates, ctx) -> int:
    """the highest instance id (a rule whose choices a test can predict)"""
    return max(c.instance_id for c in candidates)
'''
ENTRY_POINTS = '''\
[block_repro.policies]
my_rule = my_pkg.my_rule:choose
my_last = my_pkg.my_rule:last
'''


@pytest.fixture
def outside(tmp_path) -> Path:
    """``my_pkg`` in a directory of its own, with the metadata ``pip install`` would write for its entry points."""
    site = tmp_path / "site"
    (site / "my_pkg").mkdir(parents=True)
    (site / "my_pkg" / "__init__.py").write_text("")
    (site / "my_pkg" / "my_rule.py").write_text(RULE)
    dist = site / "my_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    return site


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("WANDB_MODE", None)
    return env


def test_the_page_shows_the_rule_the_test_uses():
    page = (ROOT / "docs" / "adding_a_policy.md").read_text()
    example = RULE.split("\n\ndef last")[0]
    assert example in page, "docs/adding_a_policy.md and tests/test_policy_plugin.py must show the same rule"
    for line in ENTRY_POINTS.splitlines()[:2]:
        assert line in page


def test_a_sweep_under_joblib_routes_with_a_rule_from_outside(outside, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           "policy=custom", "policy.name=my_last", "policy.target=my_pkg.my_rule:last", "policy.signal=stats",
           "policy.k=2,null", "workload.num_requests=40", "workload.qps=4", f"output_root={out}",
           "experiment_name=plugin", "progress=false"]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(outside), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "Joblib.Parallel(n_jobs=2" in p.stdout + p.stderr
    runs = sorted(out.glob("plugin/*/summary.json"))
    assert len(runs) == 2
    for s in runs:
        summary = json.loads(s.read_text())
        assert summary["policy"] == "my_last"
        files = sorted(s.parent.glob("requests.*"))
        df = pd.read_parquet(files[0]) if files[0].suffix == ".parquet" else pd.read_csv(files[0])
        inst = df["instance"]
        if "k=null" in s.parent.name:  # every instance probed: the highest id takes every request
            assert (inst == inst.max()).all() and inst.max() == 3
        else:  # two probed: instance 0 can never be the higher of two
            assert (inst != 0).all() and inst.nunique() > 1


def test_mode_emulate_hands_the_rule_to_its_live_schedulers(outside, tmp_path):
    """policy=custom in mode=emulate: the run's policy config (target included) goes to the scheduler processes."""
    cmd = [sys.executable, "-m", "experiments.run", "mode=emulate", f"output_root={tmp_path}", "progress=false",
           "cluster.num_instances=3", "workload.num_requests=12", "workload.qps=3", "mode.time_scale=4",
           f"hydra.run.dir={tmp_path}/run", "policy=custom", "policy.name=my_last",
           "policy.target=my_pkg.my_rule:last"]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(outside), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["mode"] == "emulate" and s["policy"] == "my_last" and s["completed"] == 12
    assert set(pd.read_parquet(tmp_path / "run" / "requests.parquet")["instance"]) == {2}


def test_a_rule_without_its_package_is_a_clear_config_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "experiments.run", "policy=custom", "policy.target=nowhere.rule:choose",
                        f"output_root={tmp_path}", "workload.num_requests=5", "progress=false"], cwd=ROOT,
                       env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "cannot import 'nowhere.rule'" in p.stderr
    assert "Traceback" not in p.stderr


def test_the_live_scheduler_routes_with_an_installed_plugin(outside, tmp_path):
    from fake_engine import FakeEngine

    with FakeEngine("good") as a, FakeEngine("good") as b, FakeEngine("good") as c, \
            LocalStack(tmp_path / "logs", env={**dict.fromkeys(TOKEN_VARS), "PYTHONPATH": _env(outside)["PYTHONPATH"]},
                       startup_timeout_s=90) as local:
        urls = f"{a.url},{b.url},{c.url}"
        by_entry_point = local.start("scheduler", "block.scheduler",
                                     ["--instances", urls, "--policy", "my_last", "--tokenizer", "none"])
        by_target = local.start("scheduler", "block.scheduler",
                                ["--instances", urls, "--policy", "mine", "--policy-target", "my_pkg.my_rule:last",
                                 "--tokenizer", "none"])
        for sched, name in ((by_entry_point, "my_last"), (by_target, "mine")):
            sched.wait_healthy()
            health = httpx.get(sched.url + "/health", timeout=30).json()
            assert (health["policy"], health["signal"], health["k"]) == (name, "none", None)
            for _ in range(3):
                r = httpx.post(sched.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3,
                                                                    "stream": True}, timeout=30)
                assert r.status_code == 200 and r.headers["x-block-instance"] == "2"
        assert len(c.bodies) == 6 and not a.bodies and not b.bodies


def test_make_policy_resolves_targets_and_refuses_what_it_cannot():
    pol = make_policy("mine", target="block.policies.basic:random_choice", signal="none")
    assert (pol.name, pol.signal, pol.k) == ("mine", "none", None)
    with pytest.raises(ValueError, match="built in"):
        make_policy("block", target="block.policies.basic:random_choice")
    with pytest.raises(ValueError, match="needs its rule"):
        make_policy("custom")
    with pytest.raises(ValueError, match="has no attribute"):
        make_policy("mine", target="block.policies.basic:nope")
    with pytest.raises(ValueError, match="signal must be one of"):
        make_policy("mine", target="block.policies.basic:random_choice", signal="vibes")
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("no_such_policy")


def test_design_lists_every_registered_policy():
    """DESIGN.md's table is generated (python -m block.policies --write docs/DESIGN.md): it cannot go stale."""
    from block.policies.__main__ import with_table

    design = (ROOT / "docs" / "DESIGN.md").read_text()
    assert with_table(design) == design, "DESIGN.md's policy table is stale: python -m block.policies --write " \
                                         "docs/DESIGN.md"
    table = policy_table()
    assert all(f"| `{name}` |" in table for name in POLICIES)
