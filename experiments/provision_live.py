"""Auto-provisioning in ``mode=emulate``: the agent the schedulers start back-pool slots through, their flags, and
the run records of a provisioned run (``num_active`` per request, ``provisioning.parquet``).

The agent (the scheduler's ``--provision-agent``):

``POST /slots/<i>`` starts slot ``i``'s engine and predictor through the run's ``LocalStack`` (so they are stopped
with the rest of the stack), waits for their health and answers ``{"url": <predictor URL>, "start_s": <seconds>}``.
A slot outside the back pool is a 404, a start that fails a 502, every error an OpenAI-style JSON body. The slot
lease (``--provision-lock-dir``) makes one scheduler start each slot; a second POST for a started slot answers the
same URL without starting anything (``starts`` counts real starts per slot). Binds 127.0.0.1; the stack's bearer
token, when set, is required.
"""

from __future__ import annotations

import hmac
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf


class ProvisionAgent:
    """Serves ``POST /slots/<i>`` on a free loopback port; ``start_slot(i)`` returns the slot's predictor URL."""

    def __init__(self, start_slot: Callable[[int], str], slots: range, token: Optional[str] = None) -> None:
        self.start_slot, self.slots, self.token = start_slot, slots, token
        self.urls: dict[int, str] = {}
        self.starts: dict[int, int] = {}
        self._locks = {i: threading.Lock() for i in slots}
        self._busy = 0
        self._idle = threading.Condition()
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:  # quiet: the scheduler's provisioning log has the events
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str, type_: str) -> None:
                self._answer(status, {"error": {"message": message, "type": type_, "code": status}})

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/health":
                    return self._answer(200, {"role": "provision_agent", "started": sorted(agent.urls)})
                self._error(404, f"no such path {self.path[:100]!r}", "not_found")

            def do_POST(self) -> None:  # noqa: N802
                if agent.token is not None:
                    got = (self.headers.get("authorization") or "").encode()
                    if not hmac.compare_digest(got, f"Bearer {agent.token}".encode()):
                        return self._error(401, "missing or invalid bearer token", "authentication_error")
                parts = self.path.strip("/").split("/")
                if len(parts) != 2 or parts[0] != "slots" or not parts[1].isdigit() \
                        or int(parts[1]) not in agent.slots:
                    return self._error(404, f"POST /slots/<i> with i in {agent.slots.start}.."
                                            f"{agent.slots.stop - 1}, not {self.path[:100]!r}", "not_found")
                i = int(parts[1])
                t0 = time.monotonic()
                try:
                    url = agent.start(i)
                except Exception as err:  # noqa: BLE001 - reported to the scheduler, which records the failure
                    return self._error(502, f"slot {i} did not start: {type(err).__name__}: {err}"[:2000],
                                       "upstream_error")
                self._answer(200, {"url": url, "start_s": time.monotonic() - t0})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self, i: int) -> str:
        with self._idle:
            self._busy += 1
        try:
            with self._locks[i]:
                if i not in self.urls:
                    self.starts[i] = self.starts.get(i, 0) + 1
                    self.urls[i] = self.start_slot(i)
                return self.urls[i]
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no slot is starting (False if one still is after ``timeout_s``)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout_s)

    def __enter__(self) -> "ProvisionAgent":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------------------------ emulate's wiring
def _write_yaml(path: Path, node: Any) -> str:
    path.write_text(OmegaConf.to_yaml(node, resolve=True))
    return str(path)


def provisioning_args(cfg: DictConfig, conf_dir: Path, agent_url: str, n: int, j: int) -> list[str]:
    """Scheduler ``j``'s auto-provisioning flags: the back pool starts through the agent; every scheduler shares
    one lock directory (one starts each slot, the others adopt it) and logs its events to ``provision<j>.jsonl``."""
    conf = _write_yaml(conf_dir / "provisioning.yaml", cfg.provisioning)
    return ["--provision-config", conf, "--provision-slots", str(n), "--provision-agent", agent_url,
            "--provision-lock-dir", str(conf_dir / "provision-locks"),
            "--provision-time-scale", str(float(cfg.mode.time_scale)),
            "--provision-log", str(conf_dir / f"provision{j}.jsonl"),
            "--provision-start-timeout-s", str(float(cfg.mode.startup_timeout_s))]


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def settle(agent: ProvisionAgent, conf_dir: Path, m: int, timeout_s: float) -> None:
    """At the end of a run: let the slot starts in flight finish and their scheduler record the outcome (ready or
    failed), so the records hold each start's measured cold start instead of a start cut off by the shutdown."""
    deadline = time.monotonic() + timeout_s
    agent.wait_idle(timeout_s)
    while time.monotonic() < deadline:
        ev = [e for j in range(m) for e in _jsonl(conf_dir / f"provision{j}.jsonl")]
        started = {e["instance"] for e in ev if e["event"] == "start"}
        ended = {e["instance"] for e in ev if e["event"] in ("ready", "ready_unused", "failed")}
        if started <= ended:
            return
        time.sleep(0.1)


PROVISIONING_COLUMNS = ["time_s", "event", "instance", "num_active", "scheduler_index", "cold_start_s", "wall"]


def provisioning_records(cfg: DictConfig, conf_dir: Path, requests: pd.DataFrame, m: int,
                         starts: Mapping[int, int]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(requests with ``num_active``, the ``provisioning`` table, summary keys) of a live provisioned run.

    ``num_active`` is what the scheduler that routed a request could route to at dispatch (its log row); the
    events are every scheduler's (``scheduler_index``). Both are put on the client's model-time axis: the
    schedulers log wall-clock times, the client counts from its own start, found as the median over the requests of
    (the scheduler's arrival wall time - the client's dispatch time / time_scale). ``starts``: real starts per slot
    (the agent's count: 1 each when the lease works)."""
    scale = float(cfg.mode.time_scale)
    prefix = f"bench-{int(cfg.seed)}-"
    rows = [r for j in range(m) for r in _jsonl(conf_dir / f"scheduler{j}.jsonl")
            if str(r.get("id", "")).startswith(prefix) and str(r["id"])[len(prefix):].isdigit()]
    sched = pd.DataFrame([{"id": int(str(r["id"])[len(prefix):]), "num_active": r.get("num_active"),
                           "wall": r.get("arrival_s")} for r in rows], columns=["id", "num_active", "wall"])
    sched = sched.drop_duplicates("id", keep="last")
    req = requests.drop(columns=[c for c in ("num_active",) if c in requests.columns])
    req = req.merge(sched[["id", "num_active"]], on="id", how="left")
    both = sched.merge(requests[["id", "dispatch_s"]], on="id").dropna()
    wall0 = float(np.median(both["wall"] - both["dispatch_s"] / scale)) if len(both) else math.nan
    ev = [dict(e, scheduler_index=j) for j in range(m) for e in _jsonl(conf_dir / f"provision{j}.jsonl")]
    prov = pd.DataFrame(ev, columns=PROVISIONING_COLUMNS)
    if len(prov) and math.isfinite(wall0):
        prov["time_s"] = (prov["wall"].astype(float) - wall0) * scale
        prov.loc[prov["event"] == "initial", "time_s"] = prov["time_s"].clip(upper=0.0)
    prov = prov.sort_values("time_s", kind="stable").reset_index(drop=True)
    ready = prov[prov["event"] == "ready"]
    active = pd.to_numeric(req["num_active"], errors="coerce")
    summary = {
        "instances_added": int(len(ready)),
        "instances_adopted": int((prov["event"] == "adopt").sum()),
        "instances_failed": int((prov["event"] == "failed").sum()),
        "max_active_instances": int(active.max()) if active.notna().any()
        else int(cfg.provisioning.initial_instances),
        "mean_cold_start_s": float(ready["cold_start_s"].mean()) if len(ready) else None,
        "provision_starts": {str(k): int(v) for k, v in sorted(starts.items())},
    }
    return req, prov, summary
