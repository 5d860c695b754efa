"""What does deploying over ssh cost, and does a deployed run measure what a local one does?

    python -m benchmarks.deploy [-n 200] [--qps 6] [--scale 1] [--policy block] [--hosts 3]

Starts throwaway OpenSSH hosts on this machine (``block.deploy.sshlab``: one per network namespace when run as
root, else one sshd on loopback carrying every instance), then measures:

1. ``setup`` cold (archive, upload, venv, install) and warm (the idempotent no-op), and their ratio;
2. one ``mode=deploy`` run (emulated engines, one per host) with its phase times from ``summary.json``;
3. the same workload, policy and engines in ``mode=emulate`` (local processes, no ssh), and the differences of
   p50/p99 TTFT and E2E between the two: the services and the client are the same, so the difference is the
   network path (namespaced hosts cross a bridge) and the noise of one run.

The install uses the machine's packages (``--system-site-packages``, ``pip --no-deps``), as the tests do, so the cold
setup here measures the project archive and the venv, not downloads from PyPI.
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
KEYS = ("completed", "median_ttft_ms", "p99_ttft_ms", "median_e2el_ms", "p99_e2el_ms")


def _run(out: Path, name: str, args: list[str], env: dict) -> dict:
    d = out / name
    cmd = [sys.executable, "-m", "experiments.run", f"output_root={out}", "progress=false", "force=true",
           f"hydra.run.dir={d}", *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(p.stdout[-3000:] + p.stderr[-3000:])
    s = json.loads((d / "summary.json").read_text())
    s["_wall_s"] = time.perf_counter() - t
    return s


def main(argv=None) -> None:
    from block.deploy import sshlab
    from block.deploy.inventory import Host, cluster_config, write_cluster_config
    from experiments.deploy import compose, hosts_of, open_fleet, prepare

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--num-requests", type=int, default=200)
    ap.add_argument("--qps", type=float, default=6.0)
    ap.add_argument("--scale", type=float, default=1.0, help="mode.time_scale of the emulated engines (both modes)")
    ap.add_argument("--policy", default="block")
    ap.add_argument("--hosts", type=int, default=3, help="namespaced hosts (one engine each)")
    a = ap.parse_args(argv)

    use_netns = sshlab.why_not(netns=True) is None
    reason = sshlab.why_not()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        lab = sshlab.netns_hosts(tmp / "ssh", a.hosts) if use_netns else sshlab.loopback_hosts(tmp / "ssh", 1)
        try:
            if use_netns:
                hosts = [Host(s.name, s.address, user=lab.user, port=s.port, internal_ip=s.address,
                              roles=["engine", "scheduler"] if i == 0 else ["engine"], gpu="no",
                              workdir=str(tmp / f"w-{s.name}")) for i, s in enumerate(lab.servers)]
            else:
                s = lab.servers[0]
                hosts = [Host("solo", s.address, user=lab.user, port=s.port, instances=a.hosts,
                              roles=["engine", "scheduler"], gpu="no", workdir=str(tmp / "w-solo"))]
            write_cluster_config(cluster_config(hosts, "bench", source="benchmarks.deploy"),
                                 tmp / "conf" / "cluster" / "bench.yaml")
            deploy_ov = ["mode=deploy", "cluster=bench", f"hydra.searchpath=[file://{tmp / 'conf'}]",
                         f"mode.install.python={sys.executable}", "mode.install.system_site_packages=true",
                         "mode.install.pip_args=[--no-deps,--no-build-isolation]", "mode.engine=emulated",
                         f"mode.ssh.key_filename={lab.client_key}"]
            common = [f"policy={a.policy}", f"workload.num_requests={a.num_requests}", f"workload.qps={a.qps}",
                      f"mode.time_scale={a.scale}"]

            cfg = compose(str(tmp / "conf" / "cluster" / "bench.yaml"), deploy_ov[3:])
            hs = hosts_of(cfg)
            with open_fleet(cfg, hs) as fleet:
                t = time.perf_counter()
                prepare(cfg, fleet, hs, setup=True)
                cold = time.perf_counter() - t
                t = time.perf_counter()
                prepare(cfg, fleet, hs, setup=True)
                warm = time.perf_counter() - t
            where = f"{a.hosts} network-namespace hosts" if use_netns else f"1 loopback host x {a.hosts} instances"
            print(f"hosts: {where}; setup cold {cold:.2f} s, warm (no-op) {warm:.2f} s: "
                  f"warm/cold = {warm / cold:.3f}")

            env = dict(os.environ)
            dep = _run(tmp / "out", "deploy", deploy_ov + common + ["mode.setup=false"], env)
            emu = _run(tmp / "out", "emulate", ["mode=emulate", f"cluster.num_instances={a.hosts}"] + common, env)
        finally:
            lab.close()
    print("deploy phases: " + ", ".join(f"{k[7:-2]} {dep[k]:.2f} s" for k in
                                        ("deploy_setup_s", "deploy_start_s", "deploy_benchmark_s",
                                         "deploy_collect_s")) + f"; whole run {dep['_wall_s']:.1f} s "
          f"(emulate: {emu['_wall_s']:.1f} s, ratio {dep['_wall_s'] / emu['_wall_s']:.2f})")
    print(f"{'mode':>10} " + " ".join(f"{k:>15}" for k in KEYS))
    for name, s in (("emulate", emu), ("deploy", dep)):
        print(f"{name:>10} " + " ".join(f"{s[k]:>15.1f}" if isinstance(s[k], float) else f"{s[k]:>15}"
                                        for k in KEYS))
    print(f"{'diff %':>10} " + " ".join(f"{'':>15}" if k == "completed" else
                                        f"{100 * (dep[k] - emu[k]) / emu[k]:>+15.1f}" for k in KEYS))


if __name__ == "__main__":
    main()
