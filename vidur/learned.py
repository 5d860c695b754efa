"""Learned latency predictors: instance features -> TTFT / TPOT / E2E, gradient-boosted trees trained online.

The alternative to Block's what-if (simulate the engine forward) that production routers use: llm-d's
predicted-latency scheduling trains XGBoost models of TTFT and TPOT per pod from completed requests; RouteBalance
predicts E2E for the whole request x instance matrix with one in-process model. Both learn from the requests they
routed. Here the learner is LightGBM (the ``ml`` extra: ``pip install -e ".[ml]"``; imported on first fit, so the
core stays light) on the features llm-d names, all of which ``InstanceStats`` carries:

====================  ==============================================================
``kv_used``           used fraction of the KV blocks
``prompt_tokens``     the new request's input length
``expected_output``   the output length the scheduler tells the instance
``num_waiting``       queue depth
``num_running``       running requests
``tokens_in_flight``  unprocessed tokens (prompt + expected output - computed, all requests)
``waiting_prompt``    prompt tokens waiting for prefill
====================  ==============================================================

:class:`OnlineGBDT` keeps a sliding window of samples and refits every ``refit_every`` new samples (synchronously:
a refit of 5,000 samples takes tens of milliseconds). Targets are fitted in log space (``log1p``), so the squared
loss weighs relative errors, which is what routing by latency compares. Until ``min_samples`` have been seen the
model is not ``ready`` and callers use their fallback rule.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from vidur.types import InstanceStats

FEATURES = ("kv_used", "prompt_tokens", "expected_output", "num_waiting", "num_running", "tokens_in_flight",
            "waiting_prompt")


def features(stats: InstanceStats, prompt_tokens: int, expected_output: int) -> tuple[float, ...]:
    """The feature row of one (instance, request) pair, in ``FEATURES`` order."""
    total = stats.total_blocks
    kv = (total - stats.free_blocks) / total if total > 0 else 1.0
    return (kv, float(prompt_tokens), float(expected_output), float(stats.num_waiting), float(stats.num_running),
            float(stats.unprocessed_tokens), float(stats.waiting_prompt_tokens))


def lightgbm_module() -> Any:
    """LightGBM, or an ImportError that says how to install it."""
    try:
        import lightgbm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the learned predictors need LightGBM: pip install -e '.[ml]' (or pip install lightgbm)") \
            from err
    return lightgbm


@dataclass
class OnlineGBDT:
    """A gradient-boosted regressor refitted online on the last ``window`` samples (see the module docstring)."""

    min_samples: int = 100
    refit_every: int = 200
    window: int = 5000
    num_trees: int = 60
    num_leaves: int = 15
    learning_rate: float = 0.1
    seed: int = 0
    monotone: bool = True  # latency never falls when a load feature grows (every feature in FEATURES is one)
    _x: deque = field(default_factory=deque, repr=False)
    _y: deque = field(default_factory=deque, repr=False)
    _booster: Any = field(default=None, repr=False)
    _since_fit: int = 0
    fits: int = 0
    fit_s: float = 0.0  # wall time spent refitting (decision cost is reported without it)

    def __post_init__(self) -> None:
        if self.min_samples < 2 or self.refit_every < 1 or self.window < self.min_samples:
            raise ValueError(f"OnlineGBDT: need min_samples >= 2, refit_every >= 1, window >= min_samples "
                             f"(got {self.min_samples}, {self.refit_every}, {self.window})")
        self._x = deque(maxlen=self.window)
        self._y = deque(maxlen=self.window)

    @property
    def ready(self) -> bool:
        return self._booster is not None

    @property
    def num_samples(self) -> int:
        return len(self._y)

    def add(self, x: Sequence[float], y: float) -> None:
        """One observed (features, target >= 0) pair; refits when due. Non-finite or negative targets are dropped."""
        if not (math.isfinite(y) and y >= 0):
            return
        self._x.append(tuple(x))
        self._y.append(math.log1p(y))
        self._since_fit += 1
        due = self._since_fit >= self.refit_every if self.ready else len(self._y) >= self.min_samples
        if due:
            self.fit()

    def add_many(self, xs: Sequence[Sequence[float]], ys: Sequence[float]) -> None:
        """Warm start: many samples at once (e.g. from an earlier run's records), then one fit."""
        for x, y in zip(xs, ys):
            if math.isfinite(y) and y >= 0:
                self._x.append(tuple(x))
                self._y.append(math.log1p(y))
        if len(self._y) >= self.min_samples:
            self.fit()

    def fit(self) -> None:
        lgb = lightgbm_module()
        t0 = time.perf_counter()
        x = np.asarray(self._x, dtype=np.float64)
        y = np.asarray(self._y, dtype=np.float64)
        params = {"objective": "regression", "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
                  "min_data_in_leaf": max(5, min(20, len(y) // 20)), "verbose": -1, "num_threads": 1,
                  "deterministic": True, "force_row_wise": True, "seed": self.seed}
        if self.monotone:
            params["monotone_constraints"] = [1] * x.shape[1]
        self._booster = lgb.train(params, lgb.Dataset(x, y, free_raw_data=True), num_boost_round=self.num_trees)
        self._since_fit = 0
        self.fits += 1
        self.fit_s += time.perf_counter() - t0

    def predict(self, rows: Sequence[Sequence[float]]) -> np.ndarray:
        """Predicted targets (seconds) for feature rows; requires ``ready``."""
        if self._booster is None:
            raise RuntimeError("OnlineGBDT.predict before the first fit (check .ready)")
        x = np.asarray(rows, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        return np.expm1(self._booster.predict(x, num_threads=1))


def save_samples(path: str, rows: Sequence[Sequence[float]], instance: Sequence[int], ttft: Sequence[float],
                 tpot: Sequence[float], e2e: Sequence[float]) -> None:
    """Training samples (one per finished request) as ``.npz``: ``x`` (n x len(FEATURES)), ``instance``,
    ``ttft``, ``tpot``, ``e2e`` -- what the learned policies' ``warm_start`` reads (:func:`read_samples`)."""
    np.savez(path, x=np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES)),
             instance=np.asarray(instance, dtype=np.int64), ttft=np.asarray(ttft, dtype=np.float64),
             tpot=np.asarray(tpot, dtype=np.float64), e2e=np.asarray(e2e, dtype=np.float64),
             features=np.asarray(FEATURES))


def read_samples(path: str) -> dict[str, np.ndarray]:
    """A :func:`save_samples` file; ValueError when its features are not ``FEATURES``."""
    with np.load(path) as z:
        if tuple(str(f) for f in z["features"]) != FEATURES:
            raise ValueError(f"{path}: features {list(z['features'])} are not {list(FEATURES)}")
        return {k: z[k] for k in ("x", "instance", "ttft", "tpot", "e2e")}


def relative_errors(predicted: Sequence[float], actual: Sequence[float]) -> np.ndarray:
    """|predicted - actual| / actual over the pairs with a finite prediction and a positive actual."""
    p = np.asarray(predicted, dtype=float)
    a = np.asarray(actual, dtype=float)
    ok = np.isfinite(p) & np.isfinite(a) & (a > 0)
    return np.abs(p[ok] - a[ok]) / a[ok]


def error_summary(predicted: Sequence[float], actual: Sequence[float]) -> dict[str, Optional[float]]:
    """Median and p90 relative error (and the count) -- the accuracy table's columns."""
    e = relative_errors(predicted, actual)
    if e.size == 0:
        return {"n": 0, "median_error": None, "p90_error": None}
    return {"n": int(e.size), "median_error": float(np.median(e)), "p90_error": float(np.quantile(e, 0.9))}
