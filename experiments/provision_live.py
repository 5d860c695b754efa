"""Auto-provisioning in ``mode=emulate`` and ``mode=deploy``: the agent the schedulers start and stop back-pool
slots through, their flags, and the run records of a provisioned run (``num_active`` per request,
``provisioning.parquet``).

The agent (the scheduler's ``--provision-agent``), one per run, in the driver:

* ``POST /slots/<i>`` starts slot ``i``'s engine and predictor -- ``mode=emulate``: through the run's ``LocalStack``;
  ``mode=deploy``: through hostctl on the slot's host over ssh (``experiments.deploy``) -- waits for their health
  and answers ``{"url": <predictor URL>, "start_s": <seconds>}``. A second POST for a running slot answers the same
  URL without starting anything (``starts`` counts real starts per slot).
* ``DELETE /slots/<i>`` stops them (scale-down, after the scheduler drained the slot; ``stops`` counts them).
* ``/leases/<i>``: the slot lease of ``block.scheduler.provisioning.AgentLease`` (``--provision-agent-lease``):
  ``POST /leases/<i>/start|stop`` with ``{"by"}`` answers ``{"claimed", "by"}`` (the first claimant wins until the
  slot is released), ``PUT`` publishes the slot's state, ``GET`` reads it (404: nothing published), ``DELETE``
  releases the slot. ``mode=deploy`` uses it: its schedulers run on several hosts without a shared file system.

A slot outside the back pool is a 404, a start or stop that fails a 502, every error an OpenAI-style JSON body.
Binds 127.0.0.1 (``mode=deploy`` reaches it from the scheduler hosts through ssh tunnels); the run's bearer token,
when set, is required (``/health`` excepted).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from vidur.records import write_parquet, write_yaml

log = logging.getLogger("experiments.provision_live")


MAX_LEASE_BODY = 64 * 1024  # a lease's published state is a URL and a few numbers


class ProvisionAgent:
    """Serves the slots and their leases on a free loopback port (module docstring). ``start_slot(i)`` starts slot
    ``i`` and returns its predictor URL; ``stop_slot(i)`` (optional) stops it."""

    def __init__(self, start_slot: Callable[[int], str], slots: range, token: Optional[str] = None,
                 stop_slot: Optional[Callable[[int], None]] = None) -> None:
        self.start_slot, self.stop_slot, self.slots, self.token = start_slot, stop_slot, slots, token
        self.urls: dict[int, str] = {}
        self.starts: dict[int, int] = {}
        self.stops: dict[int, int] = {}
        self.leases: dict[int, dict[str, Any]] = {}  # slot -> {"start": who, "stop": who, "info": {...}}
        self._lease_lock = threading.Lock()
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

            def _authorized(self) -> bool:
                if agent.token is None:
                    return True
                got = (self.headers.get("authorization") or "").encode()
                if hmac.compare_digest(got, f"Bearer {agent.token}".encode()):
                    return True
                self._error(401, "missing or invalid bearer token", "authentication_error")
                return False

            def _slot(self, kind: str, tails: tuple[str, ...] = ("",)) -> Optional[tuple[int, str]]:
                """(slot, tail) of ``/<kind>/<i>[/<tail>]``, or None after answering 404."""
                parts = self.path.strip("/").split("/")
                if 2 <= len(parts) <= 3 and parts[0] == kind and parts[1].isdigit() \
                        and int(parts[1]) in agent.slots and (parts[2] if len(parts) == 3 else "") in tails:
                    return int(parts[1]), parts[2] if len(parts) == 3 else ""
                tail = "/" + "|".join(t for t in tails if t) if any(tails) else ""
                self._error(404, f"{self.command} /{kind}/<i>{tail} with i in {agent.slots.start}.."
                                 f"{agent.slots.stop - 1}, not {self.path[:100]!r}", "not_found")
                return None

            def _body(self) -> Optional[dict]:
                """The JSON object of the request body, or None after answering 400/413."""
                try:
                    n = int(self.headers.get("content-length") or 0)
                except ValueError:
                    n = -1
                if not 0 <= n <= MAX_LEASE_BODY:
                    self._error(413 if n > MAX_LEASE_BODY else 400, f"content-length must be 0..{MAX_LEASE_BODY}",
                                "invalid_request_error")
                    return None
                try:
                    doc = json.loads(self.rfile.read(n) or b"{}")
                except ValueError:
                    doc = None
                if not isinstance(doc, dict):
                    self._error(400, "the body must be a JSON object", "invalid_request_error")
                    return None
                return doc

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/health":
                    return self._answer(200, {"role": "provision_agent", "started": sorted(agent.urls)})
                if not self.path.startswith("/leases/"):
                    return self._error(404, f"no such path {self.path[:100]!r}", "not_found")
                if not self._authorized() or (at := self._slot("leases")) is None:
                    return
                info = agent.lease_info(at[0])
                if info is None:
                    return self._error(404, f"nothing published for slot {at[0]}", "not_found")
                self._answer(200, info)

            def do_POST(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                if self.path.startswith("/leases/"):
                    if (at := self._slot("leases", ("start", "stop"))) is None or (body := self._body()) is None:
                        return
                    return self._answer(200, agent.claim(at[0], at[1], str(body.get("by", "?"))[:200]))
                if (at := self._slot("slots")) is None:
                    return
                t0 = time.monotonic()
                try:
                    url = agent.start(at[0])
                except Exception as err:  # noqa: BLE001 - reported to the scheduler, which records the failure
                    return self._error(502, f"slot {at[0]} did not start: {type(err).__name__}: {err}"[:2000],
                                       "upstream_error")
                self._answer(200, {"url": url, "start_s": time.monotonic() - t0})

            def do_PUT(self) -> None:  # noqa: N802
                if not self._authorized() or (at := self._slot("leases")) is None or (body := self._body()) is None:
                    return
                agent.publish(at[0], body)
                self._answer(200, {"published": True})

            def do_DELETE(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                if self.path.startswith("/leases/"):
                    if (at := self._slot("leases")) is None:
                        return
                    agent.release(at[0])
                    return self._answer(200, {"released": True})
                if (at := self._slot("slots")) is None:
                    return
                if agent.stop_slot is None:
                    return self._error(501, "this agent cannot stop slots", "not_implemented")
                try:
                    stopped = agent.stop(at[0])
                except Exception as err:  # noqa: BLE001
                    return self._error(502, f"slot {at[0]} did not stop: {type(err).__name__}: {err}"[:2000],
                                       "upstream_error")
                self._answer(200, {"stopped": stopped})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ------------------------------------------------------------------ slots
    def _busy_call(self, fn: Callable[[], Any]) -> Any:
        with self._idle:
            self._busy += 1
        try:
            return fn()
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def start(self, i: int) -> str:
        """Slot ``i``'s URL, starting it unless it runs (one real start per slot however many ask)."""
        def go() -> str:
            with self._locks[i]:
                if i not in self.urls:
                    self.starts[i] = self.starts.get(i, 0) + 1
                    self.urls[i] = self.start_slot(i)
                return self.urls[i]
        return self._busy_call(go)

    def stop(self, i: int) -> bool:
        """Stop slot ``i`` if it runs (False: it did not)."""
        assert self.stop_slot is not None

        def go() -> bool:
            with self._locks[i]:
                if i not in self.urls:
                    return False
                self.stop_slot(i)
                self.stops[i] = self.stops.get(i, 0) + 1
                del self.urls[i]
                return True
        return self._busy_call(go)

    # ------------------------------------------------------------------ leases (scheduler: AgentLease)
    def claim(self, i: int, what: str, who: str) -> dict[str, Any]:
        """The first claimant of (slot, start|stop) wins until the slot is released."""
        with self._lease_lock:
            lease = self.leases.setdefault(i, {})
            if what in lease:
                return {"claimed": False, "by": lease[what]}
            lease[what] = who
            return {"claimed": True, "by": who}

    def publish(self, i: int, info: Mapping[str, Any]) -> None:
        with self._lease_lock:
            self.leases.setdefault(i, {})["info"] = dict(info)

    def lease_info(self, i: int) -> Optional[dict[str, Any]]:
        with self._lease_lock:
            info = self.leases.get(i, {}).get("info")
            return None if info is None else dict(info)

    def release(self, i: int) -> None:
        with self._lease_lock:
            self.leases.pop(i, None)

    def wait_settled(self, timeout_s: float) -> bool:
        """At the end of a run: until no slot is starting or stopping here, every claimed start has its outcome
        published and every drain is over (released, or published as stop_failed); False if not within
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        if not self.wait_idle(timeout_s):
            return False
        while time.monotonic() < deadline:
            with self._lease_lock:
                open_ = [i for i, lease in self.leases.items()  # a start without outcome, a drain not over
                         if ("start" in lease and "info" not in lease)
                         or ("stop" in lease and lease.get("info", {}).get("state") == "draining")]
            if not open_:
                return True
            time.sleep(0.1)
        return False

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no slot is starting or stopping (False if one still is after ``timeout_s``)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout_s)

    def __enter__(self) -> "ProvisionAgent":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------------------------ emulate's wiring
def provisioning_args(cfg: DictConfig, conf_dir: Path, agent_url: str, n: int, j: int) -> list[str]:
    """Scheduler ``j``'s auto-provisioning flags: the back pool starts through the agent; every scheduler shares
    one lock directory (one starts each slot, the others adopt it) and logs its events to ``provision<j>.jsonl``."""
    conf = write_yaml(conf_dir / "provisioning.yaml", cfg.provisioning)
    return ["--provision-config", conf, "--provision-slots", str(n), "--provision-agent", agent_url,
            "--provision-lock-dir", str(conf_dir / "provision-locks"),
            "--provision-time-scale", str(float(cfg.mode.time_scale)),
            "--provision-log", str(conf_dir / f"provision{j}.jsonl"),
            "--provision-start-timeout-s", str(float(cfg.mode.startup_timeout_s))]


# ------------------------------------------------------------------------------------------------ deploy's wiring
BACK_POOL_PLAN = "backpool.json"  # beside plan.json in each host's run folder: the services started on demand


class DeployBackPool:
    """``mode=deploy``'s back pool: the agent runs here, in the deploy driver, and starts a slot by running hostctl
    on the slot's host over the run's ssh connections (engine, then predictor, each awaited healthy: the cold start
    a scheduler measures is that); scale-down stops them the same way.

    The schedulers run on other hosts: each scheduler host reaches the agent on its own loopback through an ssh
    remote forward (``Fleet.reverse_tunnel``), so the driver needs no open port and the hosts no ssh keys. The
    agent is also the slot lease (``--provision-agent-lease``): schedulers on several hosts share no file system,
    and every one of them already calls the agent, so one start and one stop per slot is decided in one place.
    Use as a context manager around the run; :meth:`split` rewrites the run's plan before it is pushed."""

    def __init__(self, cfg: DictConfig, fleet: Any, hosts: Sequence[Any], secrets: Mapping[str, str],
                 token: Optional[str]) -> None:
        from block.deploy.inventory import scheduler_hosts

        self.cfg, self.fleet, self.secrets = cfg, fleet, dict(secrets)
        self.n, self.initial = int(cfg.cluster.num_instances), int(cfg.provisioning.initial_instances)
        self.timeout_s = float(cfg.mode.startup_timeout_s)
        self.sched_hosts = scheduler_hosts(hosts)
        self.agent = ProvisionAgent(self.start_slot, range(self.initial, self.n), token, stop_slot=self.stop_slot)
        self.agent_urls: dict[str, str] = {}  # scheduler host -> the agent's URL there
        self.slot_hosts: dict[int, str] = {}
        self.plan: Any = None
        self._planned = threading.Event()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "DeployBackPool":
        try:
            self._stack.enter_context(self.agent)
            for h in self.sched_hosts:
                port = self._stack.enter_context(self.fleet.reverse_tunnel(h, self.agent.port))
                self.agent_urls[h.name] = f"http://127.0.0.1:{port}"
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def split(self, plan: Any, staging: Path) -> None:
        """Move the back-pool slots' engines and predictors from each host's start plan into ``backpool.json``;
        the schedulers get the initial pool as ``--instances`` and the provisioning flags."""
        scale, n = float(self.cfg.mode.time_scale), self.n
        conf = write_yaml(Path(staging) / "provisioning.yaml", self.cfg.provisioning)
        back = {f"{role}{i}": i for i in range(self.initial, n) for role in ("engine", "predictor")}
        for host, hp in plan.plans.items():
            mine = [svc for svc in hp["services"] if svc["name"] in back]
            hp["services"] = [svc for svc in hp["services"] if svc["name"] not in back]
            for svc in hp["services"]:
                if svc["role"] != "scheduler":
                    continue
                k, argv = int(svc["name"][len("scheduler"):]), svc["argv"]
                argv[argv.index("--instances") + 1] = ",".join(plan.predictor_urls[:self.initial])
                argv += ["--provision-config", "services/provisioning.yaml", "--provision-slots", str(n),
                         "--provision-agent", self.agent_urls[host], "--provision-agent-lease",
                         "--provision-time-scale", str(scale), "--provision-log", f"services/provision{k}.jsonl",
                         "--provision-start-timeout-s", str(self.timeout_s)]
            files = plan.files[host]
            files["plan.json"] = json.dumps(hp, indent=1).encode()
            files["services/provisioning.yaml"] = Path(conf).read_bytes()
            if mine:
                files[BACK_POOL_PLAN] = json.dumps({**hp, "services": mine}, indent=1).encode()
                self.slot_hosts.update({back[svc["name"]]: host for svc in mine})
        missing = sorted(set(range(self.initial, n)) - set(self.slot_hosts))
        if missing:
            raise ValueError(f"the plan has no services for back-pool slots {missing} (split twice?)")
        self.plan = plan
        self._planned.set()

    def _host(self, i: int) -> Any:
        if not self._planned.wait(self.timeout_s):
            raise RuntimeError("the run's plan was never made")
        return self.fleet.by_name[self.slot_hosts[i]]

    def start_slot(self, i: int) -> str:
        from block.deploy import ops

        h = self._host(i)
        for name in (f"engine{i}", f"predictor{i}"):  # the predictor's health needs its engine
            ops.start_named(self.fleet, h, self.plan.run_id, BACK_POOL_PLAN, [name], self.secrets, self.timeout_s)
        return str(self.plan.predictor_urls[i])

    def stop_slot(self, i: int) -> None:
        from block.deploy import ops

        ops.stop_named(self.fleet, self._host(i), [f"predictor{i}", f"engine{i}"])

    def settle(self) -> None:
        """After the replay: starts and stops in flight finish and their scheduler publishes the outcome."""
        if not self.agent.wait_settled(self.timeout_s):
            log.warning("provisioning: slot starts or stops still open after %.0f s", self.timeout_s)

    def records(self, run_dir: Path, src: Path) -> dict[str, Any]:
        """Add ``num_active`` to the collected ``requests.parquet`` (in ``src``), write ``provisioning.parquet``
        into ``run_dir`` from the schedulers' logs collected under ``hosts/<host>/services``; the summary keys."""
        m = int(self.cfg.mode.num_schedulers)
        logs = []
        for k in range(m):
            d = Path(run_dir) / "hosts" / self.sched_hosts[k % len(self.sched_hosts)].name / "services"
            logs.append((d / f"scheduler{k}.jsonl", d / f"provision{k}.jsonl"))
        req, prov, summary = provisioning_records(self.cfg, None, pd.read_parquet(src / "requests.parquet"), m,
                                                  self.agent.starts, self.agent.stops, logs)
        write_parquet(src / "requests.parquet", req)
        write_parquet(Path(run_dir) / "provisioning.parquet", prov)
        return summary


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def settle(agent: ProvisionAgent, conf_dir: Path, m: int, timeout_s: float) -> None:
    """At the end of a run: let the slot starts and scale-down stops in flight finish and their scheduler record the
    outcome (ready or failed; stopped, stop_failed or kept_running), so the records hold each start's measured cold
    start and each stop instead of one cut off by the shutdown."""
    deadline = time.monotonic() + timeout_s
    agent.wait_idle(timeout_s)
    while time.monotonic() < deadline:
        ev = [e for j in range(m) for e in _jsonl(conf_dir / f"provision{j}.jsonl")]
        seen = {(e["event"], e["instance"]) for e in ev}
        if all(any((end, i) in seen for end in ends) for begin, ends in SETTLED.items()
               for (b, i) in seen if b == begin):
            return
        time.sleep(0.1)


# a provisioning event that starts something -> the events that end it
SETTLED = {"start": ("ready", "ready_unused", "failed"), "drain": ("stopped", "stop_failed", "kept_running")}
PROVISIONING_COLUMNS = ["time_s", "event", "instance", "num_active", "scheduler_index", "cold_start_s", "drain_s",
                        "in_flight_left", "wall"]


def provisioning_records(cfg: DictConfig, conf_dir: Optional[Path], requests: pd.DataFrame, m: int,
                         starts: Mapping[int, int], stops: Optional[Mapping[int, int]] = None,
                         logs: Optional[Sequence[tuple[Path, Path]]] = None,
                         ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(requests with ``num_active``, the ``provisioning`` table, summary keys) of a live provisioned run.

    ``num_active`` is what the scheduler that routed a request could route to at dispatch (its log row); the
    events are every scheduler's (``scheduler_index``). Both are put on the client's model-time axis: the
    schedulers log wall-clock times, the client counts from its own start, found as the median over the requests of
    (the scheduler's arrival wall time - the client's dispatch time / time_scale). ``starts`` / ``stops``: real
    starts and stops per slot (the agent's count: 1 each when the lease works). ``logs``: (request log, provisioning
    log) of each scheduler, default ``conf_dir/scheduler<j>.jsonl`` and ``conf_dir/provision<j>.jsonl``
    (``mode=deploy`` collects them from the scheduler hosts)."""
    if logs is None:
        assert conf_dir is not None
        logs = [(conf_dir / f"scheduler{j}.jsonl", conf_dir / f"provision{j}.jsonl") for j in range(m)]
    scale = float(cfg.mode.time_scale)
    prefix = f"bench-{int(cfg.seed)}-"
    rows = [r for req_log, _ in logs for r in _jsonl(req_log)
            if str(r.get("id", "")).startswith(prefix) and str(r["id"])[len(prefix):].isdigit()]
    sched = pd.DataFrame([{"id": int(str(r["id"])[len(prefix):]), "num_active": r.get("num_active"),
                           "wall": r.get("arrival_s")} for r in rows], columns=["id", "num_active", "wall"])
    sched = sched.drop_duplicates("id", keep="last")
    req = requests.drop(columns=[c for c in ("num_active",) if c in requests.columns])
    req = req.merge(sched[["id", "num_active"]], on="id", how="left")
    both = sched.merge(requests[["id", "dispatch_s"]], on="id").dropna()
    wall0 = float(np.median(both["wall"] - both["dispatch_s"] / scale)) if len(both) else math.nan
    ev = [dict(e, scheduler_index=j) for j, (_, prov_log) in enumerate(logs) for e in _jsonl(prov_log)]
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
        "instances_stopped": int((prov["event"] == "stopped").sum()),
        "max_active_instances": int(active.max()) if active.notna().any()
        else int(cfg.provisioning.initial_instances),
        "mean_cold_start_s": float(ready["cold_start_s"].mean()) if len(ready) else None,
        "provision_starts": {str(k): int(v) for k, v in sorted(starts.items())},
        "provision_stops": {str(k): int(v) for k, v in sorted((stops or {}).items())},
    }
    return req, prov, summary
