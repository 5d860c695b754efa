"""Which instances the scheduler may route to: a connection refused or an engine said to be down puts an instance
out of the sampling for ``down_cooldown_s`` (every instance down: all of them again), auto-provisioning limits it to
the pool's routable slots; and the scheduler's ``/health`` and ``/metrics`` views of that.

``HealthMixin`` is the part of ``block.scheduler.core.Scheduler`` that does this (it reads ``cfg``, ``instances``,
``provisioning``, ``metrics``, ``policy``, ``estimator`` and ``n`` of the scheduler).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from block.http import Origin

if TYPE_CHECKING:
    from block.scheduler.config import SchedulerConfig
    from block.scheduler.metrics import Metrics
    from vidur.policy_contract import RoutingPolicy


@dataclass
class Instance:
    index: int
    url: str
    origin: Origin
    down_until: float = 0.0  # monotonic time; sampled again after it


class HealthMixin:
    """Instance health of the Scheduler (see the module docstring)."""

    cfg: "SchedulerConfig"
    instances: list[Instance]
    provisioning: Any
    metrics: "Metrics"
    policy: "RoutingPolicy"
    estimator: Any
    n: int

    def eligible(self, exclude: Iterable[int] = ()) -> list[int]:
        """Instances to route to: not excluded and not marked down (all non-excluded ones if every one is down)."""
        now = time.monotonic()
        ex = set(exclude)
        if self.provisioning is not None:  # only the provisioned pool's active slots are routable
            ex |= {x.index for x in self.instances if x.index not in self.provisioning.routable}
        ids = [x.index for x in self.instances if x.index not in ex and x.down_until <= now]
        if not ids:
            ids = [x.index for x in self.instances if x.index not in ex]
        return ids

    def mark_down(self, i: int) -> None:
        if self.cfg.down_cooldown_s > 0:
            self.instances[i].down_until = time.monotonic() + self.cfg.down_cooldown_s

    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        up = sum(1 for x in self.instances if x.down_until <= now)
        return {"role": "scheduler", "policy": self.policy.name, "k": self.policy.k, "signal": self.policy.signal,
                "instances": len(self.instances), "healthy_instances": up, "requests": self.n,
                "in_flight": self.metrics.n_inflight,
                "length_estimator": None if self.estimator is None else self.estimator.name,
                **({} if self.provisioning is None else {"provisioning": self.provisioning.describe()})}

    def render_metrics(self) -> str:
        now = time.monotonic()
        self.metrics.healthy.set(sum(1 for x in self.instances if x.down_until <= now))
        self.metrics.inflight.set(self.metrics.n_inflight)
        return self.metrics.registry.render()
