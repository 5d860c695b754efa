"""Auto-provisioning controller, as in Block plus what an operator would expect beyond it.

Block (``--initial_available_instance``, ``--max_slo_in_seconds``, ``--use_preemptive_provisioning``): the first
``initial_instances`` serve, the rest wait in a back pool.

* reactive ("relief"): after a request is served, if its measured latency exceeded the SLO, add one back instance;
* predictive ("preemptive"): before routing, if the *minimum* predicted latency over the probed instances is at or
  above the SLO, add one back instance and send this request there.

Beyond Block: ``cold_start_s`` (an added instance becomes routable only after it), ``cooldown_s`` (at most one
addition per cooldown; Block has none, 0), and scale-down: when every latency seen (measured or predicted) over
``scale_down_window_s`` stayed below ``scale_down_fraction`` x SLO, the most recently added instance stops receiving
requests and drains (never below the initial pool).

The controller only talks to a pool: ``engines`` (its size), ``active``, ``warming``, ``set_active``,
``back_pool``, ``add_instance`` and ``remove_instance`` -- ``vidur.cluster.Cluster`` in ``mode=sim``, and
``block.scheduler.provisioning.LivePool`` in the live scheduler, where ``add_instance`` starts the slot's services
and the cold start is what that start really took (``cold_start_s`` is then unused). ``on_finish`` reads
``arrival``, ``first_token`` and ``finish`` of the finished request (a simulator ``Seq`` or the live equivalent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from vidur.types import Candidate, Request

STRATEGIES = ("reactive", "predictive")


@dataclass
class ProvisioningConfig:
    strategy: str = "reactive"
    initial_instances: int = 6
    slo_s: float = 70.0
    metric: str = "e2e"  # what the reactive trigger measures: e2e | ttft
    cold_start_s: float = 0.0
    cooldown_s: float = 0.0
    scale_down: bool = False
    scale_down_fraction: float = 0.5
    scale_down_window_s: float = 60.0

    def __post_init__(self) -> None:
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"provisioning.strategy={self.strategy!r} must be one of {STRATEGIES}")
        if self.initial_instances < 1:
            problems.append(f"provisioning.initial_instances={self.initial_instances} must be >= 1")
        if self.slo_s <= 0:
            problems.append(f"provisioning.slo_s={self.slo_s} must be > 0")
        if self.metric not in ("e2e", "ttft"):
            problems.append(f"provisioning.metric={self.metric!r} must be e2e or ttft")
        if self.cold_start_s < 0 or self.cooldown_s < 0:
            problems.append("provisioning.cold_start_s and cooldown_s must be >= 0")
        if not 0 < self.scale_down_fraction < 1:
            problems.append(f"provisioning.scale_down_fraction={self.scale_down_fraction} must be in (0, 1)")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProvisioningConfig":
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in dict(d).items() if k in keys and v is not None})


class ProvisioningController:
    """Implements ``vidur.cluster.Controller`` (see the module docstring)."""

    def __init__(self, cfg: ProvisioningConfig) -> None:
        self.cfg = cfg
        self.added: list[int] = []  # instances added beyond the initial pool, in order
        self.last_add = -float("inf")
        self.calm_since: Optional[float] = None

    def start(self, cluster) -> None:
        n = len(cluster.engines)
        if self.cfg.initial_instances > n:
            raise ValueError(f"provisioning.initial_instances={self.cfg.initial_instances} exceeds "
                             f"cluster.num_instances={n}")
        cluster.set_active(range(self.cfg.initial_instances))

    def _grow(self, cluster, t: float) -> Optional[int]:
        back = cluster.back_pool()
        if not back or t - self.last_add < self.cfg.cooldown_s:
            return None
        i = back[0]
        cluster.add_instance(i, t, self.cfg.cold_start_s)
        self.added.append(i)
        self.last_add = t
        self.calm_since = None
        return i if i in cluster.active else None  # routable now (sim without cold start): send the request there

    def _observe_latency(self, cluster, latency: float, t: float) -> None:
        """Scale-down bookkeeping: a latency above the calm threshold restarts the calm window."""
        if not self.cfg.scale_down:
            return
        if latency >= self.cfg.scale_down_fraction * self.cfg.slo_s:
            self.calm_since = None
            return
        if self.calm_since is None:
            self.calm_since = t
        elif t - self.calm_since >= self.cfg.scale_down_window_s and self.added:
            i = self.added.pop()
            if i in cluster.warming:
                del cluster.warming[i]
            cluster.remove_instance(i, t)
            self.calm_since = t

    def before_route(self, cluster, req: Request, cands: list[Candidate], t: float) -> Optional[int]:
        preds = [c.prediction.e2e_s for c in cands if c.prediction is not None]
        if not preds:
            return None
        best = min(preds)
        self._observe_latency(cluster, best, t)
        if self.cfg.strategy == "predictive" and best >= self.cfg.slo_s:
            return self._grow(cluster, t)
        return None

    def on_finish(self, cluster, seq, t: float) -> None:
        start = seq.arrival
        end = seq.finish if self.cfg.metric == "e2e" else seq.first_token
        if end is None:
            return
        latency = end - start
        if self.cfg.strategy == "reactive" and latency > self.cfg.slo_s:
            self._grow(cluster, t)
        elif self.cfg.strategy == "reactive":
            self._observe_latency(cluster, latency, t)
