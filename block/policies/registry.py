"""Names used in configs and results -> policy rules, the signal each needs and whether k-probing applies.

``make_policy`` wraps a rule into a ``vidur.policy_contract.RoutingPolicy`` (the simulator's and the live scheduler's
common interface) and adds Block's two noise knobs (below). A rule is found by name among the built-in ones
(``POLICIES``: a new one is one line there plus conf/policy/<name>.yaml), among the installed plug-ins (entry points of
group ``block_repro.policies``), or by import path (``target="package.module:choose"``, ``policy=custom``): see
docs/adding_a_policy.md. Plug-ins are resolved where the policy is built, in the process that routes, so they work
under every Hydra launcher (its workers import the target themselves).


* ``length_noise_pct``: the output length the scheduler tells each probed instance (and its what-if) is drawn
  independently per (request, instance) as ``noisy_length(L, pct)``, L being the policy's base length (hint,
  prediction or truth). It goes through ``RoutingPolicy.expected_length``; draws are cached per decision in
  ``ctx.state`` so the rule and the cluster see the same number. The chosen instance keeps the *un-noised* length
  as the request's in-flight expected length (``RoutingPolicy.kept_length``), as Block forwards the client's
  length to the engine: keeping the noisy draw instead doubled the P99 TTFT damage of the error heatmap's noise.
* ``latency_noise_pct`` (prediction policies only): each candidate's predicted e2e is scaled by Block's noise
  before the argmin. The recorded ``predicted_e2e_s`` stays the un-noised what-if.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from block.policies import basic, heuristics, learned, peers, predicted, residual
from block.policies import llumnix_full, social
from block.policies.common import check_pct, noisy_length
from vidur.policy_contract import SIGNALS, ChooseFn, RoutingContext, RoutingPolicy
from vidur.types import Request

_RESERVED = {"length_of", "latency_noise_pct"}  # rule kwargs make_policy binds itself
ENTRY_POINT_GROUP = "block_repro.policies"  # installed plug-ins: name = "package.module:rule_or_PolicySpec"
CUSTOM = "custom"  # conf/policy/custom.yaml's name: the rule is given by its import path (target)


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
    needs: tuple[str, ...] = ()  # extra what-if answers (vidur.policy_contract.NEEDS)

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
    "llumnix_full": PolicySpec(llumnix_full.dispatch, "stats", True,
                               "llumnix's dispatch plus live migration: instances with freeness < threshold send a "
                               "running request to the freest (Llumnix; mode=sim only)"),
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
    "lmetric": PolicySpec(learned.lmetric, "stats", True,
                          "LMetric: (waiting prompt tokens + new prompt) x (running + waiting + 1), lower wins"),
    "llmd_latency": PolicySpec(learned.llmd_latency, "stats", True, "llm-d predicted latency: per-instance learned "
                               "TTFT/TPOT, SLO headroom, epsilon-greedy", observe=learned.learned_observe),
    "routebalance": PolicySpec(learned.routebalance, "stats", True, "RouteBalance-style: one learned E2E model "
                               "over request x instance, lower wins", observe=learned.learned_observe),
    "block_residual": PolicySpec(residual.block_residual, "prediction", True, _B + "; what-if corrected by a "
                                 "learned residual", observe=residual.residual_observe, default_k=2),
    "block_social": PolicySpec(social.block_social, "prediction", True, "predicted e2e + weight x the delay the "
                               "request adds to the others on the instance (what-if with and without it), lower "
                               "wins", default_k=2, needs=("others_delay",)),
    "block_ttft": PolicySpec(social.block_ttft, "prediction", True, "predicted TTFT + e2e_weight x predicted e2e, "
                             "lower wins (the SLO's quantity first)", default_k=2),
}


def policy_names() -> list[str]:
    """The built-in policies (each has conf/policy/<name>.yaml and a row in DESIGN.md's table)."""
    return sorted(POLICIES)


def describe_policies() -> dict[str, str]:
    """name -> one-line rule (for --help texts and the DESIGN table)."""
    return {n: POLICIES[n].doc for n in policy_names()}


def policy_table() -> str:
    """DESIGN.md's policy table, generated from ``POLICIES`` (``python -m block.policies --write docs/DESIGN.md``)."""
    rows = ["| name | signal | k (default) | rule |", "|---|---|---|---|"]
    for n in policy_names():
        s = POLICIES[n]
        k = ("all" if s.default_k is None else str(s.default_k)) if s.probes else "-"
        rows.append(f"| `{n}` | {s.signal} | {k} | {s.doc.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


@functools.lru_cache(maxsize=1)
def plugin_policies() -> dict[str, Any]:
    """Installed plug-ins: name -> entry point of group ``block_repro.policies`` (built-in names win)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in POLICIES}


def available_policies() -> list[str]:
    """Every name ``make_policy`` knows without a target: the built-ins and the installed plug-ins."""
    return sorted(set(POLICIES) | set(plugin_policies()))


def load_target(target: str) -> Any:
    """The object ``package.module:attribute`` (or ``package.module.attribute``) names, imported now.

    Resolving the rule where the policy is built, instead of registering it when some module is imported, is what
    makes a plug-in work under every launcher: a joblib, submitit or Ray worker builds the policy from the config it
    receives and imports the target itself."""
    mod, sep, attr = str(target).strip().partition(":")
    if not sep:
        mod, _, attr = mod.rpartition(".")
    if not mod or not attr:
        raise ValueError(f"policy target {target!r} must be 'package.module:function'")
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as err:
        raise ValueError(f"policy target {target!r}: cannot import {mod!r} ({err}); is its package installed or "
                         "on PYTHONPATH?") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"policy target {target!r}: {mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def as_spec(obj: Any, origin: str, signal: Optional[str] = None) -> PolicySpec:
    """A plug-in's ``PolicySpec`` as is, or one made for a rule function ``choose(request, candidates, ctx)``: its
    signal is ``signal``, else the function's ``signal`` attribute, else "none"; its default k its ``k`` attribute;
    its one-line rule the first line of its docstring."""
    if isinstance(obj, PolicySpec):
        if signal is not None and signal != obj.signal:
            raise ValueError(f"{origin} needs signal {obj.signal!r}; signal={signal!r} contradicts it")
        return obj
    if not callable(obj):
        raise ValueError(f"{origin} is neither a PolicySpec nor a function choose(request, candidates, ctx)")
    sig = signal if signal is not None else getattr(obj, "signal", "none")
    if sig not in SIGNALS:
        raise ValueError(f"{origin}: signal must be one of {SIGNALS}, got {sig!r}")
    lines = (inspect.getdoc(obj) or "").strip().splitlines()
    return PolicySpec(obj, sig, sig != "none", lines[0] if lines else origin, default_k=getattr(obj, "k", None))


def policy_spec(name: str, target: Optional[str] = None, signal: Optional[str] = None) -> PolicySpec:
    """The rule behind ``name``: the ``target`` import path when given (``name`` then only labels the results), else
    the built-in policy, else the installed plug-in of that name."""
    if target:
        if name in POLICIES:
            raise ValueError(f"policy name {name!r} is built in: give your rule (target {target!r}) a name of its "
                             "own (it labels results and figures)")
        return as_spec(load_target(str(target)), f"policy target {target!r}", signal)
    if name in POLICIES:
        return as_spec(POLICIES[name], f"policy {name!r}", signal)
    ep = plugin_policies().get(name)
    if ep is not None:
        try:
            obj = ep.load()
        except (ImportError, AttributeError) as err:
            raise ValueError(f"policy {name!r} (entry point {ep.value!r}) cannot be loaded: {err}") from err
        return as_spec(obj, f"policy {name!r} (entry point {ep.value!r})", signal)
    if name == CUSTOM:
        raise ValueError("policy custom needs its rule: policy.target=package.module:function "
                         "(see docs/adding_a_policy.md)")
    raise ValueError(f"unknown policy {name!r}; choose one of {available_policies()}, or give your own rule with "
                     "policy.target=package.module:function")


def _bind(fn: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    names = inspect.signature(fn).parameters
    return {k: v for k, v in params.items() if k in names}


def make_policy(name: str, k: Optional[int] = None, length_noise_pct: Optional[float] = None,
                latency_noise_pct: float = 0.0, target: Optional[str] = None, signal: Optional[str] = None,
                **params: Any) -> RoutingPolicy:
    """Build the routing policy ``name`` probing ``k`` instances (None: all; ignored by non-probing policies).

    ``length_noise_pct=None`` takes the policy's default (25 for ``block_noisy``, else 0). ``params`` are the
    rule's own knobs (see ``POLICIES[name].params()``). All randomness comes from the scheduler's ``ctx.rng``.
    ``target``/``signal``: a rule of your own by import path and the signal it reads (``policy_spec``).
    """
    spec = policy_spec(name, target, signal)
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
                         observe=observe, expected_length=expected_length, needs=spec.needs,
                         kept_length=base if len_pct > 0 else None)


def policy_from_config(cfg: Mapping[str, Any]) -> RoutingPolicy:
    """``make_policy`` from a conf/policy/<name>.yaml mapping: name, k, length_noise_pct, latency_noise_pct and
    the policy's own parameters (null values take the defaults)."""
    d = {key: v for key, v in dict(cfg).items() if v is not None or key == "k"}
    if "name" not in d:
        raise ValueError("policy config needs a name")
    name = str(d.pop("name"))
    k = d.pop("k", None)
    return make_policy(name, k=None if k is None else int(k), **d)
