"""SSH connections to every host of a cluster config, and work run on all of them in parallel.

Why a thin layer over Fabric: every deploy step is "do this on each host, at the same time, and tell me which hosts
failed and why". Commands that are the same everywhere go through a Fabric ``ThreadingGroup``; steps whose commands
differ per host (each host has its own work directory and its own services) run the same way, one thread per host,
and both end in :class:`HostOutcome` per host. A failure on some hosts never hides what the others did: a
:class:`FleetError` lists every failing host with its ssh target and the error, and keeps the successful results.

Secrets: the ssh key comes from ``key_filename`` / ``$BLOCK_SSH_KEY`` or from ssh-agent and ``~/.ssh`` (paramiko's
defaults); passwords are never used. Nothing here logs a command's stdin, which is how secrets reach the hosts.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shlex
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from block.deploy.inventory import Host, control_characters, workdir_problem

SSH_KEY_ENV = "BLOCK_SSH_KEY"


def _require_fabric():
    try:
        import fabric  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError("Fabric is not installed: pip install -e '.[deploy]'") from err
    return fabric


@dataclass
class HostOutcome:
    """What one step did on one host: its value, or the error that stopped it."""

    host: str
    target: str
    ok: bool
    value: Any = None
    error: Optional[str] = None


class FleetError(RuntimeError):
    """A step failed on some hosts; ``outcomes`` holds every host's outcome, the failing ones first in the text."""

    def __init__(self, action: str, outcomes: dict[str, HostOutcome]) -> None:
        self.action = action
        self.outcomes = outcomes
        bad = [o for o in outcomes.values() if not o.ok]
        good = [o.host for o in outcomes.values() if o.ok]
        lines = [f"{action} failed on {len(bad)} of {len(outcomes)} host(s):"]
        lines += [f"  {o.host} ({o.target}): {o.error}" for o in bad]
        if good:
            lines.append(f"  succeeded on: {', '.join(good)}")
        super().__init__("\n".join(lines))


def describe_error(err: BaseException) -> str:
    """One readable line for an ssh/command error (Fabric's messages are long and multi-line)."""
    from invoke.exceptions import UnexpectedExit

    if isinstance(err, UnexpectedExit):
        r = err.result
        tail = "\n".join((r.stderr or r.stdout or "").strip().splitlines()[-15:])
        return f"command exited {r.exited}: {tail}" if tail else f"command exited {r.exited}"
    msg = str(err).strip() or type(err).__name__
    return f"{type(err).__name__}: {msg}"


def shell_path(path: str) -> str:
    """Quote a remote path for the shell, keeping a leading ``~`` expandable (``~/x`` -> ``"$HOME"/x``)."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        rest = path[2:]
        return '"$HOME"/' + shlex.quote(rest) if rest else '"$HOME"'
    return shlex.quote(path)


class UnsafeWorkdir(RuntimeError):
    """A work directory that must not be used or deleted: ``/``, ``$HOME``, a parent of ``$HOME``, or unreadable."""


# Prints the physical directory and home with NUL after each (a path holds any byte but NUL, and `$(pwd)` would
# strip trailing newlines); the leading NUL keeps anything a login script prints apart from the answer.
_RESOLVE = "cd -P {p}{missing}; w=$PWD; cd -P \"$HOME\" && printf '\\0%s\\0%s\\0%s\\0' \"$w\" \"$PWD\" \"$HOME\""


def _fields(stdout: str, n: int) -> list[str]:
    """The last ``n`` NUL-terminated fields of a :data:`_RESOLVE` answer (exactly as printed), or ValueError."""
    parts = stdout.split("\0")
    if len(parts) < n + 2 or parts[-1] != "":
        raise ValueError(f"unexpected answer {stdout[-200:]!r}")
    return parts[-n - 1:-1]


def unsafe_dir_reason(path: str, homes: Iterable[str]) -> Optional[str]:
    """Why ``path`` (absolute, as resolved on the host) must not be a work directory, or None.

    Teardown deletes the work directory, so it must not be ``/``, one of ``homes`` or a parent of one, nor hold
    characters that would make the path ambiguous in remote output.
    """
    bad = control_characters(path) + (["\ufffd"] if "\ufffd" in path else [])  # U+FFFD: not UTF-8 on the host
    if bad:
        return f"the path holds {', '.join(map(repr, bad))}"
    if not path.startswith("/"):
        return "not an absolute path"
    norm = posixpath.normpath(path)
    for home in homes:
        home = posixpath.normpath(home) if home.startswith("/") else ""
        if home and (home == norm or home.startswith(norm.rstrip("/") + "/")):
            return f"it is $HOME ({home}) or a parent of it"
    if norm.startswith("//") or len(norm.strip("/").split("/")) < 2:
        return "too close to /"
    return None


def resolve_workdir(conn: Any, host: Host, create: bool) -> Optional[str]:
    """``host.workdir`` as a physical absolute path on the host, checked; None when absent and not ``create``.

    Raises UnsafeWorkdir when the configured string or the resolved path is unusable (see :func:`unsafe_dir_reason`):
    the check runs on what the host itself resolves (``~``, symlinks, ``..``), compared exactly, not on lines.
    """
    problem = workdir_problem(host.workdir, f"{host.name}: workdir")
    if problem:
        raise UnsafeWorkdir(f"refusing work directory: {problem}")
    p = shell_path(host.workdir)
    script = (f"mkdir -p {p} && " + _RESOLVE.format(p=p, missing=" || exit 1") if create
              else _RESOLVE.format(p=p, missing=" 2>/dev/null || exit 0"))
    out = conn.run(script, hide=True, in_stream=False).stdout
    if not out:
        return None
    try:
        path, *homes = _fields(out, 3)
    except ValueError as err:
        raise UnsafeWorkdir(f"cannot resolve {host.workdir!r} on {host.name}: {err}") from None
    reason = unsafe_dir_reason(path, homes)
    if reason:
        raise UnsafeWorkdir(f"refusing work directory {path!r} on {host.name}: {reason}")
    return path


class Fleet:
    """One Fabric connection per host (opened lazily, reused), and parallel work over them."""

    def __init__(self, hosts: Sequence[Host], key_filename: Optional[str] = None, connect_timeout_s: float = 15.0,
                 forward_agent: bool = False) -> None:
        _require_fabric()
        if not hosts:
            raise ValueError("a fleet needs at least one host")
        self.hosts = list(hosts)
        self.by_name = {h.name: h for h in self.hosts}
        key = key_filename or os.environ.get(SSH_KEY_ENV)
        if key and not os.path.exists(os.path.expanduser(key)):
            raise ValueError(f"ssh key {key!r} (from {'key_filename' if key_filename else '$' + SSH_KEY_ENV}) "
                             "does not exist")
        # banner and auth waits well above paramiko's 15 s / 30 s: a host (or a test machine) under load can take
        # that long to answer the key exchange, which paramiko reports as a failed authentication
        self.connect_kwargs: dict[str, Any] = {"look_for_keys": True, "allow_agent": True,
                                               "banner_timeout": max(60.0, 4 * connect_timeout_s),
                                               "auth_timeout": max(60.0, 4 * connect_timeout_s)}
        if key:
            self.connect_kwargs["key_filename"] = [os.path.expanduser(key)]
        self.connect_timeout_s = connect_timeout_s
        self.forward_agent = forward_agent
        self._conns: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.workdirs: dict[str, str] = {}  # host name -> absolute work directory (resolved on first use)
        self._inflight: dict[str, str] = {}  # remote pid file -> host name, for every command being awaited

    # ------------------------------------------------------------------ connections
    def conn(self, host: Host | str):
        from fabric import Config, Connection

        h = self.by_name[host] if isinstance(host, str) else host
        with self._lock:
            c = self._conns.get(h.name)
            if c is None:
                cfg = Config(overrides={"run": {"hide": True, "echo": False},
                                        "connect_kwargs": dict(self.connect_kwargs),
                                        "timeouts": {"connect": self.connect_timeout_s},
                                        "forward_agent": self.forward_agent})
                c = Connection(h.address, user=h.user, port=h.port, config=cfg,
                               connect_timeout=self.connect_timeout_s, connect_kwargs=dict(self.connect_kwargs))
                self._conns[h.name] = c
            return c

    def group(self, hosts: Optional[Iterable[Host]] = None):
        """A Fabric ThreadingGroup over ``hosts`` (default all): the same command on every host at once."""
        from fabric import ThreadingGroup

        return ThreadingGroup.from_connections([self.conn(h) for h in (hosts or self.hosts)])

    def close(self) -> None:
        with self._lock:
            for c in self._conns.values():
                try:
                    c.close()
                except Exception:  # noqa: BLE001 - closing a dead connection must not mask the real error
                    pass
            self._conns.clear()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ parallel work
    def run_all(self, action: str, command: str, hosts: Optional[Sequence[Host]] = None,
                raise_on_error: bool = True) -> dict[str, HostOutcome]:
        """Run one shell command on every host through a ThreadingGroup; outcome value = stripped stdout."""
        from fabric.exceptions import GroupException

        hs = list(hosts or self.hosts)
        group = self.group(hs)
        by_conn = {id(self.conn(h)): h for h in hs}
        try:
            results = dict(group.run(command, hide=True, warn=False, in_stream=False))
        except GroupException as err:
            results = dict(err.result)
        outcomes: dict[str, HostOutcome] = {}
        for conn, res in results.items():
            h = by_conn[id(conn)]
            if isinstance(res, BaseException):
                outcomes[h.name] = HostOutcome(h.name, h.ssh_target, False, error=describe_error(res))
            else:
                outcomes[h.name] = HostOutcome(h.name, h.ssh_target, True, value=res.stdout.strip())
        outcomes = {h.name: outcomes[h.name] for h in hs}
        if raise_on_error and not all(o.ok for o in outcomes.values()):
            raise FleetError(action, outcomes)
        return outcomes

    def each(self, action: str, fn: Callable[[Host, Any], Any], hosts: Optional[Sequence[Host]] = None,
             raise_on_error: bool = True) -> dict[str, HostOutcome]:
        """Call ``fn(host, connection)`` for every host in its own thread; collect outcomes in host order."""
        hs = list(hosts or self.hosts)

        def one(h: Host) -> HostOutcome:
            try:
                return HostOutcome(h.name, h.ssh_target, True, value=fn(h, self.conn(h)))
            except Exception as err:  # noqa: BLE001 - every failure is reported per host
                return HostOutcome(h.name, h.ssh_target, False, error=describe_error(err))

        if len(hs) == 1:
            outs = [one(hs[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(32, len(hs))) as pool:
                futures = [pool.submit(one, h) for h in hs]
                try:
                    outs = [f.result() for f in futures]
                except KeyboardInterrupt:  # Ctrl-C: stop the remote commands, so the threads end now
                    self.interrupt()
                    raise
        outcomes = {o.host: o for o in outs}
        if raise_on_error and not all(o.ok for o in outs):
            raise FleetError(action, outcomes)
        return outcomes

    # ------------------------------------------------------------------ commands Ctrl-C can stop
    def run(self, host: Host, command: str, cwd: Optional[str] = None, **kwargs: Any):
        """``connection.run(command)`` that Ctrl-C stops on the host too.

        Without a pty, Fabric forwards no interrupt and waits for the remote command to end by itself, so a long
        remote command (the benchmark, a start awaiting health) would outlive a Ctrl-C. Here the command records
        its pid on the host first (``exec`` keeps the pid), and :meth:`interrupt` signals every command in flight.
        ``command`` must be a simple command (it is ``exec``-ed).
        """
        c = self.conn(host)
        w = self.workdir(host)
        pid_file = f"{w}/.inflight/{uuid.uuid4().hex}.pid"
        full = (f"mkdir -p {shlex.quote(w)}/.inflight && " + (f"cd {shlex.quote(cwd)} && " if cwd else "")
                + f"echo $$ > {shlex.quote(pid_file)} && exec {command}")
        with self._lock:
            self._inflight[pid_file] = host.name
        try:
            if threading.current_thread() is not threading.main_thread():
                return c.run(full, **kwargs)
            promise = c.run(full, asynchronous=True, **kwargs)
            try:
                while not promise.runner.process_is_finished:
                    time.sleep(0.1)
            except KeyboardInterrupt:
                self.interrupt()
                with contextlib.suppress(Exception):
                    promise.join()
                raise
            return promise.join()
        finally:
            with self._lock:
                self._inflight.pop(pid_file, None)

    def interrupt(self, grace_s: float = 5.0) -> None:
        """SIGINT every remote command being awaited, SIGKILL what is left after ``grace_s``."""
        with self._lock:
            items = list(self._inflight.items())
        steps = max(1, int(grace_s / 0.1))
        for pid_file, name in items:
            q = shlex.quote(pid_file)
            script = (f'p=$(cat {q} 2>/dev/null) || exit 0; rm -f {q}; kill -INT "$p" 2>/dev/null || exit 0; '
                      f'for i in $(seq {steps}); do kill -0 "$p" 2>/dev/null || exit 0; sleep 0.1; done; '
                      'kill -KILL "$p" 2>/dev/null; true')
            with contextlib.suppress(Exception):
                self.conn(name).run(script, hide=True, warn=True, in_stream=False, timeout=grace_s + 10)

    # ------------------------------------------------------------------ calls back to this machine
    @contextlib.contextmanager
    def reverse_tunnel(self, host: Host, local_port: int, local_host: str = "127.0.0.1") -> Iterator[int]:
        """A port on ``host``'s loopback (chosen by its sshd) that reaches ``local_host:local_port`` here, through
        the host's ssh connection (remote forwarding, ``ssh -R``): services on the host call back to this machine
        -- the deploy driver, which the hosts usually cannot reach otherwise -- and nothing listens on a public
        address. Yields the remote port; closing stops the forwarding and its open connections."""
        from fabric.tunnels import Tunnel

        conn = self.conn(host)
        conn.open()
        tunnels: list[Any] = []

        def handler(channel, src, dst) -> None:  # paramiko's thread: one accepted connection on the host
            sock = socket.create_connection((local_host, local_port), timeout=10)
            sock.settimeout(None)
            tunnel = Tunnel(channel=channel, sock=sock, finished=threading.Event())
            tunnel.start()
            tunnels[:] = [t for t in tunnels if t.is_alive()] + [tunnel]

        port = conn.transport.request_port_forward("127.0.0.1", 0, handler=handler)
        try:
            yield int(port)
        finally:
            for tunnel in list(tunnels):
                tunnel.finished.set()
                tunnel.join(timeout=5)
            with contextlib.suppress(Exception):
                conn.transport.cancel_port_forward("127.0.0.1", port)

    # ------------------------------------------------------------------ per-host paths
    def workdir(self, host: Host) -> str:
        """The host's work directory as a physical absolute path (created and checked on first use)."""
        w = self.workdirs.get(host.name)
        if w is None:
            w = resolve_workdir(self.conn(host), host, create=True)
            if w is None:  # cannot happen: the script creates it or fails
                raise UnsafeWorkdir(f"work directory {host.workdir!r} on {host.name} vanished while being created")
            self.workdirs[host.name] = w
        return w
