"""Prediction feedback in the predictor side-car: predicted vs actual for the requests it served, and a residual.

The predictor is the one place that sees both halves: it answers the scheduler's ``/predict`` for a candidate
and then proxies the request the scheduler sends it, to its end. :class:`Feedback` keeps each ``/predict``
answer for a short while (``match_window_s``); when a proxied request finishes well (outcome ``ok``), it takes the
prediction made for it -- the latest one for the same prompt and told length, made before the request arrived --
and compares it with the measured E2E and TTFT (on the tracker's clock, times ``time_scale`` for an emulated
engine running faster than the model). Requests no ``/predict`` was made for (a scheduler with a load-only
policy, a client talking to the predictor directly) are counted as ``unmatched``.

What it exposes on ``/metrics``:

- ``block_predictor_e2e_predicted_over_actual{prediction="whatif"|"served"}`` -- histogram of predicted / actual
  E2E of the raw what-if and of what ``/predict`` answered (the corrected value when the correction is on): 1 is
  exact, 0.8 a prediction 20 % short (a ratio, not a signed error: a Prometheus histogram with negative buckets
  has no ``_sum``);
- ``block_predictor_feedback_requests_total{result="matched"|"unmatched"}``;
- ``block_predictor_residual_correction`` -- 1 when ``/predict`` answers corrected predictions;
- ``block_predictor_residual_e2e_factor`` -- the correction factor of the last answer (1 when off or untrained).

With ``correct=True`` (``--residual-correction``) every ``/predict`` answer is scaled by the residual learned
from the outcomes (``vidur.residual.ResidualCorrector``, the same code the simulator's ``block_residual`` uses);
the raw what-if stays in the answer as ``whatif_e2e_s`` / ``whatif_ttft_s``. Off, the errors are still recorded.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from block import prom
from vidur.residual import ResidualCorrector
from vidur.types import Prediction

RATIO_BUCKETS = [0.1, 0.25, 0.5, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 2.0, 4.0, 10.0]
MAX_REMEMBERED = 4096  # /predict answers waiting for their request (the unchosen probes' expire)


@dataclass(slots=True)
class _Answer:
    at: float
    prompt: int
    expected: int
    raw: Prediction
    served_e2e_s: float


class Feedback:
    """Predicted-vs-actual bookkeeping and the optional residual correction of one predictor (module doc)."""

    def __init__(self, registry: prom.Registry, *, correct: bool = False, total_blocks: Optional[int] = None,
                 time_scale: float = 1.0, match_window_s: float = 30.0, min_samples: int = 50,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale={time_scale} must be a positive number")
        self.corrector = ResidualCorrector(enabled=correct, total_blocks=total_blocks, min_samples=min_samples)
        self.time_scale = float(time_scale)
        self.match_window_s = match_window_s
        self.clock = clock
        self._answers: deque[_Answer] = deque(maxlen=MAX_REMEMBERED)
        self.h_err = registry.histogram("block_predictor_e2e_predicted_over_actual",
                                        "Predicted / actual E2E of the requests this predictor served: the raw "
                                        "what-if and what /predict answered.", RATIO_BUCKETS, ("prediction",))
        self.c_req = registry.counter("block_predictor_feedback_requests",
                                      "Finished proxied requests, by whether a /predict answer was found for them.",
                                      ("result",))
        self.g_on = registry.gauge("block_predictor_residual_correction",
                                   "1 when /predict answers residual-corrected predictions.")
        self.g_factor = registry.gauge("block_predictor_residual_e2e_factor",
                                       "The E2E correction factor of the last /predict answer (1: none).")
        for p in ("whatif", "served"):
            self.h_err.touch(prediction=p)
        for r in ("matched", "unmatched"):
            self.c_req.touch(result=r)
        self.g_on.set(1.0 if correct else 0.0)
        self.g_factor.set(1.0)

    # ------------------------------------------------------------------ /predict
    def answer(self, d: dict[str, Any], prompt: int, expected: int) -> dict[str, Any]:
        """Remember a /predict answer (JSON dict of a ``Prediction``) and return it, corrected when switched on."""
        raw = Prediction.from_dict(d)
        served = d
        if math.isfinite(raw.e2e_s) and raw.e2e_s < 1e17:
            fixed = self.corrector.correct(raw, prompt, expected)
            if fixed is not raw:
                served = dict(d, e2e_s=fixed.e2e_s, ttft_s=fixed.ttft_s, queue_s=fixed.queue_s,
                              whatif_e2e_s=raw.e2e_s, whatif_ttft_s=raw.ttft_s)
            self.g_factor.set(served["e2e_s"] / raw.e2e_s if raw.e2e_s > 0 else 1.0)
            self._answers.append(_Answer(self.clock(), prompt, expected, raw, float(served["e2e_s"])))
        return served

    # ------------------------------------------------------------------ proxied requests
    def _match(self, prompt: int, expected: int, arrived_at: float) -> Optional[_Answer]:
        horizon = arrived_at - self.match_window_s
        while self._answers and self._answers[0].at < horizon:
            self._answers.popleft()
        best = None
        for a in reversed(self._answers):  # newest first: the probe just before the request came
            if a.at <= arrived_at and a.expected == expected and a.prompt == prompt:
                best = a
                break
        if best is not None:
            self._answers.remove(best)
        return best

    def finished(self, prompt: int, expected: int, arrived_at: float, e2e_s: float,
                 ttft_s: Optional[float]) -> bool:
        """One request served to its end (``arrived_at`` on ``clock``); False when no /predict matched it."""
        a = self._match(prompt, expected, arrived_at)
        if a is None:
            self.c_req.inc(result="unmatched")
            return False
        self.c_req.inc(result="matched")
        actual = e2e_s * self.time_scale
        ttft = ttft_s * self.time_scale if ttft_s is not None else float("nan")
        for label, pred in (("whatif", a.raw.e2e_s), ("served", a.served_e2e_s)):
            if actual > 0 and math.isfinite(pred):
                self.h_err.observe(pred / actual, prediction=label)
        self.corrector.observe(a.raw, prompt, expected, actual, ttft, used_e2e_s=a.served_e2e_s)
        return True

    def on_finish(self, done: Any) -> None:
        """``block.predictor.proxy.Proxy.on_finish`` hook: a proxied request left (any outcome; only ``ok`` counts).

        The tracker's clock starts at its ``t0``; ``clock`` is absolute, so the arrival is re-based with it.
        """
        if done.outcome != "ok":
            return
        t = done.tracked
        ttft = done.ttft_s
        arrived_at = self.clock() - (done.finish_s - t.arrival_s)
        self.finished(int(t.prompt), int(t.expected), arrived_at, done.e2e_s, ttft)
