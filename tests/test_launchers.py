"""Sweeps beyond one machine, run for real: Ray (our ``hydra/launcher=ray_cluster`` plugin on a two-node Ray cluster
on loopback) and Slurm through hydra-submitit-launcher (its local executor end to end; the Slurm launcher up to the
``sbatch`` call). Need ``pip install -e ".[cluster]"``; each test skips, naming the missing package, without it.

Two Ray nodes on one machine are two ``ray start`` process trees (1 CPU, 100 MB object store, no dashboard each),
started once for this module (its last tests) and always stopped in a finalizer (``LocalRayCluster.stop``: only the processes it
started). The sweeps are the smoke preset (200 requests a run, seconds each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SMOKE_RUNS = {"policy=round_robin,workload.qps=4", "policy=round_robin,workload.qps=8",
              "policy=block_oracle,workload.qps=4", "policy=block_oracle,workload.qps=8"}


def _env(**extra: str) -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RAY_ADDRESS", None)
    env.pop("WANDB_MODE", None)
    return env


def _sweep(*overrides: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300,
           check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "experiments.run", "-m", *overrides], cwd=cwd, env=env or _env(),
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"sweep {overrides} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n"
                             f"--- stderr\n{p.stderr[-4000:]}")
    return p


def _summaries(root: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/summary.json")}


@pytest.fixture(scope="module")
def composer():
    from hydra import compose, initialize_config_dir

    import experiments  # noqa: F401  (the ${run_dirname:} resolver)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides: compose("config", overrides=list(overrides), return_hydra_config=True)


# ---------------------------------------------------------------------- Slurm via submitit
def test_submitit_local_runs_a_sweep_end_to_end_and_resumes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
    args = ("experiment=smoke", "policy=round_robin", f"output_root={tmp_path}", "progress=false",
            "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    _sweep(*args)
    root = tmp_path / "smoke"
    first = _summaries(root)
    assert set(first) == {"policy=round_robin,workload.qps=4", "policy=round_robin,workload.qps=8"}
    job_logs = sorted((root / ".submitit").glob("*/*_log.out"))
    assert len(job_logs) == 2  # one submitit job (its own process) per run, each logged its summary line
    assert all("completed=200" in f.read_text() for f in job_logs)
    _sweep(*args)
    assert _summaries(root) == first
    assert sum("skip" in f.read_text() for f in root.glob("*/run.log")) == 2


@pytest.fixture
def slurm_commands(tmp_path):
    """``sbatch`` and ``srun`` stand-ins on PATH: submitit looks for ``srun`` and submits with ``sbatch``, which here
    keeps the script it was given and fails as a Slurm controller that refuses the job would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sbatch\n'
                                    'echo "sbatch: error: Batch job submission failed: no controller" >&2\nexit 1\n')
    (bin_dir / "srun").write_text('#!/bin/sh\necho "srun: no controller" >&2\nexit 1\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return tmp_path / "submitted.sbatch", _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_launcher_is_the_plugin_class(composer):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    launcher = instantiate(composer(["experiment=smoke", "hydra/launcher=slurm",
                                     "hydra.launcher.partition=debug"]).hydra.launcher)
    assert isinstance(launcher, SlurmLauncher)
    assert {k: launcher.params[k] for k in ("partition", "cpus_per_task", "mem_gb", "timeout_min",
                                             "array_parallelism", "max_num_timeout")} == {
        "partition": "debug", "cpus_per_task": 2, "mem_gb": 8, "timeout_min": 120, "array_parallelism": 64,
        "max_num_timeout": 2}


def test_slurm_sweep_submits_one_array_job_with_the_config(slurm_commands, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
    script, env = slurm_commands
    p = _sweep("experiment=smoke", f"output_root={tmp_path}/out", "progress=false", "hydra/launcher=slurm",
               "hydra.launcher.partition=debug", "hydra.launcher.account=proj", env=env, check=False)
    assert p.returncode != 0 and "no controller" in p.stderr  # a refused submission is an error, never a success
    text = script.read_text()
    for line in ("#SBATCH --partition=debug", "#SBATCH --account=proj", "#SBATCH --array=0-3%4",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --mem=8GB", "#SBATCH --time=120", "#SBATCH --nodes=1",
                 "export PYTHONUNBUFFERED=1", f"{sys.executable} -u -m submitit.core._submit"):
        assert line in text, f"{line!r} not in the sbatch script:\n{text}"
    assert len(list((tmp_path / "out" / "smoke" / ".submitit").glob("*.pkl"))) == 4  # one pickled job per run


# ---------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray", reason="pip install -e '.[cluster]' (ray)")
    from hydra_plugins.block_ray_launcher._local_cluster import LocalRayCluster

    cluster = LocalRayCluster(num_nodes=2, cpus_per_node=1, object_store_bytes=100 * 1024 ** 2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _ray_sweep(cluster, *overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return _sweep("progress=false", "hydra/launcher=ray_cluster", f"hydra.launcher.address='{cluster.address}'",
                  *overrides, cwd=cwd, env=cluster.driver_env(_env()), check=check)


def test_ray_cluster_launcher_composes_into_the_plugin_class(composer):
    pytest.importorskip("ray", reason="pip install -e '.[cluster]' (ray)")
    from hydra.errors import ConfigCompositionException
    from hydra.utils import instantiate

    from hydra_plugins.block_ray_launcher.launcher import RayClusterLauncher

    cluster = instantiate(composer(["experiment=smoke", "hydra/launcher=ray_cluster",
                                    "hydra.launcher.address=10.1.2.3:6379"]).hydra.launcher)
    assert isinstance(cluster, RayClusterLauncher) and cluster.address == "10.1.2.3:6379"
    assert cluster.remote == {"num_cpus": 1, "max_calls": 0, "scheduling_strategy": "SPREAD"}
    local = instantiate(composer(["experiment=smoke", "hydra/launcher=ray_local"]).hydra.launcher)
    assert local.address is None and local.init["include_dashboard"] is False
    with pytest.raises(ConfigCompositionException):  # typed: a misspelt key fails before anything is submitted
        composer(["experiment=smoke", "hydra/launcher=ray_cluster", "hydra.launcher.adress=x:1"])


def test_ray_cluster_without_a_cluster_fails_at_once_saying_so(tmp_path):
    pytest.importorskip("ray", reason="pip install -e '.[cluster]' (ray)")
    from block.ports import free_port
    from hydra_plugins.block_ray_launcher._local_cluster import LOOPBACK

    address = f"{LOOPBACK}:{free_port(LOOPBACK)}"  # nothing listens there (ray.init would retry for minutes)
    p = _sweep("experiment=smoke", "policy=round_robin", f"output_root={tmp_path}", "progress=false",
               "hydra/launcher=ray_cluster", f"hydra.launcher.address='{address}'", timeout=120, check=False)
    assert p.returncode != 0 and f"no Ray cluster at hydra.launcher.address={address}" in p.stderr
    assert "ray start --head" in p.stderr and not list(tmp_path.rglob("summary.json"))

def test_ray_cluster_runs_a_sweep_on_both_nodes_and_resumes(ray_cluster, tmp_path):
    # the driver runs elsewhere than the repository with a relative output_root: records must land under the
    # driver's working directory, whatever directory Ray starts its workers in
    p = _ray_sweep(ray_cluster, "experiment=smoke", "output_root=out", cwd=tmp_path)
    root = tmp_path / "out" / "smoke"
    first = _summaries(root)
    assert set(first) == SMOKE_RUNS, p.stderr[-3000:]
    assert "4/4 runs complete" in p.stderr
    nodes = {d: json.loads((root / d / "ray_node.json").read_text()) for d in SMOKE_RUNS}
    assert {n["node_id"] for n in nodes.values()} == set(ray_cluster.node_ids)  # both nodes ran runs
    for d in SMOKE_RUNS:
        summary = json.loads((root / d / "summary.json").read_text())
        assert summary["completed"] == 200 and (root / d / "requests.parquet").is_file()

    again = _ray_sweep(ray_cluster, "experiment=smoke", "output_root=out", cwd=tmp_path)
    assert _summaries(root) == first  # every run skipped: nothing rewritten
    assert all(json.loads((root / d / "ray_node.json").read_text()) == nodes[d] for d in SMOKE_RUNS)
    assert "completed=" not in again.stdout and "4/4 runs already complete" in again.stderr
    assert sum("skip" in f.read_text() for f in root.glob("*/run.log")) == 4


def test_ray_cluster_finishes_the_other_runs_and_reports_a_failed_one(ray_cluster, tmp_path):
    p = _ray_sweep(ray_cluster, "experiment=smoke", "policy=round_robin", "workload.qps=4,-1",
                   f"output_root={tmp_path}", cwd=ROOT, check=False)
    assert p.returncode == 2, p.stderr[-3000:]  # the entry point's exit code for a configuration error
    assert "workload.qps" in p.stderr and "must be > 0" in p.stderr
    assert set(_summaries(tmp_path / "smoke")) == {"policy=round_robin,workload.qps=4"}
