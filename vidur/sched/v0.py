"""vLLM V0 scheduling, as Block ran it (its vLLM fork).

* chunked prefill (Sarathi / vLLM ``--enable-chunked-prefill``): per step a token budget ``chunk_size``; every
  decode sequence first (one token each), then the chunks of prefills already running, in running order, then new
  prompts admitted from the waiting queue (FCFS, head-of-line blocking) while the budget, ``max_num_seqs`` and the
  KV blocks allow;
* without chunked prefill (vLLM default, prefill first): if any waiting prompt can be admitted the step is
  prefill-only (whole prompts, token sum <= ``max_num_batched_tokens``), else a decode-only step;
* KV: an admitted prompt gets blocks for all its known tokens at once, but only while ``watermark`` of all blocks
  stays free. When a decode step cannot get the blocks it needs, the most recently admitted running request is
  preempted (repeatedly) by recompute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vidur.engine import Engine, Seq
    from vidur.types import EngineConfig


class V0Rule:
    """vLLM V0: decodes first then prefill chunks (chunked), or prefill-first steps (not chunked)."""

    prefill_holds_known = True

    def __init__(self, config: "EngineConfig") -> None:
        # a plain function, not a bound method: one call per step less on the what-if's hot path, and no cycle
        self.advance = _advance_chunked if config.chunked_prefill else _advance_prefill_first
        self.chunked = config.chunked_prefill
        # a candidate's life can be walked over the recorded steps (``vidur.candidate``): chunked only
        self.closed_form = config.chunked_prefill
        # chunked: a step first preempts until the decodes' new blocks fit, whatever waits (see ``settle``)
        self.settle = _settle_chunked if config.chunked_prefill else _settle_nothing

    def may_reach_back(self, e: "Engine") -> bool:
        """False only if the next step's admission surely stops before the last waiting request (the what-if's
        shared trajectory checkpoints the engine before a step only when this is True; see ``vidur.whatif``).

        Every request waiting ahead must be admitted: a seat each (a preemption moves one from running to waiting,
        same sum), its blocks above the watermark in turn (after the decodes' reservation when chunked) and its
        tokens with budget to spare (the loop stops when the budget is spent; prefill-first admits whole prompts).
        A request that can never fit is rejected, not blocking: then True (unsure). A step that must still preempt:
        True (``settle`` first: then its victims are at the head, and they never fit back at once).
        """
        h: Seq
        waiting = e.waiting
        ahead = len(waiting) - 1
        if len(e.running) + ahead >= e.max_seqs:
            return False
        free = e.free
        if self.chunked:
            dn = e.decode_need() if e.dg_count else 0
            if dn > free:
                return True
            free -= dn
            left = e.budget - e.dg_count
            for s in e.prefilling:
                left -= s.known - s.computed
                if left <= 0:
                    return False
        else:
            left = e.budget
        bs = e.bs
        wm = e.watermark_blocks
        never = e.total_blocks - wm
        max_len = e.cfg.max_model_len
        for i in range(ahead):
            h = waiting[i]
            known = h.prompt + h.generated
            need = -(-known // bs)
            if need > never or h.prompt > max_len:
                return True
            free -= need
            left -= known
            if free < wm or left <= 0:
                return False
        return True


def _settle_chunked(e: "Engine") -> None:
    """The step's preemptions (``_advance_chunked`` does them first, from the running set alone): committing
    them early changes nothing, and the victims then sit at the head of the queue, where ``may_reach_back`` sees
    that they block it (a victim never fits back in the step that evicted it)."""
    if e.dg_count:
        e.ensure_decode_blocks()


def _settle_nothing(e: "Engine") -> None:
    """Prefill-first steps admit before they preempt: nothing comes before the admission loop."""


def _admit(e: "Engine", budget, seqs_room, whole) -> list[tuple["Seq", int]]:
    """Admit waiting prompts FCFS (head-of-line blocking). Returns (seq, tokens this step). (``budget``,
    ``seqs_room``: ints, ``whole``: bool; typed in v0.pxd for the compiled build.)"""
    s: Seq  # (locals' types: the compiled build, vidur/speedups.py, reads their fields directly)
    out: list[tuple[Seq, int]] = []
    waiting = e.waiting
    bs = e.bs
    while waiting and budget > 0 and seqs_room > 0:
        s = waiting[0]
        known = s.prompt + s.generated
        need = -(-known // bs)
        if need > e.total_blocks - e.watermark_blocks or s.prompt > e.cfg.max_model_len:
            e.room_at_reject = (budget, seqs_room, e.free)
            e.reject(s)  # can never fit
            continue
        if e.free - need < e.watermark_blocks:
            break
        n = known if whole else min(known, budget)
        if whole and n > budget:
            break
        waiting.popleft()
        if e.wq_exact:
            e.queued(s, -1)
        e.free -= need
        s.status = "running"
        s.computed = 0
        e.running[s.id] = s
        if s.first_sched is None:
            s.first_sched = e.time
        out.append((s, n))
        budget -= n
        seqs_room -= 1
    return out


def _advance_chunked(e: "Engine", until: float) -> None:
    s: Seq
    need = e.ensure_decode_blocks() if e.dg_count else 0
    e.free -= need  # reserve the decode sequences' new blocks before admitting prompts
    budget = e.budget - e.dg_count
    chunks: list[tuple[Seq, int]] = []
    for s in e.prefilling:
        if budget <= 0:
            break
        n = min(s.known - s.computed, budget)
        chunks.append((s, n))
        budget -= n
    if budget > 0 and e.waiting and len(e.running) < e.max_seqs:
        new = _admit(e, budget, e.max_seqs - len(e.running), False)
        if new:
            for s, _ in new:  # (a loop, not a generator: the compiled build types it)
                e.prefilling.append(s)
            chunks.extend(new)
    if chunks:
        e.mixed_step(chunks, True)  # (with_decodes)
        return
    e.free += need
    if e.dg_count:
        e.decode_run(until)
    else:
        e.stalled()


def _advance_prefill_first(e: "Engine", until: float) -> None:
    if e.waiting and len(e.running) < e.max_seqs:
        new = _admit(e, e.budget, e.max_seqs - len(e.running), True)
        if new:
            for s, _ in new:
                e.prefilling.append(s)
            e.mixed_step(new, False)
            return
    if e.dg_count:
        e.ensure_decode_blocks()  # may preempt everyone: then the next call re-admits
        if e.dg_count:
            e.decode_run(until)
    else:
        e.stalled()
