"""The contract between a routing policy and whoever routes with it (the simulator or the live scheduler).

It has its own module, below both callers, so that a policy (``block.policies`` or a user's own package) depends on
these few types only -- not on the simulator's event loop (``vidur.cluster``) nor on the live services.

A policy is a pure function ``choose(request, candidates, ctx) -> instance_id`` plus what it needs to see: ``signal``
(``SIGNALS``: nothing, cheap load figures, or a what-if prediction per candidate) and ``k`` (instances sampled per
decision; None = all). ``vidur.routing`` owns the decision procedure both callers share. Being pure, a policy reads
its candidates and never changes them: a candidate without signals is one shared object per instance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from vidur.types import Candidate, Request

SIGNALS = ("none", "stats", "prediction")
# what-if answers a prediction policy may ask for on top of the default ones (``RoutingPolicy.needs``):
# "others_delay" fills Prediction.others_delay_s (vidur.whatif; live: /predict's body "others_delay": true)
NEEDS = ("others_delay",)


@dataclass(slots=True)
class RoutingContext:
    """What a policy may know besides its candidates. ``state`` is the policy's own memory (one per scheduler)."""

    now_s: float
    num_instances: int
    instance_ids: list[int]
    rng: random.Random
    request_index: int
    state: dict[str, Any] = field(default_factory=dict)


ChooseFn = Callable[[Request, list[Candidate], RoutingContext], int]
ObserveFn = Callable[[Request, int, list[Candidate], RoutingContext], None]
LengthFn = Callable[[Request, int, RoutingContext], int]


@dataclass
class RoutingPolicy:
    """A routing rule plus what it needs: ``signal`` in SIGNALS, ``k`` instances probed (None = all)."""

    name: str
    choose: ChooseFn
    signal: str = "none"
    k: Optional[int] = None
    # called after the decision with (request, chosen id, candidates, ctx): lets a policy keep history (min-QPM)
    observe: Optional[ObserveFn] = None
    # maps a request to the output length the what-if should assume (noise injection, estimators); None = hint
    expected_length: Optional[LengthFn] = None
    # the length the chosen instance keeps for the request when it is not the one its what-if was told: Block draws
    # length noise per probe but forwards the un-noised length to the engine (``num_predicted_tokens``); None = told
    kept_length: Optional[Callable[[Request], int]] = None
    # optional what-if answers the rule reads beyond the default ones (NEEDS): they cost extra simulation
    needs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"policy {self.name!r}: signal must be one of {SIGNALS}, got {self.signal!r}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"policy {self.name!r}: k must be >= 1 or None (all), got {self.k}")
        bad = sorted(set(self.needs) - set(NEEDS))
        if bad or (self.needs and self.signal != "prediction"):
            raise ValueError(f"policy {self.name!r}: needs {list(self.needs)} must be among {NEEDS} and come with "
                             f"signal 'prediction'")


__all__ = ["NEEDS", "SIGNALS", "ChooseFn", "LengthFn", "ObserveFn", "RoutingContext", "RoutingPolicy"]
