"""Residual learning for the what-if: learn how wrong the simulator's predictions are, and correct them.

Block's what-if is only as good as its execution model. When the profile is off (a different GPU clock, a new
vLLM release, a kernel change) every prediction carries a systematic error that a router can observe: it sees the
predicted latency when it dispatches a request and the actual latency when the request finishes. This module
learns that error and corrects the next predictions with it; one implementation serves the live predictor
side-car (``block/predictor/feedback.py``) and the simulator's policies (``block/policies/residual.py``).

The model: ``log(actual / predicted)`` as a linear function of load, queue depth and lengths (the features of
:func:`residual_features`, all in log space), fitted by ridge regression on exponentially forgotten sufficient
statistics (``decay`` per sample: old regimes fade, so it also follows drift). Fitting a 7x7 system every
``refit_every`` samples costs microseconds; correcting a prediction is one dot product. The correction factor is
clipped to ``[1/max_factor, max_factor]`` and stays 1 until ``min_samples`` outcomes have been seen. E2E and TTFT
get one model each; the queueing delay follows TTFT's factor.

A uniform multiplicative error (the whole profile scaled by s) does not change which instance Block picks (the
argmin of s x e2e is the argmin of e2e), so on a pool of equal instances the correction fixes accuracy -- what
SLO headroom checks, provisioning triggers and mixed pools read -- and leaves capacity where it was; an error that
grows with load does change the ranking. docs/beyond_block.md has the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from vidur.types import Prediction

RESIDUAL_FEATURES = ("bias", "log_running", "log_waiting", "log_prompt", "log_expected", "log_predicted_e2e",
                     "kv_free_fraction")


def residual_features(pred: Prediction, prompt_tokens: int, expected_output: int,
                      total_blocks: Optional[int] = None) -> np.ndarray:
    """The feature vector of one prediction (``RESIDUAL_FEATURES`` order)."""
    free = pred.free_blocks / total_blocks if total_blocks else 0.0
    e2e = pred.e2e_s if math.isfinite(pred.e2e_s) else 0.0
    return np.array([1.0, math.log1p(pred.num_running), math.log1p(pred.num_waiting), math.log1p(prompt_tokens),
                     math.log1p(expected_output), math.log1p(max(0.0, e2e)), free], dtype=np.float64)


@dataclass
class ResidualModel:
    """Ridge regression of ``log(actual / predicted)`` on features, with exponential forgetting."""

    dim: int = len(RESIDUAL_FEATURES)
    decay: float = 0.999
    ridge: float = 1.0
    min_samples: int = 50
    refit_every: int = 10
    max_factor: float = 5.0
    n: int = 0
    _a: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _b: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _w: Optional[np.ndarray] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay={self.decay} must be in (0, 1]")
        if self.ridge <= 0 or self.min_samples < 1 or self.refit_every < 1 or self.max_factor <= 1.0:
            raise ValueError("ResidualModel: ridge > 0, min_samples >= 1, refit_every >= 1, max_factor > 1")
        self._a = np.zeros((self.dim, self.dim))
        self._b = np.zeros(self.dim)

    @property
    def ready(self) -> bool:
        return self._w is not None

    def observe(self, x: np.ndarray, predicted: float, actual: float) -> bool:
        """Learn from one (prediction, outcome); False (ignored) unless both are finite and positive."""
        if not (math.isfinite(predicted) and math.isfinite(actual) and predicted > 0 and actual > 0):
            return False
        y = math.log(actual / predicted)
        self._a *= self.decay
        self._b *= self.decay
        self._a += np.outer(x, x)
        self._b += y * x
        self.n += 1
        if self.n >= self.min_samples and (self._w is None or self.n % self.refit_every == 0):
            self.fit()
        return True

    def fit(self) -> None:
        reg = self.ridge * np.eye(self.dim)
        reg[0, 0] = 1e-9  # the bias (a uniform scale error) is not shrunk
        self._w = np.linalg.solve(self._a + reg, self._b)

    def factor(self, x: np.ndarray) -> float:
        """The multiplicative correction for a prediction with features ``x`` (1.0 until ready)."""
        if self._w is None:
            return 1.0
        lim = math.log(self.max_factor)
        return math.exp(min(lim, max(-lim, float(self._w @ x))))


@dataclass
class ErrorTally:
    """Running relative-error figures of a predictor (what /metrics and the benchmark report)."""

    n: int = 0
    abs_rel_sum: float = 0.0
    log_ratio_sum: float = 0.0

    def add(self, predicted: float, actual: float) -> Optional[float]:
        if not (math.isfinite(predicted) and math.isfinite(actual) and actual > 0 and predicted > 0):
            return None
        rel = (predicted - actual) / actual
        self.n += 1
        self.abs_rel_sum += abs(rel)
        self.log_ratio_sum += math.log(predicted / actual)
        return rel

    @property
    def mean_abs_rel(self) -> float:
        return self.abs_rel_sum / self.n if self.n else float("nan")


@dataclass
class ResidualCorrector:
    """What-if corrections for E2E and TTFT, learned from outcomes; ``enabled=False`` records but never corrects."""

    enabled: bool = True
    decay: float = 0.999
    min_samples: int = 50
    total_blocks: Optional[int] = None
    e2e: ResidualModel = field(init=False)
    ttft: ResidualModel = field(init=False)
    raw_error: ErrorTally = field(default_factory=ErrorTally)  # the what-if's own error
    corrected_error: ErrorTally = field(default_factory=ErrorTally)  # after correction (what was used)

    def __post_init__(self) -> None:
        self.e2e = ResidualModel(decay=self.decay, min_samples=self.min_samples)
        self.ttft = ResidualModel(decay=self.decay, min_samples=self.min_samples)

    def features(self, pred: Prediction, prompt_tokens: int, expected_output: int) -> np.ndarray:
        return residual_features(pred, prompt_tokens, expected_output, self.total_blocks)

    def correct(self, pred: Prediction, prompt_tokens: int, expected_output: int,
                x: Optional[np.ndarray] = None) -> Prediction:
        """``pred`` with its times scaled by the learned factors (``pred`` itself when disabled or not ready)."""
        if not self.enabled or not (self.e2e.ready or self.ttft.ready):
            return pred
        x = self.features(pred, prompt_tokens, expected_output) if x is None else x
        fe, ft = self.e2e.factor(x), self.ttft.factor(x)
        return replace(pred, e2e_s=pred.e2e_s * fe, ttft_s=pred.ttft_s * ft, queue_s=pred.queue_s * ft)

    def observe(self, raw: Prediction, prompt_tokens: int, expected_output: int, actual_e2e_s: float,
                actual_ttft_s: float, used_e2e_s: Optional[float] = None) -> None:
        """Learn from one finished request: ``raw`` is the uncorrected what-if made at dispatch, ``used_e2e_s``
        the (possibly corrected) e2e the router acted on (default: the raw one)."""
        x = self.features(raw, prompt_tokens, expected_output)
        self.raw_error.add(raw.e2e_s, actual_e2e_s)
        self.corrected_error.add(raw.e2e_s if used_e2e_s is None else used_e2e_s, actual_e2e_s)
        self.e2e.observe(x, raw.e2e_s, actual_e2e_s)
        self.ttft.observe(x, raw.ttft_s, actual_ttft_s)
