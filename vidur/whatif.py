"""What-if: "how long would one more request take on this instance?"

``predict`` rebuilds the engine from an ``InstanceState`` (what a predictor knows), adds the candidate request at the
back of the waiting queue and simulates the engine forward -- with the same ``Engine`` the cluster experiments use,
under the scheduling rule the state's engine config names (``scheduler``: vLLM V0 or V1, ``vidur.sched``) --
until that request finishes. Nothing else arrives in the meantime: the answer is the latency the request would see if
it were dispatched now and the instance received nothing more (Block's ``min_new_request_latency``).

In-flight requests run to their expected output length; one that has already decoded past it is assumed to end
``overrun_tokens`` (10) tokens later, as Block does. A state with ``busy_for_s > 0`` starts the simulation at that
offset: the step in flight must end before anything new is scheduled.

Why it does not slow down with the queue (``Trajectory``): admission is FCFS and the candidate is queued last, so
every step whose admission loop stops before the back of the queue is the instance's own, whatever the candidate is.
The trajectory simulates the engine without the candidate up to the first step that may reach the back (the rule's
``may_reach_back``: False only when the seats or the head of the queue surely stop admission first) and every
candidate runs from a fork of it: what is left to simulate per candidate is at most ``max_num_seqs`` requests ahead
and the candidate's own life among the running ones. A sentinel that can never fit sits at the back of the
trajectory's queue so that the steps see the queue length they would with the candidate (V1's long-prefill
threshold counts it); the rule rejects it when admission reaches it, which changes nothing else, and it is put back.

What is left per candidate -- its own life among the running requests -- is walked in closed form over the
trajectory's recorded future when the rule allows (``vidur.candidate``: V0 with chunked prefill, where a candidate
queued last changes only the steps' durations, or is evicted first): no fork, no step simulated per candidate.

``EngineWhatIf`` keeps that trajectory with a live simulated engine (``predict_engine``, used by ``vidur.cluster``):
as long as the engine's own steps are the trajectory's -- for good with oracle lengths, with estimated lengths until
the first step in which a request could reach the shorter of its assumed and true length, or an overrun request
could decode (``EngineWhatIf.n_div``) -- it stays valid as time passes, and a request the engine receives is queued
into it where it stands (and overlaid onto its recorded future, ``Future.overlay``): a prediction costs the same at 10
or 10,000 waiting requests. A trajectory that would part
from its engine at the next step (an overrun request is running) is not kept: one simulation on a fork answers.
"""

from __future__ import annotations

import heapq
import time

from vidur.candidate import Future
from vidur.engine import INF, Engine, Seq, StepTimeModel, assumed_output
from vidur.sched import make_rule
from vidur.types import InstanceState, Prediction, Request

TARGET_ID = -1  # id of the candidate inside the what-if engine (real request ids are >= 0)
BACK_ID = -2  # id of the sentinel at the back of a trajectory's queue
_NEVER_FITS = 1 << 40  # the sentinel's prompt: every rule rejects it when (and only when) admission reaches it


def _never_fits(e: Engine, s: Seq) -> bool:
    """Whether a rule may reject ``s`` as never fitting (V0's test or V1's: either way, flag it)."""
    need = -(-(s.prompt + s.generated) // e.bs)
    return need > e.total_blocks - e.watermark_blocks or s.prompt > e.cfg.max_model_len


class Trajectory:
    """An engine's future without the candidate, paused where a request queued last may first be reached.

    ``eng`` becomes the trajectory's own (a fork or a rebuilt engine): its requests run to their assumed lengths.
    """

    def __init__(self, eng: Engine, eager: bool = True) -> None:
        self.s = eng
        # ``closed`` records the future on a version's first query (``eager``: it will be asked again, as a faithful
        # engine's trajectory is), else on its second: recording costs more than simulating one candidate on a fork
        self.eager = eager
        self._asked = -1  # the version whose first query went to a fork (not eager)
        self.rule = make_rule(eng.cfg)
        self.back = Seq(BACK_ID, _NEVER_FITS, 1)
        eng.waiting.append(self.back)
        # a request that can never fit is rejected without taking a seat: the rule's seat count would be wrong
        self.unsure = any(_never_fits(eng, s) for s in eng.waiting if s is not self.back)
        self.version = 0  # bumped by ``add``: with the engine's step count it names the point ``base`` is for
        self._base: tuple[tuple[int, int, float], float] | None = None  # (point, its finish-time sum): ``base``
        self.future: Future | None = None  # the steps past the checkpoint, recorded for this version (``closed``)
        # a request received is overlaid onto the recorded future (``Future.overlay``) instead of the future being
        # recorded again (False: always recorded again; the same answers to 1e-9, tests compare the two)
        self.overlays = True
        self.overlaid = 0  # futures made by overlay

    def _step(self, until: float) -> None:
        """Commit the next step (or run); if its admission reached the back, put the rejected sentinel back."""
        s: Engine = self.s
        s._rule_advance(s, until)  # (``Engine._advance`` without the call in between: the reach loop's hot path)
        back = self.back
        if back.status == "rejected":
            s.rejected.pop()
            back.status = "waiting"
            s.waiting.append(back)  # admission went through the whole queue: nothing is left in front of it

    def reach(self, t: float) -> Engine:
        """The trajectory's engine at the first step boundary at or after ``t`` from which a request queued last
        may be reached soon: every step before it is the same with or without such a request.

        ``t`` never goes back between calls. Steps starting before ``t`` are the engine's own (a request arriving at
        ``t`` is not there yet); after them, steps whose admission surely stops before the back
        (``may_reach_back`` False) are skipped too -- the candidate, queued behind the whole queue, is never looked
        at in them. The engine returned is the trajectory's own: fork it before running anything on it.
        """
        s: Engine = self.s
        while s.time < t and (s.running or len(s.waiting) > 1):
            self._step(t)
        if not self.unsure:
            may = self.rule.may_reach_back
            settle = self.rule.settle
            settle(s)
            while not may(s):
                self._step(INF)
                settle(s)
        return s

    def candidate(self, t: float, seq: Seq) -> Engine:
        """A fork of the reach checkpoint for ``t`` with ``seq`` queued last, ready to run."""
        e = self.reach(t).fork()
        e.waiting.pop()  # the sentinel
        if not e.running and not e.waiting and e.time < t:
            e.time = t  # an idle engine starts its next step when the request arrives (Engine.add)
        e.waiting.append(seq)
        return e

    def closed(self, t: float, seq: Seq) -> tuple[float, float, float] | None:
        """(e2e, ttft, queueing) from ``t`` of ``seq`` queued last at ``t``, walked in closed form over the recorded
        future (``vidur.candidate``), or None where only a fork's simulation can tell."""
        if self.unsure or not self.rule.closed_form:
            return None
        f = self.future
        if f is None or f.version != self.version:
            if not self.eager and self._asked != self.version:
                self._asked = self.version
                return None
        k = self.reach(t)
        if f is None or f.version != self.version:
            f = self.future = Future(k, self.rule, self.version)
        return f.life(k.num_steps, k.time, t, seq.prompt, seq.out)

    def base(self, t: float) -> float:
        """The sum of the finish times of the requests in the reach checkpoint for ``t`` when no candidate joins
        (``_run_with_delay``'s reference; computed once per checkpoint)."""
        k = self.reach(t)
        point = (self.version, k.num_steps, k.time)
        cached = self._base
        if cached is not None and cached[0] == point:
            return cached[1]
        e = k.fork()
        e.waiting.pop()  # the sentinel
        acc = e.on_finish = _FinishSum(None)
        e.run_until_idle()
        self._base = (point, acc.total)
        return acc.total

    def add(self, seq: Seq, t: float) -> None:
        """Queue ``seq`` at ``t`` for good (the engine this trajectory follows received it): it goes in front of the
        sentinel at ``reach(t)`` (the steps skipped after ``t`` there never looked at the back either)."""
        s = self.reach(t)
        never = _never_fits(s, seq)
        f = self.future
        if (f is not None and f.version == self.version and not self.unsure and not never and self.overlays
                and seq.generated == 0 and seq.computed == 0):
            # the recorded future with ``seq`` overlaid (``Future.overlay``), or None: recorded again when asked
            f = self.future = f.overlay(s.num_steps, s.time, seq.prompt, seq.out, self.version + 1)
            if f is not None:
                self.overlaid += 1
        self.version += 1
        s.waiting.pop()
        if not s.running and not s.waiting and s.time < t:
            s.time = t
        s.waiting.append(seq)
        s.waiting.append(self.back)
        self.unsure = self.unsure or never


def _run(e: Engine, target: Seq, t: float) -> tuple[float, float, float]:
    """Run ``e`` until ``target`` finishes; (e2e, ttft, queueing) from ``t``, inf if it was rejected."""
    e.run_until_finished(target)
    if target.finish is None:  # rejected: it can never fit on this instance
        return INF, INF, INF
    return target.finish - t, target.first_token - t, target.first_sched - t


class _FinishSum:
    """``Engine.on_finish`` hook: the sum of the finish times of the requests the engine finishes, but ``skip``'s."""

    __slots__ = ("skip", "total")

    def __init__(self, skip: Seq | None) -> None:
        self.skip = skip
        self.total = 0.0

    def __call__(self, s: Seq) -> None:
        if s is not self.skip:
            self.total += s.finish


def _run_with_delay(e: Engine, target: Seq, t: float, base: float) -> tuple[float, float, float, float]:
    """``_run`` plus the delay the candidate causes the others: the engine is then run until idle and the sum of the
    other requests' finish times is compared with ``base``, the same sum without the candidate (``Trajectory.base``).

    Both runs start from the same reach checkpoint, so they hold the same requests: the difference is the latency
    the candidate adds to the requests already on the instance (longer steps, preemptions, seats and KV it takes),
    under the what-if's own assumption that nothing else arrives.
    """
    acc = e.on_finish = _FinishSum(target)
    out = _run(e, target, t)
    if out[0] == INF:
        return (*out, 0.0)
    e.run_until_idle()
    return (*out, max(0.0, acc.total - base))


def _target(request: Request, expected_output_tokens: int | None) -> Seq:
    out = expected_output_tokens if expected_output_tokens is not None else request.expected_output_tokens()
    return Seq(TARGET_ID, request.prompt_tokens, max(1, int(out)))


class WhatIf:
    """Predictions for several candidates on one ``InstanceState`` (one trajectory, built on the first query)."""

    def __init__(self, state: InstanceState, model: StepTimeModel, *, overrun_tokens: int = 10) -> None:
        self.state = state
        self.model = model
        self.overrun_tokens = overrun_tokens
        self._traj: Trajectory | None = None

    def predict(self, request: Request, *, instance_id: int = 0,
                expected_output_tokens: int | None = None, others_delay: bool = False) -> Prediction:
        t0 = time.perf_counter()
        traj = self._traj
        if traj is None:
            traj = self._traj = Trajectory(Engine.from_state(self.state, self.model, self.overrun_tokens),
                                           eager=False)
        target = _target(request, expected_output_tokens)
        e2e, ttft, queue, delay = _answer(traj, target, 0.0, others_delay)
        st = self.state
        return Prediction(
            instance_id=instance_id, e2e_s=e2e, ttft_s=ttft, queue_s=queue, free_blocks=st.free_blocks,
            num_requests=st.num_requests, num_running=len(st.running), num_waiting=len(st.waiting),
            num_preemptions=st.num_preemptions, predict_ms=(time.perf_counter() - t0) * 1e3,
            others_delay_s=delay,
        )


def _answer(traj: Trajectory, target: Seq, t: float, others_delay: bool) -> tuple[float, float, float, float]:
    """(e2e, ttft, queueing, delay caused to the others -- 0 unless ``others_delay``) of ``target`` joining at ``t``."""
    if not others_delay:
        r = traj.closed(t, target)
        if r is not None:
            return (*r, 0.0)
        return (*_run(traj.candidate(t, target), target, t), 0.0)
    e = traj.candidate(t, target)
    return _run_with_delay(e, target, t, traj.base(t))


def predict(state: InstanceState, request: Request, model: StepTimeModel, *, instance_id: int = 0,
            overrun_tokens: int = 10, expected_output_tokens: int | None = None,
            others_delay: bool = False) -> Prediction:
    """Predicted e2e, TTFT and queueing delay (seconds from now) of ``request`` on the instance in ``state``.

    ``expected_output_tokens`` overrides the request's own hint (``predicted_output_tokens`` or, failing that,
    its true length): this is how a policy injects noise or uses an estimator's answer. Several queries on one
    state: ``WhatIf`` shares the queue's simulation between them. ``others_delay`` also fills
    ``Prediction.others_delay_s`` (the latency the request adds to the others on the instance; costs a run to idle
    with and without it).
    """
    return WhatIf(state, model, overrun_tokens=overrun_tokens).predict(
        request, instance_id=instance_id, expected_output_tokens=expected_output_tokens, others_delay=others_delay)


class EngineWhatIf:
    """The what-if trajectory of a live simulated engine (``Engine.whatif``), kept across queries and arrivals.

    Built from a fork of the engine at ``t`` whose requests run to their assumed lengths (``Engine.from_state``'s
    rule). It follows the engine as time passes as long as the engine's own steps are the trajectory's: always when
    every assumed length is the true one (oracle lengths); with estimated lengths until ``n_div``, the first step
    in which a request could reach the shorter of its assumed and its true length (there the engine and the
    trajectory part: one finishes it, the other does not) or an overrun request (assumed 10 tokens past what it has,
    which moves with every token) could decode. A request the engine receives is added to the trajectory too
    (``Engine.add`` calls ``added``), and a query at a later time simply finds the next reach checkpoint. Under V1's
    long-prefill threshold the rule's steps depend on how many requests wait (the sentinel counts), so the trajectory
    serves only queries at the same ``t`` with nothing received.
    """

    def __init__(self, eng: Engine, t: float, overrun_tokens: int) -> None:
        self.t = t
        self.overrun_tokens = overrun_tokens
        steps = eng.num_steps
        n_div = _parting_step(eng.running.values(), eng.dclock, steps)
        if n_div > steps + 1:  # (steps + 1 is the soonest: an overrun request running settles it)
            n_div = min(n_div, _parting_step(eng.waiting, 0, steps))
        s = eng.fork(overrun_tokens)  # the waiting requests get their assumed lengths as they are copied
        moved = False
        for q in s.running.values():
            out = assumed_output(q.expected, s.generated_of(q), overrun_tokens)
            if out != q.out:
                moved = True
                q.out = out
                if q.in_decode:  # its finish moves: a new heap entry, the old one goes stale
                    q.ver += 1
                    s.dg_heap.append((q.d0 + out - q.g0, q.id, q.ver, q))
        if moved:
            heapq.heapify(s.dg_heap)
        self.n_div = n_div
        self.same_moment_only = eng.cfg.scheduler == "v1" and bool(eng.cfg.long_prefill_token_threshold)
        self.s = s
        self._traj: Trajectory | None = None
        self.pending: list[tuple[Seq, float]] = []

    @property
    def faithful(self) -> bool:
        """Whether it follows the engine for good (every assumed length the true one, no queue-length rule)."""
        return self.n_div == _NEVER and not self.same_moment_only

    @property
    def traj(self) -> Trajectory:
        """The trajectory, built on first use."""
        if self._traj is None:
            self._traj = Trajectory(self.s)
        return self._traj

    def added(self, seq: Seq, t: float, steps: int) -> None:
        """``Engine.add`` tells us: the engine received ``seq`` at ``t`` after ``steps`` steps (copied now: the
        engine will move it on)."""
        self.n_div = min(self.n_div, _parting_step((seq,), 0, steps))
        self.pending.append((seq.clone(assumed_output(seq.expected, seq.generated, self.overrun_tokens)), t))

    def usable(self, t: float, eng: Engine) -> bool:
        """Whether the trajectory still stands for ``eng`` at ``t`` (after taking in what it received)."""
        if self.same_moment_only:
            return t == self.t and not self.pending
        if eng.num_steps >= self.n_div:
            return False
        for q, ta in self.pending:
            self.traj.add(q, ta)
        self.pending.clear()
        return True


_NEVER = 1 << 62  # ``EngineWhatIf.n_div`` of a trajectory that never parts from its engine


def _parting_step(seqs, dclock: int, steps: int) -> int:
    """The first step at which an engine that has run ``steps`` steps (decode clock ``dclock``) may part from a
    trajectory that runs ``seqs`` to their ``assumed_output`` lengths, ``_NEVER`` if it never does.

    A request below its expected length: when it reaches the shorter of that and its true length ``q.out`` (one
    finishes it, the other does not), unless the two are equal. An overrun one (assumed 10 tokens past what it has,
    which moves with its next token): at the next step, ``steps + 1``, the soonest there is: the scan stops there."""
    q: Seq
    n = _NEVER
    for q in seqs:
        g = q.g0 + dclock - q.d0 if q.in_decode else q.generated
        exp = q.expected
        if g >= exp:
            return steps + 1
        if exp != q.out:
            div = steps + min(exp, q.out) - g
            if div < n:
                n = div
    return n


# a trajectory that lasts one step is kept only from this many waiting requests on: its queue ahead, simulated once,
# then serves every probe within the step (a speed trade-off only: answers are the same either way)
KEEP_ONE_STEP_QUEUE = 8


def predict_engine(eng: Engine, t: float, request: Request, *, instance_id: int = 0, overrun_tokens: int = 10,
                   expected_output_tokens: int | None = None, others_delay: bool = False,
                   next_query_s: float | None = None) -> Prediction:
    """``predict(eng.snapshot(t), ...)`` without the snapshot, sharing the queue's simulation across queries.

    Call ``eng.sync(t)`` first. Equal to the snapshot's prediction (same engine code, same steps; times differ only
    by floating-point rounding of the time origin). ``next_query_s``, when the caller knows it (the simulated
    cluster: the next arrival), is the earliest time this engine is asked again: a trajectory the engine will part
    from before then is used once, so no future is recorded for it (a speed hint; the answer is the same).
    """
    t0 = time.perf_counter()
    target = _target(request, expected_output_tokens)
    w = eng.whatif
    if w is None or w.overrun_tokens != overrun_tokens or not w.usable(t, eng):
        w = eng.whatif = EngineWhatIf(eng, t, overrun_tokens)
        if not others_delay and (w.same_moment_only or (w.n_div <= eng.num_steps + 1 and (
                len(eng.waiting) < KEEP_ONE_STEP_QUEUE or (next_query_s is not None and eng.time < next_query_s)))):
            # it parts from the engine at its next step (an overrun request): with a short queue a trajectory with its
            # recorded future costs more than one simulation on the fork, and it is seldom asked again within the step;
            # when that step starts before the next query (``next_query_s``), it is never asked again
            eng.whatif = None
            e = w.s
            if not e.running and not e.waiting and e.time < t:
                e.time = t
            e.waiting.append(target)
            w = None
    if w is None:
        e2e, ttft, queue = _run(e, target, t)
        delay = 0.0
    else:
        e2e, ttft, queue, delay = _answer(w.traj, target, t, others_delay)
    nr, nw = len(eng.running), len(eng.waiting)
    return Prediction(
        instance_id=instance_id, e2e_s=e2e, ttft_s=ttft, queue_s=queue, free_blocks=eng.free,
        num_requests=nr + nw, num_running=nr, num_waiting=nw, num_preemptions=eng.num_preemptions,
        predict_ms=(time.perf_counter() - t0) * 1e3, others_delay_s=delay,
    )
