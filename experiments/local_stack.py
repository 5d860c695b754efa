"""Start the live services as local subprocesses, wait for their health, and always stop them.

Used by ``mode=emulate``, the tests and the benchmarks: each service is started by its command line
(``python -m block.engine``, ``block.predictor``, ``block.scheduler``) on a free loopback port (``--port 0``; the
service prints the port it bound) or a given one. Every child runs in its own process group and is stopped --
SIGTERM (or the signal asked for), then SIGKILL -- when the stack closes, on an exception, on Ctrl-C (SIGINT) and on
SIGTERM, so no orphan is left behind. Its stderr and stdout go to ``<log_dir>/<name>.log``.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Mapping, Optional, Sequence

import httpx

from vidur.config import REPO_ROOT

LISTEN_RE = re.compile(r"listening on (http://[^\s]+)")
# read by the services' --token / --upstream-token / --engine-token defaults; ``env=dict.fromkeys(TOKEN_VARS)``
# starts the services without any of them
TOKEN_VARS = ("BLOCK_API_TOKEN", "BLOCK_UPSTREAM_TOKEN", "BLOCK_ENGINE_TOKEN")


class StackError(RuntimeError):
    """A service did not start, or died; the message says which and shows the end of its log."""


@dataclass
class Service:
    name: str
    argv: list[str]
    proc: subprocess.Popen
    log_path: Path
    url: Optional[str] = None
    urls: list[str] = field(default_factory=list)  # every "listening on" address read (``listens`` of them)
    listens: int = 1
    timeout_s: float = 60.0  # default for wait_listening / wait_healthy
    _log: Optional[IO] = field(default=None, repr=False)
    _pump: Optional[threading.Thread] = field(default=None, repr=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def client(self, **kw) -> httpx.Client:
        """A new ``httpx.Client`` on the service's URL (timeout 30 s unless given)."""
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), **kw)

    def _write(self, text: str) -> None:
        try:
            self._log.write(text)  # type: ignore[union-attr]
            self._log.flush()  # type: ignore[union-attr]
        except (ValueError, AttributeError):  # log closed
            pass

    def wait_listening(self, timeout_s: Optional[float] = None) -> "Service":
        """Read stdout (into the log) until the service printed ``listening on`` ``listens`` times; a thread copies
        the rest of its stdout to the log."""
        if self._pump is not None:
            return self
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout_s
        while len(self.urls) < self.listens:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StackError(f"{self.name} did not start within {timeout_s} s:\n{self.tail()}")
            data = os.read(fd, 65536) if select.select([fd], [], [], min(left, 0.5))[0] else None
            if not data:
                if data is None and self.alive():
                    continue
                try:  # end of its stdout: it exited (or is exiting)
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                raise StackError(f"{self.name} exited with code {self.proc.returncode} before listening:\n"
                                 f"{self.tail()}")
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                self._write(text + "\n")
                m = LISTEN_RE.search(text)
                if m:
                    self.urls.append(m.group(1))
        self.url = self.urls[0]
        self._pump = threading.Thread(target=self._copy_stdout, args=(fd, buf), daemon=True)
        self._pump.start()
        return self

    def _copy_stdout(self, fd: int, pending: bytes) -> None:
        if pending:
            self._write(pending.decode(errors="replace"))
        try:
            while data := os.read(fd, 65536):
                self._write(data.decode(errors="replace"))
        except OSError:
            pass

    def wait_healthy(self, timeout_s: Optional[float] = None) -> "Service":
        """Wait for the ``listening on`` line if not read yet, then poll ``/health`` until it answers 200."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        self.wait_listening(timeout_s)
        while True:
            if not self.alive():
                raise StackError(f"{self.name} died (code {self.proc.returncode}):\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise StackError(f"{self.name} at {self.url} not healthy within {timeout_s} s:\n{self.tail()}")
            time.sleep(0.05)

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """``sig`` to the service's process group, if it still runs."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self, deadline: float) -> None:
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if self._pump is not None:
            self._pump.join(1.0)  # the last of its stdout
        if self.proc.stdout is not None and not (self._pump and self._pump.is_alive()):
            self.proc.stdout.close()
        if self._log is not None and not self._log.closed:
            self._log.close()

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
        """Stop the service: ``sig`` (SIGTERM; SIGINT, SIGKILL ... to test crash handling) to its process group,
        SIGKILL after ``grace_s``."""
        self.send_signal(sig)
        self._reap(time.monotonic() + grace_s)


class LocalStack:
    """A set of local service processes; use as a context manager (or call ``close``).

    ``log_dir`` None: a temporary directory, removed by ``close``. ``env``: overrides of the services' environment
    (a None value removes the variable); ``token`` sets every variable of ``TOKEN_VARS``.
    """

    def __init__(self, log_dir: Path | str | None = None, token: Optional[str] = None,
                 startup_timeout_s: float = 60.0, env: Optional[Mapping[str, Optional[str]]] = None) -> None:
        self._tmp = None if log_dir is not None else tempfile.mkdtemp(prefix="block-stack-")
        self.log_dir = Path(log_dir if log_dir is not None else self._tmp)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.startup_timeout_s = startup_timeout_s
        self.services: list[Service] = []
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        if token:  # never on a command line
            for var in TOKEN_VARS:
                self.env[var] = token
        self.env = {k: v for k, v in self.env.items() if v is not None}
        self._old_handlers: dict[int, object] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LocalStack":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        for sig, h in self._old_handlers.items():
            signal.signal(sig, h)  # type: ignore[arg-type]
        self._old_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() == self._pid:  # not in a forked child (a benchmark's worker) that inherited the handler
            self.close()
        raise KeyboardInterrupt(f"signal {signum}: stopped every service")

    def start(self, name: str, module: str, args: Sequence[str] = (), *, port: Optional[int] = 0, wait: bool = True,
              listens: int = 1, preexec_fn: Optional[Callable[[], None]] = None) -> Service:
        """Start ``python -m module --port <port> args...`` (no ``--port`` when ``port`` is None) and, with ``wait``,
        wait until it prints its address (``listens`` addresses). A name already used gets a ``-2``, ``-3``...
        suffix (its log file too)."""
        used = {s.name for s in self.services}
        base, n = name, 1
        while name in used:
            n += 1
            name = f"{base}-{n}"
        argv = [sys.executable, "-m", module, *(["--port", str(port)] if port is not None else []), *map(str, args)]
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "w")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=self.env, start_new_session=True,
                                cwd=REPO_ROOT, preexec_fn=preexec_fn)
        svc = Service(name, argv, proc, log_path, listens=listens, timeout_s=self.startup_timeout_s, _log=log)
        self.services.append(svc)
        if wait:
            svc.wait_listening()
        return svc

    def wait_healthy(self, services: Optional[Sequence[Service]] = None) -> None:
        """Poll ``/health`` of each service until it answers 200 (all within ``startup_timeout_s``)."""
        deadline = time.monotonic() + self.startup_timeout_s
        for svc in services or self.services:
            svc.wait_healthy(max(0.0, deadline - time.monotonic()))

    def check_alive(self) -> None:
        dead = [s for s in self.services if not s.alive()]
        if dead:
            raise StackError("; ".join(f"{s.name} died (code {s.proc.returncode}):\n{s.tail()}" for s in dead))

    def close(self, grace_s: float = 5.0) -> None:
        """Stop every service: SIGTERM to its process group, SIGKILL after ``grace_s``."""
        for svc in reversed(self.services):
            svc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for svc in reversed(self.services):
            svc._reap(deadline)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
