"""Wall time of one sweep: joblib on this machine against our Ray launcher on a two-node Ray cluster.

    python -m benchmarks.sweep_launchers                       # smoke preset (4 runs), 1000 requests a run
    python -m benchmarks.sweep_launchers --requests 3000 --runs-per-node 2

The same sweep (``experiment=smoke``, ``workload.num_requests``) runs twice from scratch, each into its own fresh
output directory: ``hydra/launcher=joblib hydra.launcher.n_jobs=<nodes x runs per node>``, then
``hydra/launcher=ray_cluster`` on a cluster of ``--nodes`` Ray nodes on loopback (``ray start`` processes, each
with ``--runs-per-node`` CPUs; started before and stopped after its sweep, not timed). Times are those of the
whole ``python -m experiments.run -m`` command, Hydra's start-up included. Prints both and ray / joblib.

On one machine both launchers share its cores, so the ratio is the Ray launcher's overhead (task submission, worker
start-up, config shipping), not a speed-up; across hosts Ray adds the other hosts' cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra_plugins.block_ray_launcher._local_cluster import LocalRayCluster  # noqa: E402


def sweep(out: Path, requests: int, launcher_args: list[str], env: dict | None = None) -> float:
    """Run the sweep into ``out``; return its wall time in seconds (raises if it fails or skips a run)."""
    cmd = [sys.executable, "-m", "experiments.run", "-m", "experiment=smoke", f"workload.num_requests={requests}",
           f"output_root={out}", "progress=false", *launcher_args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}\n{p.stderr[-3000:]}")
    done = list((out / "smoke").glob("*/summary.json"))
    if len(done) != 4:
        raise SystemExit(f"{' '.join(cmd)}: {len(done)}/4 runs have a summary.json")
    if any(json.loads(f.read_text())["completed"] != requests for f in done):
        raise SystemExit(f"{' '.join(cmd)}: a run did not complete all {requests} requests")
    return wall


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="workload.num_requests of every run")
    ap.add_argument("--nodes", type=int, default=2, help="Ray nodes (ray start processes) on this machine")
    ap.add_argument("--runs-per-node", type=int, default=1, help="CPUs of each Ray node = runs at once on it")
    args = ap.parse_args(argv)
    slots = args.nodes * args.runs_per_node
    with tempfile.TemporaryDirectory(prefix="sweep_launchers") as tmp:
        t_joblib = sweep(Path(tmp) / "joblib", args.requests, ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={slots}"])
        print(f"joblib  n_jobs={slots}: {t_joblib:7.1f} s", flush=True)
        t0 = time.perf_counter()
        with LocalRayCluster(num_nodes=args.nodes, cpus_per_node=args.runs_per_node) as cluster:
            t_start = time.perf_counter() - t0
            t_ray = sweep(Path(tmp) / "ray", args.requests,
                          ["hydra/launcher=ray_cluster", f"hydra.launcher.address='{cluster.address}'"],
                          env=cluster.driver_env())
    print(f"ray     {args.nodes} nodes x {args.runs_per_node} CPU: {t_ray:7.1f} s  (cluster start, not counted: "
          f"{t_start:.1f} s)")
    print(f"smoke sweep, 4 runs x {args.requests} requests, {os.cpu_count()} cores: ray / joblib = "
          f"{t_ray / t_joblib:.2f}")


if __name__ == "__main__":
    main()
