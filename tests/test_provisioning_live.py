"""Auto-provisioning in the live scheduler (Fig 8 outside the simulator): back-pool instances started on demand.

Real services on loopback: emulated engines and predictors started by ``experiments.local_stack``, the back pool
started through ``experiments.provision_live.ProvisionAgent`` when a scheduler's controller asks for it. The
triggers are driven, not timed: an SLO of a millisecond makes every request (reactive) or every prediction
(predictive) cross it, and the tests wait on the schedulers' provisioning events.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from block.provisioning import ProvisioningConfig, ProvisioningController
from block.scheduler.provisioning import AgentStarter, Finished, LivePool, SlotLease
from experiments.local_stack import TOKEN_VARS, LocalStack
from experiments.provision_live import ProvisionAgent

ROOT = Path(__file__).resolve().parents[1]
N, INITIAL = 4, 2


def _instance(local: LocalStack, i: int, time_scale: float = 20.0) -> str:
    """Engine + predictor of slot ``i``, healthy; the predictor's URL."""
    return _services(local, i, time_scale)[0]


def _services(local: LocalStack, i: int, time_scale: float = 20.0) -> tuple[str, list]:
    """(the predictor's URL, [predictor, engine]) of slot ``i``, healthy."""
    e = local.start(f"engine{i}", "block.engine", ["--time-scale", str(time_scale), "--tokenizer", "none",
                                                   "--num-blocks", "1000", "--seed", str(i)])
    p = local.start(f"predictor{i}", "block.predictor", ["--engine-url", e.url, "--state-source", "engine",
                                                         "--tokenizer", "none", "--instance-id", str(i)])
    local.wait_healthy([e, p])
    return str(p.url), [p, e]


class _Slots:
    """Starts and stops back-pool slots in a LocalStack, as mode=emulate's driver does (real processes)."""

    def __init__(self, local: LocalStack, time_scale: float) -> None:
        self.local, self.time_scale, self.running = local, time_scale, {}

    def start(self, i: int) -> str:
        url, self.running[i] = _services(self.local, i, self.time_scale)
        return url

    def stop(self, i: int) -> None:
        for svc in self.running.pop(i):
            svc.stop()
            self.local.services.remove(svc)


def _scheduler(local: LocalStack, tmp: Path, j: int, urls: list[str], agent: ProvisionAgent, strategy: str,
               policy: str, lock_dir: Path | None) -> str:
    conf = tmp / "provisioning.yaml"
    conf.write_text(f"enabled: true\nstrategy: {strategy}\nslo_s: 0.001\ncooldown_s: 0\n")
    args = ["--instances", ",".join(urls), "--policy", policy, "--tokenizer", "none", "--provision-config",
            str(conf), "--provision-slots", str(N), "--provision-agent", agent.url,
            "--provision-log", str(tmp / f"provision{j}.jsonl"), "--log-file", str(tmp / f"scheduler{j}.jsonl")]
    if lock_dir is not None:
        args += ["--provision-lock-dir", str(lock_dir)]
    s = local.start(f"scheduler{j}", "block.scheduler", args)
    s.wait_healthy()
    return str(s.url)


def _events(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _wait_active(paths: list[Path], slots: set[int], timeout_s: float = 300.0) -> None:
    """Wait (on the event logs, not on a clock race) until every scheduler routes to ``slots``."""
    deadline = time.monotonic() + timeout_s
    while True:
        active = []
        for p in paths:
            ev = _events(p)
            assert not [e for e in ev if e["event"] == "failed"], ev
            active.append({e["instance"] for e in ev if e["event"] in ("ready", "adopt")})
        if all(slots <= a for a in active):
            return
        assert time.monotonic() < deadline, f"slots {slots} not active in every scheduler: {active}"
        time.sleep(0.2)


def _complete(url: str, n: int = 4) -> list[httpx.Response]:
    out = []
    with httpx.Client(timeout=120) as c:
        for _ in range(n):
            r = c.post(f"{url}/v1/completions", json={"prompt": [7] * 16, "max_tokens": 4})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
            out.append(r)
    return out


@pytest.fixture()
def cluster(tmp_path):
    with LocalStack(tmp_path / "logs", env=dict.fromkeys(TOKEN_VARS), startup_timeout_s=180) as local:
        urls = [_instance(local, i) for i in range(INITIAL)]
        with ProvisionAgent(lambda i: _instance(local, i), range(INITIAL, N)) as agent:
            yield local, urls, agent


def test_reactive_scheduler_starts_the_back_pool_and_routes_to_it(cluster, tmp_path):
    local, urls, agent = cluster
    sched = _scheduler(local, tmp_path, 0, urls, agent, "reactive", "round_robin", None)
    before = _complete(sched, 2)  # both finish over the 1 ms SLO: slots 2 then 3 start
    assert before[0].headers["x-block-num-active"] == "2" and before[0].headers["x-block-instance"] in ("0", "1")
    _wait_active([tmp_path / "provision0.jsonl"], {2, 3})
    after = _complete(sched, 8)
    assert {int(r.headers["x-block-instance"]) for r in after} == {0, 1, 2, 3}  # round robin over the grown pool
    assert {r.headers["x-block-num-active"] for r in after} == {"4"}
    pool = httpx.get(f"{sched}/health").json()["provisioning"]
    assert pool["active"] == [0, 1, 2, 3] and pool["back"] == [] and pool["added"] == [2, 3]
    ev = _events(tmp_path / "provision0.jsonl")
    assert sorted((e["event"], e["instance"]) for e in ev if e["event"] != "initial") == \
        [("ready", 2), ("ready", 3), ("start", 2), ("start", 3)]  # no slot lost, none started twice
    assert all(e["cold_start_s"] > 0 for e in ev if e["event"] == "ready")  # measured
    assert agent.starts == {2: 1, 3: 1}
    rows = [json.loads(ln) for ln in (tmp_path / "scheduler0.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok"] * 10  # none lost


def test_two_schedulers_share_the_lease_exactly_one_starts_each_slot(cluster, tmp_path):
    local, urls, agent = cluster
    locks = tmp_path / "locks"
    scheds = [_scheduler(local, tmp_path, j, urls, agent, "predictive", "block_oracle", locks) for j in range(2)]
    for s in scheds:  # every prediction is over the SLO: each scheduler's controller asks for the back pool
        _complete(s, 2)
    logs = [tmp_path / f"provision{j}.jsonl" for j in range(2)]
    _wait_active(logs, {2, 3})
    for s in scheds:  # both route to the grown pool
        served = _complete(s, 12)
        assert {r.headers["x-block-num-active"] for r in served} == {"4"}
        assert {int(r.headers["x-block-instance"]) for r in served} & {2, 3}
    ev = [e for p in logs for e in _events(p)]
    for slot in (2, 3):  # one scheduler started it, the other adopted it
        assert len([e for e in ev if e["event"] == "start" and e["instance"] == slot]) == 1
        assert len([e for e in ev if e["event"] == "ready" and e["instance"] == slot]) == 1
        assert len([e for e in ev if e["event"] == "adopt" and e["instance"] == slot]) == 1
    assert agent.starts == {2: 1, 3: 1}
    assert sorted(os.listdir(locks)) == ["slot2.json", "slot2.lock", "slot3.json", "slot3.lock"]


def test_lease_is_exclusive_and_scale_down_drains_the_last_added(tmp_path):
    a, b = SlotLease(str(tmp_path)), SlotLease(str(tmp_path))
    assert a.claim(5) and not b.claim(5) and not a.claim(5)
    assert b.read(5) is None
    a.publish(5, {"url": "http://127.0.0.1:1"})
    assert b.read(5) == {"url": "http://127.0.0.1:1"}
    assert b.claim(5, "stop") and not a.claim(5, "stop")  # the stop lease is another one, as exclusive
    b.release(5)  # after the stop: nothing published, both leases free again
    assert a.read(5) is None and not os.listdir(tmp_path) and a.claim(5)
    asyncio.run(_calm_drains_the_last_added())


async def _calm_drains_the_last_added() -> None:
    # the controller's scale-down on the live pool: calm latencies drain the last added slot, never the initial
    ctl = ProvisioningController(ProvisioningConfig(strategy="reactive", initial_instances=1, slo_s=10.0,
                                                    scale_down=True, scale_down_window_s=5.0))
    pool = LivePool(ctl, 3, starter=None, lease=SlotLease(None))  # type: ignore[arg-type]
    ctl.start(pool)
    pool._activate(1, "http://127.0.0.1:2", "adopt")  # as if slot 1 had been started and published
    assert pool.active == [0, 1] and ctl.added == [1]

    for t in (0.0, 2.0, 6.0):  # 1 s latencies, far under half the SLO, for longer than the window
        ctl.on_finish(pool, Finished(t, None, t + 1.0), t + 1.0)
    assert pool.active == [0] and [e["event"] for e in pool.events][-1] == "remove" and 1 in pool.draining
    assert 1 not in pool.back_pool()  # draining: not added again before it is stopped
    await pool.close()


def test_agent_lease_endpoints_validate_and_settle():
    """The agent's slot leases (mode=deploy's AgentLease) over real HTTP: first claimant wins, publish/read/release,
    every bad request an OpenAI-style 4xx, and wait_settled until the start has its outcome and the drain is over."""
    from block.scheduler.provisioning import AgentLease

    with ProvisionAgent(lambda i: "http://127.0.0.1:9", range(2, 4), token="tok-abcdefgh") as agent:
        a, b = AgentLease(agent.url, "tok-abcdefgh", who="a"), AgentLease(agent.url, "tok-abcdefgh", who="b")
        assert a.claim(2) and not b.claim(2) and not a.claim(2) and b.claim(2, "stop")
        assert b.read(2) is None and not agent.wait_settled(0.3)  # a start without its outcome
        a.publish(2, {"url": "http://127.0.0.1:9"})
        assert b.read(2) == {"url": "http://127.0.0.1:9"} and agent.wait_settled(5.0)  # the start's outcome
        b.publish(2, {"url": "http://127.0.0.1:9", "state": "draining"})
        assert not agent.wait_settled(0.3)  # a drain not over
        b.release(2)
        assert a.read(2) is None and agent.wait_settled(5.0) and a.claim(2)
        auth = {"authorization": "Bearer tok-abcdefgh"}
        with httpx.Client(base_url=agent.url, timeout=10) as c:
            bad = [c.post("/leases/2/start", json={"by": "x"}),  # no token
                   c.post("/leases/9/start", headers=auth, json={}),  # not a back-pool slot
                   c.post("/leases/2/steal", headers=auth, json={}),
                   c.put("/leases/2", headers=auth, content=b"[1]"),  # not an object
                   c.put("/leases/2", headers=auth, content=b"{"),
                   c.put("/leases/2", headers=auth, content=b"x" * 70_000),
                   c.delete("/slots/2", headers=auth)]  # this agent cannot stop slots
            assert [r.status_code for r in bad] == [401, 404, 404, 400, 400, 413, 501]
            assert all(set(r.json()["error"]) == {"message", "type", "code"} for r in bad)
            assert c.get("/health").status_code == 200  # open, as every service's


def _calm(ctl: ProvisioningController, pool: LivePool, t: float) -> None:
    """Latencies far under half the SLO for longer than the scale-down window: the last added slot is removed."""
    for dt in (0.0, 2.0, 10.0):
        ctl.on_finish(pool, Finished(t + dt, None, t + dt + 1.0), t + dt + 1.0)


async def _until(cond, what, timeout_s: float = 300.0) -> None:
    """Wait until ``cond()``; ``what()`` says what was missing."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what()
        await asyncio.sleep(0.05)


def test_scale_down_drains_the_slot_then_stops_it_once(tmp_path):
    """Scale-down stops the instance, after its in-flight request is served whole. Two schedulers share one lease
    directory and both scale the slot down: one drains and stops it (one stop), the other only drops it; the stop is
    in the records (provisioning table, summary); adding the slot again starts it anew."""
    from omegaconf import OmegaConf

    from experiments.provision_live import provisioning_records

    with LocalStack(tmp_path / "logs", env=dict.fromkeys(TOKEN_VARS), startup_timeout_s=180) as local:
        _instance(local, 0)
        slots = _Slots(local, time_scale=1.0)  # real time: a 300-token answer takes seconds, it is in flight
        with ProvisionAgent(slots.start, range(1, 2), stop_slot=slots.stop) as agent:
            asyncio.run(scale_down_twice(tmp_path, agent, lambda: AgentStarter(agent.url),
                                         lambda: SlotLease(str(tmp_path / "locks")), 2))
    events = [_events(tmp_path / f"prov{j}.jsonl") for j in range(2)]
    every = [(e["event"], e["instance"]) for ev in events for e in ev if e["instance"] == 1]
    assert every.count(("stopped", 1)) == 1 and every.count(("drain", 1)) == 1 and every.count(("start", 1)) == 2
    cfg = OmegaConf.create({"mode": {"time_scale": 1.0}, "seed": 0, "provisioning": {"initial_instances": 1}})
    _, prov, summary = provisioning_records(
        cfg, None, pd.DataFrame({"id": pd.Series([], dtype=int), "dispatch_s": pd.Series([], dtype=float)}), 2,
        agent.starts, agent.stops, logs=[(tmp_path / "none.jsonl", tmp_path / f"prov{j}.jsonl") for j in range(2)])
    stopped = prov[prov["event"] == "stopped"]
    assert len(stopped) == 1 and stopped["drain_s"].iloc[0] > 0 and stopped["in_flight_left"].iloc[0] == 0
    assert summary["instances_stopped"] == 1 and summary["provision_stops"] == {"1": 1}


async def scale_down_twice(tmp: Path, agent: ProvisionAgent, starter, lease, n: int, token: str | None = None) -> None:
    """Two schedulers' pools over ``n`` slots, the last one the back pool, started through ``agent`` (``starter()``
    and ``lease()`` make each pool's): the slot starts once, serves a long streamed answer while both pools scale it
    down, the answer arrives whole, then exactly one stop; the slot is gone, back in both back pools, and starts
    again when asked. Events go to ``tmp/prov<j>.jsonl``. Shared with the deploy test (the agent there is reached
    through ssh and starts slots with hostctl)."""
    slot = n - 1
    pools = []
    for j in range(2):
        ctl = ProvisioningController(ProvisioningConfig(strategy="reactive", initial_instances=n - 1, slo_s=10.0,
                                                        scale_down=True, scale_down_window_s=5.0))
        pool = LivePool(ctl, n, starter(), lease(), event_log=str(tmp / f"prov{j}.jsonl"), poll_s=0.05,
                        drain_grace_s=0.2)
        ctl.start(pool)
        await pool.start()
        pools.append((ctl, pool))
    (ca, a), (cb, b) = pools
    ca.on_finish(a, Finished(0.0, None, 20.0), 20.0)  # 20 s > the 10 s SLO: the back slot starts
    await _until(lambda: slot in a.active and slot in b.active, lambda: f"slot not active: {a.events} {b.events}")
    url = a.urls[slot]
    auth = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=300, trust_env=False, headers=auth) as client:
        async with client.stream("POST", f"{url}/v1/completions", json={
                "prompt": [7] * 16, "max_tokens": 300, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            chunks = r.aiter_lines()
            got = [await chunks.__anext__()]  # the request is in flight on the slot
            _calm(ca, a, 30.0)  # both schedulers scale the slot down while it serves the request
            _calm(cb, b, 30.0)
            assert slot not in a.active and slot not in b.active and slot in a.draining
            removed = time.time()
            got += [line async for line in chunks]
        done = time.time()
    got = [g for g in got if g]
    text = [json.loads(g[6:]) for g in got if g.startswith("data: {")]
    assert got[-1] == "data: [DONE]", got[-3:]
    assert text[-1]["choices"][0]["finish_reason"] == "length"  # served whole: not cut off by the stop
    assert done - removed > 0.5  # it was in flight while the slot drained (300 decode steps, seconds)
    await _until(lambda: any(e["event"] == "stopped" for p in (a, b) for e in p.events),
                 lambda: f"slot never stopped: {a.events} {b.events}")
    stopped = next(e for p in (a, b) for e in p.events if e["event"] == "stopped")
    assert stopped["in_flight_left"] == 0 and agent.stops == {slot: 1}
    with pytest.raises(httpx.ConnectError):  # the slot's predictor is gone
        httpx.get(f"{url}/health", timeout=5)
    assert slot in a.back_pool() and slot in b.back_pool()
    assert await asyncio.to_thread(lease().read, slot) is None  # the lease is released: nothing published
    ca.on_finish(a, Finished(50.0, None, 70.0), 70.0)  # slow again: the slot starts anew
    await _until(lambda: slot in a.active, lambda: f"slot not restarted: {a.events}")
    assert agent.starts == {slot: 2}
    for p in (a, b):
        await p.close()


@pytest.mark.parametrize("schedulers", [1, 2])
def test_emulated_fig8_run_records_the_pool_and_draws(tmp_path, schedulers):
    cmd = [sys.executable, "-m", "experiments.run", "mode=emulate", f"output_root={tmp_path}", "progress=false",
           f"cluster.num_instances={N}", "workload.num_requests=16", "workload.qps=2", "mode.time_scale=4",
           "policy=block_oracle", "provisioning=reactive", f"provisioning.initial_instances={INITIAL}",
           "provisioning.slo_s=0.001", "mode.startup_timeout_s=240", f"mode.num_schedulers={schedulers}",
           f"hydra.run.dir={tmp_path}/run"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k not in TOKEN_VARS})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["completed"] == 16 and s["failed"] == 0
    assert s["instances_added"] == 2 and s["instances_failed"] == 0 and s["provision_starts"] == {"2": 1, "3": 1}
    assert s["mean_cold_start_s"] > 0
    prov = pd.read_parquet(run / "provisioning.parquet")
    assert sorted(prov.loc[prov["event"] == "start", "instance"]) == [2, 3]  # one start per slot, all schedulers
    assert set(prov["scheduler_index"]) == set(range(schedulers))
    assert prov["time_s"].is_monotonic_increasing
    req = pd.read_parquet(run / "requests.parquet")
    assert req["num_active"].notna().all() and req["num_active"].iloc[0] == INITIAL
    out = subprocess.run([sys.executable, "-m", "analysis.fig8", str(run)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    tab = pd.read_csv(next(run.rglob("fig8.csv")))
    assert tab["variant"].tolist() == ["reactive"] and tab["instances_added"].tolist() == [2]


def test_command_provisioner_uses_the_printed_url_and_records_a_failed_start(cluster, tmp_path):
    """--provision-command: slot 2's command prints a running predictor's URL, slot 3's exits 3. Slot 3 is recorded
    as failed and never routed to; every request is still served."""
    local, urls, agent = cluster
    spare = _instance(local, 2)  # what the command "starts" (in deploy: a fab task on the slot's host)
    cmd = (f"{sys.executable} -c \"import sys; s = sys.argv[1]; print('starting', s); "
           f"sys.exit(3) if s == '3' else print('{spare}')\" {{slot}}")
    conf = tmp_path / "provisioning.yaml"
    conf.write_text("enabled: true\nstrategy: reactive\nslo_s: 0.001\n")
    s = local.start("scheduler", "block.scheduler", [
        "--instances", ",".join(urls), "--policy", "round_robin", "--tokenizer", "none", "--provision-config",
        str(conf), "--provision-slots", str(N), "--provision-command", cmd,
        "--provision-log", str(tmp_path / "provision0.jsonl")]).wait_healthy()
    _complete(str(s.url), 2)  # slots 2 and 3 are asked for
    deadline = time.monotonic() + 300
    while not {"ready", "failed"} <= {e["event"] for e in _events(tmp_path / "provision0.jsonl")}:
        assert time.monotonic() < deadline, _events(tmp_path / "provision0.jsonl")
        time.sleep(0.2)
    ev = _events(tmp_path / "provision0.jsonl")
    assert [(e["event"], e["instance"]) for e in ev if e["event"] in ("ready", "failed")] in \
        ([("ready", 2), ("failed", 3)], [("failed", 3), ("ready", 2)])
    assert "exited 3" in next(e["error"] for e in ev if e["event"] == "failed")
    served = _complete(str(s.url), 6)
    assert {int(r.headers["x-block-instance"]) for r in served} == {0, 1, 2}
    assert {r.headers["x-block-num-active"] for r in served} == {"3"}
    assert agent.starts == {}  # nothing went through the agent


@pytest.mark.parametrize("argv, message", [
    (["--provision-slots", "4"], "needs --provision-config"),
    (["--provision-config", "{conf}", "--provision-slots", "1"], "must be >= the 2 --instances"),
    (["--provision-config", "{conf}", "--provision-slots", "4"], "needs a way to start it"),
    (["--provision-config", "{bad}", "--provision-slots", "2"], "slo_s=-1 must be > 0"),
    (["--provision-config", "{typo}", "--provision-slots", "2"], "provisioning config"),
    (["--provision-config", "{pred}", "--provision-slots", "2", "--policy", "round_robin"], "predicts none"),
    (["--provision-config", "{conf}", "--provision-slots", "4", "--provision-command", "x",
      "--provision-agent-lease"], "--provision-agent-lease needs --provision-agent"),
    (["--provision-config", "{conf}", "--provision-slots", "4", "--provision-agent", "http://127.0.0.1:1",
      "--provision-stop-command", "x"], "--provision-stop-command needs --provision-command"),
    (["--provision-config", "{conf}", "--provision-slots", "4", "--provision-agent", "http://127.0.0.1:1",
      "--provision-drain-timeout-s", "-1"], "drain-timeout-s=-1.0 must be >= 0"),
    (["--provision-agent-lease"], "needs --provision-config"),
])
def test_provisioning_flags_are_validated(tmp_path, argv, message):
    from block.scheduler.cli import build_parser, make_scheduler

    files = {"conf": "strategy: reactive\n", "bad": "slo_s: -1\n", "pred": "strategy: predictive\n",
             "typo": "slo_s: [1\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    argv = [a.format(**{k: tmp_path / f"{k}.yaml" for k in files}) for a in argv]
    args = build_parser().parse_args(["--instances", "http://127.0.0.1:1,http://127.0.0.1:2", *argv])
    with pytest.raises(ValueError, match=message):
        make_scheduler(args)
