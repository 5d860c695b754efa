# cython: cpow=True
# (the compiled build: a C double's ``** 0.5`` is C's pow, not a complex-valued power: steps_started_before)
"""One engine (replica) of vLLM, simulated step by step -- and run by run where steps repeat.

Why this shape: both the cluster experiments and the predictors' what-if run this one class, and a what-if must
answer in well under a millisecond. Most engine iterations are decode-only steps whose batch does not change
until some request finishes, the KV cache runs out, or a new request arrives. Over such a *run* every decode
sequence gains one token per step, so the run's duration is a closed-form sum (the execution model is linear in the
total KV length for a fixed batch size), the step at which the next request finishes is the top of a heap, and the
step at which the KV cache runs out follows from a histogram of the sequences' positions inside their last block.
Decode sequences are therefore kept *lazily*: a sequence that joined the decode group at decode-clock ``d0`` with
``c0`` computed tokens has ``c0 + (dclock - d0)`` computed tokens now; nothing is touched per step.

Scheduling rules plug in (``vidur.sched``, chosen by ``EngineConfig.scheduler``): ``v0`` is vLLM V0 as Block ran
it (``vidur/sched/v0.py``), ``v1`` is current vLLM's V1 scheduler (``vidur/sched/v1.py``). A rule forms the next step
from the engine's queues with the primitives below -- ``preempt_last``, ``ensure_decode_blocks``, ``mixed_step``,
``decode_run`` -- so the lazy decode group and its closed-form runs are shared by every rule. Common to all rules:

* KV: paged blocks of ``block_size`` tokens; a decode sequence takes one more block when its length crosses a block
  boundary; preemption is by recompute: the victim's blocks are freed and it goes back to the *front* of the waiting
  queue; on re-admission it prefills its prompt plus the tokens it had generated;
* a request generates exactly its output length (ignore_eos); the step that finishes a prompt's prefill emits the
  first output token.

Time semantics: ``time`` is the end of the last step the engine has committed. ``sync(t)`` commits every step that
starts before ``t``; the step in flight at ``t`` is committed too (its batch is fixed when it starts), so after
``sync(t)`` the engine's requests are in their state *after* that step and ``time - t`` is how long it still runs.
A request added at ``t`` joins the first step formed after that.
"""

from __future__ import annotations

import math
from collections import deque
from heapq import heapify, heappop, heappush
from typing import Iterable, Optional, Protocol

from vidur.sched import SchedulingRule, make_rule
from vidur.types import EngineConfig, InstanceState, InstanceStats, SeqState

INF = float("inf")


def assumed_output(expected: int, generated: int, overrun_tokens: int) -> int:
    """The output length a predictor assumes for a request that has generated ``generated`` tokens: its expected
    length, or, once it has reached that (the estimate was too short), ``overrun_tokens`` more -- Block's rule
    (``convert_list_to_request_infos``, 10 tokens). The what-if's engines run requests to this length."""
    return expected if generated < expected else generated + overrun_tokens


class StepTimeModel(Protocol):
    """What the engine needs from an execution-time model (see ``vidur.execution_model``)."""

    def step_time(self, prefill_chunks: list[tuple[int, int]], num_decode: int, decode_kv_sum: int) -> float: ...

    def decode_coeffs(self, batch: int) -> tuple[float, float]: ...


class Seq:
    """A request inside an engine. Decode-phase fields are lazy (see the module docstring)."""

    __slots__ = (
        "id", "prompt", "out", "expected", "arrival", "computed", "generated", "in_decode", "c0", "d0", "g0",
        "ver", "first_sched", "first_token", "finish", "preemptions", "status", "tag",
    )

    def __init__(self, id: int, prompt: int, out: int, arrival: float = 0.0, expected: Optional[int] = None,
                 computed: int = 0, generated: int = 0, tag: object = None) -> None:
        self.id = id
        self.prompt = prompt
        self.out = out  # the engine stops the request after exactly this many output tokens
        self.expected = out if expected is None else expected  # what a predictor may know of `out`
        self.arrival = arrival
        self.computed = computed
        self.generated = generated
        self.in_decode = False
        self.c0 = self.d0 = self.g0 = 0
        self.ver = 0
        self.first_sched: Optional[float] = None
        self.first_token: Optional[float] = None
        self.finish: Optional[float] = None
        self.preemptions = 0
        self.status = "waiting"
        self.tag = tag  # anything the caller wants back with the finished request

    @property
    def known(self) -> int:
        """Tokens a (re)prefill must process: the prompt plus every token already generated."""
        return self.prompt + self.generated

    def clone(self, out=None) -> "Seq":  # (out: Optional[int]; declared in engine.pxd for the compiled build)
        """An independent copy (``Engine.fork``): every field, spelled out because this is the fork's hot loop;
        ``out`` replaces the length it runs to (the what-if's assumed one)."""
        c: Seq = Seq.__new__(Seq)
        c.id = self.id
        c.prompt = self.prompt
        c.out = self.out if out is None else out
        c.expected = self.expected
        c.arrival = self.arrival
        c.computed = self.computed
        c.generated = self.generated
        c.in_decode = self.in_decode
        c.c0 = self.c0
        c.d0 = self.d0
        c.g0 = self.g0
        c.ver = self.ver
        c.first_sched = self.first_sched
        c.first_token = self.first_token
        c.finish = self.finish
        c.preemptions = self.preemptions
        c.status = self.status
        c.tag = self.tag
        return c


class Engine:
    """A simulated vLLM engine. See the module docstring for the semantics."""

    def __init__(self, config: EngineConfig, model: StepTimeModel, instance_id: int = 0,
                 keep_finished: bool = True) -> None:
        config.validate()
        self.cfg = config
        self.model = model
        self.instance_id = instance_id
        self.bs = config.block_size
        self.total_blocks = config.num_blocks
        self.free = config.num_blocks
        self.watermark_blocks = config.watermark_blocks
        self.budget = config.token_budget
        self.max_seqs = config.max_num_seqs
        self.time = 0.0
        self.running: dict[int, Seq] = {}  # running order = admission order (decides preemption victims)
        self.prefilling: list[Seq] = []  # running requests still in prefill, in running order
        self.waiting: deque[Seq] = deque()
        self.num_preemptions = 0
        self.num_steps = 0
        self.busy_s = 0.0
        self.keep_finished = keep_finished
        self.finished: list[Seq] = []
        self.rejected: list[Seq] = []
        # the waiting queue's load figures for ``stats`` (tokens to prefill, their blocks, prompt + expected output),
        # kept as requests enter and leave the queue through the methods below: a router asks every instance for
        # ``stats`` on every arrival, and past capacity the queue holds hundreds of requests. A fork's queue is edited
        # from outside (the what-if's sentinel and candidates), so a fork counts afresh (``wq_exact`` False).
        self.wq_tokens = 0
        self.wq_blocks = 0
        self.wq_unprocessed = 0
        self.wq_exact = True
        # (budget, seats, free blocks) the admission loop had left when it last rejected a request (V0): what a request
        # queued behind it would find -- the what-if's recorded future reads it off its sentinel's rejection
        self.room_at_reject: Optional[tuple[int, int, int]] = None
        # lazy decode group
        self.dclock = 0
        self.dg_count = 0
        self.dg_sum = 0  # sum of (c0 - d0): computed tokens of the group = dg_sum + dg_count * dclock
        self.dg_hist = [0] * self.bs  # count of members by (c0 - d0) mod block_size
        self.dg_heap: list[tuple[int, int, int, Seq]] = []  # (finish clock, id, version, seq)
        self.on_finish = None  # optional callback(seq)
        self.whatif = None  # vidur.whatif's shared trajectory of this engine (told of every add; dropped on abort)
        rule = make_rule(config)  # shared, holds no engine (few attributes: the what-if builds an engine per call)
        self._rule_advance = rule.advance
        # V0 gives an admitted prompt blocks for all its tokens at once; V1 only for the tokens computed so far
        self._prefill_holds_known = rule.prefill_holds_known

    # ------------------------------------------------------------------ public API
    @property
    def rule(self) -> SchedulingRule:
        """The scheduling rule ``cfg.scheduler`` names (``vidur.sched``)."""
        return make_rule(self.cfg)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def add(self, seq: Seq, now: float) -> Seq:
        """Queue a request that arrives at ``now`` (call ``sync(now)`` first so the engine is not behind)."""
        if not self.running and not self.waiting and self.time < now:
            self.time = now  # an idle engine starts its next step when the request arrives
        seq.status = "waiting"
        self.waiting.append(seq)
        if self.wq_exact:
            self.queued(seq, 1)
        if self.whatif is not None:
            self.whatif.added(seq, now, self.num_steps)
        return seq

    def abort(self, request_id: int) -> Optional[Seq]:
        """Take request ``request_id`` out of the engine (client gone); return it, or None if it is not here.

        A running request leaves the way a preempted one does (its KV blocks are freed, it leaves the decode group or
        the prefill list) but is not re-queued; a waiting one leaves the queue. Its status becomes ``"aborted"``.
        The step in flight is already committed (see ``sync``), so the request is simply absent from the next one.
        """
        self.whatif = None  # the what-if's shared trajectory assumed this request stays
        s = self.running.get(request_id)
        if s is not None:
            self._remove_running(s)
        else:
            for s in self.waiting:
                if s.id == request_id:
                    self.waiting.remove(s)
                    if self.wq_exact:
                        self.queued(s, -1)
                    break
            else:
                return None
        s.status = "aborted"
        return s

    def adopt(self, seq: Seq, now: float, reserved_blocks: int = 0) -> Seq:
        """Take in a decoding request whose KV cache is already here (a live migration's destination); return it.

        ``seq`` comes with its progress (as ``abort`` leaves it on the source: ``computed = prompt + generated - 1``)
        and continues decoding from the next step formed here, with no prefill; it joins the end of the running order
        (the first preemption victim, as Llumnix appends a migrated-in request to vLLM's running queue). It holds
        ``ceil(computed / block_size)`` blocks, of which ``reserved_blocks`` the caller already took from ``free``
        (pre-allocated while the copy ran); the rest come from ``free`` now. Like vLLM's running queue it may exceed
        ``max_num_seqs`` (the cap gates admissions from the waiting queue). Call ``sync(now)`` first. Raises
        ValueError when the request is not mid-decode, is already here, or its blocks do not fit.
        """
        if seq.id in self.running or seq.in_decode:
            raise ValueError(f"request {seq.id} is already running in an engine")
        if not 0 < seq.generated < seq.out or seq.computed != seq.prompt + seq.generated - 1:
            raise ValueError(f"request {seq.id} is not mid-decode (prompt {seq.prompt}, generated {seq.generated}"
                             f" of {seq.out}, computed {seq.computed})")
        need = -(-seq.computed // self.bs) - reserved_blocks
        if need > self.free:
            raise ValueError(f"request {seq.id} does not fit: it needs {need} more KV blocks, {self.free} are free")
        if not self.running and not self.waiting and self.time < now:
            self.time = now  # an idle engine starts its next step when the request arrives
        self.free -= need
        seq.status = "running"
        self.running[seq.id] = seq
        self.join_decode(seq)
        self.whatif = None  # the what-if's shared trajectory did not expect this request
        return seq

    def _advance(self, until: float) -> None:
        """Form the next step and commit it (or the part of a decode run that starts < until): the rule's job."""
        self._rule_advance(self, until)

    def sync(self, t: float) -> None:
        """Commit every step that starts before ``t`` (the step in flight at ``t`` included)."""
        advance = self._rule_advance  # (the loops call the rule directly: one call per step less)
        while self.time < t and (self.running or self.waiting):
            advance(self, t)

    def sample(self, ts, out) -> None:  # (ts: float, out: list; typed in engine.pxd for the compiled build)
        """``sync(ts)``, then append the engine's state to ``out``: (ts, instance, running, waiting, free blocks,
        preemptions), a row of ``vidur.records``' instance table. The cluster's sampler calls it for every engine
        every sample interval (50,000 times in a 100,000-request run of 4 engines): the row is built in the compiled
        build's C, not from six field reads in the cluster's Python loop."""
        self.sync(ts)
        out.append((ts, self.instance_id, len(self.running), len(self.waiting), self.free, self.num_preemptions))

    def run_until_idle(self) -> None:
        advance = self._rule_advance
        while self.running or self.waiting:
            advance(self, INF)

    def run_until_finished(self, seq: Seq) -> None:
        """Advance until ``seq`` has finished (or was rejected)."""
        advance = self._rule_advance
        while seq.finish is None and seq.status != "rejected":
            if not (self.running or self.waiting):
                raise RuntimeError("engine went idle before the request finished")
            advance(self, INF)

    def computed_of(self, s: Seq) -> int:
        return s.c0 + self.dclock - s.d0 if s.in_decode else s.computed

    def generated_of(self, s: Seq) -> int:
        return s.g0 + self.dclock - s.d0 if s.in_decode else s.generated

    def blocks_held(self, s: Seq) -> int:
        """KV blocks a running request holds between steps."""
        if s.in_decode:
            return -(-(s.c0 + self.dclock - s.d0) // self.bs)
        return -(-(s.known if self._prefill_holds_known else s.computed) // self.bs)

    def stats(self) -> InstanceStats:
        """Cheap load figures (what vLLM's /metrics or Block's simple trace report)."""
        if self.wq_exact:
            wblocks, wtokens, unprocessed = self.wq_blocks, self.wq_tokens, self.wq_unprocessed
        else:
            bs = self.bs
            wblocks = wtokens = unprocessed = 0
            for s in self.waiting:
                k = s.prompt + s.generated
                wblocks += -(-k // bs)
                wtokens += k
                unprocessed += max(0, s.prompt + s.expected)
        d = self.dclock
        for s in self.running.values():
            x = s.prompt + s.expected - (s.c0 + d - s.d0 if s.in_decode else s.computed)
            if x > 0:
                unprocessed += x
        return InstanceStats(
            instance_id=self.instance_id, num_running=len(self.running), num_waiting=len(self.waiting),
            free_blocks=self.free, total_blocks=self.total_blocks, num_preemptions=self.num_preemptions,
            waiting_prompt_blocks=wblocks, waiting_prompt_tokens=wtokens, unprocessed_tokens=unprocessed,
        )

    def snapshot(self, now: float) -> InstanceState:
        """The exact state a predictor would see at ``now`` (after ``sync(now)``)."""
        running = []
        for s in self.running.values():
            running.append(SeqState(s.id, s.prompt, s.expected, self.computed_of(s), self.generated_of(s), s.arrival))
        waiting = [SeqState(s.id, s.prompt, s.expected, 0, s.generated, s.arrival) for s in self.waiting]
        return InstanceState(
            running=running, waiting=waiting, free_blocks=self.free, total_blocks=self.total_blocks,
            num_preemptions=self.num_preemptions, config=self.cfg, now_s=now,
            busy_for_s=max(0.0, self.time - now),
        )

    @classmethod
    def from_state(cls, state: InstanceState, model: StepTimeModel, overrun_tokens: int = 10) -> "Engine":
        """Rebuild an engine from what a predictor knows, to simulate it forward (the what-if).

        In-flight requests run to their expected length; one that has already decoded that many tokens (the
        estimate was too short) is assumed to end ``overrun_tokens`` later -- Block's rule, with 10 tokens.
        The scheduling rule is the state's (``state.config.scheduler``).
        """
        eng = cls(state.config, model, keep_finished=False)
        eng.total_blocks = state.total_blocks
        eng.free = state.free_blocks
        eng.num_preemptions = state.num_preemptions
        eng.time = max(0.0, state.busy_for_s)
        eng.wq_exact = False  # its queue is filled below, and then gets the what-if's sentinel: it counts afresh
        for st in state.running:
            out = assumed_output(st.expected_output_tokens, st.decoded_tokens, overrun_tokens)
            s = Seq(st.id, st.prompt_tokens, out, st.arrival_s, computed=st.computed_tokens,
                    generated=st.decoded_tokens)
            s.status = "running"
            s.first_sched = 0.0
            eng.running[s.id] = s
            if st.decoded_tokens > 0 and st.computed_tokens >= st.prompt_tokens + st.decoded_tokens - 1:
                s.computed = st.prompt_tokens + st.decoded_tokens - 1
                eng.join_decode(s)
            else:
                eng.prefilling.append(s)
        for st in state.waiting:
            out = assumed_output(st.expected_output_tokens, st.decoded_tokens, overrun_tokens)
            s = Seq(st.id, st.prompt_tokens, out, st.arrival_s, generated=st.decoded_tokens)
            eng.waiting.append(s)
        return eng

    def fork(self, overrun_tokens: Optional[int] = None) -> "Engine":
        """An independent copy of this engine (its requests copied, no callbacks, nothing kept on finish).

        With ``overrun_tokens`` the waiting requests' copies run to the length a predictor assumes for them
        (``assumed_output``), set as they are copied: past capacity the queue holds hundreds.

        The what-if's shared trajectory forks the engine where the candidate would first be reached and runs each
        candidate on its own fork. A stale decode-heap entry keeps pointing at the original request: its version
        never comes back, so it stays stale in the fork too, and the heap's order is kept without re-heapifying.
        """
        heap = self.dg_heap
        if len(heap) > 2 * self.dg_count + 16:  # mostly stale entries (a long-lived trajectory): drop them first
            heap = self.dg_heap = [x for x in heap if x[2] == x[3].ver and x[3].in_decode]
            heapify(heap)
        e: Engine = Engine.__new__(Engine)
        # attribute by attribute in __init__'s order, never through __dict__: an instance whose dict was touched
        # loses CPython's fast attribute access, and every step of the fork would pay for it
        e.cfg = self.cfg
        e.model = self.model
        e.instance_id = self.instance_id
        e.bs = self.bs
        e.total_blocks = self.total_blocks
        e.free = self.free
        e.watermark_blocks = self.watermark_blocks
        e.budget = self.budget
        e.max_seqs = self.max_seqs
        e.time = self.time
        m: dict[Seq, Seq] = {}
        running: dict[int, Seq] = {}
        for sid, s in self.running.items():
            c = m[s] = s.clone()
            running[sid] = c
        e.running = running
        e.prefilling = [m[s] for s in self.prefilling]
        if overrun_tokens is None:
            e.waiting = deque([s.clone() for s in self.waiting])
        else:
            e.waiting = deque([s.clone(assumed_output(s.expected, s.generated, overrun_tokens)) for s in self.waiting])
        e.num_preemptions = self.num_preemptions
        e.num_steps = self.num_steps
        e.busy_s = self.busy_s
        e.keep_finished = False
        e.finished = []
        e.rejected = []
        e.wq_tokens = e.wq_blocks = e.wq_unprocessed = 0  # not kept on a fork: ``stats`` counts its queue afresh
        e.wq_exact = False
        e.room_at_reject = None
        e.dclock = self.dclock
        e.dg_count = self.dg_count
        e.dg_sum = self.dg_sum
        e.dg_hist = self.dg_hist.copy()
        get = m.get
        e.dg_heap = [(a, b, v, get(s, s)) for a, b, v, s in heap]
        e.on_finish = None
        e.whatif = None
        e._rule_advance = self._rule_advance
        e._prefill_holds_known = self._prefill_holds_known
        return e

    # ------------------------------------------------------------------ decode group bookkeeping
    def join_decode(self, s: Seq) -> None:
        """Put a running request whose prefill is complete into the lazy decode group."""
        s.in_decode = True
        s.c0 = s.computed
        s.d0 = self.dclock
        s.g0 = s.generated
        s.ver += 1
        off = s.c0 - s.d0
        self.dg_count += 1
        self.dg_sum += off
        self.dg_hist[off % self.bs] += 1
        heappush(self.dg_heap, (s.d0 + s.out - s.g0, s.id, s.ver, s))

    def leave_decode(self, s: Seq) -> None:
        """Materialise a decode member's lazy fields and take it out of the group."""
        s.computed = s.c0 + self.dclock - s.d0
        s.generated = s.g0 + self.dclock - s.d0
        off = s.c0 - s.d0
        self.dg_count -= 1
        self.dg_sum -= off
        self.dg_hist[off % self.bs] -= 1
        s.in_decode = False
        s.ver += 1  # lazily deletes its heap entry

    def _remove_running(self, s: Seq) -> None:
        """Take a running request out of the running set and give back its blocks (preemption, abort)."""
        freed = self.blocks_held(s)
        del self.running[s.id]
        if s.in_decode:
            self.leave_decode(s)
        else:
            self.prefilling.remove(s)
        self.free += freed

    def preempt_last(self) -> Seq:
        """Preempt the last request in running order by recompute (vLLM V0 and V1 alike); return it."""
        s: Seq = self.running[next(reversed(self.running))]
        self._remove_running(s)
        s.computed = 0
        s.preemptions += 1
        s.status = "waiting"
        self.num_preemptions += 1
        self.waiting.appendleft(s)
        if self.wq_exact:
            self.queued(s, 1)
        return s

    def queued(self, s, sign) -> None:  # (s: Seq, sign: int; typed in engine.pxd)
        """``s`` entered (``sign`` 1) or left (-1) the waiting queue: update its load figures (``stats``). Callers
        skip it on a fork (``wq_exact`` False: it counts afresh), where the what-if's steps run."""
        k = s.prompt + s.generated
        self.wq_tokens += sign * k
        self.wq_blocks += sign * -(-k // self.bs)
        u = s.prompt + s.expected
        if u > 0:
            self.wq_unprocessed += sign * u

    def reject(self, s: Seq) -> None:
        """Drop the head of the waiting queue, which can never fit (vLLM refuses such a prompt with an error)."""
        self.waiting.popleft()
        if self.wq_exact:
            self.queued(s, -1)
        s.status = "rejected"
        self.rejected.append(s)

    def _finish(self, s: Seq, t: float) -> None:
        s.finish = t
        s.status = "finished"
        del self.running[s.id]
        self.free += -(-s.computed // self.bs)
        if self.keep_finished:
            self.finished.append(s)
        if self.on_finish is not None:
            self.on_finish(s)

    def _pop_finished(self, t: float) -> None:
        s: Seq  # (a local's type: the compiled build reads its fields directly, plain Python ignores it)
        heap = self.dg_heap
        d = self.dclock
        while heap and heap[0][0] <= d:
            _, _, ver, s = heappop(heap)
            if ver != s.ver or not s.in_decode:
                continue
            self.leave_decode(s)
            self._finish(s, t)

    def _heap_top_clock(self) -> int:
        heap = self.dg_heap
        s: Seq
        while heap:
            top = heap[0]
            s = top[3]
            if top[2] == s.ver and s.in_decode:
                return top[0]
            heappop(heap)
        return 1 << 62

    def decode_need(self, k: int = 0) -> int:
        """New blocks the decode group needs in the step at decode clock ``dclock + k``."""
        return self.dg_hist[(-(self.dclock + k)) % self.bs]

    def ensure_decode_blocks(self) -> int:
        """Preempt the last running request until the next decode step's new blocks fit; return how many it needs.

        Preempting from the tail until the whole group fits is what both V0 (all at once) and V1 (one request at a
        time, in running order, preempting the tail when one does not fit) arrive at: the fewest victims from the
        tail such that the survivors' new blocks fit.
        """
        hist, bs = self.dg_hist, self.bs
        need = hist[(-self.dclock) % bs]
        while need > self.free:
            self.preempt_last()
            need = hist[(-self.dclock) % bs]
        return need

    # ------------------------------------------------------------------ stepping (composed by the rules)
    def mixed_step(self, chunks, with_decodes) -> None:  # (list[tuple[Seq, int]], bool: typed in engine.pxd)
        """Commit one step with prefill chunks (and, if ``with_decodes``, every decode member, blocks reserved)."""
        s: Seq
        B = self.dg_count if with_decodes else 0
        pre = [(n, s.computed) for s, n in chunks]
        kv = self.dg_sum + B * self.dclock + B if B else 0
        dt = self.model.step_time(pre, B, kv)
        t_end = self.time + dt
        self.busy_s += dt
        self.num_steps += 1
        if B:
            self.dclock += 1
            self._pop_finished(t_end)
        done = []
        for s, n in chunks:  # (``s.known`` spelled out here: a property is a Python call in the compiled build)
            s.computed += n
            if s.computed >= s.prompt + s.generated:
                done.append(s)
        if done:
            self.prefilling = [s for s in self.prefilling if s.computed < s.prompt + s.generated]
            for s in done:
                s.generated += 1  # the step that completes a prefill emits the next token
                if s.first_token is None:
                    s.first_token = t_end
                if s.generated >= s.out:
                    self._finish(s, t_end)
                else:
                    self.join_decode(s)
        self.time = t_end

    def decode_run(self, until: float) -> None:
        """A run of decode-only steps until the next finish or KV exhaustion; commit the steps starting < until.

        The first step's blocks were already secured by ``ensure_decode_blocks``. The caller guarantees that
        nothing else could join a step of the run (no prefill, no admissible waiting request): admission only gets
        harder while the run consumes blocks, and the run ends at the next finish.
        """
        B = self.dg_count
        m = self._heap_top_clock() - self.dclock  # steps until the first request finishes
        if m > 1 and self.free < B * (m // self.bs + 1):  # else the pool surely covers all m steps
            m = min(m, self._steps_until_blocks_run_out())
        c, k = self.model.decode_coeffs(B)
        S1 = self.dg_sum + B * self.dclock + B  # KV tokens in the first step
        t0 = self.time
        a = 0.5 * k * B
        b = c + k * S1 - a
        if until < INF:
            delta = until - t0
            j = steps_started_before(a, b, delta)
            if j < m:
                m = j
        total = m * b + a * m * m  # = sum_{i<m} (c + k (S1 + B i))
        self.free -= self._cum_need(m)
        self.dclock += m
        self.num_steps += m
        self.busy_s += total
        self.time = t0 + total
        self._pop_finished(self.time)

    def stalled(self) -> None:
        """Raise if waiting requests can never be admitted into an empty engine (a bug or a misconfiguration)."""
        if self.waiting and not self.running:
            raise RuntimeError("engine stalled: waiting requests cannot be admitted into an empty engine")

    def _cum_need(self, m) -> int:  # (m: int; a C integer in engine.pxd for the compiled build)
        """New blocks the decode group takes over the next ``m`` steps (the first included)."""
        bs = self.bs
        q, r = divmod(m, bs)
        total = q * self.dg_count
        if r:  # the members' needs at clocks d, d+1, ..: the histogram read backwards from (-d) mod bs
            hist = self.dg_hist
            r0 = (-self.dclock) % bs
            if r <= r0 + 1:
                total += sum(hist[r0 - r + 1:r0 + 1])
            else:
                total += sum(hist[:r0 + 1]) + sum(hist[bs - (r - r0 - 1):])
        return total

    def _steps_until_blocks_run_out(self) -> int:
        """Largest m such that the next m decode steps get their blocks from the free pool."""
        B = self.dg_count
        bs = self.bs
        free = self.free
        q = free // B  # full block periods the pool covers
        rem = free - q * B
        hist = self.dg_hist
        d = self.dclock + q * bs
        r = 0
        used = 0
        while r < bs:
            used += hist[(-(d + r)) % bs]
            if used > rem:
                break
            r += 1
        return max(1, q * bs + r)


def steps_started_before(a, b, delta) -> int:  # (a, b, delta: float; C doubles in engine.pxd)
    """Number of steps i >= 0 of a decode run whose start time cum(i) = a i^2 + b i is < delta (at least 1):
    ``Engine.decode_run``'s cut of a run at a time limit (a function of the compiled build's, called in C)."""
    if delta <= 0:
        return 1
    # a first guess from the root of a j^2 + b j = delta, at most one or two steps off; the loops below make it
    # exact whatever its rounding. Spelled with ``** 0.5`` and ``int``, not math.sqrt and math.ceil: compiled, those
    # were two Python calls (module attribute lookups, boxed floats) in every decode run's cut, 9 % of the engines'
    # time on a 100,000-request run; this is C arithmetic there (cpow, first line) and no slower in plain Python
    if a > 0:
        j = int((-b + (b * b + 4 * a * delta) ** 0.5) / (2 * a)) + 1
    else:
        j = int(delta / b) + 1
    if j < 1:
        j = 1
    while j > 1 and a * (j - 1) * (j - 1) + b * (j - 1) >= delta:
        j -= 1
    while a * j * j + b * j < delta:
        j += 1
    return j


def make_seqs(requests: Iterable, use_prediction: bool = True) -> list[Seq]:
    """Seqs for ``vidur.types.Request`` objects (the engine stops at the true length; predictors see the hint)."""
    out = []
    for r in requests:
        exp = r.expected_output_tokens() if use_prediction else r.output_tokens
        out.append(Seq(r.id, r.prompt_tokens, r.output_tokens, r.arrival_s, expected=exp, tag=r))
    return out


def outcome_columns(seqs: list) -> tuple:
    """(ids, first-token times, finish times, first-scheduled times, preemptions) of ``seqs`` as numpy arrays (int64,
    float64 with NaN where the request never got that far, int64), and their tags as a list: what a run's request
    records take from the engines.

    One pass over the sequences, writing numbers straight into the arrays: the records of a 100,000-request run read
    every request's ``Seq`` and its times, scattered in memory, and the compiled build (``vidur.speedups``) runs this
    loop in C with the arrays as typed memory (lists of floats converted by numpy afterwards took twice as long).
    """
    import numpy as np

    n = len(seqs)
    nan = math.nan
    ids = np.empty(n, dtype=np.int64)
    pre = np.empty(n, dtype=np.int64)
    first = np.empty(n, dtype=np.float64)
    finish = np.empty(n, dtype=np.float64)
    sched = np.empty(n, dtype=np.float64)
    tags = [None] * n
    for k in range(n):
        s = seqs[k]
        ids[k] = s.id
        pre[k] = s.preemptions
        first[k] = nan if s.first_token is None else s.first_token
        finish[k] = nan if s.finish is None else s.finish
        sched[k] = nan if s.first_sched is None else s.first_sched
        tags[k] = s.tag
    return np.asarray(ids), np.asarray(first), np.asarray(finish), np.asarray(sched), np.asarray(pre), tags
