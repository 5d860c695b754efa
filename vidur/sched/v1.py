"""vLLM V1 scheduling (``vllm/v1/core/sched/scheduler.py``, ``Scheduler.schedule``; checked against vLLM 0.32).

V1 has no prefill or decode phase: each step has one token budget, ``max_num_batched_tokens``, and every request
just tries to catch its computed tokens up with its known tokens (prompt plus output so far).

* **Running requests first, in running order** (admission order). Each gets ``min(known - computed, budget left)``
  tokens: a decode takes 1, a partly prefilled request a chunk. With ``long_prefill_token_threshold`` > 0 a chunk is
  also capped at that many tokens, but only while more than one request is in the engine (running + waiting). The
  loop stops when the budget is spent: requests later in running order get nothing this step.
* **KV blocks per chunk**: a request holds blocks for its computed tokens only and each step allocates what its new
  tokens need (``kv_cache_manager.allocate_slots``). When that fails, the *last* request in running order is preempted
  (recompute: blocks freed, ``num_computed_tokens = 0``, to the front of the waiting queue) until the allocation fits
  -- or the request itself was the last one, which ends the running loop. Requests already scheduled in the step are
  never victims (they are ahead of the current one).
* **Waiting requests, FCFS, only if no request was preempted in this step**, while budget remains and fewer than
  ``max_num_seqs`` requests run. The head must fit whole (``scheduler_reserve_full_isl``, on by default): blocks for
  all its known tokens plus the watermark (``watermark`` x blocks, 0 by default in V1; applied only when something is
  running) must be free, else admission stops (head-of-line blocking). It is then given ``min(known, budget left)``
  tokens (threshold-capped) and blocks for those only. Without chunked prefill a head that does not fit the budget
  stops admission instead.

Not modelled: prefix caching (vLLM V1 enables it by default; with prompts that share no full block, e.g. the
benchmark datasets, it never hits -- but a preempted request may re-hit its own freed blocks, which makes real
recompute cheaper than here), async scheduling (see docs/simulator.md), speculative decoding, priorities, the
adaptive threshold, KV connectors, encoder inputs.

The fast path assumes the usual shape of V1's running list: decodes first, prefills at its tail (without a
threshold at most one partial prefill, the last admitted). Then "decodes first, then prefills in order" *is* the
running order, the decodes' block demand comes from the decode group's histogram and decode-only stretches are the
engine's closed-form runs. Any other order (threshold-capped chunks, a state from a predictor) takes the general
path, which walks the running list request by request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vidur.engine import Engine, Seq
    from vidur.types import EngineConfig


def _chunk(left: int, thr: int, budget: int) -> int:
    """Tokens a running request gets this step: what it has left, capped by the threshold (0 = none) and budget."""
    n = thr if thr and left > thr else left
    return n if n <= budget else budget


def _make_room(e: "Engine", s: "Seq", c: int, n: int) -> int:
    """Allocate the blocks that ``n`` more tokens after ``c`` computed need, preempting the tail of running order
    until they fit; the blocks allocated, or -1 when ``s`` itself was the victim (the running loop ends)."""
    bs = e.bs
    extra = -(-(c + n) // bs) - (-(-c // bs))
    while extra > e.free:
        if e.preempt_last() is s:
            return -1
    e.free -= extra
    return extra


class V1Rule:
    """vLLM V1: one token budget per step, running requests first, then waiting ones if nobody was preempted."""

    prefill_holds_known = False
    closed_form = False  # ``vidur.candidate`` follows V0 chunked steps only: V1 candidates take the simulation

    def __init__(self, config: "EngineConfig") -> None:
        self.threshold = config.long_prefill_token_threshold
        self.chunked = config.chunked_prefill

    def advance(self, e: "Engine", until: float) -> None:
        thr = self.threshold if self.threshold and len(e.running) + len(e.waiting) > 1 else 0
        preempted_before = e.num_preemptions
        skipped: list[Seq] = []
        if e.prefilling and not self._prefills_at_tail(e):
            chunks, budget, skipped, reserved = self._running_in_order(e, thr)
        else:
            reserved = e.ensure_decode_blocks() if e.dg_count else 0
            e.free -= reserved  # the decodes' new blocks: they come first in running order
            chunks, budget = self._prefill_chunks(e, e.budget - e.dg_count, thr)
        preempted = e.num_preemptions != preempted_before
        if not preempted and budget > 0 and e.waiting and len(e.running) < e.max_seqs:
            self._admit(e, chunks, budget, thr)
        if chunks or skipped:
            for s in skipped:  # decodes the budget did not reach sit this step out
                e.leave_decode(s)
            e.mixed_step(chunks, with_decodes=True)
            for s in skipped:
                e.join_decode(s)
            return
        e.free += reserved
        if e.dg_count:
            e.decode_run(until)  # nothing can join: admission failed (or was barred) and only gets harder
        elif not preempted:
            e.stalled()

    @staticmethod
    def settle(e: "Engine") -> None:
        """Nothing: V1 preempts inside its running loop, on the chunks' allocations (``SchedulingRule.settle``)."""

    @staticmethod
    def may_reach_back(e: "Engine") -> bool:
        """False only if the next step's admission surely stops before the last waiting request (see V0's).

        A seat for every request ahead (a preemption moves one from running to waiting, same sum; a preemption also
        bars admission), and the head's full blocks plus the watermark must be free: the running loop only
        allocates, so the pool at admission is at most today's. A head that can never fit is rejected: True.
        """
        ahead = len(e.waiting) - 1
        if len(e.running) + ahead >= e.max_seqs:
            return False
        if ahead > 0:
            h = e.waiting[0]
            full = -(-(h.prompt + h.generated) // e.bs)
            if full > e.total_blocks or h.prompt > e.cfg.max_model_len:
                return True
            if full + (e.watermark_blocks if e.running else 0) > e.free:
                return False
        return True

    @staticmethod
    def _prefills_at_tail(e: "Engine") -> bool:
        """Whether the running prefills are the last requests in running order (the fast path's shape)."""
        keys = reversed(e.running)
        for s in reversed(e.prefilling):
            if next(keys) != s.id:
                return False
        return True

    @staticmethod
    def _prefill_chunks(e: "Engine", budget: int, thr: int) -> tuple[list[tuple["Seq", int]], int]:
        """Chunks for the running prefills (the tail of running order) after the decodes; preempt the tail on need."""
        pre = e.prefilling
        chunks: list[tuple[Seq, int]] = []
        i = 0
        while i < len(pre) and budget > 0:
            s = pre[i]
            c = s.computed
            n = _chunk(s.known - c, thr, budget)
            if _make_room(e, s, c, n) < 0:  # victims are later prefills, then s itself: the loop ends
                return chunks, budget
            chunks.append((s, n))
            budget -= n
            i += 1
        return chunks, budget

    @staticmethod
    def _running_in_order(e: "Engine", thr: int) -> tuple[list[tuple["Seq", int]], int, list["Seq"], int]:
        """The general running loop, request by request: (chunks, budget left, decodes skipped, decode blocks)."""
        budget = e.budget
        chunks: list[tuple[Seq, int]] = []
        reserved = 0  # the decodes' new blocks
        order = list(e.running.values())
        i = 0
        while i < len(order) and budget > 0:
            s = order[i]
            if s.status != "running":
                break  # preempted from the tail, like everything after it
            if s.in_decode:
                c = e.computed_of(s)
                n = 1
            else:
                c = s.computed
                n = _chunk(s.known - c, thr, budget)
            extra = _make_room(e, s, c, n)
            if extra < 0:
                break
            budget -= n
            if s.in_decode:
                reserved += extra
            else:
                chunks.append((s, n))
            i += 1
        skipped = [s for s in order[i:] if s.in_decode and s.status == "running"]
        return chunks, budget, skipped, reserved

    def _admit(self, e: "Engine", chunks: list[tuple["Seq", int]], budget: int, thr: int) -> None:
        """Admit waiting requests FCFS into ``chunks`` (head-of-line blocking)."""
        bs = e.bs
        waiting = e.waiting
        max_len = e.cfg.max_model_len
        while waiting and budget > 0 and len(e.running) < e.max_seqs:
            s = waiting[0]
            known = s.prompt + s.generated
            full = -(-known // bs)
            if full > e.total_blocks or s.prompt > max_len:
                e.reject(s)  # can never fit
                continue
            if full + (e.watermark_blocks if e.running else 0) > e.free:
                break
            n = known
            if thr and n > thr:
                n = thr
            if n > budget:
                if not self.chunked:
                    break
                n = budget
            waiting.popleft()
            if e.wq_exact:
                e.queued(s, -1)
            e.free -= -(-n // bs)
            s.status = "running"
            s.computed = 0
            e.running[s.id] = s
            if s.first_sched is None:
                s.first_sched = e.time
            e.prefilling.append(s)
            chunks.append((s, n))
            budget -= n
