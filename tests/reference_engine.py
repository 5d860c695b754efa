"""A deliberately naive engine: one step at a time, every request touched every step, no closed forms.

It implements the same scheduling rules as ``vidur.engine.Engine`` -- vLLM V0 as Block ran it (``vidur/sched/v0.py``)
and vLLM V1 (``vidur/sched/v1.py``, ``step_v1`` below is a line-by-line transcription of the running and waiting
loops of vLLM's ``Scheduler.schedule``) -- in the most direct way, so tests can check that the fast engine's lazy
decode group, closed-form runs, block histogram and fast paths give exactly the same schedule.
"""

from __future__ import annotations

from collections import deque


class RSeq:
    def __init__(self, id, prompt, out, arrival):
        self.id, self.prompt, self.out, self.arrival = id, prompt, out, arrival
        self.computed = 0
        self.generated = 0
        self.blocks = 0
        self.prefill_done = False
        self.first_token = None
        self.finish = None
        self.preemptions = 0

    @property
    def known(self):
        return self.prompt + self.generated


class RefEngine:
    def __init__(self, cfg, model):
        self.cfg, self.model = cfg, model
        self.bs = cfg.block_size
        self.free = cfg.num_blocks
        self.wm = cfg.watermark_blocks
        self.time = 0.0
        self.running: list[RSeq] = []
        self.waiting: deque[RSeq] = deque()
        self.finished = []
        self.num_preemptions = 0

    def add(self, s, now):
        if not self.running and not self.waiting and self.time < now:
            self.time = now
        self.waiting.append(s)

    def sync(self, t):
        while self.time < t and (self.running or self.waiting):
            self.step()

    def run_until_idle(self):
        while self.running or self.waiting:
            self.step()

    def _ceil(self, x):
        return -(-x // self.bs)

    def _preempt_last(self):
        v = self.running.pop()
        self.free += v.blocks
        v.blocks = 0
        v.computed = 0
        v.prefill_done = False
        v.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(v)

    def _decodes_with_blocks(self):
        """Preempt from the tail until every decode sequence can get the block it needs this step."""
        while True:
            decodes = [s for s in self.running if s.prefill_done]
            need = sum(1 for s in decodes if self._ceil(s.computed + 1) > s.blocks)
            if need <= self.free:
                return decodes
            self._preempt_last()

    def _admit(self, budget, whole):
        new = []
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            s = self.waiting[0]
            need = self._ceil(s.known)
            if self.free - need < self.wm:
                break
            n = s.known if whole else min(s.known, budget)
            if whole and n > budget:
                break
            self.waiting.popleft()
            self.free -= need
            s.blocks = need
            s.computed = 0
            self.running.append(s)
            new.append((s, n))
            budget -= n
        return new

    def step(self):
        cfg = self.cfg
        if cfg.scheduler == "v1":
            return self.step_v1()
        if cfg.chunked_prefill:
            decodes = self._decodes_with_blocks() if any(s.prefill_done for s in self.running) else []
            for s in decodes:  # reserve
                if self._ceil(s.computed + 1) > s.blocks:
                    s.blocks += 1
                    self.free -= 1
            budget = cfg.chunk_size - len(decodes)
            chunks = []
            for s in self.running:
                if not s.prefill_done and budget > 0:
                    n = min(s.known - s.computed, budget)
                    chunks.append((s, n))
                    budget -= n
            if budget > 0:
                chunks += self._admit(budget, whole=False)
        else:
            decodes = []
            chunks = self._admit(cfg.max_num_batched_tokens, whole=True)
            if not chunks:
                decodes = self._decodes_with_blocks()
                for s in decodes:
                    if self._ceil(s.computed + 1) > s.blocks:
                        s.blocks += 1
                        self.free -= 1
        self._run_step(chunks, decodes)

    def step_v1(self):
        """vLLM V1: running requests in order with one budget, preempting the tail; then waiting ones, FCFS."""
        cfg = self.cfg
        thr = cfg.long_prefill_token_threshold if len(self.running) + len(self.waiting) > 1 else 0
        budget = cfg.max_num_batched_tokens
        scheduled = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            s = self.running[i]
            n = s.known - s.computed  # 1 for a decode
            if 0 < thr < n:
                n = thr
            n = min(n, budget)
            need = self._ceil(s.computed + n) - s.blocks
            fits = True
            while need > self.free:
                v = self.running[-1]
                self._preempt_last()
                preempted = True
                if v is s:
                    fits = False
                    break
            if not fits:
                break
            s.blocks += need
            self.free -= need
            scheduled.append((s, n))
            budget -= n
            i += 1
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                s = self.waiting[0]
                full = self._ceil(s.known)
                wm = self.wm if self.running else 0
                if full + wm > self.free:
                    break
                n = s.known
                if 0 < thr < n:
                    n = thr
                if n > budget:
                    if not cfg.chunked_prefill:
                        break
                    n = budget
                self.waiting.popleft()
                s.blocks = self._ceil(n)
                self.free -= s.blocks
                s.computed = 0
                self.running.append(s)
                scheduled.append((s, n))
                budget -= n
        decodes = [s for s, _ in scheduled if s.prefill_done]
        chunks = [(s, n) for s, n in scheduled if not s.prefill_done]
        self._run_step(chunks, decodes)

    def _run_step(self, chunks, decodes):
        if not chunks and not decodes:
            return
        kv = sum(s.computed + 1 for s in decodes)
        dt = self.model.step_time([(n, s.computed) for s, n in chunks], len(decodes), kv)
        t_end = self.time + dt
        for s in decodes:
            s.computed += 1
            s.generated += 1
        for s, n in chunks:
            s.computed += n
            if s.computed >= s.known:
                s.prefill_done = True
                s.generated += 1
                if s.first_token is None:
                    s.first_token = t_end
        for s in list(self.running):
            if s.generated >= s.out:
                s.finish = t_end
                self.free += s.blocks
                self.running.remove(s)
                self.finished.append(s)
        self.time = t_end
