"""hostctl against real detached processes: a tiny HTTP service script, real signals, no mocks.

The CLI cases run hostctl as a subprocess with captured pipes, as Fabric would over ssh: if a started
service inherited hostctl's stdout, subprocess.run would hang until its timeout instead of returning.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from block.deploy import hostctl
from block.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "tok-Zq81-very-secret-value"

SERVICE_SCRIPT = r'''
import argparse, http.server, os, subprocess, sys, time

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--delay", type=float, default=0.0)
p.add_argument("--marker")
p.add_argument("--exit-code", type=int)
p.add_argument("--never-healthy", action="store_true")
p.add_argument("--child-pid-file")
p.add_argument("--tag", default="")
a = p.parse_args()
if a.marker:
    with open(a.marker, "w") as f:
        f.write("present" if os.environ.get("BLOCK_API_TOKEN") else "absent")
print("svc starting on port", a.port, "tag", a.tag)
if a.exit_code is not None:
    print("boom: giving up", file=sys.stderr)
    sys.exit(a.exit_code)
if a.child_pid_file:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(a.child_pid_file, "w") as f:
        f.write(str(child.pid))
ready_at = time.monotonic() + a.delay

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/health" and not a.never_healthy and time.monotonic() >= ready_at
        self.send_response(200 if ok else 503)
        self.end_headers()
        self.wfile.write(b"ok" if ok else b"not yet")
    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", a.port), H).serve_forever()
'''


def alive(pid: int) -> bool:
    return hostctl.pid_alive(pid)


class Env:
    """A run directory with the service script, a state dir, and plan/CLI helpers."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.cwd = tmp_path / "run"
        self.cwd.mkdir()
        (self.cwd / "svc.py").write_text(SERVICE_SCRIPT)
        self.state_dir = tmp_path / "state"
        self.extra_pids: list[int] = []

    def service(self, name: str, role: str, *extra: str, port: int | None = None) -> dict:
        port = port or free_port()
        return {"name": name, "role": role, "url": f"http://127.0.0.1:{port}", "health": "/health",
                "argv": ["python", "svc.py", "--port", str(port), *extra], "env": {"SOME_NONSECRET": "1"}}

    def plan(self, *services: dict) -> dict:
        return {"host": "node-test", "run_id": "run-1", "cwd": str(self.cwd), "services": list(services)}

    def write_plan(self, plan: dict | str, name: str = "plan.json") -> Path:
        path = self.root / name
        path.write_text(plan if isinstance(plan, str) else json.dumps(plan))
        return path

    def cli(self, *args: str, stdin: str = "") -> tuple[int, dict, str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        p = subprocess.run([sys.executable, "-m", "block.deploy.hostctl", *args], input=stdin, cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=30, check=False)
        return p.returncode, json.loads(p.stdout), p.stdout + p.stderr

    def cleanup(self) -> None:
        hostctl.stop_services(self.state_dir, grace=1)
        for pid in self.extra_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.cleanup()


def by_name(out: dict) -> dict[str, dict]:
    return {s["name"]: s for s in out["services"]}


def all_text_under(path: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in path.rglob("*") if p.is_file())


def test_cli_start_secrets_status_kept_restarted_stop(env):
    eng = env.service("engine0", "engine", "--marker", "engine0.env", "--delay", "0.3")
    pred = env.service("predictor0", "predictor", "--marker", "predictor0.env")
    plan_file = env.write_plan(env.plan(eng, pred))
    t0 = time.monotonic()
    rc, out, text = env.cli("start", "--plan", str(plan_file), "--state-dir", str(env.state_dir),
                            "--timeout", "15", "--secrets-stdin", stdin=json.dumps({"BLOCK_API_TOKEN": SECRET}))
    assert rc == 0 and out["ok"], text
    assert time.monotonic() - t0 < 15  # returned although the services keep running (no fd held)
    assert out["host"] == "node-test"
    svcs = by_name(out)
    assert {n: s["action"] for n, s in svcs.items()} == {"engine0": "started", "predictor0": "started"}
    assert all(s["alive"] and s["healthy"] for s in svcs.values())
    assert (env.cwd / "engine0.env").read_text() == "present"  # relative path resolved in the plan cwd
    assert (env.cwd / "predictor0.env").read_text() == "present"
    states = {p.stem: json.loads(p.read_text()) for p in env.state_dir.glob("*.json")}
    assert set(states) == {"engine0", "predictor0"}
    st = states["engine0"]
    assert st["pid"] == st["pgid"] == svcs["engine0"]["pid"] and st["argv"][0] == sys.executable
    assert st["log"] == str(env.cwd / "logs" / "engine0.log") and st["run_id"] == "run-1"
    assert "svc starting" in Path(st["log"]).read_text()
    assert SECRET not in text and SECRET not in all_text_under(env.root)

    rc, out, _ = env.cli("status", "--state-dir", str(env.state_dir))
    assert rc == 0 and out["ok"]
    assert all(s["alive"] and s["healthy"] and s["action"] == "status" for s in out["services"])

    rc, out, _ = env.cli("logs", "--state-dir", str(env.state_dir), "--lines", "1")
    assert rc == 0 and all(len(s["log_tail"]) == 1 and "svc starting" in s["log_tail"][0] for s in out["services"])

    secrets = {"BLOCK_API_TOKEN": SECRET}
    again = hostctl.start_services(env.plan(eng, pred), env.state_dir, timeout=10, secrets=secrets)
    assert again["ok"] and {s["action"] for s in again["services"]} == {"kept"}
    assert by_name(again)["engine0"]["pid"] == svcs["engine0"]["pid"]

    old_pid = svcs["predictor0"]["pid"]
    pred2 = {**pred, "argv": pred["argv"] + ["--tag", "v2"]}
    changed = hostctl.start_services(env.plan(eng, pred2), env.state_dir, timeout=10, secrets=secrets)
    acts = {n: s["action"] for n, s in by_name(changed).items()}
    assert changed["ok"] and acts == {"engine0": "kept", "predictor0": "restarted"}
    assert by_name(changed)["predictor0"]["pid"] != old_pid and not alive(old_pid)

    rc, out, _ = env.cli("stop", "--state-dir", str(env.state_dir), "--grace", "2")
    assert rc == 0 and out["ok"]
    assert [(s["name"], s["action"]) for s in out["services"]] == [("predictor0", "stopped"), ("engine0", "stopped")]
    assert not any(alive(s["pid"]) for s in out["services"])
    rc, out, _ = env.cli("status", "--state-dir", str(env.state_dir))
    assert rc == 0 and out["ok"] and out["services"] == []


def test_exiting_service_fails_fast_with_exit_code_and_log_tail_others_keep_running(env):
    good = env.service("engine0", "engine")
    bad = env.service("engine1", "engine", "--exit-code", "3")
    t0 = time.monotonic()
    rc, out, text = env.cli("start", "--plan", str(env.write_plan(env.plan(good, bad))),
                            "--state-dir", str(env.state_dir), "--timeout", "20")
    assert rc == 1 and not out["ok"], text
    assert time.monotonic() - t0 < 10  # failed at once, not after the 20 s timeout
    s = by_name(out)
    assert s["engine1"]["exit_code"] == 3 and "exited with code 3" in s["engine1"]["error"]
    assert not s["engine1"]["alive"] and not s["engine1"]["healthy"]
    assert any("boom: giving up" in line for line in s["engine1"]["log_tail"])
    assert "engine1" in out["message"]
    assert s["engine0"]["healthy"] and alive(s["engine0"]["pid"])  # a failure does not stop the others


def test_never_healthy_times_out_with_clear_error(env):
    svc = env.service("engine0", "engine", "--never-healthy")
    out = hostctl.start_services(env.plan(svc), env.state_dir, timeout=1.0)
    s = out["services"][0]
    assert not out["ok"] and s["alive"] and not s["healthy"]
    assert "not healthy after 1s" in s["error"] and "HTTP 503" in s["error"]
    assert any("svc starting" in line for line in s["log_tail"])


def test_stop_kills_the_whole_process_group(env):
    svc = env.service("engine0", "engine", "--child-pid-file", "child.pid")
    out = hostctl.start_services(env.plan(svc), env.state_dir, timeout=10)
    assert out["ok"], out
    child_pid = int((env.cwd / "child.pid").read_text())
    env.extra_pids.append(child_pid)
    leader = out["services"][0]["pid"]
    assert alive(child_pid) and alive(leader)
    rc, out, text = env.cli("stop", "--state-dir", str(env.state_dir), "--grace", "2")
    assert rc == 0 and out["services"][0]["action"] == "stopped", text
    assert hostctl.wait_until(lambda: not alive(child_pid) and not alive(leader), 2)
    assert not list(env.state_dir.glob("*.json"))
    assert hostctl.status(env.state_dir)["services"] == []


def test_roles_filter_and_stop_order(env):
    eng = env.service("engine0", "engine")
    pred = env.service("predictor0", "predictor")
    sch = env.service("scheduler0", "scheduler")
    plan_file = env.write_plan(env.plan(eng, pred, sch))
    rc, out, text = env.cli("start", "--plan", str(plan_file), "--state-dir", str(env.state_dir),
                            "--roles", "engine", "--timeout", "10")
    assert rc == 0 and [s["name"] for s in out["services"]] == ["engine0"], text
    assert [s["name"] for s in hostctl.status(env.state_dir)["services"]] == ["engine0"]

    out = hostctl.start_services(env.plan(eng, pred, sch), env.state_dir, timeout=10)
    assert out["ok"] and [s["action"] for s in out["services"]] == ["kept", "started", "started"]

    out = hostctl.stop_services(env.state_dir, roles=["predictor"], grace=2)
    assert [(s["name"], s["action"]) for s in out["services"]] == [("predictor0", "stopped")]
    out = hostctl.stop_services(env.state_dir, names=["predictor0", "scheduler0", "engine0"], grace=2)
    assert [(s["name"], s["action"]) for s in out["services"]] == [
        ("scheduler0", "stopped"), ("engine0", "stopped"), ("predictor0", "not-running")]


def test_stale_state_and_pid_reuse_are_not_running(env):
    """A recorded pid that is gone, or now belongs to another process, is never signalled."""
    env.state_dir.mkdir()
    common = {"role": "engine", "argv": ["x"], "argv_hash": "h", "url": "http://127.0.0.1:9", "health": "/health",
              "log": str(env.cwd / "logs" / "x.log"), "run_id": "r", "started_at": time.time()}
    me = hostctl.proc_stat(os.getpid())
    reused = {"name": "reused", "pid": os.getpid(), "pgid": os.getpgid(0), "proc_start": me.start_time + 1, **common}
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = {"name": "dead", "pid": gone.pid, "pgid": gone.pid, "proc_start": None, **common}
    for st in (reused, dead):
        (env.state_dir / f"{st['name']}.json").write_text(json.dumps(st))
    out = hostctl.status(env.state_dir)
    assert not out["ok"] and all(not s["alive"] and not s["healthy"] for s in out["services"])
    out = hostctl.stop_services(env.state_dir, grace=1)
    assert out["ok"] and {s["action"] for s in out["services"]} == {"not-running"}
    assert not list(env.state_dir.glob("*.json"))  # we are still alive: nothing was signalled


@pytest.mark.parametrize("plan, stdin, needle", [
    ("{not json", "", "not valid JSON"),
    ({"cwd": "/tmp/x"}, "", "'services'"),
    ({"services": []}, "", "'cwd'"),
    ({"cwd": "/tmp/x", "services": [{"name": "e0", "role": "engine", "url": "http://h:1"}]}, "", "'argv'"),
    ({"cwd": "/tmp/x", "services": [{"name": "e0", "role": "engine", "url": "u", "argv": ["a"]}]},
     '{"BLOCK_API_TOKEN": 5}', "'BLOCK_API_TOKEN' must be a string"),
])
def test_bad_plan_or_secrets_exit_2_with_json(env, plan, stdin, needle):
    rc, out, text = env.cli("start", "--plan", str(env.write_plan(plan)), "--state-dir", str(env.state_dir),
                            "--secrets-stdin", stdin=stdin)
    assert rc == 2 and out["ok"] is False and out["services"] == [], text
    assert needle in out["message"]


def test_usage_error_exit_2_with_json(env):
    rc, out, _ = env.cli("start", "--state-dir", str(env.state_dir))
    assert rc == 2 and not out["ok"] and "--plan" in out["message"]
