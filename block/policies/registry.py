"""Names used in configs and results -> policy rules, the signal each needs and whether k-probing applies.

``make_policy`` wraps a rule into a ``vidur.policy_contract.RoutingPolicy`` (the simulator's and the live scheduler's
common interface) and adds Block's two noise knobs:

* ``length_noise_pct``: the output length the scheduler tells each probed instance (and its what-if) is drawn
  independently per (request, instance) as ``noisy_length(L, pct)``, L being the policy's base length (hint,
  prediction or truth). It goes through ``RoutingPolicy.expected_length``; draws are cached per decision in
  ``ctx.state`` so the rule and the cluster see the same number, and the chosen instance keeps its draw as the
  request's in-flight expected length (the cluster does that). Block itself forwards the un-noised hint to the
  engine; here the engine keeps the noisy one it was told -- a deliberate small difference.
* ``latency_noise_pct`` (prediction policies only): each candidate's predicted e2e is scaled by Block's noise
  before the argmin. The recorded ``predicted_e2e_s`` stays the un-noised what-if.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from block.policies import basic, heuristics, peers, predicted
from block.policies.common import check_pct, noisy_length
from vidur.policy_contract import ChooseFn, RoutingContext, RoutingPolicy
from vidur.types import Request

_RESERVED = {"length_of", "latency_noise_pct"}  # rule kwargs make_policy binds itself


@dataclass(frozen=True)
class PolicySpec:
    choose: ChooseFn
    signal: str  # none | stats | prediction
    probes: bool  # whether k applies (policies that look at no signal use every instance)
    doc: str  # one-line rule (DESIGN.md's table)
    length: Callable[[Request], int] = predicted.hint_length  # base output length told to the instances
    observe: Optional[Callable[..., None]] = None
    default_length_noise_pct: float = 0.0
    default_k: Optional[int] = None  # what conf/policy/<name>.yaml sets

    @property
    def uses_length(self) -> bool:
        return "length_of" in inspect.signature(self.choose).parameters

    def params(self) -> dict[str, Any]:
        """The rule's tunable keyword parameters and their defaults."""
        out = {}
        for fn in (self.choose, self.observe):
            if fn is None:
                continue
            for p in inspect.signature(fn).parameters.values():
                if p.kind is p.KEYWORD_ONLY and p.name not in _RESERVED:
                    out[p.name] = p.default
        return out


_B = "predicted e2e latency of the new request (what-if), lower wins; probes k (2 = Po2, null = all)"
POLICIES: dict[str, PolicySpec] = {
    "block": PolicySpec(predicted.block, "prediction", True,
                        _B + "; length = the client's hint (predicted if present, else true)", default_k=2),
    "block_star": PolicySpec(predicted.block, "prediction", True,
                             _B + "; length = the estimator's prediction (paper's Block*)",
                             length=predicted.predicted_length, default_k=2),
    "block_oracle": PolicySpec(predicted.block, "prediction", True, _B + "; length = the true length",
                               length=predicted.oracle_length, default_k=2),
    "block_noisy": PolicySpec(predicted.block, "prediction", True,
                              _B + "; length = true length with Block's noise (default 25%), Block* stand-in",
                              length=predicted.oracle_length, default_length_noise_pct=25.0, default_k=2),
    "block_nosim": PolicySpec(heuristics.block_nosim, "stats", True,
                              "unprocessed tokens on the instance + new prompt + new expected output, lower wins "
                              "(Block-NoSim ablation)", default_k=2),
    "llumnix": PolicySpec(heuristics.llumnix, "stats", True,
                          "-(free blocks - waiting prompts' blocks) / max(running, 1), lower wins "
                          "(Llumnix dispatch, no migration)"),
    "infaas": PolicySpec(heuristics.infaas, "stats", True, "-free blocks / max(running, 1), lower wins (INFaaS++)"),
    "least_requests": PolicySpec(heuristics.least_requests, "stats", True, "fewest running + waiting requests"),
    "llmd": PolicySpec(peers.llmd, "stats", True,
                       "llm-d scorers: 2 x queue (max-q)/(max-q - min-q) + 2 x (1 - KV used/total), highest wins"),
    "sglang_least_load": PolicySpec(peers.sglang_least_load, "stats", True,
                                    "SGLang least_load: unprocessed tokens / throughput + w k/(1-k), k = KV used "
                                    "fraction, lower wins"),
    "dynamo_kv": PolicySpec(peers.dynamo_kv, "stats", True,
                            "Dynamo KV cost: overlap_score_weight x new prompt blocks + (blocks in use + waiting "
                            "prompts' blocks), lower wins"),
    "min_qpm": PolicySpec(basic.min_qpm, "none", False,
                          "fewest requests sent by this scheduler in the last 60 s, random tie-break",
                          observe=basic.min_qpm_observe),
    "round_robin": PolicySpec(basic.round_robin, "none", False, "request i -> instance i mod N"),
    "random": PolicySpec(basic.random_choice, "none", False, "uniform over instances"),
}


def policy_names() -> list[str]:
    return sorted(POLICIES)


def describe_policies() -> dict[str, str]:
    """name -> one-line rule (for --help texts and the DESIGN table)."""
    return {n: POLICIES[n].doc for n in policy_names()}


def _bind(fn: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    names = inspect.signature(fn).parameters
    return {k: v for k, v in params.items() if k in names}


def make_policy(name: str, k: Optional[int] = None, length_noise_pct: Optional[float] = None,
                latency_noise_pct: float = 0.0, **params: Any) -> RoutingPolicy:
    """Build the routing policy ``name`` probing ``k`` instances (None: all; ignored by non-probing policies).

    ``length_noise_pct=None`` takes the policy's default (25 for ``block_noisy``, else 0). ``params`` are the
    rule's own knobs (see ``POLICIES[name].params()``). All randomness comes from the scheduler's ``ctx.rng``.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {policy_names()}")
    spec = POLICIES[name]
    allowed = spec.params()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"policy {name!r} has no parameter(s) {unknown}; it takes {sorted(allowed) or 'none'}")
    len_pct = check_pct("length_noise_pct",
                        spec.default_length_noise_pct if length_noise_pct is None else length_noise_pct)
    lat_pct = check_pct("latency_noise_pct", latency_noise_pct)
    if lat_pct > 0 and spec.signal != "prediction":
        raise ValueError(f"latency_noise_pct applies to predicted latencies; policy {name!r} uses none "
                         "(only the block* policies take it)")

    base = spec.length
    expected_length: Optional[Callable[[Request, int, RoutingContext], int]]
    if len_pct > 0:
        def expected_length(req: Request, instance: int, ctx: RoutingContext) -> int:
            key = (req.id, ctx.request_index)
            cache = ctx.state.get("_lengths")
            if cache is None or cache[0] != key:
                cache = ctx.state["_lengths"] = (key, {})
            drawn = cache[1]
            if instance not in drawn:
                drawn[instance] = noisy_length(base(req), len_pct, ctx.rng)
            return drawn[instance]
    elif base is predicted.hint_length:
        expected_length = None  # the cluster's default is the hint
    else:
        def expected_length(req: Request, instance: int, ctx: RoutingContext) -> int:
            return base(req)

    kw = _bind(spec.choose, params)
    if spec.signal == "prediction":
        kw["latency_noise_pct"] = lat_pct
    rule = spec.choose
    if spec.uses_length:
        length_fn = expected_length or (lambda req, i, ctx: base(req))

        def choose(req: Request, cands: list, ctx: RoutingContext) -> int:
            return rule(req, cands, ctx, length_of=lambda i: length_fn(req, i, ctx), **kw)
    elif kw:
        def choose(req: Request, cands: list, ctx: RoutingContext) -> int:
            return rule(req, cands, ctx, **kw)
    else:
        choose = rule

    observe = None
    if spec.observe is not None:
        okw = _bind(spec.observe, params)
        obs = spec.observe

        def observe(req: Request, chosen: int, cands: list, ctx: RoutingContext) -> None:
            obs(req, chosen, cands, ctx, **okw)

    return RoutingPolicy(name=name, choose=choose, signal=spec.signal, k=k if spec.probes else None,
                         observe=observe, expected_length=expected_length)


def policy_from_config(cfg: Mapping[str, Any]) -> RoutingPolicy:
    """``make_policy`` from a conf/policy/<name>.yaml mapping: name, k, length_noise_pct, latency_noise_pct and
    the policy's own parameters (null values take the defaults)."""
    d = {key: v for key, v in dict(cfg).items() if v is not None or key == "k"}
    if "name" not in d:
        raise ValueError("policy config needs a name")
    name = str(d.pop("name"))
    k = d.pop("k", None)
    return make_policy(name, k=None if k is None else int(k), **d)
