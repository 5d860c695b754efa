"""The deploy steps over a :class:`~block.deploy.fleet.Fleet`: setup, push, start, stop, status, run, collect, teardown.

Layout on every host (``host.workdir``, default ``~/block-deploy``)::

    src/             this project (a deterministic archive of the checkout, unpacked)
    src.sha256       digest of the archive + install options: setup is a no-op while it matches
    venv/            the virtual environment, with the project installed (engine extra by host: vllm on GPU hosts)
    state/           one JSON file per running service (pid, process group, url, log) -- see block.deploy.hostctl
    runs/<run id>/   plan.json, services/*.yaml (resolved configs), logs/<service>.log, records/ (scheduler host)

Why services are started by ``hostctl`` on the host rather than by ssh one-liners: the process must outlive the ssh
session, its health must be awaited where it is reachable (engines bind loopback), and a later ``status`` must find
it again; hostctl keeps that in ``state/`` and answers in JSON, so each step here is one ssh command per host.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from block.deploy.fleet import Fleet, FleetError, HostOutcome, describe_error, resolve_workdir
from block.deploy.inventory import Host
from vidur.config import REPO_ROOT

STAGES = ("engine", "predictor", "scheduler")
UNREACHABLE_ERRORS = ("NoValidConnectionsError", "SSHException", "AuthenticationException", "timed out", "socket",
                      "gaierror", "ConnectionRefused", "EOFError")  # start order; stop goes the other way
PROJECT_PATHS = ("pyproject.toml", "README.md", "fabfile.py", "vidur", "block", "length_estimation", "experiments",
                 "analysis", "data", "conf")


class DeployError(RuntimeError):
    """A deploy step failed; the message says where, and (for start) what is running where."""


class NotSetUp(DeployError):
    """The host has no venv with this project yet (run setup)."""


# ---------------------------------------------------------------------------------------------- project archive
def project_files(root: Path = REPO_ROOT) -> list[str]:
    """The files a host needs: git's tracked + untracked-not-ignored files, or the package folders outside git."""
    root = Path(root)
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard"],
                                 capture_output=True, check=True).stdout.decode()
            files = [f for f in out.split("\0") if f and (root / f).is_file()]
            return sorted(f for f in files if f.split("/")[0] in PROJECT_PATHS)
        except (OSError, subprocess.CalledProcessError):
            pass
    files = []
    for top in PROJECT_PATHS:
        p = root / top
        if p.is_file():
            files.append(top)
        elif p.is_dir():
            files += [str(f.relative_to(root)) for f in p.rglob("*")
                      if f.is_file() and "__pycache__" not in f.parts and not f.name.endswith(".pyc")]
    return sorted(files)


def project_archive(root: Path = REPO_ROOT) -> tuple[bytes, str]:
    """A reproducible ``.tar.gz`` of the project (same files -> same bytes) and its sha256."""
    root = Path(root)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel in project_files(root):
                data = (root / rel).read_bytes()
                info = tarfile.TarInfo(rel)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    return blob, hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class InstallOptions:
    """How ``setup`` builds each host's environment."""

    python: str = "python3"
    system_site_packages: bool = False  # reuse the host's packages (offline hosts, test hosts)
    pip_args: Sequence[str] = ()        # e.g. ["--no-index", "--find-links", "/wheels"]
    extras: Mapping[str, str] = field(default_factory=dict)  # host name -> "vllm" | "" (engine extra)

    def digest(self, archive_sha: str, host: str) -> str:
        key = json.dumps([archive_sha, self.python, self.system_site_packages, list(self.pip_args),
                          self.extras.get(host, "")])
        return hashlib.sha256(key.encode()).hexdigest()


def detect_gpus(fleet: Fleet, hosts: Optional[Sequence[Host]] = None) -> dict[str, int]:
    """GPUs per host by ``nvidia-smi -L`` (0 where it is missing); hosts with gpu=yes/no are taken at their word."""
    ask = [h for h in (hosts or fleet.hosts) if h.gpu == "auto"]
    found = {h.name: (1 if h.gpu == "yes" else 0) for h in (hosts or fleet.hosts) if h.gpu != "auto"}
    if ask:
        outs = fleet.run_all("GPU detection", "nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true", ask)
        for name, o in outs.items():
            try:
                found[name] = int((o.value or "0").splitlines()[-1])
            except ValueError:
                found[name] = 0
    return found


def setup(fleet: Fleet, opts: InstallOptions, archive: Optional[tuple[bytes, str]] = None,
          log=None) -> dict[str, str]:
    """Install the project into a venv on every host; idempotent (a host whose digest matches is left alone).

    Returns host -> "up to date" | "installed". Raises FleetError naming each host that failed.
    """
    blob, sha = archive or project_archive()
    log = log or (lambda msg: None)

    def one(h: Host, c) -> str:
        w = fleet.workdir(h)
        want = opts.digest(sha, h.name)
        q = shlex.quote
        check = c.run(f"cat {q(w)}/src.sha256 2>/dev/null; "
                      f"{q(w)}/venv/bin/python -c 'import block.deploy.hostctl' 2>/dev/null && echo IMPORT-OK",
                      hide=True, warn=True, in_stream=False).stdout.split()
        if want in check and "IMPORT-OK" in check:
            log(f"{h.name}: up to date")
            return "up to date"
        log(f"{h.name}: installing ({len(blob) / 1e6:.1f} MB archive)")
        c.put(io.BytesIO(blob), f"{w}/src.tar.gz")
        venv_flags = "--system-site-packages " if opts.system_site_packages else ""
        extra = opts.extras.get(h.name, "")
        spec = f"{w}/src[{extra}]" if extra else f"{w}/src"
        pip = " ".join(q(a) for a in opts.pip_args)
        script = " && ".join([
            f"rm -f {q(w)}/src.sha256",
            f"rm -rf {q(w)}/src.new && mkdir -p {q(w)}/src.new",
            f"tar -xzf {q(w)}/src.tar.gz -C {q(w)}/src.new",
            f"rm -rf {q(w)}/src && mv {q(w)}/src.new {q(w)}/src && rm -f {q(w)}/src.tar.gz",
            f"(test -x {q(w)}/venv/bin/python || {q(opts.python)} -m venv {venv_flags}{q(w)}/venv)",
            f"{q(w)}/venv/bin/python -m pip install -q --disable-pip-version-check {pip} -e {q(spec)}",
            f"{q(w)}/venv/bin/python -c 'import block.deploy.hostctl'",
            f"echo {want} > {q(w)}/src.sha256",
        ])
        c.run(script, hide=True, in_stream=False)
        log(f"{h.name}: installed")
        return "installed"

    return {k: o.value for k, o in fleet.each("setup", one).items()}


# ---------------------------------------------------------------------------------------------- hostctl calls
def _venv_python(w: str) -> str:
    return f"{shlex.quote(w)}/venv/bin/python"


def hostctl(fleet: Fleet, h: Host, args: Sequence[str], secrets: Optional[Mapping[str, str]] = None,
            timeout_s: Optional[float] = None) -> dict[str, Any]:
    """Run ``python -m block.deploy.hostctl args`` on ``h``; return its JSON answer (ok false on failure).

    Secrets go to hostctl's stdin as JSON, never onto a command line (which ``ps`` and logs would show).
    """
    w = fleet.workdir(h)
    argv = [*args, "--secrets-stdin"] if secrets else list(args)
    cmd = f"{_venv_python(w)} -m block.deploy.hostctl " + " ".join(shlex.quote(a) for a in argv)
    stdin = io.StringIO(json.dumps(dict(secrets))) if secrets else False
    res = fleet.run(h, cmd, cwd=w, hide=True, warn=True, in_stream=stdin, timeout=timeout_s)
    if res.exited == 127 and "venv/bin/python" in (res.stderr or ""):
        raise NotSetUp(f"{h.name} is not set up (no {w}/venv): run setup first")
    try:
        doc = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise DeployError(f"hostctl on {h.name} exited {res.exited} without a JSON answer "
                          f"(is setup done?):\n{tail}") from None
    doc.setdefault("ok", res.exited == 0)
    return doc


def _tail(lines: Any) -> str:
    return "\n".join(f"    | {x}" for x in (lines if isinstance(lines, list) else str(lines).splitlines()))


def _state_dir(fleet: Fleet, h: Host) -> str:
    return f"{fleet.workdir(h)}/state"


def run_dir_of(fleet: Fleet, h: Host, run_id: str) -> str:
    return f"{fleet.workdir(h)}/runs/{run_id}"


def push_run(fleet: Fleet, run_id: str, files: Mapping[str, Mapping[str, bytes]]) -> dict[str, str]:
    """Upload each host's run files (path -> bytes) into ``runs/<run_id>/`` (absolute paths: there); returns host ->
    remote run dir."""
    hosts = [fleet.by_name[n] for n in files]

    def one(h: Host, c) -> str:
        d = run_dir_of(fleet, h, run_id)
        where = {rel: rel if rel.startswith("/") else f"{d}/{rel}" for rel in files[h.name]}  # absolute: as is
        dirs = sorted({os.path.dirname(x) for x in where.values()})
        c.run("mkdir -p " + " ".join(shlex.quote(x) for x in dirs), hide=True, in_stream=False)
        for rel, data in files[h.name].items():
            c.put(io.BytesIO(data), where[rel])
        return d

    return {k: o.value for k, o in fleet.each("upload", one, hosts).items()}


# ---------------------------------------------------------------------------------------------- status
@dataclass
class ClusterStatus:
    """What runs where: per host, hostctl's service list, or why the host could not be asked."""

    hosts: dict[str, dict[str, Any]]      # host -> hostctl status doc
    errors: dict[str, str]                # host -> why it could not be asked
    expected: dict[str, list[str]] = field(default_factory=dict)  # host -> service names a full start has

    @property
    def running(self) -> dict[str, list[str]]:
        return {h: [s["name"] for s in d.get("services", []) if s.get("alive")] for h, d in self.hosts.items()}

    @property
    def healthy(self) -> dict[str, list[str]]:
        return {h: [s["name"] for s in d.get("services", []) if s.get("alive") and s.get("healthy")]
                for h, d in self.hosts.items()}

    @property
    def missing(self) -> dict[str, list[str]]:
        ok = self.healthy
        return {h: [n for n in names if n not in ok.get(h, [])] for h, names in self.expected.items()
                if [n for n in names if n not in ok.get(h, [])]}

    @property
    def state(self) -> str:
        """``stopped`` (nothing runs), ``running`` (everything listed and expected is healthy) or ``partial``."""
        listed = [s for d in self.hosts.values() for s in d.get("services", [])]
        if not listed and not self.errors:
            return "stopped"
        if self.errors or self.missing or any(not (s.get("alive") and s.get("healthy")) for s in listed):
            return "partial"
        return "running"

    def describe(self) -> str:
        lines = [f"cluster state: {self.state}"]
        for h in sorted(set(self.hosts) | set(self.errors) | set(self.expected)):
            if h in self.errors:
                e = self.errors[h]
                kind = "UNREACHABLE" if any(x in e for x in UNREACHABLE_ERRORS) else "ERROR"
                lines.append(f"  {h}: {kind} ({e})")
                continue
            svcs = self.hosts.get(h, {}).get("services", [])
            if not svcs:
                note = " (not set up)" if self.hosts.get(h, {}).get("message") == "not set up" else ""
                lines.append(f"  {h}: nothing running{note}")
            for s in svcs:
                flag = "healthy" if s.get("alive") and s.get("healthy") else ("UNHEALTHY" if s.get("alive")
                                                                              else "DEAD")
                lines.append(f"  {h}: {s['name']:<12} {flag:<9} pid {s.get('pid')}  {s.get('url', '')}")
            for n in self.missing.get(h, []):
                if n not in [s["name"] for s in svcs]:
                    lines.append(f"  {h}: {n:<12} NOT RUNNING")
        return "\n".join(lines)


def _on_state(fleet: Fleet, command: str, *args: str,
              hosts: Optional[Sequence[Host]] = None) -> dict[str, HostOutcome]:
    """``hostctl <command>`` on every host's (or ``hosts``') state folder; a host not set up yet runs nothing."""

    def one(h: Host, c) -> dict[str, Any]:
        try:
            return hostctl(fleet, h, [command, "--state-dir", _state_dir(fleet, h), *args])
        except NotSetUp:
            return {"host": h.name, "ok": True, "services": [], "message": "not set up"}

    return fleet.each(command, one, hosts, raise_on_error=False)


def status(fleet: Fleet, expected: Optional[Mapping[str, list[str]]] = None) -> ClusterStatus:
    outs = _on_state(fleet, "status")
    return ClusterStatus({k: o.value for k, o in outs.items() if o.ok},
                         {k: o.error or "" for k, o in outs.items() if not o.ok}, dict(expected or {}))


# ---------------------------------------------------------------------------------------------- start / stop
def start(fleet: Fleet, run_id: str, plans: Mapping[str, Mapping[str, Any]],
          secrets: Optional[Mapping[str, str]] = None, timeout_s: float = 180.0, log=None) -> ClusterStatus:
    """Start every host's services stage by stage (engines, predictors, schedulers), each stage awaited healthy.

    ``plans``: host -> hostctl plan (already pushed as ``runs/<run_id>/plan.json``). On any failure the services
    that did start keep running (stop them with :func:`stop`) and a DeployError describes the half-started cluster.
    """
    log = log or (lambda msg: None)
    expected = {h: [s["name"] for s in p["services"]] for h, p in plans.items()}
    for stage in STAGES:
        hosts = [fleet.by_name[h] for h, p in plans.items() if any(s["role"] == stage for s in p["services"])]
        if not hosts:
            continue
        t0 = time.monotonic()

        def one(h: Host, c, stage=stage) -> dict[str, Any]:
            return _started(hostctl(fleet, h, ["start", "--plan", f"{run_dir_of(fleet, h, run_id)}/plan.json",
                                               "--state-dir", _state_dir(fleet, h), "--roles", stage,
                                               "--timeout", str(timeout_s)], secrets, timeout_s=timeout_s + 60))

        try:
            fleet.each(f"start {stage}s", one, hosts)
        except FleetError as err:
            st = status(fleet, expected)
            raise DeployError(f"{err}\n\nthe cluster is half-started:\n{st.describe()}\n"
                              "(stop it with `fab stop --cluster ...`, or fix and start again: running services "
                              "with the same command line are kept)") from None
        log(f"{stage}s healthy on {len(hosts)} host(s) in {time.monotonic() - t0:.1f} s")
    return status(fleet, expected)


def _started(doc: dict[str, Any]) -> dict[str, Any]:
    """hostctl's answer to a start, or a DeployError naming every service that is not healthy (with its log)."""
    if not doc.get("ok"):
        bad = [s for s in doc.get("services", []) if not (s.get("alive") and s.get("healthy"))]
        detail = "; ".join(f"{s['name']}: {s.get('error') or 'not healthy'}"
                           + ("\n" + _tail(s["log_tail"]) if s.get("log_tail") else "") for s in bad)
        raise DeployError(detail or doc.get("message") or "start failed")
    return doc


def start_named(fleet: Fleet, h: Host, run_id: str, plan_name: str, names: Sequence[str],
                secrets: Optional[Mapping[str, str]] = None, timeout_s: float = 180.0) -> dict[str, Any]:
    """Start only ``names`` of the plan ``runs/<run_id>/<plan_name>`` on ``h`` and wait until they are healthy (a
    back-pool slot started on demand: auto-provisioning in ``mode=deploy``); a DeployError if they are not."""
    return _started(hostctl(fleet, h, ["start", "--plan", f"{run_dir_of(fleet, h, run_id)}/{plan_name}",
                                       "--state-dir", _state_dir(fleet, h), "--names", ",".join(names),
                                       "--timeout", str(timeout_s)], secrets, timeout_s=timeout_s + 60))


def stop_named(fleet: Fleet, h: Host, names: Sequence[str], grace_s: float = 10.0) -> dict[str, Any]:
    """Stop ``names`` on ``h`` (dependants first; a name not running is fine); a DeployError if one will not stop."""
    doc = hostctl(fleet, h, ["stop", "--state-dir", _state_dir(fleet, h), "--names", ",".join(names),
                             "--grace", str(grace_s)], timeout_s=grace_s + 60)
    if not doc.get("ok"):
        raise DeployError(f"stopping {', '.join(names)} on {h.name}: {doc.get('message') or 'failed'}")
    return doc


def stop(fleet: Fleet, roles: Optional[Sequence[str]] = None, grace_s: float = 10.0,
         hosts: Optional[Sequence[Host]] = None) -> dict[str, HostOutcome]:
    """Stop the services (all, or those of ``roles``) on every reachable host (or on ``hosts``); unreachable hosts
    are reported."""
    args = ["--grace", str(grace_s)] + (["--roles", ",".join(roles)] if roles else [])

    return _on_state(fleet, "stop", *args, hosts=hosts)


def logs(fleet: Fleet, lines: int = 30) -> dict[str, HostOutcome]:
    """The last ``lines`` of every running service's log, per host (hostctl ``logs``)."""

    return _on_state(fleet, "logs", "--lines", str(lines))


def stop_unplanned(fleet: Fleet, expected: Mapping[str, Sequence[str]]) -> None:
    """Stop every running service that ``expected`` (host -> service names) does not list."""
    st = status(fleet)
    for name, doc in st.hosts.items():
        extra = [s["name"] for s in doc.get("services", []) if s["name"] not in expected.get(name, [])]
        if extra:
            h = fleet.by_name[name]
            hostctl(fleet, h, ["stop", "--state-dir", _state_dir(fleet, h), "--names", ",".join(extra)])


# ---------------------------------------------------------------------------------------------- run / collect
def run_on(fleet: Fleet, h: Host, run_id: str, argv: Sequence[str], secrets: Optional[Mapping[str, str]] = None,
           stream: bool = True, timeout_s: Optional[float] = None) -> str:
    """Run ``python argv...`` (the host's venv python) in ``runs/<run_id>``; stream its output here.

    Secrets arrive as JSON on stdin (the program must read them, e.g. ``--secrets-stdin``).
    """
    w = fleet.workdir(h)
    cmd = f"{_venv_python(w)} " + " ".join(shlex.quote(a) for a in argv)
    stdin = io.StringIO(json.dumps(dict(secrets or {})))
    try:
        res = fleet.run(h, cmd, cwd=run_dir_of(fleet, h, run_id), hide=not stream, warn=False, in_stream=stdin,
                        timeout=timeout_s, out_stream=sys.stderr if stream else None,
                        err_stream=sys.stderr if stream else None)
    except Exception as err:  # noqa: BLE001
        raise DeployError(f"{argv[:3]} on {h.name} ({h.ssh_target}) failed: {describe_error(err)}") from None
    return res.stdout


_COPY_OUTSIDE_LOGS = (
    "import json, os, shutil\n"
    "for s in json.load(open('plan.json'))['services']:\n"
    "    src = os.path.join(s['cwd'], 'logs', s['name'] + '.log') if s.get('cwd') else None\n"
    "    if src and os.path.isfile(src):\n"
    "        shutil.copyfile(src, os.path.join('logs', s['name'] + '.log'))\n"
)


def collect(fleet: Fleet, run_id: str, dest: Path, hosts: Optional[Sequence[Host]] = None,
            parts: Sequence[str] = ("logs", "services", "records")) -> dict[str, Path]:
    """Bring ``runs/<run_id>/{logs,services,records}`` of every host into ``dest/hosts/<host>/``."""
    dest = Path(dest)

    def one(h: Host, c) -> Path:
        d = run_dir_of(fleet, h, run_id)
        q = shlex.quote
        remote_tar = f"{d}.collect.tgz"
        # one round trip: services that live outside the run folder (kept engines) log beside themselves, so a
        # copy comes in first; then whatever of ``parts`` exists is packed (its names are printed)
        present = c.run(
            f"cd {q(d)} 2>/dev/null || exit 0; "
            f"if test -f plan.json; then mkdir -p logs && {_venv_python(fleet.workdir(h))} -c "
            f"{q(_COPY_OUTSIDE_LOGS)}; fi; "
            f"present=$(ls -d {' '.join(q(p) for p in parts)} 2>/dev/null); "
            f'if [ -n "$present" ]; then tar -czf {q(remote_tar)} $present && echo $present; fi',
            hide=True, in_stream=False).stdout.split()
        out = dest / "hosts" / h.name
        out.mkdir(parents=True, exist_ok=True)
        if not present:
            return out
        with tempfile.NamedTemporaryFile(suffix=".tgz", dir=dest, delete=False) as tmp:
            local_tar = tmp.name
        try:
            c.get(remote_tar, local_tar)
            with tarfile.open(local_tar) as tar:
                tar.extractall(out, filter="data")
        finally:
            os.unlink(local_tar)
            c.run(f"rm -f {q(remote_tar)}", hide=True, warn=True, in_stream=False)
        return out

    return {k: o.value for k, o in fleet.each("collect", one, hosts).items()}


def teardown(fleet: Fleet) -> dict[str, HostOutcome]:
    """Stop everything, then delete each host's work directory (venv, project, runs).

    The directory is resolved on the host and checked there (:func:`~block.deploy.fleet.resolve_workdir`): never
    ``/``, ``$HOME`` or a parent of it, whatever the cluster config says; a refused host is reported as failed and
    keeps its services. Hosts without a work directory are left as they are (nothing is created to be deleted).
    """
    found = fleet.each("teardown", lambda h, c: resolve_workdir(c, h, create=False), raise_on_error=False)
    present = [fleet.by_name[n] for n, o in found.items() if o.ok and o.value]
    fleet.workdirs.update({h.name: found[h.name].value for h in present})
    if present:
        stop(fleet, hosts=present)

    def one(h: Host, c) -> str:
        w = found[h.name].value
        c.run(f"rm -rf -- {shlex.quote(w)}", hide=True, in_stream=False)
        fleet.workdirs.pop(h.name, None)
        return f"removed {w}"

    removed = fleet.each("teardown", one, present, raise_on_error=False) if present else {}
    return {n: removed.get(n) or (o if not o.ok else HostOutcome(n, o.target, True, "nothing to remove"))
            for n, o in found.items()}
