"""Auto-provisioning in the live scheduler (Fig 8 outside the simulator).

The decisions are ``block.provisioning.ProvisioningController``'s -- the very object ``mode=sim`` uses -- driven
through :class:`LivePool`, which gives it the pool interface of ``vidur.cluster.Cluster`` over real instances:

* slots ``0 .. initial-1`` are the scheduler's ``--instances`` and route from the start; slots ``initial .. N-1``
  are the back pool: no URL, not routable, usually not even running;
* ``add_instance(slot)`` (the controller's reactive or predictive trigger) takes the slot's lease and starts its
  services through a :class:`SlotStarter` -- :class:`AgentStarter` (``POST <agent>/slots/<slot>``: the run's driver
  starts engine + predictor, ``mode=emulate`` with ``experiments.local_stack``, ``mode=deploy`` with hostctl on the
  slot's host over ssh) or :class:`CommandStarter` (a shell command per slot printing the predictor URL). The slot
  becomes routable once its predictor answers ``/health``; the cold start recorded is the time that took (measured,
  never assumed: the controller's ``cold_start_s`` is unused live);
* scale-down (``remove_instance``) takes the slot out of routing at once, then drains it -- waits until its predictor
  serves no request (``/health`` ``tracked_requests``, every scheduler's requests), at most ``drain_timeout_s`` --
  and stops it (``SlotStarter.stop``: the agent's ``DELETE /slots/<i>``, or ``--provision-stop-command``); events
  ``remove``, ``drain``, ``stopped`` (``drain_s``, ``in_flight_left``). A starter that cannot stop leaves it running
  (``kept_running``; adding it again is then immediate). A request routed to it just before the removal still
  arrives (``drain_grace_s``), and one that meets a stopped instance before its first token is retried elsewhere.

Several stateless schedulers share a **lease** per slot, so no instance is started (or stopped) twice:

* ``--provision-lock-dir`` (one machine or a shared file system, ``mode=emulate``): :class:`SlotLease`, lock files
  created with ``O_CREAT | O_EXCL`` -- exactly one scheduler wins a slot's start lease and starts it, then publishes
  its URL (``slot<i>.json``, written atomically);
* ``--provision-agent-lease`` (``mode=deploy``, schedulers on several hosts): :class:`AgentLease`, the same
  operations answered by the one provisioning agent every scheduler already calls (on the deploy driver).

Every other scheduler adopts a published slot (its controller asking for it, or the watcher that polls the lease),
so all schedulers converge on the same pool. Scale-down is shared too: the scheduler that wins a slot's stop lease
publishes it as draining (every scheduler drops it from routing), stops it and releases the lease (the slot is
back in every back pool). Without a lease a single scheduler owns every slot.

Times given to the controller are model seconds: wall seconds x ``time_scale`` (``mode=emulate`` runs the engines
``time_scale`` x faster than the modelled GPU; the predictors' what-ifs are in model seconds already).
"""

from __future__ import annotations

import asyncio
import contextlib
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
    """Starts and stops the services (engine + predictor) of one back-pool slot."""

    async def start(self, slot: int) -> str:
        """Start slot ``slot``; return its predictor's base URL once the services run."""
        ...

    async def stop(self, slot: int) -> None:
        """Stop slot ``slot``'s services (NotImplementedError: this starter cannot, the slot keeps running)."""
        ...


def _bearer(token: Optional[str]) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


@dataclass
class AgentStarter:
    """``POST <agent>/slots/<slot>``: the agent starts the slot's services, waits for their health and answers
    ``{"url": <predictor URL>}``; ``DELETE <agent>/slots/<slot>`` stops them (``experiments.provision_live``)."""

    agent_url: str
    token: Optional[str] = None
    timeout_s: float = 600.0

    async def _call(self, method: str, slot: int) -> httpx.Response:
        async with httpx.AsyncClient(timeout=self.timeout_s, trust_env=False) as client:
            r = await client.request(method, f"{self.agent_url.rstrip('/')}/slots/{slot}",
                                     headers=_bearer(self.token))
        if r.status_code != 200:
            raise RuntimeError(f"provisioning agent answered {r.status_code} to {method} of slot {slot}: "
                               f"{r.text[:300]}")
        return r

    async def start(self, slot: int) -> str:
        return str((await self._call("POST", slot)).json()["url"])

    async def stop(self, slot: int) -> None:
        await self._call("DELETE", slot)


async def _shell(cmd: str, timeout_s: float, what: str) -> tuple[int, str, str]:
    """Run ``cmd`` in a shell (own session), bounded by ``timeout_s``: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_shell(cmd, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{what} did not return within {timeout_s} s") from None
    return int(proc.returncode or 0), out.decode(errors="replace"), err.decode(errors="replace")


@dataclass
class CommandStarter:
    """Runs ``template`` (``{slot}`` substituted) in a shell; its last non-empty stdout line is the predictor URL.
    The command must return once the services run (e.g. a script that starts the slot's engine and predictor on
    its host). ``stop_template`` (optional) stops them; without it a scaled-down slot keeps running."""

    template: str
    timeout_s: float = 600.0
    stop_template: Optional[str] = None

    async def start(self, slot: int) -> str:
        cmd = self.template.replace("{slot}", shlex.quote(str(slot)))
        code, out, err = await _shell(cmd, self.timeout_s, f"start command of slot {slot}")
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        if code != 0 or not lines:
            raise RuntimeError(f"start command of slot {slot} exited {code} without a URL: {err[-300:]}")
        return lines[-1]

    async def stop(self, slot: int) -> None:
        if not self.stop_template:
            raise NotImplementedError("no stop command (--provision-stop-command)")
        code, _, err = await _shell(self.stop_template.replace("{slot}", shlex.quote(str(slot))), self.timeout_s,
                                    f"stop command of slot {slot}")
        if code != 0:
            raise RuntimeError(f"stop command of slot {slot} exited {code}: {err[-300:]}")


class Lease(Protocol):
    """Who starts and who stops each slot, over every scheduler sharing it: :class:`SlotLease` (lock files) or
    :class:`AgentLease` (the provisioning agent). Blocking calls: :class:`LivePool` runs them off its event loop."""

    @property
    def shared(self) -> bool: ...

    def claim(self, slot: int, what: str = "start") -> bool:
        """True for exactly one claimant of (``slot``, ``what``: start | stop) until the slot is released."""
        ...

    def publish(self, slot: int, info: Mapping[str, Any]) -> None: ...

    def read(self, slot: int) -> Optional[dict[str, Any]]: ...

    def release(self, slot: int) -> None: ...


class SlotLease:
    """Who starts and who stops a slot: ``O_EXCL`` lock files in ``lock_dir`` (None: this process owns every slot).

    ``slot<i>.lock`` is the start lease, ``slot<i>.stop.lock`` the stop lease, ``slot<i>.json`` the published state
    (``{"url"}``, ``{"error"}``, or ``{"url", "state": "draining"}`` while a scheduler drains it to stop it).
    ``release`` (after the stop) removes all three, so the slot can be started again."""

    def __init__(self, lock_dir: Optional[str]) -> None:
        self.dir = Path(lock_dir) if lock_dir else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._mine: set[tuple[int, str]] = set()

    @property
    def shared(self) -> bool:
        return self.dir is not None

    def _lock(self, slot: int, what: str) -> Path:
        assert self.dir is not None
        return self.dir / (f"slot{slot}.lock" if what == "start" else f"slot{slot}.{what}.lock")

    def claim(self, slot: int, what: str = "start") -> bool:
        """True for exactly one claimant of (``slot``, ``what``) over all schedulers sharing the directory."""
        if self.dir is None:
            if (slot, what) in self._mine:
                return False
            self._mine.add((slot, what))
            return True
        try:
            fd = os.open(self._lock(slot, what), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as err:
            if err.errno == errno.EEXIST:
                return False
            raise
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True

    def publish(self, slot: int, info: Mapping[str, Any]) -> None:
        """The slot's URL (or its error, or its draining) for the other schedulers; written atomically (rename)."""
        if self.dir is None:
            return
        from vidur.records import write_atomic

        write_atomic(self.dir / f"slot{slot}.json", json.dumps(dict(info)).encode())

    def read(self, slot: int) -> Optional[dict[str, Any]]:
        if self.dir is None:
            return None
        try:
            return json.loads((self.dir / f"slot{slot}.json").read_text())
        except (OSError, ValueError):
            return None

    def release(self, slot: int) -> None:
        """After a stop: the published state first (nobody adopts it any more), then the start and stop leases."""
        self._mine = {m for m in self._mine if m[0] != slot}
        if self.dir is None:
            return
        for path in (self.dir / f"slot{slot}.json", self._lock(slot, "start"), self._lock(slot, "stop")):
            path.unlink(missing_ok=True)


@dataclass
class AgentLease:
    """The same lease held by the provisioning agent (``mode=deploy``: one agent on the deploy driver, reached by
    every scheduler host through an ssh tunnel): ``POST /leases/<i>/<start|stop>`` claims (first claimant wins),
    ``PUT``/``GET``/``DELETE /leases/<i>`` publish, read and release the slot's state. Blocking calls: the pool
    runs them in a thread."""

    agent_url: str
    token: Optional[str] = None
    timeout_s: float = 30.0
    who: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    shared = True

    def _call(self, method: str, path: str, body: Optional[Mapping[str, Any]] = None) -> httpx.Response:
        r = httpx.request(method, f"{self.agent_url.rstrip('/')}/leases/{path}", json=body,
                          headers=_bearer(self.token), timeout=self.timeout_s, trust_env=False)
        if r.status_code not in (200, 404):
            raise RuntimeError(f"provisioning agent answered {r.status_code} to {method} /leases/{path}: "
                               f"{r.text[:300]}")
        return r

    def claim(self, slot: int, what: str = "start") -> bool:
        return bool(self._call("POST", f"{slot}/{what}", {"by": self.who}).json()["claimed"])

    def publish(self, slot: int, info: Mapping[str, Any]) -> None:
        self._call("PUT", str(slot), dict(info))

    def read(self, slot: int) -> Optional[dict[str, Any]]:
        r = self._call("GET", str(slot))
        return r.json() if r.status_code == 200 else None

    def release(self, slot: int) -> None:
        self._call("DELETE", str(slot))


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
    lease: Lease
    time_scale: float = 1.0
    event_log: Optional[str] = None
    poll_s: float = 0.2
    health_timeout_s: float = 600.0
    drain_timeout_s: float = 600.0  # longest wait for a scaled-down slot's requests before it is stopped anyway
    drain_grace_s: float = 1.0  # wall seconds before the first in-flight check: routings already decided arrive
    active: list[int] = field(default_factory=list)
    warming: dict[int, float] = field(default_factory=dict)
    draining: dict[int, float] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    failed: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.time_scale <= 0:
            raise ValueError(f"provisioning time_scale={self.time_scale} must be > 0")
        if self.drain_timeout_s < 0:
            raise ValueError(f"provisioning drain_timeout_s={self.drain_timeout_s} must be >= 0")
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
                and i not in self.failed and i not in self.draining]

    def add_instance(self, i: int, t: float, cold_start_s: float = 0.0) -> None:
        """Start slot ``i`` (if this scheduler wins its lease) or adopt it (another one started it)."""
        self.known.add(i)
        self.warming[i] = t
        self._spawn(self._add(i))

    def remove_instance(self, i: int, t: float) -> None:
        """Scale-down: out of routing now; then drained and stopped (:meth:`_retire`)."""
        was_active = i in self.active
        self.active = [a for a in self.active if a != i]
        self.routable = frozenset(self.active)
        self._event("remove", i)
        if was_active and i in self.urls:
            self.draining[i] = t
            self._spawn(self._retire(i, self.urls[i]))

    # ------------------------------------------------------------------ the scheduler's hooks
    def num_active(self) -> int:
        return len(self.active)

    def describe(self) -> dict[str, Any]:
        """For the scheduler's ``/health``: the pool by state, the strategy and the additions so far."""
        return {"strategy": self.controller.cfg.strategy, "slo_s": self.controller.cfg.slo_s, "slots": self.slots,
                "active": list(self.active), "starting": sorted(self.warming), "draining": sorted(self.draining),
                "failed": sorted(self.failed), "back": self.back_pool(), "added": list(self.controller.added),
                "shared_lease": self.lease.shared}

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

    async def _lease(self, fn, *args: Any) -> Any:
        """A lease call off the event loop (the agent's lease is an HTTP round trip, a file lease a syscall)."""
        return await asyncio.to_thread(fn, *args)

    async def _read(self, i: int) -> Optional[dict[str, Any]]:
        try:
            return await self._lease(self.lease.read, i)
        except Exception as err:  # noqa: BLE001 - an unreadable lease is "nothing published yet"
            log.warning("cannot read the lease of slot %d: %s", i, err)
            return None

    def _fail(self, i: int, error: str) -> None:
        self.warming.pop(i, None)
        self.failed.add(i)
        self._event("failed", i, error=error[:300])

    async def _add(self, i: int) -> None:
        """Adopt slot ``i`` if it runs (published by anyone), else claim its start lease and start it; a slot being
        drained by another scheduler is waited for (it is released after its stop) and then started again."""
        t0 = time.monotonic()
        deadline = t0 + self.health_timeout_s + 60.0
        waited = False
        while True:
            if i not in self.warming:  # scaled down again while this scheduler waited for it: leave it
                return
            if not self.lease.shared and i in self.urls:  # kept running after a scale-down: routable at once
                return self._activate(i, self.urls[i], "adopt", cold_start_s=0.0)
            info = await self._read(i) if self.lease.shared else None
            if info is not None and info.get("url") and info.get("state") != "draining":
                return self._activate(i, info["url"], "adopt", cold_start_s=info.get("cold_start_s"))
            if info is not None and not info.get("url"):
                return self._fail(i, str(info.get("error")))
            if info is None:
                try:
                    won = await self._lease(self.lease.claim, i)
                except Exception as err:  # noqa: BLE001 - a lease that cannot be asked fails this start
                    return self._fail(i, f"lease: {type(err).__name__}: {err}")
                if won:
                    self._event("start", i)
                    return await self._start(i, t0)
            if not waited:  # another scheduler starts it (or drains it): its state will be published
                self._event("wait", i)
                waited = True
            if time.monotonic() > deadline:
                return self._fail(i, f"slot {i} neither published nor released within {deadline - t0:.0f} s")
            await asyncio.sleep(self.poll_s)

    async def _start(self, i: int, t0: float) -> None:
        try:
            url = normalize_url(await self.starter.start(i))  # a garbled answer fails now, not after the timeout
            await self._wait_healthy(url)
        except Exception as err:  # noqa: BLE001 - a failed start is recorded, never routed to
            msg = f"{type(err).__name__}: {err}"
            with contextlib.suppress(Exception):
                await self._lease(self.lease.publish, i, {"error": msg, "by": self.who})
            return self._fail(i, msg)
        cold = time.monotonic() - t0
        with contextlib.suppress(Exception):  # peers adopt it; this scheduler routes to it either way
            await self._lease(self.lease.publish, i, {"url": url, "cold_start_s": cold * self.time_scale,
                                                      "by": self.who})
        self._activate(i, url, "ready", cold_start_s=cold * self.time_scale, wall_cold_start_s=cold)

    async def _wait_healthy(self, url: str) -> None:
        deadline = time.monotonic() + self.health_timeout_s
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
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
        if event != "adopt" and i not in self.warming:  # scaled down while starting: ready, then stopped unused
            self._event("ready_unused", i, **extra)
            self.draining[i] = self.now()
            self._spawn(self._retire(i, url))
            return
        self.warming.pop(i, None)
        self.known.add(i)
        if i not in self.controller.added:
            self.controller.added.append(i)  # adopted slots drain on scale-down here too
        self.active = sorted(set(self.active) | {i})
        self.routable = frozenset(self.active)
        self._event(event, i, **extra)

    # ------------------------------------------------------------------ scale-down: drain, then stop
    async def _in_flight(self, client: httpx.AsyncClient, url: str) -> Optional[int]:
        """Requests the slot's predictor is serving now, over every scheduler (its ``/health``
        ``tracked_requests``); None when it cannot say (unreachable: nothing left to drain)."""
        try:
            r = await client.get(f"{url.rstrip('/')}/health")
            if r.status_code != 200:  # its engine is down: nothing is served there any more
                return None
            doc = r.json()
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("tracked_requests"), int):
            log.warning("%s/health says nothing of its requests: waiting for the drain timeout", url)
            return 1
        return int(doc["tracked_requests"])

    async def _wait_drained(self, url: str) -> int:
        """Until the slot serves no request (two readings of zero ``poll_s`` apart, after ``drain_grace_s``), at
        most ``drain_timeout_s``; returns the requests still in flight (0 unless it timed out)."""
        deadline = time.monotonic() + self.drain_timeout_s
        await asyncio.sleep(min(self.drain_grace_s, self.drain_timeout_s))
        zeros = 0
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while True:
                n = await self._in_flight(client, url)
                zeros = zeros + 1 if not n else 0
                if zeros >= 2:
                    return 0
                if time.monotonic() >= deadline:
                    return int(n or 0)
                await asyncio.sleep(self.poll_s)

    async def _retire(self, i: int, url: str) -> None:
        """Drain and stop a scaled-down slot. With a shared lease one scheduler wins the slot's stop lease and
        publishes it as draining (every other scheduler drops it from routing); the others only stop routing."""
        try:
            won = await self._lease(self.lease.claim, i, "stop")
        except Exception as err:  # noqa: BLE001 - without the lease nobody may stop it: it keeps running
            self.draining.pop(i, None)
            self._event("stop_failed", i, error=f"lease: {type(err).__name__}: {err}"[:300])
            return
        if not won:  # another scheduler drains and stops it; it comes back to this pool once released
            self.draining.pop(i, None)
            self.urls.pop(i, None)
            return
        with contextlib.suppress(Exception):
            await self._lease(self.lease.publish, i, {"url": url, "state": "draining", "by": self.who})
        self._event("drain", i)
        t0 = time.monotonic()
        left = await self._wait_drained(url)
        drained = time.monotonic() - t0
        try:
            await self.starter.stop(i)
        except NotImplementedError as err:  # this starter cannot stop: the slot keeps running, re-adds adopt it
            self.draining.pop(i, None)
            with contextlib.suppress(Exception):
                await self._lease(self.lease.publish, i, {"url": url, "by": self.who})
            self._event("kept_running", i, reason=str(err)[:300], drain_s=drained * self.time_scale)
            return
        except Exception as err:  # noqa: BLE001 - recorded; the slot is left out of this pool (it may still run)
            msg = f"{type(err).__name__}: {err}"[:300]
            self.draining.pop(i, None)
            self.failed.add(i)
            with contextlib.suppress(Exception):  # the drain is over: peers may adopt it again (it may still run)
                await self._lease(self.lease.publish, i, {"url": url, "state": "stop_failed", "error": msg,
                                                          "by": self.who})
            self._event("stop_failed", i, error=msg)
            return
        self.urls.pop(i, None)
        inst = self.sched.instances[i] if self.sched is not None else None
        if inst is not None:
            inst.url = ""
        with contextlib.suppress(Exception):
            await self._lease(self.lease.release, i)
        self.draining.pop(i, None)
        self._event("stopped", i, drain_s=drained * self.time_scale, wall_drain_s=drained, in_flight_left=left)

    # ------------------------------------------------------------------ peers (shared lease)
    async def _watch(self) -> None:
        """Adopt the slots other schedulers published; drop the ones another scheduler drains (shared lease)."""
        initial = self.controller.cfg.initial_instances
        while True:
            await asyncio.sleep(self.poll_s)
            for i in self.back_pool():
                if i in self.known:  # drained here by scale-down: only this scheduler's controller re-adds it
                    continue
                info = await self._read(i)
                if info is not None and info.get("url") and info.get("state") != "draining" \
                        and i in self.back_pool():
                    self._activate(i, info["url"], "adopt", cold_start_s=info.get("cold_start_s"))
            for i in [a for a in self.active if a >= initial and a not in self.draining]:
                info = await self._read(i)
                if (info is None or info.get("state") == "draining") and i in self.active:
                    self.active = [a for a in self.active if a != i]
                    self.routable = frozenset(self.active)
                    if i in self.controller.added:
                        self.controller.added.remove(i)
                    self.known.add(i)
                    self.urls.pop(i, None)
                    self._event("remove", i, by=(info or {}).get("by", "released"))

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
