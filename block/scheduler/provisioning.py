"""Auto-provisioning in the live scheduler (Fig 8 outside the simulator).

The decisions are ``block.provisioning.ProvisioningController``'s -- the very object ``mode=sim`` uses -- driven
through :class:`LivePool`, which gives it the pool interface of ``vidur.cluster.Cluster`` over real instances:

* slots ``0 .. initial-1`` are the scheduler's ``--instances`` and route from the start; slots ``initial .. N-1``
  are the back pool: no URL, not routable, usually not even running;
* ``add_instance(slot)`` (the controller's reactive or predictive trigger) takes the slot's lease and starts its
  services through a :class:`SlotStarter` -- :class:`AgentStarter` (``POST <agent>/slots/<slot>``: ``mode=emulate``'s
  driver starts engine + predictor with ``experiments.local_stack``) or :class:`CommandStarter` (a shell command per
  slot printing the predictor URL, e.g. an ssh to the slot's host). The slot becomes routable once its predictor
  answers ``/health``; the cold start recorded is the time that took (measured, never assumed: the controller's
  ``cold_start_s`` is unused live);
* scale-down (``remove_instance``) takes the slot out of routing; it drains and keeps running, so adding it again
  is immediate.

Several stateless schedulers (``--provision-lock-dir``, a directory they all see): a slot's lease is a lock file
created with ``O_CREAT | O_EXCL`` -- exactly one scheduler wins it and starts the slot; it then publishes the slot's
URL (``slot<i>.json``, written atomically). Every other scheduler adopts a published slot (its controller asking for
it, or the watcher that polls the directory), so no instance is started twice and all schedulers converge on the
same pool. Without a lock directory a single scheduler owns every slot.

Times given to the controller are model seconds: wall seconds x ``time_scale`` (``mode=emulate`` runs the engines
``time_scale`` x faster than the modelled GPU; the predictors' what-ifs are in model seconds already).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

import httpx

from block.http import Origin
from block.scheduler.core import normalize_url
from block.provisioning import ProvisioningController
from vidur.types import Candidate, Request

log = logging.getLogger("block.scheduler.provisioning")


class SlotStarter(Protocol):
    """Starts the services (engine + predictor) of one back-pool slot; returns the predictor's base URL."""

    async def start(self, slot: int) -> str: ...


@dataclass
class AgentStarter:
    """``POST <agent>/slots/<slot>``: the agent starts the slot's services, waits for their health and answers
    ``{"url": <predictor URL>}`` (``experiments.provision_agent``)."""

    agent_url: str
    token: Optional[str] = None
    timeout_s: float = 600.0

    async def start(self, slot: int) -> str:
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            r = await client.post(f"{self.agent_url.rstrip('/')}/slots/{slot}", headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"provisioning agent answered {r.status_code} for slot {slot}: {r.text[:300]}")
        return str(r.json()["url"])


@dataclass
class CommandStarter:
    """Runs ``template`` (``{slot}`` substituted) in a shell; its last non-empty stdout line is the predictor URL.
    The command must return once the services run (e.g. a script that starts the slot's engine and predictor on
    its host)."""

    template: str
    timeout_s: float = 600.0

    async def start(self, slot: int) -> str:
        cmd = self.template.replace("{slot}", shlex.quote(str(slot)))
        proc = await asyncio.create_subprocess_shell(cmd, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.PIPE, start_new_session=True)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"start command of slot {slot} did not return within {self.timeout_s} s") from None
        lines = [ln.strip() for ln in out.decode(errors="replace").splitlines() if ln.strip()]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"start command of slot {slot} exited {proc.returncode} without a URL: "
                               f"{err.decode(errors='replace')[-300:]}")
        return lines[-1]


class SlotLease:
    """Who starts a slot: an ``O_EXCL`` lock file per slot in ``lock_dir`` (None: this process owns every slot)."""

    def __init__(self, lock_dir: Optional[str]) -> None:
        self.dir = Path(lock_dir) if lock_dir else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._mine: set[int] = set()

    @property
    def shared(self) -> bool:
        return self.dir is not None

    def claim(self, slot: int) -> bool:
        """True for exactly one claimant of ``slot`` over all schedulers sharing the directory."""
        if self.dir is None:
            if slot in self._mine:
                return False
            self._mine.add(slot)
            return True
        try:
            fd = os.open(self.dir / f"slot{slot}.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as err:
            if err.errno == errno.EEXIST:
                return False
            raise
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True

    def publish(self, slot: int, info: Mapping[str, Any]) -> None:
        """The slot's URL (or its error) for the other schedulers; written atomically (rename)."""
        if self.dir is None:
            return
        tmp = self.dir / f".slot{slot}.json.{os.getpid()}"
        tmp.write_text(json.dumps(dict(info)))
        os.replace(tmp, self.dir / f"slot{slot}.json")

    def read(self, slot: int) -> Optional[dict[str, Any]]:
        if self.dir is None:
            return None
        try:
            return json.loads((self.dir / f"slot{slot}.json").read_text())
        except (OSError, ValueError):
            return None


@dataclass
class Finished:
    """What the controller's reactive trigger reads of a finished request (model seconds)."""

    arrival: float
    first_token: Optional[float]
    finish: float


@dataclass
class LivePool:
    """The controller's pool over live instances (module docstring). Attach it to a ``Scheduler`` with
    :meth:`attach` before the scheduler starts."""

    controller: ProvisioningController
    slots: int
    starter: SlotStarter
    lease: SlotLease
    time_scale: float = 1.0
    event_log: Optional[str] = None
    poll_s: float = 0.2
    health_timeout_s: float = 600.0
    active: list[int] = field(default_factory=list)
    warming: dict[int, float] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    failed: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.time_scale <= 0:
            raise ValueError(f"provisioning time_scale={self.time_scale} must be > 0")
        self.wall0 = time.time()
        self.sched: Any = None
        self.routable: frozenset[int] = frozenset()
        self._tasks: set[asyncio.Task] = set()
        self._log = open(self.event_log, "a", buffering=1) if self.event_log else None
        self.who = f"{socket.gethostname()}:{os.getpid()}"
        self.known: set[int] = set()  # slots this scheduler added or adopted (the watcher leaves them alone)
        self.urls: dict[int, str] = {}  # predictor URL of every back-pool slot known to run

    # ------------------------------------------------------------------ wiring
    @property
    def engines(self) -> range:  # the controller sizes the pool with len(cluster.engines)
        return range(self.slots)

    def attach(self, sched: Any) -> None:
        """Give ``sched`` the back-pool slots (no URL yet) and route only to the active ones."""
        from block.scheduler.core import Instance

        initial = len(sched.instances)
        if initial > self.slots:
            raise ValueError(f"{initial} instances given but only {self.slots} provisioning slots")
        self.controller.cfg.initial_instances = initial
        for i in range(initial, self.slots):
            sched.instances.append(Instance(i, "", None))  # type: ignore[arg-type]  # origin set when ready
        self.sched = sched
        sched.provisioning = self
        self.controller.start(self)

    def now(self, wall: Optional[float] = None) -> float:
        """Model seconds since the pool was made."""
        return ((time.time() if wall is None else wall) - self.wall0) * self.time_scale

    def _event(self, event: str, slot: int, **extra: Any) -> None:
        wall = time.time()
        row = {"wall": wall, "time_s": self.now(wall), "event": event, "instance": slot,
               "num_active": len(self.active), "scheduler": self.who, **extra}
        self.events.append(row)
        log.info("provisioning: %s slot %d (active %d) %s", event, slot, len(self.active), extra or "")
        if self._log is not None:
            try:
                self._log.write(json.dumps(row) + "\n")
            except (OSError, ValueError) as err:
                log.warning("cannot write the provisioning log: %s", err)

    # ------------------------------------------------------------------ the controller's pool interface
    def set_active(self, ids: Sequence[int]) -> None:
        self.active = sorted(ids)
        self.routable = frozenset(self.active)
        self._event("initial", -1)

    def back_pool(self) -> list[int]:
        return [i for i in range(self.slots) if i not in self.active and i not in self.warming
                and i not in self.failed]

    def add_instance(self, i: int, t: float, cold_start_s: float = 0.0) -> None:
        """Start slot ``i`` (if this scheduler wins its lease) or wait for it (another one started it)."""
        self.known.add(i)
        info = {"url": self.urls[i]} if i in self.urls else self.lease.read(i)
        if info is not None and info.get("url"):  # started before (here or by anyone): routable at once
            self._activate(i, info["url"], "adopt", cold_start_s=0.0)
            return
        self.warming[i] = t
        if self.lease.claim(i):
            self._event("start", i)
            self._spawn(self._start(i, time.monotonic()))
        else:
            self._event("wait", i)
            self._spawn(self._await_published(i))

    def remove_instance(self, i: int, t: float) -> None:
        self.active = [a for a in self.active if a != i]
        self.routable = frozenset(self.active)
        self._event("remove", i)

    # ------------------------------------------------------------------ the scheduler's hooks
    def num_active(self) -> int:
        return len(self.active)

    def describe(self) -> dict[str, Any]:
        """For the scheduler's ``/health``: the pool by state, the strategy and the additions so far."""
        return {"strategy": self.controller.cfg.strategy, "slo_s": self.controller.cfg.slo_s, "slots": self.slots,
                "active": list(self.active), "starting": sorted(self.warming), "failed": sorted(self.failed),
                "back": self.back_pool(), "added": list(self.controller.added), "shared_lease": self.lease.shared}

    def before_route(self, req: Request, cands: list[Candidate]) -> Optional[int]:
        """The predictive trigger (and scale-down bookkeeping); an instance to send ``req`` to, or None."""
        i = self.controller.before_route(self, req, cands, self.now())
        return i if i is not None and i in self.routable else None

    def on_finish(self, row: Mapping[str, Any]) -> None:
        """The reactive trigger, from a finished request's log row (wall-clock times)."""
        if row.get("status") != "ok" or row.get("arrival_s") is None or row.get("finish_s") is None:
            return
        ft = row.get("first_token_s")
        done = Finished(self.now(row["arrival_s"]), self.now(ft) if ft is not None else None,
                        self.now(row["finish_s"]))
        self.controller.on_finish(self, done, done.finish)

    # ------------------------------------------------------------------ starting and adopting
    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, i: int, t0: float) -> None:
        try:
            url = normalize_url(await self.starter.start(i))  # a garbled answer fails now, not after the timeout
            await self._wait_healthy(url)
        except Exception as err:  # noqa: BLE001 - a failed start is recorded, never routed to
            self.warming.pop(i, None)
            self.failed.add(i)
            self.lease.publish(i, {"error": f"{type(err).__name__}: {err}", "by": self.who})
            self._event("failed", i, error=f"{type(err).__name__}: {err}"[:300])
            return
        cold = time.monotonic() - t0
        self.lease.publish(i, {"url": url, "cold_start_s": cold * self.time_scale, "by": self.who})
        self._activate(i, url, "ready", cold_start_s=cold * self.time_scale, wall_cold_start_s=cold)

    async def _await_published(self, i: int) -> None:
        while True:
            info = self.lease.read(i)
            if info is not None:
                if info.get("url"):
                    self._activate(i, info["url"], "adopt", cold_start_s=info.get("cold_start_s"))
                else:
                    self.warming.pop(i, None)
                    self.failed.add(i)
                    self._event("failed", i, error=str(info.get("error"))[:300])
                return
            await asyncio.sleep(self.poll_s)

    async def _wait_healthy(self, url: str) -> None:
        deadline = time.monotonic() + self.health_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                try:
                    if (await client.get(f"{url.rstrip('/')}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} not healthy within {self.health_timeout_s} s")
                await asyncio.sleep(self.poll_s)

    def _activate(self, i: int, url: str, event: str, **extra: Any) -> None:
        self.urls[i] = url
        inst = self.sched.instances[i] if self.sched is not None else None
        if inst is not None and inst.url != url:
            inst.url, inst.origin, inst.down_until = url.rstrip("/"), Origin(url.rstrip("/")), 0.0
        if event == "adopt" and i not in self.warming and i in self.active:
            return
        if event != "adopt" and i not in self.warming:  # scaled down while starting: ready, left in the back pool
            self._event("ready_unused", i, **extra)
            return
        self.warming.pop(i, None)
        self.known.add(i)
        if i not in self.controller.added:
            self.controller.added.append(i)  # adopted slots drain on scale-down here too
        self.active = sorted(set(self.active) | {i})
        self.routable = frozenset(self.active)
        self._event(event, i, **extra)

    async def _watch(self) -> None:
        """Adopt the slots other schedulers published (shared lease only)."""
        while True:
            await asyncio.sleep(self.poll_s)
            for i in self.back_pool():
                if i in self.known:  # drained here by scale-down: only this scheduler's controller re-adds it
                    continue
                info = self.lease.read(i)
                if info is not None and info.get("url"):
                    self._activate(i, info["url"], "adopt", cold_start_s=info.get("cold_start_s"))

    async def start(self) -> None:
        if self.lease.shared:
            self._spawn(self._watch())

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._log is not None:
            self._log.close()
            self._log = None
