"""mode=deploy and the fab tasks against real OpenSSH servers (loopback, and hosts in network namespaces).

The tests deploy the emulated stack through Fabric exactly as onto CloudLab hosts: setup (venv + this project from
an archive), start (engines, predictors, schedulers, each stage awaited healthy), the benchmark on the scheduler
host, collect, stop, teardown. Each "host" has its own work directory. They skip, saying why, where the machine
cannot run sshd (or network namespaces).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from block.deploy import sshlab as sshd_hosts
from block.deploy.inventory import Host, cluster_config, write_cluster_config
from block.ports import free_port, free_ports

REPO = Path(__file__).resolve().parents[1]
TOKEN = "tok-7f3a91-never-logged"
HF_TOKEN = "hf_testsecret0c1d2e3f"
pytestmark = pytest.mark.timeout(600)


def _cluster(tmp: Path, name: str, hosts: list[Host]) -> Path:
    path = tmp / "conf" / "cluster" / f"{name}.yaml"
    write_cluster_config(cluster_config(hosts, name, source="test"), path)
    return path


def _overrides(tmp: Path, name: str, key: Path, **extra) -> list[str]:
    ov = {
        "mode": "deploy", "cluster": name, "hydra.searchpath": f"[file://{tmp / 'conf'}]",
        "mode.install.python": sys.executable, "mode.install.system_site_packages": "true",
        "mode.install.pip_args": "[--no-deps,--no-build-isolation]", "mode.ssh.key_filename": str(key),
        "mode.time_scale": "10", "mode.startup_timeout_s": "90", "mode.engine": "emulated",
        "workload.num_requests": "40", "workload.qps": "4", "output_root": str(tmp / "outputs"),
        "experiment_name": "deploy", "progress": "false", "policy": "block", "policy.k": "null",
    }
    ov.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in ov.items()]


def _run(args: list[str], env_extra: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "BLOCK_API_TOKEN": TOKEN, "HF_TOKEN": HF_TOKEN, **(env_extra or {})}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _fab(*args: str, key: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``fab`` at the repository root; the ssh key comes from $BLOCK_SSH_KEY, as a user would give it."""
    return _run([sys.executable, "-m", "fabric", *args], {"BLOCK_SSH_KEY": str(key)} if key else None,
                timeout=timeout)


def _no_token_in(root: Path) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                data = p.read_bytes()
                if TOKEN.encode() in data or HF_TOKEN.encode() in data:
                    hits.append(str(p))
            except OSError:
                pass
    return hits


def _run_dirs(tmp: Path) -> list[Path]:
    return sorted(p.parent for p in (tmp / "outputs" / "deploy").rglob("summary.json"))


def _run_dir(tmp: Path) -> Path:
    found = _run_dirs(tmp)
    assert len(found) == 1, found
    return found[0]


# ------------------------------------------------------------------------------------------------ no ssh needed
def test_plan_places_services_by_host_and_keeps_secrets_out(tmp_path, monkeypatch):
    from experiments.deploy import build_plan, compose, secrets_of

    monkeypatch.setenv("BLOCK_API_TOKEN", TOKEN)

    hosts = [Host("node0", "h0.example", user="alice", internal_ip="10.10.1.1", instances=2,
                  roles=["engine", "scheduler"], gpu="no"),
             Host("node1", "h1.example", user="alice", internal_ip="10.10.1.2", instances=1, gpu="yes"),
             Host("node2", "h2.example", user="alice", internal_ip="10.10.1.3", instances=1, gpu="yes",
                  service_ports={"engine": 9000, "predictor": 9100})]
    path = _cluster(tmp_path, "two", hosts)
    cfg = compose(str(path), ["policy=block", "mode.num_schedulers=2"])
    assert secrets_of(cfg)["BLOCK_API_TOKEN"] == TOKEN
    plan = build_plan(cfg, hosts, {"node0": "emulated", "node1": "vllm", "node2": "vllm"}, "rid",
                      {"node0": "/w0/runs/rid", "node1": "/w1/runs/rid", "node2": "/w2/runs/rid"},
                      tmp_path / "staging")
    by = {h: {s["name"]: s for s in p["services"]} for h, p in plan.plans.items()}
    assert sorted(by["node0"]) == ["engine0", "engine1", "predictor0", "predictor1", "scheduler0", "scheduler1"]
    assert sorted(by["node1"]) == ["engine2", "predictor2"]
    # engines on loopback (their predictor is the way in), predictors and schedulers on the LAN address
    assert by["node0"]["engine1"]["url"] == "http://127.0.0.1:8001"
    assert by["node0"]["predictor1"]["url"] == "http://10.10.1.1:8101"
    # node2's own ports (cluster config) win over mode.ports
    assert plan.predictor_urls == ["http://10.10.1.1:8100", "http://10.10.1.1:8101", "http://10.10.1.2:8100",
                                   "http://10.10.1.3:9100"]
    assert by["node2"]["engine3"]["url"] == "http://127.0.0.1:9000"
    assert plan.scheduler_urls == ["http://10.10.1.1:8200", "http://10.10.1.1:8201"]
    assert by["node1"]["engine2"]["argv"][:3] == ["python", "-m", "block.engine.vllm"]
    from block.engine.vllm import build_parser  # the vLLM engine takes the emulated engine's flags as they are

    a = build_parser().parse_args(by["node1"]["engine2"]["argv"][3:])
    # engine.num_blocks unset: vLLM sizes its own KV cache (no --num-blocks), the emulated engine gets the count
    assert (a.model, a.num_blocks, a.port, a.load_format) == ("services/model.yaml", None, 8000, "dummy")
    assert by["node0"]["engine0"]["argv"][by["node0"]["engine0"]["argv"].index("--num-blocks") + 1] == "1036"
    assert by["node0"]["engine0"]["argv"][:3] == ["python", "-m", "block.engine"]
    assert "proxy" in by["node1"]["predictor2"]["argv"] and "engine" in by["node0"]["predictor0"]["argv"]
    sargv = by["node0"]["scheduler0"]["argv"]
    assert sargv[sargv.index("--instances") + 1] == ",".join(plan.predictor_urls)
    # config files are referenced relative to the run folder on the host, and shipped with the plan
    assert "services/model.yaml" in by["node0"]["engine0"]["argv"]
    assert {"services/model.yaml", "services/engine.yaml", "services/policy.yaml", "plan.json"} <= set(
        plan.files["node0"])
    for files in plan.files.values():
        for rel, data in files.items():
            assert TOKEN.encode() not in data, rel
    assert json.loads(plan.files["node1"]["plan.json"])["cwd"] == "/w1/runs/rid"


def test_deploy_config_errors_name_the_keys(tmp_path):
    from experiments.deploy import check, compose
    from experiments.wiring import ConfigError

    hosts = [Host("node0", "h0", instances=1, roles=["engine", "scheduler"])]
    path = _cluster(tmp_path, "one", hosts)
    with pytest.raises(ConfigError, match="vLLM runs in real time"):
        check(compose(str(path), ["mode.engine=vllm", "mode.time_scale=10"]))
    with pytest.raises(ConfigError, match="engine slots"):
        check(compose(str(path), ["cluster.num_instances=3"]))
    with pytest.raises(ConfigError, match="has no hosts"):
        check(compose("local4"))
    with pytest.raises(ConfigError, match=r"\$BLOCK_API_TOKEN, not in the config"):
        check(compose(str(path), ["+mode.token=abc"]))
    r = _run([sys.executable, "-m", "experiments.run", "mode=deploy", "cluster=local4",
              f"output_root={tmp_path / 'o'}"], timeout=120)
    assert r.returncode == 2 and "has no hosts" in r.stderr


def test_cluster_yaml_with_control_characters_stops_before_any_ssh(tmp_path):
    """A hand-edited cluster config goes through the inventory's checks: a run and `fab teardown` refuse it."""
    from experiments.deploy import check, compose
    from experiments.wiring import ConfigError

    host = Host("node0", "h0.invalid", instances=1, roles=["engine", "scheduler"], workdir="~/\nfoo")
    path = _cluster(tmp_path, "nl", [host])
    with pytest.raises(ConfigError, match=r"cluster=nl: cluster\.hosts\[0\]\.workdir='~/\\nfoo' contains control"):
        check(compose(str(path)))
    r = _fab("teardown", "--cluster", str(path), "--yes", timeout=120)
    assert r.returncode == 2 and "configuration error" in r.stderr and "workdir" in r.stderr, r.stderr
    _cluster(tmp_path, "home", [Host("node0", "h0.invalid", instances=1, roles=["engine", "scheduler"],
                                     workdir="~")])
    with pytest.raises(ConfigError, match=r"workdir='~' is / or the home directory"):
        check(compose(str(tmp_path / "conf" / "cluster" / "home.yaml")))


def test_fab_lists_every_task():
    r = _fab("--list", timeout=60)
    assert r.returncode == 0, r.stderr
    for name in ("setup", "start", "stop", "status", "logs", "run", "collect", "teardown", "inventory"):
        assert f"  {name}" in r.stdout


# ------------------------------------------------------------------------------------------------ loopback sshd
@pytest.fixture
def loopback(tmp_path):
    reason = sshd_hosts.why_not()
    if reason:
        pytest.skip(reason)
    hosts = sshd_hosts.loopback_hosts(tmp_path / "ssh", 1)
    yield hosts
    hosts.close()


def test_deploy_on_one_loopback_host_end_to_end(tmp_path, loopback):
    srv = loopback.servers[0]
    work = tmp_path / "hostwork"
    host = Host("solo", srv.address, user=loopback.user, port=srv.port, instances=2,
                roles=["engine", "scheduler"], gpu="auto", workdir=str(work))
    path = _cluster(tmp_path, "solo", [host])
    base = free_ports(6)  # engines at base, base+1; predictors at base+2, base+3; the scheduler at base+4
    ports = {"mode.ports.engine": base, "mode.ports.predictor": base + 2, "mode.ports.scheduler": base + 4}

    # setup twice: the second is a no-op
    key = str(loopback.client_key)
    r = _fab("setup", "--cluster", str(path), "--overrides", f"mode.ssh.key_filename={key} "
             f"mode.install.python={sys.executable} mode.install.system_site_packages=true "
             "mode.install.pip_args=[--no-deps,--no-build-isolation] mode.engine=emulated")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "solo: installed" in r.stdout and "engine=emulated" in r.stdout
    t0 = time.monotonic()
    r = _fab("setup", "--cluster", str(path), "--overrides", f"mode.ssh.key_filename={key} "
             f"mode.install.python={sys.executable} mode.install.system_site_packages=true "
             "mode.install.pip_args=[--no-deps,--no-build-isolation] mode.engine=emulated")
    assert r.returncode == 0 and "solo: up to date" in r.stdout, r.stdout + r.stderr
    assert time.monotonic() - t0 < 60
    # the host runs its own copy of the project, not this checkout
    origin = subprocess.run([str(work / "venv" / "bin" / "python"), "-c", "import block; print(block.__file__)"],
                            capture_output=True, text=True, cwd=work)
    assert origin.stdout.strip().startswith(str(work / "src")), origin

    # a sweep of two policies on the host (sequential points, the engines kept between them), then the paper's
    # figure from the deployed runs
    ov = _overrides(tmp_path, "solo", loopback.client_key, **ports, policy="block,round_robin",
                    **{"mode.keep_engines": "true"})
    r = _run([sys.executable, "-m", "experiments.run", "-m", *ov])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    runs = _run_dirs(tmp_path)
    assert len(runs) == 2
    for run_dir in runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["mode"] == "deploy" and summary["completed"] == 40 and summary["failed"] == 0
        assert summary["num_hosts"] == 1 and summary["engines"] == ["emulated"]
        assert summary["deploy_start_s"] > 0 and summary["deploy_benchmark_s"] > 0
        req = pd.read_parquet(run_dir / "requests.parquet")
        assert len(req) == 40 and set(req["instance"]) == {0, 1}
        inst = pd.read_parquet(run_dir / "instances.parquet")
        assert set(inst["instance"]) == {0, 1}
        logs = run_dir / "hosts" / "solo" / "logs"
        assert {"engine0.log", "engine1.log", "predictor0.log", "predictor1.log", "scheduler0.log"} <= {
            p.name for p in logs.iterdir()}
        assert "policy:" in (run_dir / "config.yaml").read_text()
    # the token reached the services (the runs authenticated) but no file here or on the host, nor any output
    assert not _no_token_in(tmp_path / "outputs") and not _no_token_in(work)
    assert TOKEN not in r.stdout + r.stderr and HF_TOKEN not in r.stdout + r.stderr

    # the engines were started once and served both points; each run's collected logs include their log
    engine_logs = list(work.glob("engines/*/logs/engine0.log"))
    assert len(engine_logs) == 1 and engine_logs[0].read_text().count("start engine0") == 1
    for run_dir in runs:
        assert "start engine0" in (run_dir / "hosts" / "solo" / "logs" / "engine0.log").read_text()
    # after the runs only the kept engines run; fab stop stops them
    r = _fab("status", "--cluster", str(path), timeout=120, key=loopback.client_key)
    assert r.returncode == 0 and "cluster state: running" in r.stdout, r.stdout + r.stderr
    assert "engine1" in r.stdout and "predictor" not in r.stdout and "scheduler" not in r.stdout, r.stdout
    r = _fab("stop", "--cluster", str(path), timeout=120, key=loopback.client_key)
    assert r.returncode == 0 and ("stopped engine1, engine0" in r.stdout or "stopped engine0, engine1" in r.stdout), \
        r.stdout
    # nothing is left running; the same sweep again (through `fab run`) is skipped (resume)
    r = _fab("status", "--cluster", str(path), timeout=120, key=loopback.client_key)
    assert r.returncode == 0 and "cluster state: stopped" in r.stdout, r.stdout + r.stderr
    rest = " ".join(o for o in ov if o.split("=")[0] not in ("mode", "cluster", "hydra.searchpath"))
    r = _fab("run", "--cluster", str(path), "--multirun", "--overrides", rest, key=loopback.client_key)
    assert r.returncode == 0 and (r.stdout + r.stderr).lower().count("skip") >= 2, r.stdout + r.stderr
    r = _run([sys.executable, "-m", "analysis.fig6", str(tmp_path / "outputs" / "deploy")], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "outputs" / "deploy" / "figures" / "fig6_qps.png").stat().st_size > 10_000

    r = _fab("teardown", "--cluster", str(path), timeout=120, key=loopback.client_key)
    assert r.returncode == 2 and "--yes" in r.stderr
    r = _fab("teardown", "--cluster", str(path), "--yes", timeout=120, key=loopback.client_key)
    assert r.returncode == 0 and f"removed {work}" in r.stdout, r.stdout + r.stderr
    assert not work.exists()


def test_ctrl_c_stops_the_run_on_the_host(tmp_path, loopback):
    """Fabric would wait for the remote benchmark after a Ctrl-C; the run must stop it and every service instead."""
    srv = loopback.servers[0]
    work = tmp_path / "hostwork"
    _cluster(tmp_path, "solo", [Host("solo", srv.address, user=loopback.user, port=srv.port, instances=1,
                                     roles=["engine", "scheduler"], gpu="no", workdir=str(work))])
    base = free_ports(3)
    ov = _overrides(tmp_path, "solo", loopback.client_key, **{
        "mode.ports.engine": base, "mode.ports.predictor": base + 1, "mode.ports.scheduler": base + 2,
        "workload.num_requests": 2000, "mode.time_scale": 1, "progress": "true"})
    # Ctrl-C must reach it even when the suite itself was started in the background (a non-interactive shell's
    # background job ignores SIGINT, and a child inherits that): give the run the terminal's default disposition
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", *ov], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        seen = ""
        while time.monotonic() < deadline and "requests:" not in seen:  # the benchmark runs on the host
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert "requests:" in seen, seen[-3000:]
        assert _pgrep("experiments.drive")
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]  # about 10 s here: the bound only catches a hang
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["pkill", "-f", str(work)])  # a failed stop must not leave the host's services running
    assert proc.returncode == 130 and "every service was stopped" in out, out[-3000:]
    assert not _pgrep(str(work))  # nothing of the run is left on the host
    assert not list((work / "state").glob("*.json"))
    assert not _run_dirs(tmp_path)


def _pgrep(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def test_unreachable_host_is_named(tmp_path, loopback):
    srv = loopback.servers[0]
    good = Host("good", srv.address, user=loopback.user, port=srv.port, roles=["engine", "scheduler"], gpu="no",
                workdir=str(tmp_path / "w-good"))
    bad = Host("bad", "127.0.0.1", user=loopback.user, port=free_port(), gpu="no",
               workdir=str(tmp_path / "w-bad"))
    path = _cluster(tmp_path, "mixed", [good, bad])
    r = _fab("status", "--cluster", str(path), timeout=120, key=loopback.client_key)
    assert r.returncode == 1
    assert "bad: UNREACHABLE" in r.stdout and "good: nothing running" in r.stdout, r.stdout


def test_teardown_never_removes_root_home_or_a_parent_of_home(tmp_path):
    """Teardown resolves the work directory on the host and compares it exactly, whatever the config says.

    The ssh sessions get a throwaway $HOME deep under tmp_path, so a parent of it is not / and a failure here would
    delete only test files. Hosts are made in code, as if a config had bypassed the inventory checks.
    """
    from block.deploy import ops
    from block.deploy.fleet import Fleet

    reason = sshd_hosts.why_not()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "a" / "home" / "user"
    (home / "\nfoo").mkdir(parents=True)  # what the old `pwd` parsing read as "$HOME/", "foo"
    (home / "keep").write_text("precious")
    (tmp_path / "link-home").symlink_to(home)
    (tmp_path / "link-root").symlink_to("/")
    (tmp_path / "doomed" / "runs").mkdir(parents=True)
    servers = sshd_hosts.loopback_hosts(tmp_path / "ssh", 1, home=home)
    srv = servers.servers[0]
    workdirs = {"newline": "~/\nfoo", "home": str(home), "home-tilde": "~", "parent": str(home.parent),
                "grandparent": str(home.parent.parent), "symlink": str(tmp_path / "link-home"),
                "root": "/", "root-symlink": str(tmp_path / "link-root"), "dotdot": "~/x/../..",
                "ok": str(tmp_path / "doomed"), "absent": str(tmp_path / "never-made")}
    hosts = [Host(name, srv.address, user=servers.user, port=srv.port, gpu="no", workdir=w)
             for name, w in workdirs.items()]
    try:
        with Fleet(hosts, key_filename=str(servers.client_key)) as fleet:
            outs = ops.teardown(fleet)
    finally:
        servers.close()
    assert (home / "keep").read_text() == "precious" and (home / "\nfoo").is_dir()
    assert Path("/").joinpath("usr").is_dir()
    refused = {n for n, o in outs.items() if not o.ok}
    assert refused == set(workdirs) - {"ok", "absent"}, {n: o.value for n, o in outs.items()}
    assert all("refusing work directory" in outs[n].error for n in refused), {n: outs[n].error for n in refused}
    assert "$HOME" in outs["symlink"].error and "$HOME" in outs["grandparent"].error
    assert outs["ok"].value == f"removed {tmp_path / 'doomed'}" and not (tmp_path / "doomed").exists()
    assert outs["absent"].value == "nothing to remove"


# ------------------------------------------------------------------------------------------------ netns hosts
@pytest.fixture
def lan(tmp_path):
    reason = sshd_hosts.why_not(netns=True)
    if reason:
        pytest.skip(reason)
    hosts = sshd_hosts.netns_hosts(tmp_path / "ssh", 3)
    yield hosts
    hosts.close()


def test_deploy_on_three_namespaced_hosts(tmp_path, lan):
    hosts = [Host(s.name, s.address, user=lan.user, port=s.port, internal_ip=s.address, instances=1,
                  roles=["engine", "scheduler"] if i == 0 else ["engine"], gpu="auto",
                  workdir=str(tmp_path / f"w-{s.name}"))
             for i, s in enumerate(lan.servers)]
    path = _cluster(tmp_path, "lan3", hosts)
    ov = _overrides(tmp_path, "lan3", lan.client_key)
    r = _run([sys.executable, "-m", "experiments.run", *ov])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    run_dir = _run_dir(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] == 40 and summary["failed"] == 0 and summary["num_hosts"] == 3
    req = pd.read_parquet(run_dir / "requests.parquet")
    assert set(req["instance"]) == {0, 1, 2}  # block with k=all spreads 40 requests over every host
    for i, s in enumerate(lan.servers):
        logs = run_dir / "hosts" / s.name / "logs"
        assert (logs / f"engine{i}.log").exists() and (logs / f"predictor{i}.log").exists()
        plan = json.loads((run_dir / "hosts" / s.name / "services" / "plan.json").read_text()) \
            if (run_dir / "hosts" / s.name / "services" / "plan.json").exists() else None
        assert plan is None or all(TOKEN not in json.dumps(x) for x in plan["services"])
    assert not _no_token_in(run_dir) and not any(_no_token_in(tmp_path / f"w-{s.name}") for s in lan.servers)

    # a half-started cluster: node2's engine port is taken, so its engine cannot start
    blocker = subprocess.Popen(["ip", "netns", "exec", lan.servers[2].netns, sys.executable, "-c",
                                "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
                                "socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', 8000)); s.listen(); time.sleep(600)"])
    try:
        time.sleep(0.5)
        over = " ".join(o for o in ov if o.split("=")[0].startswith(("mode.", "policy")) and "searchpath" not in o)
        r = _fab("start", "--cluster", str(path), "--overrides", over, "--run-dir", str(tmp_path / "manual"),
                 key=lan.client_key)
        assert r.returncode == 1, r.stdout + r.stderr
        err = r.stderr
        print(err)
        assert "half-started" in err and "node2" in err and "engine2" in err, err
        assert "node0: engine0" in err and "node1: engine1" in err, err
        r = _fab("status", "--cluster", str(path), key=lan.client_key)
        assert r.returncode == 1 and "cluster state: partial" in r.stdout, r.stdout + r.stderr
        r = _fab("logs", "--cluster", str(path), "--lines", "5", key=lan.client_key)
        assert r.returncode == 0 and "== node0: engine0" in r.stdout and "listening on" in r.stdout, r.stdout
        assert "address already in use" in r.stdout  # node2's dead engine keeps its log until stop
        r = _fab("stop", "--cluster", str(path), key=lan.client_key)
        assert r.returncode == 0 and "node0: stopped engine0" in r.stdout, r.stdout + r.stderr
        r = _fab("status", "--cluster", str(path), key=lan.client_key)
        assert r.returncode == 0 and "cluster state: stopped" in r.stdout
    finally:
        blocker.kill()


def test_cloudlab_manifest_to_a_deploy_plan(tmp_path):
    """The example manifest -> cluster config -> the services a run would start on those hosts."""
    from block.deploy.inventory import main as inventory_main
    from experiments.deploy import build_plan, check, compose, engine_kinds

    out = tmp_path / "conf" / "cluster" / "cl3.yaml"
    assert inventory_main(["--manifest", str(REPO / "tests" / "data" / "cloudlab_manifest.xml"), "--name", "cl3",
                           "--user", "alice", "--out", str(out)]) == 0
    cfg = compose(str(out), ["policy=block"])
    hosts = check(cfg)
    kinds = engine_kinds(cfg, hosts, {h.name: 1 for h in hosts})  # what nvidia-smi finds on a d7525
    assert set(kinds.values()) == {"vllm"}
    plan = build_plan(cfg, hosts, kinds, "r", {h.name: "/home/alice/block-deploy/runs/r" for h in hosts},
                      tmp_path / "st")
    assert plan.predictor_urls == [f"http://10.10.1.{i}:8100" for i in (1, 2, 3)]
    assert plan.scheduler_urls == ["http://10.10.1.1:8200"] and plan.bench_host == "node0"
    assert all(s["argv"][2] == "block.engine.vllm" for p in plan.plans.values() for s in p["services"]
               if s["role"] == "engine")
    # engine.num_blocks unset: vLLM sizes its KV cache and the predictors adopt its count (no --num-blocks for
    # either); set, both are pinned to it
    argvs = [s["argv"] for p in plan.plans.values() for s in p["services"] if s["role"] in ("engine", "predictor")]
    assert len(argvs) == 6 and cfg.engine.num_blocks is None and not any("--num-blocks" in a for a in argvs)
    pinned = compose(str(out), ["policy=block", "engine.num_blocks=900"])
    plan = build_plan(pinned, hosts, kinds, "r2", {h.name: "/home/alice/block-deploy/runs/r2" for h in hosts},
                      tmp_path / "st2")
    argvs = [s["argv"] for p in plan.plans.values() for s in p["services"] if s["role"] in ("engine", "predictor")]
    assert all(a[a.index("--num-blocks") + 1] == "900" for a in argvs)
    with pytest.raises(Exception, match="time_scale"):
        engine_kinds(compose(str(out), ["mode.time_scale=10"]), hosts, {h.name: 1 for h in hosts})


def test_kept_engines_live_beside_their_config(tmp_path):
    """mode.keep_engines: engines get a working folder named by their config's content, shared by runs."""
    from experiments.deploy import build_plan, compose

    hosts = [Host("node0", "h0", internal_ip="10.0.0.1", instances=1, roles=["engine", "scheduler"], gpu="no")]
    path = _cluster(tmp_path, "one", hosts)

    def engine_cwd(run_id: str, *ov: str) -> tuple[str, dict]:
        cfg = compose(str(path), ["mode.keep_engines=true", *ov])
        plan = build_plan(cfg, hosts, {"node0": "emulated"}, run_id, {"node0": f"/w/runs/{run_id}"},
                          tmp_path / run_id)
        eng = next(s for s in plan.plans["node0"]["services"] if s["role"] == "engine")
        return eng["cwd"], plan.files["node0"]

    a, files = engine_cwd("r1", "policy=block")
    b, _ = engine_cwd("r2", "policy=round_robin")
    c, _ = engine_cwd("r3", "engine.max_num_seqs=24")
    assert a == b and a.startswith("/w/engines/") and c != a  # another policy keeps them, another engine does not
    assert f"{a}/services/engine.yaml" in files and "services/policy.yaml" in files
