"""Start the live services as local subprocesses, wait for their health, and always stop them.

Used by ``mode=emulate`` (and by tests): each service is started by its command line (``python -m block.engine``,
``block.predictor``, ``block.scheduler``) on a free loopback port (``--port 0``; the service prints the port it
bound). Every child runs in its own process group and is stopped -- SIGTERM, then SIGKILL -- when the stack closes,
on an exception, on Ctrl-C (SIGINT) and on SIGTERM, so no orphan is left behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional, Sequence

import httpx

LISTEN_RE = re.compile(r"listening on (http://[^\s]+)")


class StackError(RuntimeError):
    """A service did not start, or died; the message says which and shows the end of its log."""


@dataclass
class Service:
    name: str
    argv: list[str]
    proc: subprocess.Popen
    log_path: Path
    url: Optional[str] = None
    _log: Optional[IO] = field(default=None, repr=False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class LocalStack:
    """A set of local service processes; use as a context manager."""

    def __init__(self, log_dir: Path | str, token: Optional[str] = None, startup_timeout_s: float = 60.0,
                 env: Optional[dict[str, str]] = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.startup_timeout_s = startup_timeout_s
        self.services: list[Service] = []
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        if token:
            # read by the services' --token / --upstream-token / --engine-token defaults: never on a command line
            for var in ("BLOCK_API_TOKEN", "BLOCK_UPSTREAM_TOKEN", "BLOCK_ENGINE_TOKEN"):
                self.env[var] = token
        self._old_handlers: dict[int, object] = {}

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
        self.close()
        raise KeyboardInterrupt(f"signal {signum}: stopped every service")

    def start(self, name: str, module: str, args: Sequence[str]) -> Service:
        """Start ``python -m module --port 0 args...`` and wait until it prints its address."""
        argv = [sys.executable, "-m", module, "--port", "0", *map(str, args)]
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "w")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=self.env, text=True,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[1])
        svc = Service(name, argv, proc, log_path, _log=log)
        self.services.append(svc)
        deadline = time.monotonic() + self.startup_timeout_s
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                if proc.poll() is not None:
                    raise StackError(f"{name} exited with code {proc.returncode} before listening:\n{svc.tail()}")
                continue
            log.write(line)
            log.flush()
            m = LISTEN_RE.search(line)
            if m:
                svc.url = m.group(1)
                threading.Thread(target=self._pump, args=(proc.stdout, log), daemon=True).start()
                return svc
        raise StackError(f"{name} did not start within {self.startup_timeout_s} s:\n{svc.tail()}")

    @staticmethod
    def _pump(stream: IO, log: IO) -> None:
        for line in stream:
            try:
                log.write(line)
                log.flush()
            except ValueError:  # log closed
                return

    def wait_healthy(self, services: Optional[Sequence[Service]] = None) -> None:
        """Poll ``/health`` of each service until it answers 200."""
        deadline = time.monotonic() + self.startup_timeout_s
        for svc in services or self.services:
            while True:
                if not svc.alive():
                    raise StackError(f"{svc.name} died (code {svc.proc.returncode}):\n{svc.tail()}")
                try:
                    if httpx.get(f"{svc.url}/health", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise StackError(f"{svc.name} at {svc.url} not healthy within {self.startup_timeout_s} s:\n"
                                     f"{svc.tail()}")
                time.sleep(0.05)

    def check_alive(self) -> None:
        dead = [s for s in self.services if not s.alive()]
        if dead:
            raise StackError("; ".join(f"{s.name} died (code {s.proc.returncode}):\n{s.tail()}" for s in dead))

    def close(self, grace_s: float = 5.0) -> None:
        """Stop every service: SIGTERM to its process group, SIGKILL after ``grace_s``."""
        for svc in reversed(self.services):
            if svc.alive():
                try:
                    os.killpg(svc.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for svc in reversed(self.services):
            try:
                svc.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(svc.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                svc.proc.wait()
            if svc._log is not None and not svc._log.closed:
                svc._log.close()
