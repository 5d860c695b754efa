"""Auto-provisioning in ``mode=deploy`` (Fig 8 on hosts) against a real OpenSSH server on loopback.

The back pool starts through hostctl on the slot's host over ssh, driven by the agent in the deploy driver, which
the schedulers reach through ssh remote forwards and which holds the slot leases. The run is long enough (arrivals
over about a minute of wall time) for a slot started on demand to serve the later requests; the assertions read
the run records, not the clock.
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import pandas as pd
import pytest

from block.deploy.inventory import Host
from block.ports import free_ports
from block.scheduler.provisioning import AgentLease, AgentStarter
from test_deploy import TOKEN, _cluster, _overrides, _run, _run_dir, loopback  # noqa: F401 - fixture
from test_provisioning_live import scale_down_twice

pytestmark = pytest.mark.timeout(900)
N, INITIAL = 3, 2


def test_deploy_fig8_starts_a_slot_through_ssh_once_for_two_schedulers(tmp_path, loopback, monkeypatch):  # noqa: F811
    srv = loopback.servers[0]
    work = tmp_path / "hostwork"
    host = Host("solo", srv.address, user=loopback.user, port=srv.port, instances=N, roles=["engine", "scheduler"],
                gpu="no", workdir=str(work))
    path = _cluster(tmp_path, "solo", [host])
    base = free_ports(2 * N + 2)
    ov = _overrides(tmp_path, "solo", loopback.client_key, **{
        "mode.ports.engine": base, "mode.ports.predictor": base + N, "mode.ports.scheduler": base + 2 * N,
        "cluster.num_instances": N, "provisioning": "reactive", "provisioning.initial_instances": INITIAL,
        "provisioning.slo_s": 0.001, "mode.num_schedulers": 2, "policy": "round_robin", "mode.time_scale": 2,
        "workload.qps": 0.25, "workload.num_requests": 30})
    r = _run([sys.executable, "-m", "experiments.run", *ov], timeout=800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    run = _run_dir(tmp_path)
    s = json.loads((run / "summary.json").read_text())
    assert s["completed"] == 30 and s["failed"] == 0 and s["mode"] == "deploy"
    assert s["instances_added"] == 1 and s["instances_failed"] == 0 and s["provision_starts"] == {"2": 1}
    assert s["mean_cold_start_s"] > 0
    prov = pd.read_parquet(run / "provisioning.parquet")
    two = prov[prov["instance"] == 2]
    assert sorted(two["event"]) == ["adopt", "ready", "start"] or sorted(two["event"]) == \
        ["adopt", "ready", "start", "wait"], two  # one scheduler started it, the other adopted it
    assert set(prov["scheduler_index"]) == {0, 1}
    req = pd.read_parquet(run / "requests.parquet")
    assert req.sort_values("dispatch_s")["num_active"].iloc[0] == INITIAL
    assert set(req["num_active"]) == {INITIAL, N}  # served before and after the slot joined
    assert 2 in set(req["instance"])  # round robin over the grown pool reaches it
    logs = run / "hosts" / "solo" / "logs"
    assert "start engine2" in (logs / "engine2.log").read_text()  # hostctl started it on the host
    assert not list((work / "state").glob("*.json"))  # and the run stopped it with the rest
    r = _run([sys.executable, "-m", "analysis.fig8", str(run)], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tab = pd.read_csv(next(run.rglob("fig8.csv")))
    assert tab["instances_added"].tolist() == [1]

    monkeypatch.setenv("BLOCK_API_TOKEN", TOKEN)  # the services' secrets, as a run gives them (secrets_of)
    _agent_starts_and_stops_a_slot_through_the_tunnel(tmp_path, path, ov, loopback)


def _agent_starts_and_stops_a_slot_through_the_tunnel(tmp_path, path, ov, loopback) -> None:  # noqa: F811
    """The pieces of the run in process: the host (set up by the run) calls the driver's agent on its own loopback
    through the ssh remote forward; the agent starts slot 2 on the host with hostctl over ssh, and stops it."""
    from block.deploy import ops
    from experiments.deploy import build_plan, check, compose, open_fleet, run_id_of, secrets_of
    from experiments.provision_live import DeployBackPool

    rest = [o for o in ov if o.split("=")[0] not in ("mode", "cluster", "hydra.searchpath")]
    cfg = compose(str(path), rest)
    hosts = check(cfg)
    run_id = run_id_of(tmp_path / "manual")
    with open_fleet(cfg, hosts) as fleet, DeployBackPool(cfg, fleet, hosts, secrets_of(cfg),
                                                         TOKEN) as back:
        remote = {h.name: ops.run_dir_of(fleet, h, run_id) for h in hosts}
        plan = build_plan(cfg, hosts, {"solo": "emulated"}, run_id, remote, tmp_path / "manual" / "services")
        back.split(plan, tmp_path / "manual" / "services")
        assert [s["name"] for s in plan.plans["solo"]["services"]] == \
            ["engine0", "predictor0", "engine1", "predictor1", "scheduler0", "scheduler1"]
        sched = next(s for s in plan.plans["solo"]["services"] if s["name"] == "scheduler1")["argv"]
        assert sched[sched.index("--instances") + 1] == ",".join(plan.predictor_urls[:INITIAL])
        assert "--provision-agent-lease" in sched and sched[sched.index("--provision-agent") + 1] == \
            back.agent_urls["solo"]
        ops.push_run(fleet, run_id, plan.files)
        agent = back.agent_urls["solo"]  # a port of the host's sshd, forwarded to the agent here
        assert agent != back.agent.url
        auth = {"authorization": f"Bearer {TOKEN}"}
        with httpx.Client(timeout=300, trust_env=False) as c:
            assert c.post(f"{agent}/slots/2").status_code == 401  # the run's token guards the agent
            url = c.post(f"{agent}/slots/2", headers=auth).json()["url"]
            assert url == plan.predictor_urls[2] and c.get(f"{url}/health").status_code == 200
            assert c.post(f"{agent}/leases/2/start", headers=auth, json={"by": "a"}).json()["claimed"]
            assert not c.post(f"{agent}/leases/2/start", headers=auth, json={"by": "b"}).json()["claimed"]
            assert c.delete(f"{agent}/slots/2", headers=auth).json() == {"stopped": True}
            with pytest.raises(httpx.ConnectError):
                c.get(f"{url}/health")
        assert back.agent.starts == {2: 1} and back.agent.stops == {2: 1}
        assert ops.status(fleet).state == "stopped"
    # scale-down on the hosts: two schedulers' pools with the agent's lease, through the tunnel; the slot drains a
    # streamed answer, then one stop through hostctl over ssh (the same checks as mode=emulate's test)
    with open_fleet(cfg, hosts) as fleet, DeployBackPool(cfg, fleet, hosts, secrets_of(cfg),
                                                         TOKEN) as back:
        plan = build_plan(cfg, hosts, {"solo": "emulated"}, run_id, remote, tmp_path / "manual" / "services")
        back.split(plan, tmp_path / "manual" / "services")
        ops.push_run(fleet, run_id, plan.files)
        url = back.agent_urls["solo"]
        try:
            asyncio.run(scale_down_twice(tmp_path, back.agent, lambda: AgentStarter(url, TOKEN),
                                         lambda: AgentLease(url, TOKEN), N, TOKEN))
        finally:
            ops.stop(fleet)
    events = [e for j in range(2) for e in map(json.loads, (tmp_path / f"prov{j}.jsonl").read_text().splitlines())]
    assert [e["event"] for e in events].count("stopped") == 1
