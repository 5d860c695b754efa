"""mode=emulate: the live stack on loopback runs a workload into the run-record format, and never leaves orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments.local_stack import LocalStack, StackError
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]


def _pgrep(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def _run(tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.run", "mode=emulate", f"output_root={tmp_path}", "progress=false",
           "cluster.num_instances=2", "workload.num_requests=24", "workload.qps=3", "mode.time_scale=4",
           f"hydra.run.dir={tmp_path}/run", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, **(env or {})})


def test_emulate_run_writes_records_and_stops_everything(tmp_path):
    p = _run(tmp_path, "policy=block_oracle", env={"BLOCK_API_TOKEN": "s3cret-token"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["mode"] == "emulate" and s["completed"] == 24 and s["failed"] == 0
    assert s["p99_ttft_ms"] > 0 and s["mean_itl_ms"] > 0 and s["median_itl_ms"] >= 0  # reads coalesce under load
    req = pd.read_parquet(run / "requests.parquet")
    assert len(req) == 24 and (req["status"] == "ok").all()
    assert set(req["instance"]) <= {0, 1} and req["predicted_e2e_s"].notna().all()
    assert (req["e2e_s"] >= req["ttft_s"]).all()
    inst = pd.read_parquet(run / "instances.parquet")
    assert set(inst["instance"]) == {0, 1}
    logs = run / "logs"
    assert {p.name for p in logs.iterdir()} >= {"engine0.log", "engine1.log", "predictor0.log", "scheduler0.log"}
    # the token (from the environment: mode.token is refused) is in no file the run wrote, .hydra/ included
    files = [f for f in run.rglob("*") if f.is_file()]
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "config.yaml"} <= {str(f.relative_to(run)) for f in files}
    assert [str(f) for f in files if b"s3cret-token" in f.read_bytes()] == []
    assert not _pgrep(str(run / "services"))  # no service survives the run


def test_ctrl_c_stops_every_service(tmp_path):
    cmd = [sys.executable, "-m", "experiments.run", "mode=emulate", f"output_root={tmp_path}", "progress=false",
           "cluster.num_instances=2", "workload.num_requests=400", "workload.qps=2", "mode.time_scale=1",
           f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = tmp_path / "run" / "logs" / "scheduler0.log"  # the scheduler starts last: the whole stack is up
        assert wait_until(lambda: log.exists() and "listening on" in log.read_text(errors="replace"), timeout=240)
        assert _pgrep(str(tmp_path / "run" / "services")), "the services should be running"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # a service left behind never exits by itself: waiting (generously) for the last ones to go races nothing
    assert wait_until(lambda: not _pgrep(str(tmp_path / "run" / "services")), timeout=30)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_service_that_fails_to_start_is_reported_and_nothing_is_left(tmp_path):
    with pytest.raises(StackError, match="engine0"):
        with LocalStack(tmp_path / "logs", startup_timeout_s=30) as stack:
            stack.start("ok", "block.engine", ["--time-scale", "10"])
            stack.start("engine0", "block.engine", ["--model", "no_such_model"])
    assert all(not s.alive() for s in stack.services)
