"""Live migration of running requests between simulated engines: Llumnix's mechanism, for ``policy=llumnix_full``.

Why: Block's artifact compares against *full* Llumnix, whose load balancing comes as much from moving running
requests as from dispatch. This module is the mechanism; which instances pair up is the policy's ``Planner``
(``block.policies.llumnix_full``), passed in so that the simulator imports nothing of ``block``.

Every ``interval_s`` (Llumnix polls every 0.05 s) the planner sees the load figures of the active instances that
are not migrating and returns (source, destination) pairs. The source picks one decoding request
(``request_policy``: ``SJF`` fewest tokens -- Llumnix's default, ``LJF`` most, ``LCFS`` last in running order) and
copies its KV cache in stages, as Llumnix's multi-stage live migration does:

* a non-final stage copies the full blocks not copied yet while the request *keeps decoding on the source*; the
  destination pre-allocates those blocks first (the migration is aborted, and every pre-allocated block given back,
  when the destination lacks them or the request finishes or is preempted on the source meanwhile);
* once at most ``last_stage_max_blocks`` blocks are left, or at stage ``max_stages``, the last stage is blocking:
  the request leaves the source after its step in flight (``Engine.abort`` keeps its progress), the remaining blocks
  are copied, and it joins the destination's decode batch (``Engine.adopt``) -- the copy is the request's downtime.
  As in Llumnix, only KV blocks gate a destination (its pre-allocation keeps the watermark): a migrated-in request
  joins the running queue even when that already holds ``max_num_seqs`` requests.

A stage copying ``n`` blocks takes ``stage_overhead_s + n x block_size x kv_bytes_per_token / bandwidth``, where
``kv_bytes_per_token`` is what one GPU of the instance holds (layers x KV heads x head dim x 2 x dtype bytes / TP:
the TP shards copy their slices in parallel) and ``bandwidth_gbps`` is one GPU's share of the link between the
two instances (GB/s). One instance takes part in at most one migration at a time (out or in).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

from vidur.engine import Engine, Seq
from vidur.types import InstanceStats

Planner = Callable[[list[InstanceStats]], list[tuple[int, int]]]  # load figures -> (source, destination) pairs
REQUEST_POLICIES = ("SJF", "LJF", "LCFS")


@dataclass(frozen=True)
class MigrationConfig:
    """How migration copies and how often the planner looks (defaults: Llumnix's)."""

    kv_bytes_per_token: float  # K and V of one token held by one GPU of an instance (bytes)
    bandwidth_gbps: float  # one GPU's share of the link between two instances (GB/s, 1e9 bytes)
    interval_s: float = 0.05  # Llumnix's polling_interval, pair_migration_frequency = 1
    last_stage_max_blocks: int = 16
    max_stages: int = 3
    stage_overhead_s: float = 0.0  # fixed cost per stage (RPC, kernel launches); 0 = bandwidth only
    request_policy: str = "SJF"

    def __post_init__(self) -> None:
        problems = []
        for k in ("kv_bytes_per_token", "bandwidth_gbps", "interval_s"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                problems.append(f"{k}={v} must be a finite number > 0")
        if self.last_stage_max_blocks < 0 or self.max_stages < 1:
            problems.append(f"last_stage_max_blocks={self.last_stage_max_blocks} must be >= 0 and "
                            f"max_stages={self.max_stages} >= 1")
        if not (math.isfinite(self.stage_overhead_s) and self.stage_overhead_s >= 0):
            problems.append(f"stage_overhead_s={self.stage_overhead_s} must be >= 0")
        if self.request_policy not in REQUEST_POLICIES:
            problems.append(f"request_policy={self.request_policy!r} must be one of {list(REQUEST_POLICIES)}")
        if problems:
            raise ValueError("invalid migration config: " + "; ".join(problems))

    def copy_s(self, blocks: int, block_size: int) -> float:
        """Seconds one stage takes to copy ``blocks`` blocks."""
        return self.stage_overhead_s + self.bytes_of(blocks, block_size) / (self.bandwidth_gbps * 1e9)

    def bytes_of(self, blocks: int, block_size: int) -> float:
        """Bytes one GPU sends for ``blocks`` blocks."""
        return blocks * block_size * self.kv_bytes_per_token


@dataclass
class Migration:
    """One migration, as recorded (``Migrator.rows``). Times in simulated seconds, bytes per GPU."""

    id: int
    src: int
    dst: int
    start_s: float
    end_s: float = math.nan  # when the request joined the destination (or the migration was aborted)
    stages: int = 0
    blocks: int = 0  # blocks copied (= pre-allocated on the destination)
    bytes: float = 0.0
    downtime_s: float = 0.0  # the last, blocking stage: the request decodes nowhere
    status: str = "running"  # running | done | aborted: <why>


class _Live:
    """A migration in progress: its record, the request and the destination blocks it holds."""

    __slots__ = ("rec", "seq", "reserved", "preemptions")

    def __init__(self, rec: Migration, seq: Seq) -> None:
        self.rec = rec
        self.seq = seq
        self.reserved = 0
        self.preemptions = seq.preemptions  # a preemption in between makes the copied KV stale


class Migrator:
    """Runs Llumnix's migration over a cluster's engines; the cluster's event loop drives it (``next_time``/``step``)."""

    def __init__(self, config: MigrationConfig, planner: Planner) -> None:
        self.cfg = config
        self.planner = planner
        self._next_tick = config.interval_s
        self._events: list[tuple[float, int, str, _Live]] = []  # (time, order, kind, migration)
        self._order = 0
        self.busy: set[int] = set()  # instances in a migration (out or in)
        self.records: list[Migration] = []

    # ------------------------------------------------------------------ driving
    @property
    def in_progress(self) -> bool:
        return bool(self._events)

    def next_time(self) -> float:
        """When the next event (a stage's end, a switch, or the planner's tick) happens."""
        return min(self._events[0][0], self._next_tick) if self._events else self._next_tick

    def step(self, engines: Sequence[Engine], active: Sequence[int]) -> float:
        """Handle the earliest event (stage ends before a tick at the same time); return its time."""
        if self._events and self._events[0][0] <= self._next_tick:
            t, _, kind, m = heapq.heappop(self._events)
            if kind == "stage":
                m.rec.stages += 1
                self._stage(m, t, engines)
            else:
                self._switch(m, t, engines)
            return t
        t = self._next_tick
        self._next_tick = t + self.cfg.interval_s
        self._tick(t, engines, active)
        return t

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]

    def summary(self) -> dict[str, Any]:
        """Totals for a run's summary.json."""
        done = [r for r in self.records if r.status == "done"]
        return {
            "num_migrations": len(done),
            "num_migrations_aborted": sum(r.status.startswith("aborted") for r in self.records),
            "migration_bytes": float(sum(r.bytes for r in self.records)),
            "mean_migration_downtime_ms": float(sum(r.downtime_s for r in done) / len(done) * 1e3) if done else 0.0,
            "mean_migration_s": float(sum(r.end_s - r.start_s for r in done) / len(done)) if done else 0.0,
        }

    # ------------------------------------------------------------------ the mechanism
    def _push(self, t: float, kind: str, m: _Live) -> None:
        self._order += 1
        heapq.heappush(self._events, (t, self._order, kind, m))

    def _tick(self, t: float, engines: Sequence[Engine], active: Sequence[int]) -> None:
        stats = []
        for i in active:
            if i in self.busy:
                continue
            e = engines[i]
            e.sync(t)
            stats.append(e.stats())
        if len(stats) < 2:
            return
        for src, dst in self.planner(stats):
            if src == dst or src in self.busy or dst in self.busy:
                continue
            seq = self._pick(engines[src])
            if seq is None:
                continue
            m = _Live(Migration(seq.id, src, dst, t), seq)
            self.records.append(m.rec)
            self.busy.update((src, dst))
            m.rec.stages = 1
            self._stage(m, t, engines)

    def _pick(self, e: Engine) -> Optional[Seq]:
        """The decoding request the source sends (``request_policy``), or None when none decodes."""
        decoding = [s for s in e.running.values() if s.in_decode]
        if not decoding:
            return None
        pol = self.cfg.request_policy
        if pol == "LCFS":
            return decoding[-1]
        length = {s.id: s.prompt + e.generated_of(s) for s in decoding}
        if pol == "SJF":
            return min(decoding, key=lambda s: length[s.id])  # first in running order among ties
        return max(decoding, key=lambda s: length[s.id])

    def _stage(self, m: _Live, t: float, engines: Sequence[Engine]) -> None:
        """Start stage ``m.rec.stages`` at ``t``: a background copy, or the last, blocking one."""
        src, dst, s = engines[m.rec.src], engines[m.rec.dst], m.seq
        src.sync(t)
        dst.sync(t)
        if s.id not in src.running or not s.in_decode or s.preemptions != m.preemptions:
            self._abort(m, t, dst, "finished" if s.finish is not None else "preempted on the source")
            return
        bs = src.bs
        full = src.computed_of(s) // bs
        copied = m.rec.blocks
        if m.rec.stages < self.cfg.max_stages and full - copied > self.cfg.last_stage_max_blocks:
            n = full - copied  # the request keeps decoding on the source meanwhile
            if not self._reserve(m, t, dst, n):
                return
            self._push(t + self.cfg.copy_s(n, bs), "stage", m)
            return
        n = src.blocks_held(s) - copied
        if not self._reserve(m, t, dst, n):
            return
        t0 = max(t, src.time)  # it leaves after the step in flight (already committed by sync)
        src.abort(s.id)  # keeps its progress; its blocks return to the source
        s.status = "migrating"
        dt = self.cfg.copy_s(n, bs)
        m.rec.downtime_s = dt
        self._push(t0 + dt, "switch", m)

    def _switch(self, m: _Live, t: float, engines: Sequence[Engine]) -> None:
        dst = engines[m.rec.dst]
        dst.sync(t)
        dst.adopt(m.seq, t, reserved_blocks=m.reserved)
        m.rec.end_s = t
        m.rec.status = "done"
        self.busy.difference_update((m.rec.src, m.rec.dst))

    def _reserve(self, m: _Live, t: float, dst: Engine, n: int) -> bool:
        """Pre-allocate ``n`` blocks on the destination for the stage about to copy them (keeping its watermark)."""
        if dst.free - n < dst.watermark_blocks:
            self._abort(m, t, dst, "destination out of KV blocks")
            return False
        dst.free -= n
        dst.whatif = None  # fewer free blocks: a what-if trajectory kept for this engine no longer holds
        m.reserved += n
        m.rec.blocks += n
        m.rec.bytes += self.cfg.bytes_of(n, dst.bs)
        return True

    def _abort(self, m: _Live, t: float, dst: Engine, why: str) -> None:
        dst.free += m.reserved  # dst was synced to t by the caller
        dst.whatif = None
        m.reserved = 0
        m.rec.end_s = t
        m.rec.status = f"aborted: {why}"
        self.busy.difference_update((m.rec.src, m.rec.dst))
