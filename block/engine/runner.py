"""The simulator's engine (``vidur.engine.Engine``) run in real time by one asyncio task.

Clocks: model time ``m = (monotonic() - t0) * S`` with ``S`` the time scale; every engine step takes
``step_time / S`` real seconds, so the service runs ``S`` times faster than the modelled GPU.

The stepping loop owns the engine. While it has work it commits *exactly one* step -- ``engine.sync(T + eps)`` with
``T = engine.time`` the end of the last committed step, which commits the mixed step or the first step of a decode
run that starts at ``T`` -- then sleeps until real time reaches the step's end (``engine.time / S``) and only then
emits that step's tokens: every request whose ``generated_of(seq)`` grew gets the new tokens, a finished one its
final event. Steps are scheduled on the absolute model clock, so per-step overheads do not accumulate as drift as
long as the loop keeps up; when it falls behind, the next step starts at once (back to back, like a GPU).

A new request at model time ``now`` first brings the engine up to ``now`` (in the normal case the step in flight is
already committed and nothing happens; if the loop is late it commits the steps that should have started, emitting
those that have already ended), then ``engine.add(seq, now)``: it joins the first step formed after ``now`` (an idle
engine starts that step at ``now``). Per-step work is O(running requests).

Abort (client gone): ``Engine.abort(request_id)`` takes a waiting request out of the queue, or removes a running one
the way the engine preempts one (its KV blocks are freed) without re-queueing it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from vidur.engine import Engine, Seq, StepTimeModel
from vidur.types import EngineConfig, InstanceState

log = logging.getLogger("block.engine")

FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"


@dataclass(eq=False)
class Handle:
    """One request's life in the runner, and the channel its tokens come through."""

    rid: int
    external_id: str
    prompt_tokens: int
    max_tokens: int
    expected: int
    seed: int
    seq: Optional[Seq] = None
    emitted: int = 0
    finished: bool = False
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    arrival_wall: float = 0.0
    first_token_wall: Optional[float] = None
    last_token_wall: Optional[float] = None
    finish_wall: Optional[float] = None
    # events: (new tokens, finish reason or None); the event with a reason is the last one
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class RealTimeEngine:
    """A ``vidur`` engine stepped in (scaled) real time. All methods must run on the event loop's thread."""

    def __init__(self, config: EngineConfig, model: StepTimeModel, time_scale: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, on_event: Optional[Callable[..., None]] = None) -> None:
        if not time_scale > 0 or math.isinf(time_scale):
            raise ValueError(f"time_scale={time_scale} must be a positive finite number")
        self.engine = Engine(config, model, keep_finished=False)
        self.engine.on_finish = self._on_finish
        self.config = config
        self.scale = float(time_scale)
        self.clock = clock
        self.t0 = clock()
        self.handles: dict[int, Handle] = {}  # requests inside the engine (running or waiting), by engine id
        self._finished: list[Seq] = []
        self._nrejected = 0
        self._next_id = 0
        self._task: Optional[asyncio.Task] = None
        self._wake: Optional[asyncio.Event] = None
        self.failed: Optional[str] = None
        self.on_event = on_event  # callback(kind, handle, n) for metrics: kind in {"tokens", "finish"}
        self.num_aborted = 0

    # ------------------------------------------------------------------ clocks
    def model_now(self) -> float:
        return (self.clock() - self.t0) * self.scale

    def wall_of(self, model_t: float) -> float:
        return self.t0 + model_t / self.scale

    # ------------------------------------------------------------------ loop
    def ensure_started(self) -> None:
        if self._task is None or self._task.done():
            if self._task is not None and self._task.done() and self.failed:
                return
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="block-engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
            self._task = None

    def _commit_one(self) -> None:
        """Commit the next step (exactly one) starting at ``engine.time``."""
        t = self.engine.time
        self.engine.sync(t + max(1e-9, abs(t) * 1e-12))

    def catch_up(self, now: Optional[float] = None) -> None:
        """Commit the steps that should have started before ``now`` (only when the loop is late)."""
        eng = self.engine
        now = self.model_now() if now is None else now
        while eng.has_work() and eng.time < now:
            self._commit_one()
            if eng.time <= now:
                self._emit()

    async def _run(self) -> None:
        eng = self.engine
        tol = 2e-6 * self.scale  # 2 microseconds of real time, in model seconds
        try:
            while True:
                now = self.model_now()
                if eng.time > now + tol:
                    await asyncio.sleep((eng.time - now) / self.scale)
                    continue
                self._emit()
                if eng.has_work():
                    self._commit_one()
                    if eng.time <= self.model_now():
                        await asyncio.sleep(0)  # behind real time: let the streams flush anyway
                else:
                    assert self._wake is not None
                    self._wake.clear()
                    await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug: fail every request rather than hang them
            log.exception("engine loop failed")
            self.failed = f"engine loop failed: {type(err).__name__}: {err}"
            for h in list(self.handles.values()):
                self._close(h, FINISH_ERROR, error=self.failed)
            self.handles.clear()

    # ------------------------------------------------------------------ emission
    def _on_finish(self, s: Seq) -> None:
        self._finished.append(s)

    def _emit(self) -> None:
        """Hand out the tokens of every committed step (call only when real time has reached ``engine.time``)."""
        eng = self.engine
        wall = self.clock()
        for s in eng.running.values():
            h = s.tag
            g = eng.generated_of(s)
            if g > h.emitted:
                self._push(h, g - h.emitted, wall)
        if self._finished:
            done, self._finished = self._finished, []
            for s in done:
                h = s.tag
                self.handles.pop(s.id, None)
                if h.finished:
                    continue
                self._close(h, FINISH_LENGTH, wall=wall, n=s.generated - h.emitted)
        if len(eng.rejected) > self._nrejected:  # cannot happen for requests the service validated; be safe
            for s in eng.rejected[self._nrejected:]:
                h = s.tag
                self.handles.pop(s.id, None)
                self._close(h, FINISH_ERROR, error="request can never fit in the KV cache", wall=wall)
            self._nrejected = len(eng.rejected)

    def _count(self, h: Handle, n: int, wall: float) -> None:
        if h.first_token_wall is None:
            h.first_token_wall = wall
        h.last_token_wall = wall
        h.emitted += n
        if self.on_event is not None:
            self.on_event("tokens", h, n)

    def _push(self, h: Handle, n: int, wall: float) -> None:
        if h.finished:
            return
        self._count(h, n, wall)
        h.queue.put_nowait((n, None))

    def _close(self, h: Handle, reason: str, error: Optional[str] = None, wall: Optional[float] = None,
               n: int = 0) -> None:
        """Finish ``h`` with ``reason``; its last ``n`` tokens travel in the same (final) event."""
        if h.finished:
            return
        wall = self.clock() if wall is None else wall
        if n > 0:
            self._count(h, n, wall)
        h.finished = True
        h.finish_reason = reason
        h.error = error
        h.finish_wall = wall
        h.queue.put_nowait((max(0, n), reason))
        h.done.set()
        if self.on_event is not None:
            self.on_event("finish", h, 0)

    # ------------------------------------------------------------------ requests
    def submit(self, prompt_tokens: int, max_tokens: int, *, external_id: str = "", expected: Optional[int] = None,
               seed: int = 0) -> Handle:
        """Queue a request now; its tokens arrive on ``handle.queue``."""
        if self.failed:
            raise RuntimeError(self.failed)
        self.ensure_started()
        rid = self._next_id
        self._next_id += 1
        h = Handle(rid=rid, external_id=external_id or str(rid), prompt_tokens=int(prompt_tokens),
                   max_tokens=int(max_tokens), expected=min(int(expected or max_tokens), int(max_tokens)), seed=int(seed),
                   arrival_wall=self.clock())
        now = self.model_now()
        self.catch_up(now)  # = engine.sync(now), emitting the tokens of steps that have already ended
        seq = Seq(rid, h.prompt_tokens, h.max_tokens, arrival=now, expected=h.expected, tag=h)
        h.seq = seq
        self.handles[rid] = h
        self.engine.add(seq, now)
        assert self._wake is not None
        self._wake.set()
        return h

    def abort(self, h: Handle) -> bool:
        """Take a request out of the engine (client gone). Returns True if it was still in the engine."""
        if h.finished:
            return False
        s = h.seq
        removed = s is not None and self.engine.abort(s.id) is not None
        self.handles.pop(h.rid, None)
        self.num_aborted += 1
        self._close(h, FINISH_ABORT)
        return removed

    # ------------------------------------------------------------------ introspection
    def snapshot(self) -> tuple[InstanceState, float]:
        """The engine's exact state now (after the step in flight, ``busy_for_s`` = its remaining model time)."""
        now = self.model_now()
        self.catch_up(now)
        return self.engine.snapshot(now), now

    def counts(self) -> tuple[int, int, int, int, int]:
        """(running, waiting, free blocks, total blocks, preemptions) -- O(1)."""
        e = self.engine
        return len(e.running), len(e.waiting), e.free, e.total_blocks, e.num_preemptions
