"""Host-side process control: start, stop and report the long-running services of one host.

Fabric uploads a plan file to a host and runs ``<venv>/bin/python -m block.deploy.hostctl <command> ...``
there over ssh.  This module is the remote half of that exchange, so it is deliberately self-contained:
it imports nothing else of the project and only the standard library at module level (httpx is imported
lazily, only by the commands that probe health), which keeps every ssh round trip short.

Contract with the caller:

* stdout carries exactly ONE JSON document per invocation
  (``{"host", "ok", "services": [...], "message"}``) so the caller can parse it;
  human diagnostics go to stderr.
* exit code 0 when ``ok``, 1 when not, 2 for usage / plan / secrets errors (still with the JSON document).
* services run detached (own session and process group, stdin from /dev/null, stdout+stderr appended to
  ``<plan cwd>/logs/<name>.log``, no inherited descriptors) so they outlive the ssh session and the ssh
  command returns as soon as hostctl exits.
* secrets (``--secrets-stdin``) only ever reach the services' environments; they are never written to
  state files, logs or the JSON output.

Commands: ``start``, ``stop``, ``status``, ``logs`` (see ``main``); the functions behind them
(``start_services``, ``stop_services``, ``status``, ``logs``) are usable in-process too.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

DEFAULT_HEALTH = "/health"
DEFAULT_START_TIMEOUT_S = 120.0
DEFAULT_GRACE_S = 10.0
DEFAULT_LOG_LINES = 50
FAILURE_LOG_LINES = 30
HEALTH_REQUEST_TIMEOUT_S = 2.0
POLL_INTERVAL_S = 0.15
KILL_WAIT_S = 5.0
# Stop dependants before what they depend on: schedulers call predictors and engines, predictors serve them.
ROLE_STOP_ORDER = {"scheduler": 0, "predictor": 1, "engine": 2}
# A secret value this long found verbatim in argv/env is certainly a leak, not a coincidence.
MIN_LEAK_CHECK_LEN = 8
LOCK_FILE = ".hostctl.lock"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HAS_PROC = os.path.exists("/proc/self/stat")
# Children started by this interpreter: polling them reaps zombies and yields exit codes (tests and
# in-process callers start services as their own children; the CLI's children are reparented on exit).
_CHILDREN: dict[int, subprocess.Popen] = {}


class PlanError(ValueError):
    """A bad plan, bad secrets or bad usage: the caller's input is wrong (exit code 2)."""


# ----------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ServiceSpec:
    """One service of a plan: how to launch it and where to ask whether it is ready."""

    name: str
    role: str
    argv: list[str]
    url: str
    health: str = DEFAULT_HEALTH
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None  # this service's own working directory (default: the plan's), e.g. shared by runs

    def workdir(self, plan: "Plan") -> Path:
        return self.cwd or plan.cwd

    @property
    def health_url(self) -> str:
        path = self.health if self.health.startswith("/") else "/" + self.health
        return self.url.rstrip("/") + path


@dataclass(frozen=True)
class Plan:
    """Everything one host runs for one run: the working directory and its services, in start order."""

    host: str
    run_id: str
    cwd: Path
    services: list[ServiceSpec]


def _require(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """Fetch a required key of the expected JSON type, or raise a PlanError that names it."""
    if key not in obj:
        raise PlanError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise PlanError(f"{where}: {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _str_map(value: Any, where: str) -> dict[str, str]:
    """Environment maps must be str -> str: anything else would fail later, inside Popen, less clearly."""
    if not isinstance(value, dict):
        raise PlanError(f"{where} must be an object of strings, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise PlanError(f"{where}: value of {k!r} must be a string, got {type(v).__name__}")
    return dict(value)


def parse_service(data: Any, index: int) -> ServiceSpec:
    """Validate one entry of plan["services"]; errors name the entry so a long plan is easy to fix."""
    where = f"plan services[{index}]"
    if not isinstance(data, dict):
        raise PlanError(f"{where} must be an object, got {type(data).__name__}")
    name = _require(data, "name", str, where)
    if not _NAME_RE.match(name):
        raise PlanError(f"{where}: name {name!r} must match {_NAME_RE.pattern} (it names files)")
    where = f"plan service {name!r}"
    argv = _require(data, "argv", list, where)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise PlanError(f"{where}: 'argv' must be a non-empty list of strings")
    health = data.get("health", DEFAULT_HEALTH)
    if not isinstance(health, str):
        raise PlanError(f"{where}: 'health' must be str")
    cwd = data.get("cwd")
    if cwd is not None and not (isinstance(cwd, str) and os.path.isabs(cwd)):
        raise PlanError(f"{where}: 'cwd' must be an absolute path, got {cwd!r}")
    return ServiceSpec(name=name, role=_require(data, "role", str, where), argv=list(argv),
                       url=_require(data, "url", str, where), health=health,
                       env=_str_map(data.get("env", {}), f"{where} 'env'"), cwd=Path(cwd) if cwd else None)


def parse_plan(data: Any) -> Plan:
    """Validate a decoded plan document; host and run_id are optional, cwd and services are not."""
    if not isinstance(data, dict):
        raise PlanError(f"plan must be a JSON object, got {type(data).__name__}")
    cwd = _require(data, "cwd", str, "plan")
    if not os.path.isabs(cwd):
        raise PlanError(f"plan: 'cwd' must be an absolute path, got {cwd!r}")
    raw_services = _require(data, "services", list, "plan")
    services = [parse_service(s, i) for i, s in enumerate(raw_services)]
    seen: set[str] = set()
    for s in services:
        if s.name in seen:
            raise PlanError(f"plan: duplicate service name {s.name!r}")
        seen.add(s.name)
    host = data.get("host") or socket.gethostname()
    run_id = data.get("run_id", "")
    if not isinstance(host, str) or not isinstance(run_id, str):
        raise PlanError("plan: 'host' and 'run_id' must be strings")
    return Plan(host=host, run_id=run_id, cwd=Path(cwd), services=services)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan file (PlanError on a missing file, bad JSON or bad content)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PlanError(f"cannot read plan {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"plan {path} is not valid JSON: {e}") from None
    return parse_plan(data)


def parse_secrets(text: str) -> dict[str, str]:
    """Decode the secrets document from stdin: one JSON object of string env vars, or nothing at all.

    Error messages name keys but never values, because they end up in the JSON output.
    """
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"secrets on stdin are not valid JSON ({e.msg} at char {e.pos})") from None
    return validate_secrets(data)


def validate_secrets(data: Any) -> dict[str, str]:
    """Secrets become environment variables: a JSON object of str -> str, nothing else."""
    if not isinstance(data, Mapping):
        raise PlanError(f"secrets must be a JSON object, got {type(data).__name__}")
    for k, v in data.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise PlanError(f"secret name {k!r} is not a valid environment variable name")
        if not isinstance(v, str):
            raise PlanError(f"secret {k!r} must be a string, got {type(v).__name__}")
    return dict(data)


def check_no_secret_in_spec(spec: ServiceSpec, secrets: Mapping[str, str]) -> None:
    """Refuse a plan that carries a secret value in argv or env: those are persisted and visible in ps."""
    visible = list(spec.argv) + list(spec.env.values())
    for key, value in secrets.items():
        if len(value) >= MIN_LEAK_CHECK_LEN and any(value in item for item in visible):
            raise PlanError(f"service {spec.name!r}: the value of secret {key!r} appears in its argv/env; "
                            "pass secrets only through --secrets-stdin")


def resolve_argv(argv: list[str]) -> list[str]:
    """"python" means the interpreter running hostctl, i.e. the project's venv on that host."""
    return [sys.executable, *argv[1:]] if argv and argv[0] == "python" else list(argv)


def launch_hash(argv: list[str], cwd: Path, env: Mapping[str, str]) -> str:
    """Fingerprint of what a launch would run; a change means the running process is stale.

    Covers the resolved argv, the cwd and the plan's (non-secret) env; secrets are deliberately left
    out so that nothing derived from them is ever persisted.
    """
    doc = json.dumps({"argv": argv, "cwd": str(cwd), "env": dict(env)}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- state


@dataclass
class ServiceState:
    """What hostctl remembers about a started service, one JSON file per service in the state dir."""

    name: str
    role: str
    pid: int
    pgid: int
    argv: list[str]
    argv_hash: str
    url: str
    health: str
    log: str
    run_id: str
    started_at: float
    proc_start: int | None = None  # field 22 of /proc/<pid>/stat: guards against PID reuse
    cwd: str = ""

    @property
    def health_url(self) -> str:
        return ServiceSpec(self.name, self.role, self.argv, self.url, self.health).health_url

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServiceState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def state_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def write_state(state_dir: Path, state: ServiceState) -> Path:
    """Atomic write (tmp + os.replace) so a concurrent reader never sees half a file."""
    path = state_path(state_dir, state.name)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(asdict(state), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def remove_state(state_dir: Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(state_dir, name).unlink()


def read_states(state_dir: Path) -> tuple[list[ServiceState], dict[str, str]]:
    """All state files in start order, plus {name: error} for files that cannot be read."""
    states: list[ServiceState] = []
    broken: dict[str, str] = {}
    if not state_dir.is_dir():
        return states, broken
    for path in sorted(state_dir.glob("*.json")):
        try:
            states.append(ServiceState.from_json(json.loads(path.read_text())))
        except FileNotFoundError:
            continue  # removed by a concurrent stop
        except (OSError, ValueError, TypeError) as e:
            broken[path.stem] = f"unreadable state file {path}: {e}"
    states.sort(key=lambda s: (s.started_at, s.name))
    return states, broken


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Serialise mutating commands on one state dir (e.g. a retried start racing a stop)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOCK_FILE, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ processes


class ProcStat(NamedTuple):
    state: str
    pgrp: int
    start_time: int


def proc_stat(pid: int) -> ProcStat | None:
    """Parse /proc/<pid>/stat (None when the process does not exist or /proc is unavailable).

    The command name (field 2) may contain spaces and parentheses, so split after the last ')'.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    try:
        return ProcStat(state=rest[0], pgrp=int(rest[2]), start_time=int(rest[19]))
    except (IndexError, ValueError):
        return None


def _reap_child(pid: int) -> int | None:
    """Exit code of one of our own children if it has exited (reaping it), else None."""
    proc = _CHILDREN.get(pid)
    return proc.poll() if proc is not None else None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True when pid runs, is not a zombie and (when known) is the same process we started."""
    if pid <= 0 or _reap_child(pid) is not None:
        return False
    if not _HAS_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    st = proc_stat(pid)
    if st is None or st.state == "Z":
        return False
    return start_time is None or st.start_time == start_time


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group; on non-Linux, [pgid] if the group exists at all."""
    if not _HAS_PROC:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = proc_stat(int(entry.name))
            if st is not None and st.pgrp == pgid and st.state != "Z":
                members.append(int(entry.name))
    return members


def owns_group(state: ServiceState) -> bool:
    """Whether the recorded process group still holds processes of OUR service.

    If the leader pid now belongs to another process (different start time), our group is gone for
    sure: Linux never hands out a pid that is still in use as a process-group id.  A dead leader with
    surviving group members (e.g. engine workers) still counts, so stop can clean them up.
    """
    _reap_child(state.pid)
    if state.proc_start is not None and _HAS_PROC:
        st = proc_stat(state.pid)
        if st is not None and st.state != "Z" and st.start_time != state.proc_start:
            return False
    return bool(group_members(state.pgid))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll predicate until true or timeout; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def terminate_group(state: ServiceState, grace: float) -> str | None:
    """SIGTERM the whole group, SIGKILL what is left after grace; returns an error or None."""
    def gone() -> bool:
        _reap_child(state.pid)
        return not group_members(state.pgid)

    try:
        _signal_group(state.pgid, signal.SIGTERM)
        if wait_until(gone, grace):
            return None
        print(f"hostctl: {state.name} ignored SIGTERM for {grace:g}s, sending SIGKILL", file=sys.stderr)
        _signal_group(state.pgid, signal.SIGKILL)
    except PermissionError as e:
        return f"cannot signal process group {state.pgid}: {e}"
    if wait_until(gone, KILL_WAIT_S):
        return None
    return f"process group {state.pgid} still alive after SIGKILL: pids {group_members(state.pgid)}"


def tail_lines(path: str | os.PathLike, n: int, max_bytes: int = 1 << 20) -> list[str]:
    """Last n lines of a (possibly huge) log file, reading backwards from the end."""
    if n <= 0:
        return []
    try:
        with open(path, "rb") as f:
            pos = f.seek(0, os.SEEK_END)
            data = b""
            while pos > 0 and data.count(b"\n") <= n and len(data) < max_bytes:
                step = min(8192, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-n:]


def log_path(plan: Plan, spec: ServiceSpec) -> Path:
    return spec.workdir(plan) / "logs" / f"{spec.name}.log"


def launch(spec: ServiceSpec, plan: Plan, secrets: Mapping[str, str]) -> tuple[ServiceState, subprocess.Popen]:
    """Start one service detached: own session/process group, stdin /dev/null, output to its log.

    close_fds (the default) plus redirected stdio means the child holds none of hostctl's descriptors,
    in particular not the ssh channel behind our stdout, so the ssh command returns when hostctl exits.
    """
    argv = resolve_argv(spec.argv)
    log = log_path(plan, spec)
    cwd = spec.workdir(plan)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **spec.env, **secrets, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"\n===== hostctl {stamp}: start {spec.name} (run {plan.run_id}): {shlex.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    _CHILDREN[proc.pid] = proc
    st = proc_stat(proc.pid)
    state = ServiceState(name=spec.name, role=spec.role, pid=proc.pid, pgid=proc.pid, argv=argv,
                         argv_hash=launch_hash(argv, cwd, spec.env), url=spec.url, health=spec.health,
                         log=str(log), run_id=plan.run_id, started_at=time.time(),
                         proc_start=st.start_time if st else None, cwd=str(cwd))
    return state, proc


# -------------------------------------------------------------------------------------------- reports


@dataclass
class ServiceReport:
    """One entry of the JSON "services" list."""

    name: str
    role: str
    pid: int | None
    alive: bool
    healthy: bool
    url: str
    log: str
    action: str
    error: str | None = None
    log_tail: list[str] | None = None
    exit_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Optional fields appear only when set, keeping the common case terse."""
        return {k: v for k, v in asdict(self).items()
                if v is not None or k not in ("error", "log_tail", "exit_code")}

    @classmethod
    def of(cls, state: ServiceState, action: str, **kw: Any) -> ServiceReport:
        kw.setdefault("alive", False)
        kw.setdefault("healthy", False)
        return cls(name=state.name, role=state.role, pid=state.pid, url=state.url, log=state.log,
                   action=action, **kw)


def result(host: str, ok: bool, reports: Iterable[ServiceReport], message: str) -> dict[str, Any]:
    return {"host": host, "ok": ok, "services": [r.to_json() for r in reports], "message": message}


def broken_reports(broken: Mapping[str, str], action: str) -> list[ServiceReport]:
    return [ServiceReport(name=n, role="", pid=None, alive=False, healthy=False, url="", log="",
                          action=action, error=e) for n, e in broken.items()]


def summarize(reports: list[ServiceReport], good: Callable[[ServiceReport], bool], what: str) -> str:
    """'3 services healthy' or '1 of 3 services not healthy: a (why)' -- the line a human reads first."""
    bad = [r for r in reports if not good(r)]
    if not reports:
        return "no services"
    if not bad:
        return f"{len(reports)} service(s) {what}"
    details = "; ".join(f"{r.name} ({r.error or 'failed'})" for r in bad)
    return f"{len(bad)} of {len(reports)} service(s) not {what}: {details}"


# ------------------------------------------------------------------------------------------- health


def probe(client: Any, url: str, timeout: float) -> tuple[bool, str]:
    """One unauthenticated GET; (True, '') on HTTP 200, else (False, why)."""
    import httpx

    try:
        r = client.get(url, timeout=timeout)
    except httpx.HTTPError as e:
        return False, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return (True, "") if r.status_code == 200 else (False, f"HTTP {r.status_code}")


def http_client() -> Any:
    """trust_env=False: a host's HTTP(S)_PROXY must not capture requests to its own services."""
    import httpx

    return httpx.Client(trust_env=False, timeout=HEALTH_REQUEST_TIMEOUT_S)


# --------------------------------------------------------------------------------------------- start


@dataclass
class _Launch:
    """Bookkeeping for one service during `start`: what was done and how its health wait ended."""

    spec: ServiceSpec
    state: ServiceState | None
    action: str
    proc: subprocess.Popen | None = None
    error: str | None = None
    exit_code: int | None = None
    healthy: bool = False
    last_probe: str = "no health check yet"
    log_tail: list[str] | None = None

    def report(self) -> ServiceReport:
        s = self.state
        return ServiceReport(name=self.spec.name, role=self.spec.role, pid=s.pid if s else None,
                             alive=self.exited() is None and s is not None and pid_alive(s.pid, s.proc_start),
                             healthy=self.healthy, url=self.spec.url, log=s.log if s else "",
                             action=self.action, error=self.error, log_tail=self.log_tail,
                             exit_code=self.exit_code)

    def exited(self) -> str | None:
        """Why the service's process is gone, or None while it runs."""
        if self.state is None:
            return "not started"
        if self.proc is not None:
            rc = self.proc.poll()
            return None if rc is None else f"exited with code {rc} during startup"
        return None if pid_alive(self.state.pid, self.state.proc_start) else "process exited"


def ensure_running(spec: ServiceSpec, plan: Plan, state_dir: Path, secrets: Mapping[str, str],
                   grace: float) -> _Launch:
    """Keep a matching live process, replace a stale one, or start afresh."""
    wanted = launch_hash(resolve_argv(spec.argv), spec.workdir(plan), spec.env)
    old = _read_one(state_dir, spec.name)
    action = "started"
    if old is not None:
        if pid_alive(old.pid, old.proc_start):
            if old.argv_hash == wanted:
                old.url, old.health, old.run_id = spec.url, spec.health, plan.run_id
                write_state(state_dir, old)
                return _Launch(spec, old, "kept")
            action = "restarted"
        if owns_group(old):  # the live stale process, or orphans of a dead leader
            err = terminate_group(old, grace)
            if err:
                return _Launch(spec, old, action, error=f"could not stop the previous process: {err}")
        remove_state(state_dir, spec.name)
    try:
        state, proc = launch(spec, plan, secrets)
    except OSError as e:
        return _Launch(spec, None, action, error=f"cannot execute {spec.argv[0]!r}: {e.strerror or e}")
    write_state(state_dir, state)
    return _Launch(spec, state, action, proc=proc)


def _read_one(state_dir: Path, name: str) -> ServiceState | None:
    try:
        return ServiceState.from_json(json.loads(state_path(state_dir, name).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        print(f"hostctl: ignoring unreadable state file for {name}: {e}", file=sys.stderr)
        return None


def wait_healthy(launches: list[_Launch], timeout: float) -> None:
    """Poll every live launch's health URL until all answer 200, one exits, or the deadline passes.

    A process that exits fails immediately (no point waiting out the timeout); the others keep
    being polled, because the caller wants to know the state of the whole host.
    """
    pending = [l for l in launches if l.error is None]
    deadline = time.monotonic() + timeout
    with http_client() as client:
        while pending:
            for l in list(pending):
                why = l.exited()
                if why is not None:
                    l.error = why
                    l.exit_code = l.proc.returncode if l.proc is not None else None
                    l.log_tail = tail_lines(l.state.log, FAILURE_LOG_LINES) if l.state else None
                    pending.remove(l)
                    continue
                remaining = deadline - time.monotonic()
                l.healthy, why = probe(client, l.spec.health_url, min(HEALTH_REQUEST_TIMEOUT_S, max(0.1, remaining)))
                if l.healthy:
                    pending.remove(l)
                else:
                    l.last_probe = why
            if not pending:
                return
            if time.monotonic() >= deadline:
                for l in pending:
                    l.error = f"not healthy after {timeout:g}s (GET {l.spec.health_url}: {l.last_probe})"
                    l.log_tail = tail_lines(l.state.log, FAILURE_LOG_LINES) if l.state else None
                return
            time.sleep(POLL_INTERVAL_S)


def start_services(plan: Plan | Mapping[str, Any], state_dir: str | os.PathLike,
                   roles: Iterable[str] | None = None, timeout: float = DEFAULT_START_TIMEOUT_S,
                   secrets: Mapping[str, str] | None = None, grace: float = DEFAULT_GRACE_S,
                   names: Iterable[str] | None = None) -> dict[str, Any]:
    """Bring the plan's services (optionally only some roles, or some names: a back-pool slot started on demand)
    up and wait until they are healthy.

    Never stops healthy services because another failed: the caller must be able to see (and decide
    what to do about) a half-started cluster.
    """
    plan = plan if isinstance(plan, Plan) else parse_plan(plan)
    secrets = validate_secrets(secrets) if secrets else {}
    role_set = set(roles) if roles is not None else None
    name_set = set(names) if names is not None else None
    if name_set is not None and name_set - {s.name for s in plan.services}:
        raise PlanError(f"the plan has no service {', '.join(sorted(name_set - {s.name for s in plan.services}))}")
    specs = [s for s in plan.services if (role_set is None or s.role in role_set)
             and (name_set is None or s.name in name_set)]
    for spec in specs:
        check_no_secret_in_spec(spec, secrets)
    state_dir = Path(state_dir)
    for spec in specs:
        spec.workdir(plan).mkdir(parents=True, exist_ok=True)
    with locked(state_dir):
        launches = [ensure_running(s, plan, state_dir, secrets, grace) for s in specs]
    wait_healthy(launches, timeout)
    reports = [l.report() for l in launches]
    ok = all(r.healthy for r in reports)
    message = summarize(reports, lambda r: r.healthy, "healthy") if specs else "no services selected"
    return result(plan.host, ok, reports, message)


# ---------------------------------------------------------------------------------------------- stop


def stop_order(state: ServiceState) -> tuple[int, float]:
    """Schedulers, then predictors, then engines, then anything else; latest-started first within a role."""
    return ROLE_STOP_ORDER.get(state.role, len(ROLE_STOP_ORDER)), -state.started_at


def stop_one(state_dir: Path, state: ServiceState, grace: float) -> ServiceReport:
    if not owns_group(state):
        remove_state(state_dir, state.name)
        return ServiceReport.of(state, "not-running")
    err = terminate_group(state, grace)
    if err:
        return ServiceReport.of(state, "stopped", alive=pid_alive(state.pid, state.proc_start), error=err)
    remove_state(state_dir, state.name)
    return ServiceReport.of(state, "stopped")


def stop_services(state_dir: str | os.PathLike, names: Iterable[str] | None = None,
                  roles: Iterable[str] | None = None, grace: float = DEFAULT_GRACE_S,
                  host: str | None = None) -> dict[str, Any]:
    """Stop recorded services (all, or those matching names/roles), dependants first.

    Requested names without a state file are reported as "not-running" so stop is idempotent.
    """
    state_dir = Path(state_dir)
    name_set = set(names) if names is not None else None
    role_set = set(roles) if roles is not None else None
    with locked(state_dir):
        states, broken = read_states(state_dir)
        chosen = [s for s in states if (name_set is None or s.name in name_set)
                  and (role_set is None or s.role in role_set)]
        reports = [stop_one(state_dir, s, grace) for s in sorted(chosen, key=stop_order)]
    # An unreadable file has no known role, so only an unfiltered or by-name stop reports it.
    if role_set is None:
        reports += broken_reports({n: e for n, e in broken.items() if name_set is None or n in name_set}, "stopped")
    missing = (name_set or set()) - {s.name for s in states} - set(broken)
    reports += [ServiceReport(name=n, role="", pid=None, alive=False, healthy=False, url="", log="",
                              action="not-running") for n in sorted(missing)]
    ok = all(r.error is None for r in reports)
    message = summarize(reports, lambda r: r.error is None, "stopped cleanly")
    return result(host or socket.gethostname(), ok, reports, message)


# -------------------------------------------------------------------------------------- status, logs


def status(state_dir: str | os.PathLike, host: str | None = None) -> dict[str, Any]:
    """Liveness and health of every recorded service; read-only (stale files are reported, not removed)."""
    states, broken = read_states(Path(state_dir))
    reports: list[ServiceReport] = []
    client = http_client() if states else None
    try:
        for s in states:
            alive = pid_alive(s.pid, s.proc_start)
            healthy, why = probe(client, s.health_url, HEALTH_REQUEST_TIMEOUT_S) if alive else (False, "")
            error = None if healthy else (f"GET {s.health_url}: {why}" if alive else "process not running")
            reports.append(ServiceReport.of(s, "status", alive=alive, healthy=healthy, error=error))
    finally:
        if client is not None:
            client.close()
    reports += broken_reports(broken, "status")
    ok = all(r.alive and r.healthy for r in reports)
    return result(host or socket.gethostname(), ok, reports, summarize(reports, lambda r: r.healthy, "healthy"))


def logs(state_dir: str | os.PathLike, lines: int = DEFAULT_LOG_LINES, host: str | None = None) -> dict[str, Any]:
    """Each recorded service's log path and its last `lines` lines (for post-mortems over ssh)."""
    states, broken = read_states(Path(state_dir))
    reports = [ServiceReport.of(s, "logs", alive=pid_alive(s.pid, s.proc_start),
                                log_tail=tail_lines(s.log, lines)) for s in states]
    reports += broken_reports(broken, "logs")
    return result(host or socket.gethostname(), not broken, reports, f"{len(states)} service log(s)")


# ----------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so usage errors still yield JSON."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise PlanError(f"usage: {self.prog}: {message}")


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _nonneg(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m block.deploy.hostctl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start the plan's services and wait until healthy")
    s.add_argument("--plan", required=True)
    s.add_argument("--state-dir", required=True)
    s.add_argument("--roles", type=_csv, default=None, help="comma-separated roles to start (default: all)")
    s.add_argument("--names", type=_csv, default=None, help="comma-separated services to start (default: all)")
    s.add_argument("--timeout", type=_nonneg, default=DEFAULT_START_TIMEOUT_S)
    s.add_argument("--grace", type=_nonneg, default=DEFAULT_GRACE_S, help="SIGTERM grace when restarting")
    s.add_argument("--secrets-stdin", action="store_true", help="read a JSON object of secret env vars from stdin")
    t = sub.add_parser("stop", help="stop recorded services (process groups)")
    t.add_argument("--state-dir", required=True)
    t.add_argument("--names", type=_csv, default=None)
    t.add_argument("--roles", type=_csv, default=None)
    t.add_argument("--grace", type=_nonneg, default=DEFAULT_GRACE_S)
    st = sub.add_parser("status", help="liveness and health of recorded services")
    st.add_argument("--state-dir", required=True)
    lg = sub.add_parser("logs", help="tails of the services' logs")
    lg.add_argument("--state-dir", required=True)
    lg.add_argument("--lines", type=int, default=DEFAULT_LOG_LINES)
    return p


def run_command(args: argparse.Namespace, stdin_text: Callable[[], str]) -> dict[str, Any]:
    if args.command == "start":
        plan = load_plan(args.plan)
        secrets = parse_secrets(stdin_text()) if args.secrets_stdin else {}
        return start_services(plan, args.state_dir, roles=args.roles, timeout=args.timeout,
                              secrets=secrets, grace=args.grace, names=args.names)
    if args.command == "stop":
        return stop_services(args.state_dir, names=args.names, roles=args.roles, grace=args.grace)
    if args.command == "status":
        return status(args.state_dir)
    return logs(args.state_dir, lines=args.lines)


def main(argv: list[str] | None = None) -> int:
    """Run one command; print exactly one JSON document on stdout; 0 ok, 1 not ok, 2 bad input."""
    try:
        out = run_command(build_parser().parse_args(argv), lambda: sys.stdin.read())
        code = 0 if out["ok"] else 1
    except PlanError as e:
        out = result(socket.gethostname(), False, [], str(e))
        code = 2
    except Exception as e:  # noqa: BLE001 -- the caller must still get its JSON document
        import traceback

        traceback.print_exc(file=sys.stderr)
        out = result(socket.gethostname(), False, [], f"internal error: {type(e).__name__}: {e}")
        code = 1
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
