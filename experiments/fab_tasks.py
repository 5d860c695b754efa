"""Fabric tasks: ``fab --list`` at the repository root (``fabfile.py`` re-exports these).

Every task takes ``--cluster``: a cluster config name under ``conf/cluster`` (made by ``fab inventory`` /
``python -m block.deploy.inventory``) or the path of such a YAML file. Tasks that start services also take
``--overrides``, the Hydra overrides of a run (``"policy=block engine=vllm workload.qps=20"``), composed exactly as
``python -m experiments.run mode=deploy`` composes them, so what ``fab start`` starts is what a run would start.

    fab inventory --manifest manifest.xml --name cl12 --user alice   # CloudLab manifest -> conf/cluster/cl12.yaml
    fab setup --cluster cl12                                          # venv + project on every host (idempotent)
    fab start --cluster cl12 --overrides "policy=block"               # engines, predictors, schedulers; wait healthy
    fab status --cluster cl12                                         # what runs where (exit 1 if half-started)
    fab logs --cluster cl12 --lines 20                                # the end of every running service's log
    fab run --cluster cl12 --overrides "policy=block workload.qps=20" # one experiment, records in outputs/
    fab collect --cluster cl12 --run-id <id>                          # bring a run's records and logs back
    fab stop --cluster cl12 ; fab teardown --cluster cl12 --yes

Why these tasks live in ``experiments`` and not in ``block/deploy``: the plan of services is derived from the run's
Hydra config (``experiments.deploy``), and there must be one derivation, used by ``mode=deploy`` and by these tasks
alike; ``block/deploy`` below holds what they drive (inventory, fleet, host operations) and imports nothing above.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fabric import task
from invoke.exceptions import Exit

from experiments.wiring import REPO_ROOT, ConfigError

CLUSTER_HELP = "cluster config: a name under conf/cluster, or a YAML path (made by `fab inventory`)"
OVERRIDES_HELP = "Hydra overrides of the run, space separated (quoted), e.g. \"policy=block workload.qps=20\""


def _cfg(cluster: str, overrides: str = ""):
    from experiments.deploy import compose

    try:
        return compose(cluster, shlex.split(overrides))
    except Exception as err:  # noqa: BLE001 - ConfigError, and Hydra's own (unknown group option, bad override)
        raise Exit(f"configuration error: {err}", code=2)


def _open(cluster: str, overrides: str = ""):
    """The run's config, its checked hosts and their fleet (not yet entered); a configuration error exits 2."""
    from experiments.deploy import check, open_fleet

    cfg = _cfg(cluster, overrides)
    try:
        hosts = check(cfg)
        return cfg, hosts, open_fleet(cfg, hosts)
    except ConfigError as err:
        raise Exit(f"configuration error: {err}", code=2)


@contextmanager
def _failure_exits() -> Iterator[None]:
    """A failure inside is one ``error: ...`` line and exit code 1 (a FleetError names every failing host)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001
        raise Exit(f"error: {err}", code=1)


@task(help={"name": "name of the cluster config to write", "manifest": "CloudLab manifest.xml",
            "hosts_file": "pssh-style hosts file (user@host[:port] [key=value ...] per line)",
            "user": "ssh user to pick from the manifest's logins", "out": "output YAML (default conf/cluster/<name>.yaml)",
            "force": "overwrite an existing output"})
def inventory(c, name, manifest="", hosts_file="", user="", out="", force=False):
    """Turn a CloudLab manifest or a hosts file into a cluster config (conf/cluster/<name>.yaml)."""
    from block.deploy.inventory import main

    argv = ["--name", name]
    if manifest:
        argv += ["--manifest", manifest]
    if hosts_file:
        argv += ["--hosts-file", hosts_file]
    if user:
        argv += ["--user", user]
    if out:
        argv += ["--out", out]
    if force:
        argv.append("--force")
    code = main(argv)
    if code:
        raise Exit(code=code)


@task(help={"cluster": CLUSTER_HELP, "overrides": OVERRIDES_HELP})
def setup(c, cluster, overrides=""):
    """Create a venv on every host and install this project (vllm extra on GPU hosts); a no-op when up to date."""
    from experiments.deploy import prepare

    cfg, hosts, fleet = _open(cluster, overrides)
    with fleet, _failure_exits():
        kinds = prepare(cfg, fleet, hosts, setup=True, say=print)
    for h in hosts:
        print(f"{h.name}: engine={kinds[h.name]}")


@task(help={"cluster": CLUSTER_HELP, "overrides": OVERRIDES_HELP,
            "run_dir": "local folder for the plan and config files (default outputs/deploy/manual)"})
def start(c, cluster, overrides="", run_dir="outputs/deploy/manual"):
    """Start engines, predictors and schedulers on every host and wait until all are healthy."""
    from experiments.deploy import prepare, start_cluster

    cfg, hosts, fleet = _open(cluster, overrides)
    with fleet, _failure_exits():
        kinds = prepare(cfg, fleet, hosts, say=print)
        plan = start_cluster(cfg, fleet, hosts, kinds, REPO_ROOT / run_dir, say=print)
    print(f"run id {plan.run_id}; schedulers: {' '.join(plan.scheduler_urls)}")


@task(help={"cluster": CLUSTER_HELP, "overrides": OVERRIDES_HELP,
            "roles": "only these roles, comma separated (engine,predictor,scheduler)"})
def stop(c, cluster, roles="", overrides=""):
    """Stop the services on every host (schedulers first, engines last)."""
    from block.deploy import ops

    _, _, fleet = _open(cluster, overrides)
    with fleet:
        outs = ops.stop(fleet, [r for r in roles.split(",") if r] or None)
    bad = False
    for name, o in outs.items():
        if not o.ok:
            bad = True
            print(f"{name}: UNREACHABLE ({o.error})")
        else:
            stopped = [s["name"] for s in o.value.get("services", []) if s.get("action") == "stopped"]
            print(f"{name}: stopped {', '.join(stopped) if stopped else 'nothing'}")
    if bad:
        raise Exit(code=1)


@task(help={"cluster": CLUSTER_HELP, "overrides": OVERRIDES_HELP})
def status(c, cluster, overrides=""):
    """Show what runs where; exit code 1 when the cluster is half-started or a host is unreachable."""
    from block.deploy import ops

    _, _, fleet = _open(cluster, overrides)
    with fleet:
        st = ops.status(fleet)
    print(st.describe())
    if st.state == "partial":
        raise Exit(code=1)


@task(help={"cluster": CLUSTER_HELP, "overrides": OVERRIDES_HELP, "lines": "lines per service (default 30)",
            "service": "only this service (e.g. engine0)"})
def logs(c, cluster, lines=30, service="", overrides=""):
    """Show the end of every running service's log on every host (after a run: `fab collect`)."""
    from block.deploy import ops

    _, _, fleet = _open(cluster, overrides)
    with fleet:
        outs = ops.logs(fleet, int(lines))
    for name, o in outs.items():
        if not o.ok:
            print(f"== {name}: UNREACHABLE ({o.error})")
            continue
        for s in o.value.get("services", []):
            if service and s.get("name") != service:
                continue
            print(f"== {name}: {s.get('name')} ({s.get('log')})")
            print("\n".join(s.get("log_tail") or []))


@task(help={"cluster": CLUSTER_HELP, "overrides": OVERRIDES_HELP, "multirun": "pass -m to Hydra (sweeps)"})
def run(c, cluster, overrides="", multirun=False):
    """Run an experiment on the hosts: `python -m experiments.run mode=deploy cluster=<cluster> <overrides>`."""
    from experiments.deploy import cluster_overrides

    argv = [sys.executable, "-m", "experiments.run"] + (["-m"] if multirun else []) + ["mode=deploy"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            argv += cluster_overrides(cluster, Path(tmp))
        except ConfigError as err:
            raise Exit(f"configuration error: {err}", code=2)
        code = subprocess.call(argv + shlex.split(overrides), cwd=REPO_ROOT)
    if code:
        raise Exit(code=code)


@task(help={"cluster": CLUSTER_HELP, "run_id": "the run id on the hosts (its folder under <workdir>/runs)",
            "dest": "local destination (default outputs/deploy/collected/<run id>)", "overrides": OVERRIDES_HELP})
def collect(c, cluster, run_id, dest="", overrides=""):
    """Bring a run's records, configs and logs from every host into outputs/ (hosts/<host>/...)."""
    from block.deploy import ops

    _, _, fleet = _open(cluster, overrides)
    out = Path(dest) if dest else REPO_ROOT / "outputs" / "deploy" / "collected" / run_id
    out.mkdir(parents=True, exist_ok=True)
    with fleet, _failure_exits():
        got = ops.collect(fleet, run_id, out)
    for name, path in got.items():
        print(f"{name}: {path}")


@task(help={"cluster": CLUSTER_HELP, "yes": "really delete each host's work directory", "overrides": OVERRIDES_HELP})
def teardown(c, cluster, yes=False, overrides=""):
    """Stop everything and delete each host's work directory (venv, project, runs). Needs --yes."""
    from block.deploy import ops

    _, _, fleet = _open(cluster, overrides)
    if not yes:
        raise Exit("teardown deletes " + ", ".join(f"{h.name}:{h.workdir}" for h in fleet.hosts)
                   + "; run again with --yes", code=2)
    with fleet:
        outs = ops.teardown(fleet)
    bad = False
    for name, o in outs.items():
        print(f"{name}: {o.value if o.ok else 'FAILED: ' + str(o.error)}")
        bad |= not o.ok
    if bad:
        raise Exit(code=1)
