"""The candidate's own life in closed form, over the trajectory's recorded future (the what-if's fast path).

Why: once the shared trajectory (``vidur.whatif.Trajectory``) has simulated the queue ahead of the candidate, what is
left per candidate is its own life among the running requests -- a dozen decode runs and a prefill step or two,
each re-simulated on a fork for every probe. But under vLLM V0 with chunked prefill, a candidate queued last changes
nothing in the *composition* of the instance's steps until it is preempted:

* it is admitted in the first step whose admission loop reaches the back with a seat, budget and blocks above the
  watermark to spare (what the loop had left when it reached the trajectory's sentinel) -- every step before is the
  instance's own;
* it is last in running order, so its prefill chunks take only the budget the others leave, and nobody is admitted
  after it (nothing else arrives in a what-if), so once its prefill is done every step is decode-only;
* the others finish after the same number of steps with or without it (lengths are in tokens); only the steps'
  *durations* change: a chunk more in a mixed step, one more decode sequence (``decode_coeffs(B + 1)``) and its KV
  tokens in a decode run -- a closed-form sum per run.

So the future *without* the candidate is recorded once per trajectory version (``Future``: lazily, as far as the
longest candidate asked; shared by every probe and by later queries until the instance receives a request), and
each candidate is a walk over its segments. The walk gives up (returns None: the caller forks and simulates, as
before) where the composition would change: a preemption while the candidate holds blocks (it would be the first
victim), blocks it takes that would force one, a prefill after its own, or an engine with no room to run it alone.
Other rules (V0 prefill-first, V1) always take the simulation; so does ``others_delay``.

When the instance receives a request, the future is not recorded again: ``Future.overlay`` walks that request over it
the same way and writes the steps it changes (``Trajectory.add``), so a version's future costs a walk, not a
simulation, and the recording engine only extends it past where the old one ended.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from typing import Optional

from vidur.engine import INF, Engine, Seq

MIXED, RUN = 0, 1
_STOP = float("inf")  # ``Future.hold`` of a segment the prefix-sum walk must not cross


class _LastStep:
    """The recording engine's step-time model: forwards to the real one and remembers the last step's shape."""

    __slots__ = ("model", "last")

    def __init__(self, model) -> None:
        self.model = model
        self.last: tuple = ()

    def step_time(self, prefill_chunks, num_decode: int, decode_kv_sum: int) -> float:
        self.last = (MIXED, prefill_chunks, num_decode, decode_kv_sum)
        return self.model.step_time(prefill_chunks, num_decode, decode_kv_sum)

    def decode_coeffs(self, batch: int) -> tuple[float, float]:
        self.last = (RUN, batch)
        return self.model.decode_coeffs(batch)


class Future:
    """The steps of a trajectory past its reach checkpoint, without the candidate, recorded on demand.

    Segments (tuples, for speed), indexed by the engine's step count at their first step:

    * ``(MIXED, n0, t0, t1, chunks, B, kv, room, free_after, preempted)``: one step with prefill chunks
      [(tokens, cached)], ``B`` decodes holding ``kv`` KV tokens, from ``t0`` to ``t1``;
    * ``(RUN, n0, t0, m, B, S1, c, k, a, b, room, free0, cum, preempted, c1, k1, free_end)``: ``m`` decode-only
      steps of ``B`` sequences, the first holding ``S1`` KV tokens; step ``j`` starts at ``t0 + b j + a j^2`` and
      lasts ``c + k (S1 + B j)`` (``c1 + k1 (...)`` with one sequence more); after it ``free0 - (j + 1) // bs * B -
      cum[(j + 1) % bs]`` blocks are free, ``free_end`` after the last step (the requests finishing in it freed).

    ``room`` is what the admission loop of the segment's first step had left when it reached the sentinel at the back
    of the queue, i.e. what a request queued last would find -- (budget, seats, blocks free; ``Engine.room_at_reject``)
    -- or None when the loop stopped before the back; ``preempted`` whether that step began by preempting.
    """

    def __init__(self, checkpoint: Engine, rule, version: int) -> None:
        # decode runs with only the sentinel waiting are committed directly (``extend``); False steps every segment
        # through the rule, as the other segments are (the same segments: tests compare the two)
        self.fast_runs = True
        e = self.e = checkpoint.fork()  # keeps the trajectory's sentinel at the back: its rejection gives the room
        self.back = e.waiting[-1]
        self.model = checkpoint.model
        self.rec = e.model = _LastStep(checkpoint.model)
        self.rule = rule
        self.version = version
        self.segs: list[tuple] = []
        self.starts: list[int] = []
        self.end = e.num_steps  # first step not recorded yet
        self.done = False  # the engine went idle: every later step is the candidate's alone
        cfg = e.cfg
        self.bs = e.bs
        self.budget = e.budget
        self.total = e.total_blocks
        self.wm = e.watermark_blocks
        self.max_len = cfg.max_model_len
        self.hits = 0  # candidates answered in closed form, and those handed back to the simulation
        self.falls = 0
        # prefix sums over the segments for walking whole decode runs at once (``_skip_runs``): a candidate decoding
        # through full run i from step P_i (relative to the first) with g tokens costs A_i + K_i (prompt + g);
        # ``hold[i]`` is large unless its blocks fit through run i whenever P_i - prompt - g_i >= hold[i] - m_i + 1
        self.p0 = e.num_steps
        self.sa = [0.0]
        self.sk = [0.0]
        self.skp = [0.0]
        self.hold: list[float] = []

    def extend(self) -> bool:
        """Record one more segment; False when there is none (the engine went idle)."""
        if self.done:
            return False
        e: Engine = self.e
        if not e.running and len(e.waiting) <= 1:
            self.done = True
            return False
        back = self.back
        # Only decodes run, only the sentinel waits and the decodes' next blocks fit: the step is a decode run (V0
        # chunked, ``_advance_chunked``) whose admission loop meets the sentinel first and rejects it. Most of a future
        # is such runs, so the run is committed directly and ``room`` is what that loop would have recorded (the
        # budget the decodes leave, the seats, the blocks after their reservation), without the sentinel's rejection
        # and return; ``settle`` would preempt nobody.
        fast = (self.fast_runs and e.dg_count and not e.prefilling and len(e.waiting) == 1 and e.waiting[0] is back
                and e.dg_hist[(-e.dclock) % self.bs] <= e.free)  # (``Engine.decode_need``, inline: once per segment)
        if fast:
            preempted = False
        else:
            p0 = e.num_preemptions
            self.rule.settle(e)
            preempted = e.num_preemptions != p0
        n0, t0, free0, B, d0 = e.num_steps, e.time, e.free, e.dg_count, e.dclock
        S1 = e.dg_sum + B * d0 + B
        cum = None
        if B:  # cum[r]: new blocks over the first r steps of a block period (the members' needs, step by step)
            hist = e.dg_hist
            r0 = (-d0) % self.bs
            cum = [0, *accumulate((hist[r0::-1] + hist[:r0:-1])[:-1])]
        if fast:
            left = e.budget - B
            room = (left, e.max_seqs - B, free0 - hist[r0]) if left > 0 and B < e.max_seqs else None
            e.decode_run(INF)
        else:
            e._advance(INF)
            room = None
            if back.status == "rejected":  # admission reached the sentinel: what it had left, then put it back
                room = e.room_at_reject
                e.rejected.pop()
                back.status = "waiting"
                e.waiting.append(back)
        last = self.rec.last
        if last[0] == MIXED:
            seg = (MIXED, n0, t0, e.time, last[1], last[2], last[3], room, e.free, preempted)
        else:
            model = self.model
            c, k = model.decode_coeffs(B)
            a = 0.5 * k * B
            c1, k1 = model.decode_coeffs(B + 1)  # the same steps with the candidate decoding too
            m = e.num_steps - n0
            seg = (RUN, n0, t0, m, B, S1, c, k, a, c + k * S1 - a, room, free0, cum, preempted, c1, k1, e.free)
        self._push(seg)
        self.end = e.num_steps
        return True

    def _push(self, seg: tuple) -> None:
        """Append a segment and its prefix sums (``_skip_runs``)."""
        n0 = seg[1]
        if seg[0] == MIXED:
            A = K = 0.0
            hold = _STOP
        else:
            m, B, S1, free0, cum, c1, k1 = seg[3], seg[4], seg[5], seg[11], seg[12], seg[14], seg[15]
            A = m * c1 + k1 * (m * S1 + (B + 1) * (m * (m - 1) // 2))
            K = k1 * m
            # its blocks after the run's last step, ceil((prompt + g + m - 1) / bs), must not exceed what is free then
            free_last = free0 - m // self.bs * B - cum[m % self.bs]
            hold = _STOP if seg[13] else (n0 - self.p0) + m - 1 - free_last * self.bs
        self.sa.append(self.sa[-1] + A)
        self.sk.append(self.sk[-1] + K)
        self.skp.append(self.skp[-1] + K * (n0 - self.p0))
        self.hold.append(hold)
        self.segs.append(seg)
        self.starts.append(n0)

    def life(self, n: int, t_n: float, t: float, prompt: int, out: int) -> Optional[tuple[float, float, float]]:
        """(e2e, ttft, queueing) from ``t`` of a candidate queued last before step ``n`` (which starts at ``t_n``,
        the trajectory's reach checkpoint for ``t``), or None where only the simulation can tell."""
        r = self._life(n, t_n, t, prompt, out)
        if r is None:
            self.falls += 1
        else:
            self.hits += 1
        return r

    def _life(self, n, t_n: float, t: float, prompt, out) -> Optional[tuple[float, float, float]]:
        # (n, prompt, out: ints, typed as C integers in candidate.pxd for the compiled build)
        bs, wm, budget = self.bs, self.wm, self.budget
        if -(-prompt // bs) > self.total - wm or prompt > self.max_len:
            return INF, INF, INF  # rejected: it can never fit on this instance
        segs = self.segs
        while self.end <= n and self.extend():
            pass
        if self.end <= n:  # the engine is idle from step n on
            now = max(t_n, t)
            return self._alone(now, t, now, None, 0, prompt, out)
        k = bisect_right(self.starts, n) - 1
        j = n - segs[k][1]
        model = self.model
        now: float = t_n
        g = 0  # tokens generated so far (a preemption keeps them: the re-prefill recomputes prompt + g)
        t_adm = ttft = None
        while True:
            known = prompt + g
            need = -(-known // bs)
            # phase 1: queued last, until a step's admission reaches it with room (the others' steps, unchanged)
            while True:
                if k == len(segs) and not self.extend():
                    now = max(now, t)
                    return self._alone(now, t, now if t_adm is None else t_adm, ttft, g, prompt, out)
                seg = segs[k]
                if seg[0] == MIXED:
                    room = seg[7]
                    if room is not None and room[2] - need >= wm:
                        break
                    now += seg[3] - seg[2]
                    k += 1
                else:
                    room = seg[10]
                    if room is not None:
                        x = j + 1
                        if seg[11] - x // bs * seg[4] - seg[12][x % bs] - need >= wm:
                            break
                    m = seg[3]
                    rb, ra = seg[9], seg[8]  # (typed locals: the compiled walk's arithmetic stays in C)
                    now += rb * (m - j) + ra * (m * m - j * j)
                    k += 1
                    j = 0
            if t_adm is None:
                t_adm = now
            # phase 2: its (re-)prefill, in the budget the others leave; evicted first if the pool runs dry
            comp = 0
            left = room[0]
            first = True
            evicted = False
            while comp < known:
                if k == len(segs) and not self.extend():
                    return self._alone(now, t, t_adm, ttft, g, prompt, out, comp)
                seg = segs[k]
                if seg[0] == MIXED:
                    chunks, B, kv = seg[4], seg[5], seg[6]
                    if not first:
                        if seg[9] or seg[8] < need:
                            evicted = True
                            break
                        left = budget - B - _chunk_tokens(chunks)
                    nc = min(known - comp, left)
                    now += model.step_time([*chunks, (nc, comp)], B, kv) if nc > 0 else seg[3] - seg[2]
                    k += 1
                else:
                    B = seg[4]
                    if not first:
                        x = j + 1
                        if (j == 0 and seg[13]) or seg[11] - x // bs * B - seg[12][x % bs] < need:
                            evicted = True
                            break
                        left = budget - B
                    kv = seg[5] + B * j
                    nc = min(known - comp, left)
                    now += model.step_time([(nc, comp)], B, kv) if nc > 0 else seg[6] + seg[7] * kv
                    j += 1
                    if j == seg[3]:
                        k += 1
                        j = 0
                comp += nc
                first = False
            if evicted:
                continue  # back to the queue (its only request, or behind the others evicted with it)
            g += 1  # the step that completes a prefill emits the next token
            if ttft is None:
                ttft = now - t
            # phase 3: decode steps, one more sequence in the others' runs, until it finishes or is evicted
            while g < out:
                if j == 0 and out - g > 1:
                    k, g, now = self._skip_runs(k, g, now, prompt, out)
                    if g >= out:
                        break
                if k == len(segs) and not self.extend():
                    return self._alone(now, t, t_adm, ttft, g, prompt, out, prompt + g)
                seg = segs[k]
                x = _decode_stop(seg, j)
                if x:
                    if x == 2:
                        return None
                    evicted = True
                    break
                B, m, free0, cum = seg[4], seg[3], seg[11], seg[12]
                steps = min(m - j, out - g)
                x = _steps_before_eviction(free0, B, cum, j, steps, prompt + g, bs)
                if x < steps:
                    steps = x
                    evicted = True
                if steps:
                    c1, k1, S1 = seg[14], seg[15], seg[5]
                    # steps hold S1 + B i KV tokens of the others (i = j ..) and prompt + g + s of its own
                    si = steps * j + steps * (steps - 1) // 2
                    sd = steps * (prompt + g) + steps * (steps - 1) // 2
                    now += steps * c1 + k1 * (steps * S1 + B * si + sd)
                    g += steps
                    j += steps
                    if j == m:
                        k += 1
                        j = 0
                if evicted:
                    break
            if not evicted:
                return now - t, ttft, t_adm - t

    def overlay(self, n, t_n: float, prompt, out, version) -> Optional["Future"]:
        """The future once a request of ``prompt`` tokens and ``out`` output tokens is queued last before step ``n``
        (which starts at ``t_n``: the trajectory's reach checkpoint where it received the request), for ``version``;
        None where the walk cannot follow that request's life (then the future is recorded again, as before).

        Why: a trajectory that receives a request used to record its whole future again (about 40 segments and
        every step in them simulated) although the probe that chose the instance had just walked that very request
        over the old one. With FCFS and the request queued last, the new future is the old one with it overlaid:
        its steps before the admission are the old ones, except that a request queued behind it finds no room;
        its prefill chunks go into the budget the others leave (their step times recomputed); its decode steps make
        the others' runs one sequence wider (its KV tokens and its blocks added); a step whose blocks it would run
        dry begins by evicting it (it queues again, is re-admitted and recomputes, as ``_life`` walks it); after it
        finishes the old steps follow, later by what it cost. It gives up where ``_life`` does (someone prefilling
        after it) and where the engine would go idle. This future's recording engine goes to the new one, its clock
        moved on by that cost: this future is spent.
        (``n``, ``prompt``, ``out``, ``version``: ints, typed as C integers in candidate.pxd.)"""
        bs, wm, budget = self.bs, self.wm, self.budget
        if -(-prompt // bs) > self.total - wm or prompt > self.max_len:
            return None
        segs = self.segs
        while self.end <= n and self.extend():
            pass
        if self.end <= n:
            return None
        model = self.model
        k = bisect_right(self.starts, n) - 1
        j = n - segs[k][1]
        now: float = t_n
        new: list = []
        g = 0  # tokens it has generated (an eviction keeps them: the re-prefill recomputes prompt + g)
        hit = -1  # the step at whose start it was last evicted (that step begins by preempting)
        while True:
            known = prompt + g
            need = -(-known // bs)
            # phase 1: queued, until a step's admission reaches it with room; a request behind it finds none
            while True:
                if k == len(segs) and not self.extend():
                    return None
                seg = segs[k]
                if seg[0] == MIXED:
                    room = seg[7]
                    if room is not None and room[2] - need >= wm:
                        break
                    dt = seg[3] - seg[2]
                    new.append((MIXED, seg[1], now, now + dt, seg[4], seg[5], seg[6], None, seg[8],
                                seg[9] or seg[1] == hit))
                    now += dt
                    k += 1
                else:
                    room = seg[10]
                    if room is not None:
                        x = j + 1
                        if seg[11] - x // bs * seg[4] - seg[12][x % bs] - need >= wm:
                            break
                    new.append(_rest(seg, j, now, False, (j == 0 and seg[13]) or seg[1] + j == hit, bs))
                    m = seg[3]
                    now += seg[9] * (m - j) + seg[8] * (m * m - j * j)
                    k += 1
                    j = 0
            # phase 2: its (re-)prefill, in the budget the others leave (its chunk last in each step)
            comp = 0
            left = room[0]
            first = True
            evicted = False
            while comp < known:
                if k == len(segs) and not self.extend():
                    return None
                seg = segs[k]
                if seg[0] == MIXED:
                    n0 = seg[1]
                    chunks, B, kv, room, free = seg[4], seg[5], seg[6], seg[7], seg[8]
                    if not first:
                        if seg[9] or free < need:
                            evicted = True
                            break
                        left = budget - B - _chunk_tokens(chunks)
                    preempted = seg[9] or n0 == hit
                    nc = min(known - comp, left)
                    if nc > 0:
                        chunks = [*chunks, (nc, comp)]
                        dt = model.step_time(chunks, B, kv)
                    else:
                        dt = seg[3] - seg[2]
                    k += 1
                else:
                    B = seg[4]
                    n0 = seg[1] + j
                    x = j + 1
                    free = seg[11] - x // bs * B - seg[12][x % bs]
                    if not first:
                        if (j == 0 and seg[13]) or free < need:
                            evicted = True
                            break
                        left = budget - B
                    preempted = (j == 0 and seg[13]) or n0 == hit
                    kv = seg[5] + B * j
                    nc = min(known - comp, left)
                    if nc <= 0:
                        return None
                    chunks = [(nc, comp)]
                    dt = model.step_time(chunks, B, kv)
                    room = seg[10]
                    if room is not None:
                        room = (room[0], room[1], free)
                    if x == seg[3]:
                        free = seg[16]  # (the run's last step: the requests finishing in it freed their blocks)
                    j = x
                    if j == seg[3]:
                        k += 1
                        j = 0
                comp += nc
                first = False
                if room is not None:  # what a request queued behind it finds: less budget, a seat and its blocks fewer
                    room = (room[0] - nc, room[1] - 1, room[2] - need) if room[0] > nc and room[1] > 1 else None
                if comp < known or g + 1 < out:  # (else it finishes in the step that ends its prefill)
                    free -= need
                new.append((MIXED, n0, now, now + dt, chunks, B, kv, room, free, preempted))
                now += dt
            if evicted:
                hit = n0
                continue  # back to the queue, at its head (behind the others evicted with it)
            g += 1  # the step that completes a prefill emits the next token
            # phase 3: decode steps, one sequence more in the others' runs, until it finishes or is evicted
            while g < out:
                if k == len(segs) and not self.extend():
                    return None
                seg = segs[k]
                x = _decode_stop(seg, j)
                if x:
                    if x == 2:
                        return None
                    evicted = True
                    hit = seg[1]
                    break
                B, m, free0, cum = seg[4], seg[3], seg[11], seg[12]
                steps = min(m - j, out - g)
                x = _steps_before_eviction(free0, B, cum, j, steps, prompt + g, bs)
                if x < steps:
                    steps = x
                    evicted = True
                if steps:
                    fj = j // bs * B + cum[j % bs]  # the others' new blocks over the run's first j steps
                    c0 = prompt + g - 1
                    own0 = -(-c0 // bs)  # the blocks it holds
                    cum1 = _cum_from(cum, j, B, bs, c0)  # the others' new blocks and its own
                    B1 = B + 1
                    free1 = free0 - fj - own0
                    S1 = seg[5] + B * j + prompt + g
                    c1, k1 = seg[14], seg[15]
                    a = 0.5 * k1 * B1
                    b = c1 + k1 * S1 - a
                    room = seg[10]
                    if room is not None:
                        room = (room[0] - 1, room[1] - 1, free1 - 1 // bs * B1 - cum1[1 % bs]) \
                            if room[0] > 1 and room[1] > 1 else None
                    c2, k2 = model.decode_coeffs(B1 + 1)
                    x = j + steps  # free after its last step: the others' finishing there freed, and its own if it ends
                    end = seg[16] if x == m else free0 - x // bs * B - cum[x % bs]
                    if g + steps < out:
                        end -= -(-(c0 + steps) // bs)
                    new.append((RUN, seg[1] + j, now, steps, B1, S1, c1, k1, a, b, room, free1, cum1, False, c2, k2,
                                end))
                    now += steps * b + a * steps * steps
                    g += steps
                    j = x
                    if j == m:
                        k += 1
                        j = 0
                if evicted:
                    hit = seg[1] + j
                    break
            if not evicted:
                break
        # then the others' steps as they were, later by what it cost
        if k < len(segs):
            seg = segs[k]
            if j:  # the rest of the run it finished in: the others alone again
                new.append(_rest(seg, j, now, True, False, bs))
                shift = now - (seg[2] + seg[9] * j + seg[8] * j * j)
                k += 1
            else:
                shift = now - seg[2]
            for i in range(k, len(segs)):
                seg = segs[i]
                if seg[0] == MIXED:
                    new.append(seg[:2] + (seg[2] + shift, seg[3] + shift) + seg[4:])
                else:
                    new.append(seg[:2] + (seg[2] + shift,) + seg[3:])
        else:
            shift = now - self.e.time
        f = Future.__new__(Future)
        f.fast_runs = self.fast_runs
        f.e = self.e
        f.e.time += shift
        f.back, f.model, f.rec, f.rule = self.back, self.model, self.rec, self.rule
        f.version = version
        f.end, f.done = self.end, self.done
        f.bs, f.budget, f.total, f.wm, f.max_len = bs, budget, self.total, wm, self.max_len
        f.hits = f.falls = 0
        f.p0 = new[0][1]
        f.segs, f.starts, f.sa, f.sk, f.skp, f.hold = [], [], [0.0], [0.0], [0.0], []
        for seg in new:
            f._push(seg)
        self.e = None  # (spent: its engine is the new future's)
        self.done = True
        return f

    def _skip_runs(self, k, g, now: float, prompt, out) -> tuple[int, int, float]:
        """Walk the whole decode runs from segment ``k`` the candidate decodes through with ``g`` tokens, as far as it
        needs, in one go (prefix sums); stop before a run it does not finish whole, or one where something else
        happens (a prefill, a preemption, its blocks running short): the caller walks those step by step.
        (``k``, ``g``, ``prompt``, ``out``: ints, typed as C integers in candidate.pxd for the compiled build.)"""
        starts = self.starts
        target = starts[k] + (out - g) if k < len(starts) else 0
        while self.end < target and self.extend():
            pass
        e = bisect_right(starts, target, k) - 1  # segments k .. e-1 end by the candidate's last step
        if e <= k:
            return k, g, now
        theta = (starts[k] - self.p0) - prompt - g
        hold = self.hold
        for i in range(k, e):  # (a loop, not max() over a slice: the compiled build compares C doubles, and stops early)
            if hold[i] > theta:
                return k, g, now
        sk = self.sk[e] - self.sk[k]
        now += (self.sa[e] - self.sa[k]) + (prompt + g - (starts[k] - self.p0)) * sk + (self.skp[e] - self.skp[k])
        return e, g + starts[e] - starts[k], now

    def _alone(self, now: float, t: float, t_adm: float, ttft: Optional[float], g: int, prompt: int, out: int,
               comp: int = 0) -> Optional[tuple[float, float, float]]:
        """The rest of the candidate's life on an engine nobody else is left on: the rest of its (re-)prefill of
        ``prompt + g`` tokens from ``comp`` (none when ``comp`` is that already), then its decode steps."""
        if -(-(prompt + out) // self.bs) > self.total:
            return None  # it would preempt itself: leave it to the simulation
        model, budget = self.model, self.budget
        known = prompt + g
        if comp < known:
            while comp < known:
                nc = min(known - comp, budget)
                now += model.step_time([(nc, comp)], 0, 0)
                comp += nc
            g += 1
            if ttft is None:
                ttft = now - t
        steps = out - g
        if steps > 0:
            c1, k1 = model.decode_coeffs(1)
            now += steps * c1 + k1 * (steps * (prompt + g) + steps * (steps - 1) // 2)
        return now - t, ttft, t_adm - t


def _decode_stop(seg: tuple, j) -> int:
    """What stops a decoding candidate at step ``j`` of ``seg``: 0 nothing, 1 the step begins by preempting (it is the
    first victim: evicted), 2 someone else prefills after its own prefill (not a shape the walk follows)."""
    if seg[0] == MIXED:
        return 1 if seg[9] else 2
    return 1 if j == 0 and seg[13] else 0


def _steps_before_eviction(free0, B, cum: list, j, steps, known, bs) -> int:
    """How many of ``steps`` decode steps from step ``j`` of a run (``free0``, ``B``, ``cum``: ``Future``'s RUN
    fields) a candidate with ``known`` tokens decodes before its blocks run the pool dry: after step s it holds
    ceil((known + s) / bs) blocks and the others leave free0 - cum(j + s + 1); it is evicted at the first s where that
    is short (``steps`` if none is). (All ints, typed in candidate.pxd.)"""
    x = j + steps
    if free0 - x // bs * B - cum[x % bs] >= -(-(known + steps - 1) // bs):
        return steps
    lo, hi = 0, steps - 1  # the last step is short, so the first short one is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        x = j + mid + 1
        if free0 - x // bs * B - cum[x % bs] < -(-(known + mid) // bs):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _cum_from(cum: list, j, B, bs, c0) -> list:
    """A decode run's ``cum`` (``Future``: new blocks over the first r steps of a block period) for its steps from
    ``j`` on, with, when ``c0 >= 0``, those of one more sequence decoding with them that holds ``c0`` KV tokens before
    its first step. (All but ``cum``: ints, typed in candidate.pxd.)"""
    fj = j // bs * B + cum[j % bs]
    own0 = -(-c0 // bs) if c0 >= 0 else 0
    out = [0] * bs
    for r in range(bs):
        x = j + r
        out[r] = x // bs * B + cum[x % bs] - fj
        if c0 >= 0:
            out[r] += -(-(c0 + r) // bs) - own0
    return out


def _rest(seg: tuple, j, t0: float, keep_room, pre, bs) -> tuple:
    """Steps ``j``.. of a decode run as a run of their own, starting at ``t0`` (``Future.overlay``): its room is
    None unless ``keep_room`` (then the old run's, its blocks at step ``j``), ``pre`` whether its first step begins by
    preempting. (``j``, ``bs``: ints, ``keep_room``, ``pre``: bools.)"""
    B, free0, cum, S1, c, k, a, room = seg[4], seg[11], seg[12], seg[5], seg[6], seg[7], seg[8], seg[10]
    if j:
        free0 -= j // bs * B + cum[j % bs]
        S1 += B * j
        cum = _cum_from(cum, j, B, bs, -1)
    if keep_room and room is not None:
        room = (room[0], room[1], free0 - 1 // bs * B - cum[1 % bs])
    else:
        room = None
    return (RUN, seg[1] + j, t0, seg[3] - j, B, S1, c, k, a, c + k * S1 - a, room, free0, cum, pre, seg[14], seg[15],
            seg[16])


def _chunk_tokens(chunks: list) -> int:
    """Tokens of a step's prefill chunks [(tokens, cached)] (a loop, not a generator: the compiled walk has none)."""
    n = 0
    for c, _ in chunks:
        n += c
    return n


def closed_form_rule(rule) -> bool:
    """Whether the rule's steps can be followed in closed form (V0 with chunked prefill)."""
    return getattr(rule, "closed_form", False)


__all__ = ["Future", "closed_form_rule"]
