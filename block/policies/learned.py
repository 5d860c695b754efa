"""Routers from the field after Block: LMetric, llm-d's predicted-latency routing, RouteBalance's learned matrix.

* ``lmetric`` (LMetric, arXiv 2603.15202): score = new prefill tokens x batch size, lower wins, no knob. Our
  reading on ``InstanceStats``: prefill tokens = the waiting prompts' tokens + the new prompt; batch size = the
  requests the instance would hold with the new one (running + waiting + 1).
* ``llmd_latency`` (llm-d predicted-latency scheduling, the Gateway API Inference Extension's SLO-aware router):
  per-instance learned TTFT and TPOT models (gradient-boosted trees, ``vidur.learned.OnlineGBDT``; llm-d uses
  XGBoost) on llm-d's instance features, trained online from the requests the scheduler routed; headroom = SLO -
  prediction (``slo_ttft_s``, ``slo_tpot_s``). Candidates with both headrooms positive form the positive tier,
  the rest the negative one; with both tiers present the negative one is drawn with probability ``epsilon``
  (llm-d: 0.01), else the positive one. In the positive tier each headroom is normalised over the tier, blended
  0.8 TTFT / 0.2 TPOT, and a candidate drawn with weight ~ (1 - blend) (``selection="least"``, llm-d's default:
  packing) or ~ blend (``"most"``: spreading); ``"best"`` (ours, not llm-d's) takes the largest blended headroom
  relative to the SLOs without a draw. In the negative tier idle instances come first, then weights fall
  with the blended deficit. Without a prefix cache llm-d's prefix-affinity gate never applies (so its epsilon
  only acts in the tier draw). Until an instance's models have ``min_samples`` outcomes, llm-d's static scorer
  (queue + KV, ``peers.llmd``) decides. Each instance's models see only that instance's outcomes, so they refit
  every ``refit_every`` = 50 of them (a model refitted every 200 went stale for whole overload episodes). Our
  reading of the upstream code: re-check it before citing a detail.
* ``routebalance`` (RouteBalance, arXiv 2606.17949, Block's successor): one in-process learned predictor of E2E
  for the whole request x instance matrix (one batched model call per decision) instead of a simulation per
  instance; argmin. Until ``min_samples`` outcomes, Block-NoSim's unprocessed-token rule decides.

The learned rules keep their models in the policy's memory (``RoutingContext.state``) and learn from the outcomes
the harness hands back through ``vidur.outcomes`` (the simulator and the live scheduler both do): ``choose``
remembers the feature row of every candidate, ``observe`` keeps the chosen one's under the request id, and the next
``choose`` first drains the finished requests and trains on (row, actual latency). ``warm_start`` (a ``.npz`` of
``vidur.learned.save_samples``, e.g. ``python -m vidur.learned_data RUN_DIR -o samples.npz`` from earlier runs'
records) seeds them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from block.policies import heuristics, peers
from block.policies.common import fallback, min_by, with_stats
from vidur.learned import OnlineGBDT, features, lightgbm_module, read_samples, save_samples  # noqa: F401
from vidur.outcomes import Outcome, drain, open_outcomes
from vidur.policy_contract import RoutingContext
from vidur.types import Candidate, Request

LengthOf = Callable[[int], int]
MAX_PENDING = 50_000  # rows kept for requests not finished yet (a lost request must not leak memory)


def lmetric(request: Request, candidates: list[Candidate], ctx: RoutingContext) -> int:
    """LMetric: (waiting prompt tokens + new prompt) x (running + waiting + 1); lower wins."""
    cands = with_stats(candidates)
    return min_by(cands, [(c.stats.waiting_prompt_tokens + request.prompt_tokens)
                          * (c.stats.num_running + c.stats.num_waiting + 1) for c in cands], ctx)


# ------------------------------------------------------------------------------------------------ learned state
@dataclass
class LearnedState:
    """A learned rule's memory: its models, the rows of the last decision and of requests in flight."""

    models: dict[Any, OnlineGBDT] = field(default_factory=dict)
    last: tuple[int, dict[int, tuple[float, ...]]] = (-1, {})
    pending: dict[int, tuple[int, tuple[float, ...]]] = field(default_factory=dict)
    outcomes: int = 0
    predict_s: float = 0.0  # wall time inside model calls at decisions
    decisions: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def model(self, key: Any) -> OnlineGBDT:
        m = self.models.get(key)
        if m is None:
            c = self.config
            m = self.models[key] = OnlineGBDT(min_samples=c["min_samples"], refit_every=c["refit_every"],
                                              window=c["window"], seed=c.get("seed", 0))
        return m

    def remember(self, request_id: int, rows: dict[int, tuple[float, ...]]) -> None:
        self.last = (request_id, rows)

    def keep_chosen(self, request_id: int, chosen: int) -> None:
        rid, rows = self.last
        if rid == request_id and chosen in rows:
            if len(self.pending) >= MAX_PENDING:
                self.pending.pop(next(iter(self.pending)))
            self.pending[request_id] = (chosen, rows[chosen])

    def finished(self, ctx: RoutingContext) -> list[tuple[Outcome, int, tuple[float, ...]]]:
        """The outcomes delivered since the last decision, joined with the row the request was routed on."""
        out = []
        for o in drain(ctx.state, ctx.now_s):
            hit = self.pending.pop(o.request_id, None)
            if hit is not None and hit[0] == o.instance_id:
                out.append((o, hit[0], hit[1]))
        self.outcomes += len(out)
        return out


def learned_state(ctx: RoutingContext, key: str, **config: Any) -> LearnedState:
    """The rule's ``LearnedState`` in ``ctx.state`` (created on first use; opens the outcome channel)."""
    st = ctx.state.get(key)
    if st is None:
        lightgbm_module()  # fail at the first decision, with how to install it, not at the first refit
        st = ctx.state[key] = LearnedState(config={"kind": key, **config})
        open_outcomes(ctx.state)
        ws = config.get("warm_start")
        if ws:
            load_samples(st, str(ws))
    return st


def _rows(request: Request, cands: list[Candidate], length_of: Optional[LengthOf]) -> dict[int, tuple[float, ...]]:
    def told(i: int) -> int:
        return length_of(i) if length_of is not None else request.expected_output_tokens()
    return {c.instance_id: features(c.stats, request.prompt_tokens, told(c.instance_id)) for c in cands}


# ------------------------------------------------------------------------------------------------ llm-d
def llmd_latency(request: Request, candidates: list[Candidate], ctx: RoutingContext, *,
                 length_of: Optional[LengthOf] = None, slo_ttft_s: float = 3.0, slo_tpot_s: float = 0.1,
                 epsilon: float = 0.01, selection: str = "least", min_samples: int = 50, refit_every: int = 50,
                 window: int = 5000, warm_start: Optional[str] = None) -> int:
    """llm-d predicted-latency routing (module docstring): per-instance TTFT/TPOT models, SLO headroom, epsilon."""
    if selection not in SELECTIONS:
        raise ValueError(f"llmd_latency: selection={selection!r} must be one of {SELECTIONS}")
    st = learned_state(ctx, "llmd_latency", min_samples=min_samples, refit_every=refit_every, window=window,
                       warm_start=warm_start)
    for o, i, row in st.finished(ctx):
        st.model(("ttft", i)).add(row, o.ttft_s)
        if o.output_tokens > 1:
            st.model(("tpot", i)).add(row, o.tpot_s)
    cands = with_stats(candidates)
    if not cands:
        return fallback(ctx)
    rows = _rows(request, cands, length_of)
    st.remember(request.id, rows)
    ready = [st.model(("ttft", c.instance_id)).ready and st.model(("tpot", c.instance_id)).ready for c in cands]
    if not all(ready):
        return peers.llmd(request, cands, ctx)
    t0 = time.perf_counter()
    preds = []
    for c in cands:
        row = rows[c.instance_id]
        ttft = float(st.model(("ttft", c.instance_id)).predict([row])[0])
        tpot = float(st.model(("tpot", c.instance_id)).predict([row])[0])
        preds.append((c, slo_ttft_s - ttft, slo_tpot_s - tpot))  # (candidate, TTFT headroom, TPOT headroom)
    st.predict_s += time.perf_counter() - t0
    st.decisions += 1
    pos = [p for p in preds if p[1] > 0 and p[2] > 0]
    neg = [p for p in preds if not (p[1] > 0 and p[2] > 0)]
    if selection == "best":  # not llm-d's: the largest blended headroom, no draw (isolates the learned model)
        return min_by([p[0] for p in preds], [-_blend(p[1] / slo_ttft_s, p[2] / slo_tpot_s) for p in preds], ctx)
    if pos and (not neg or ctx.rng.random() >= epsilon):  # llm-d: 1 - epsilon to the positive tier
        return _weighted(pos, _positive_weights(pos, selection), ctx)
    return _negative_pick(neg, ctx)


HEADROOM_TTFT_WEIGHT, HEADROOM_TPOT_WEIGHT = 0.8, 0.2  # llm-d's blend of the two headrooms (and deficits)
SELECTIONS = ("least", "most", "best")


def _blend(ttft: float, tpot: float) -> float:
    return HEADROOM_TTFT_WEIGHT * ttft + HEADROOM_TPOT_WEIGHT * tpot


def _norm(vals: list[float], default: float) -> list[float]:
    lo, hi = min(vals), max(vals)
    return [default if hi - lo <= 1e-9 else (v - lo) / (hi - lo + 1e-9) for v in vals]


def _positive_weights(pos: list, selection: str) -> list[int]:
    """llm-d: headrooms normalised within the cohort, blended 0.8 TTFT / 0.2 TPOT; "least" weighs tight fits up."""
    nt = _norm([p[1] for p in pos], 0.5)
    np_ = _norm([p[2] for p in pos], 0.5)
    out = []
    for a, b in zip(nt, np_):
        combined = HEADROOM_TTFT_WEIGHT * a + HEADROOM_TPOT_WEIGHT * b
        out.append(int(((1.0 - combined) if selection == "least" else combined) * 99) + 2)
    return out


def _negative_pick(neg: list, ctx: RoutingContext) -> int:
    """llm-d's pick when no candidate meets both SLOs: idle instances first; then weights by the blended deficit
    (normalised within each violation class: both, TTFT only, TPOT only), a floor weight for the rest."""
    idle = [p for p in neg if p[0].stats.num_running == 0]
    pool = idle or neg
    if len(pool) == 1:
        return pool[0][0].instance_id
    chosen: list = []
    weights: list[int] = []
    classes = ([p for p in pool if p[1] < 0 and p[2] < 0], [p for p in pool if p[1] < 0 <= p[2]],
               [p for p in pool if p[2] < 0 <= p[1]])
    for cls in classes:
        if not cls:
            continue
        dt = _norm([max(0.0, -p[1]) for p in cls], 0.0)
        dp = _norm([max(0.0, -p[2]) for p in cls], 0.0)
        for p, a, b in zip(cls, dt, dp):
            chosen.append(p)
            weights.append(int((1.0 - (HEADROOM_TTFT_WEIGHT * a + HEADROOM_TPOT_WEIGHT * b)) * 80) + 2)
    for p in pool:
        if p[1] >= 0 and p[2] >= 0:
            chosen.append(p)
            weights.append(1)
    return _weighted(chosen, weights, ctx)


def _weighted(items: list, weights: list[int], ctx: RoutingContext) -> int:
    if len(items) == 1:
        return items[0][0].instance_id
    x = ctx.rng.randrange(sum(weights))
    for p, w in zip(items, weights):
        if x < w:
            return p[0].instance_id
        x -= w
    return items[-1][0].instance_id


def learned_observe(request: Request, chosen: int, candidates: list[Candidate], ctx: RoutingContext) -> None:
    """Keep the chosen candidate's feature row until the request's outcome comes back (both learned rules)."""
    for key in ("llmd_latency", "routebalance"):
        st = ctx.state.get(key)
        if st is not None:
            st.keep_chosen(request.id, chosen)


# ------------------------------------------------------------------------------------------------ RouteBalance
def routebalance(request: Request, candidates: list[Candidate], ctx: RoutingContext, *,
                 length_of: Optional[LengthOf] = None, min_samples: int = 200, refit_every: int = 200,
                 window: int = 5000, warm_start: Optional[str] = None) -> int:
    """RouteBalance-style: one learned E2E model over the request x instance matrix, argmin (module docstring)."""
    st = learned_state(ctx, "routebalance", min_samples=min_samples, refit_every=refit_every, window=window,
                       warm_start=warm_start)
    m = st.model("e2e")
    for o, _, row in st.finished(ctx):
        m.add(row, o.e2e_s)
    cands = with_stats(candidates)
    if not cands:
        return fallback(ctx)
    rows = _rows(request, cands, length_of)
    st.remember(request.id, rows)
    if not m.ready:
        return heuristics.block_nosim(request, cands, ctx, length_of=length_of)
    t0 = time.perf_counter()
    pred = m.predict([rows[c.instance_id] for c in cands])
    st.predict_s += time.perf_counter() - t0
    st.decisions += 1
    return min_by(cands, [float(p) if math.isfinite(p) else math.inf for p in pred], ctx)


# ------------------------------------------------------------------------------------------------ warm start
def load_samples(st: LearnedState, path: str) -> None:
    """Seed ``st``'s models from a ``save_samples`` file (the keys its rule uses: per instance or pooled)."""
    z = read_samples(path)
    _seed(st, z["x"], z["instance"], z["ttft"], z["tpot"], z["e2e"])


def _seed(st: LearnedState, x: np.ndarray, inst: np.ndarray, ttft: np.ndarray, tpot: np.ndarray,
          e2e: np.ndarray) -> None:
    rows = [tuple(r) for r in x]
    if st.config.get("kind") == "routebalance":
        st.model("e2e").add_many(rows, list(e2e))
        return
    for i in sorted(set(int(v) for v in inst)):
        sel = [k for k, v in enumerate(inst) if int(v) == i]
        st.model(("ttft", i)).add_many([rows[k] for k in sel], [float(ttft[k]) for k in sel])
        st.model(("tpot", i)).add_many([rows[k] for k in sel], [float(tpot[k]) for k in sel])
