"""Accuracy metrics of a response-length estimator (numpy only, shared by every estimator in this package).

The paper's evaluation (Block's ``eval_roberta.py``) reports the mean absolute error in tokens and the fraction of
predictions within 10, 50 and 100 tokens of the truth ("Acc-10/50/100"); the SYSTOR version's Table 1 reports the
mean absolute percentage error. ``length_metrics`` computes all of them plus a few robust extras::

    >>> from length_estimation.metrics import length_metrics
    >>> m = length_metrics(actual=[100, 200, 300], predicted=[110, 150, 300])
    >>> round(m["mae"], 2), round(m["acc_10"], 3), round(m["acc_50"], 3)
    (20.0, 0.667, 1.0)

Conventions:

- errors are ``predicted - actual`` in tokens; absolute errors are compared with ``<=`` (|err| <= 10 counts in Acc-10);
- MAPE is in percent, ``100 * mean(|err| / max(actual, 1))``: an actual length of 0 (an empty response, which
  the training data filter drops anyway) counts as 1 instead of dividing by zero;
- inputs are any array-likes of equal length; NaN in either array is an error, not silently dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

ACC_THRESHOLDS: tuple[int, ...] = (10, 50, 100)

# The column order of metric tables (CSV / Markdown) written by length_estimation.evaluate.
METRIC_COLUMNS: tuple[str, ...] = ("n", "mae", "mape", "acc_10", "acc_50", "acc_100", "rmse", "median_ae",
                                   "p90_ae", "mean_actual", "mean_predicted", "spearman")


def _pair(actual, predicted) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(actual, dtype=np.float64).ravel()
    p = np.asarray(predicted, dtype=np.float64).ravel()
    if a.shape != p.shape:
        raise ValueError(f"actual and predicted differ in length: {a.size} vs {p.size}")
    if a.size == 0:
        raise ValueError("no samples: actual and predicted are empty")
    if not (np.isfinite(a).all() and np.isfinite(p).all()):
        raise ValueError("actual and predicted must be finite (found NaN or inf)")
    return a, p


def mae(actual, predicted) -> float:
    """Mean absolute error in tokens."""
    a, p = _pair(actual, predicted)
    return float(np.mean(np.abs(p - a)))


def mape(actual, predicted) -> float:
    """Mean absolute percentage error, in percent; the denominator is ``max(actual, 1)``."""
    a, p = _pair(actual, predicted)
    return float(100.0 * np.mean(np.abs(p - a) / np.maximum(a, 1.0)))


def rmse(actual, predicted) -> float:
    """Root mean squared error in tokens."""
    a, p = _pair(actual, predicted)
    return float(np.sqrt(np.mean((p - a) ** 2)))


def acc_within(actual, predicted, tokens: float) -> float:
    """Fraction of predictions with ``|predicted - actual| <= tokens`` (the paper's Acc-10/50/100)."""
    if tokens < 0:
        raise ValueError(f"tokens={tokens} must be >= 0")
    a, p = _pair(actual, predicted)
    return float(np.mean(np.abs(p - a) <= tokens))


def spearman(actual, predicted) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    a, p = _pair(actual, predicted)

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(x.size, dtype=np.float64)
        r[order] = np.arange(x.size, dtype=np.float64)
        # average the ranks of ties
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return sums[inv] / counts[inv]

    ra, rp = ranks(a), ranks(p)
    if ra.std() == 0 or rp.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rp)[0, 1])


def length_metrics(actual, predicted, thresholds: Iterable[int] = ACC_THRESHOLDS) -> dict[str, float]:
    """All metrics of one set of predictions: n, mae, mape (%), acc_<k> for k in thresholds, rmse, median_ae,
    p90_ae, mean_actual, mean_predicted, spearman."""
    a, p = _pair(actual, predicted)
    ae = np.abs(p - a)
    out: dict[str, float] = {"n": int(a.size), "mae": float(ae.mean()), "mape": mape(a, p)}
    for k in thresholds:
        out[f"acc_{int(k)}"] = float(np.mean(ae <= k))
    out.update(rmse=rmse(a, p), median_ae=float(np.median(ae)), p90_ae=float(np.percentile(ae, 90)),
               mean_actual=float(a.mean()), mean_predicted=float(p.mean()), spearman=spearman(a, p))
    return out


def error_cdf(actual, predicted, grid: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Empirical CDF of the absolute error: ``(x, F(x))`` with ``F(x) = P(|err| <= x)``.

    Without ``grid``, x is the sorted absolute errors (a step function through every sample)."""
    a, p = _pair(actual, predicted)
    ae = np.sort(np.abs(p - a))
    if grid is None:
        return ae, np.arange(1, ae.size + 1, dtype=np.float64) / ae.size
    x = np.asarray(grid, dtype=np.float64)
    return x, np.searchsorted(ae, x, side="right") / ae.size


def constant_baseline(train_actual, value: str = "mean") -> float:
    """The constant a trivial predictor would output: the training targets' ``mean`` or ``median``
    (the median minimises the MAE of a constant)."""
    t = np.asarray(train_actual, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no training targets")
    if value == "mean":
        return float(t.mean())
    if value == "median":
        return float(np.median(t))
    raise ValueError(f"unknown constant baseline {value!r}: use 'mean' or 'median'")


def format_table(rows: dict[str, dict], columns: Sequence[str] = ("n", "mae", "mape", "acc_10", "acc_50",
                                                                   "acc_100")) -> str:
    """A Markdown table of several metric dicts (name -> metrics): tokens with 1 decimal, MAPE in %,
    accuracies in %."""
    head = "| estimator | " + " | ".join(_label(c) for c in columns) + " |"
    sep = "|---|" + "|".join("---:" for _ in columns) + "|"
    lines = [head, sep]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(c, m.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _label(col: str) -> str:
    return {"n": "n", "mae": "MAE (tok)", "mape": "MAPE (%)", "rmse": "RMSE (tok)", "median_ae": "median AE",
            "p90_ae": "p90 AE", "mean_actual": "mean true", "mean_predicted": "mean pred",
            "spearman": "Spearman"}.get(col, col.replace("acc_", "Acc-") + (" (%)" if col.startswith("acc_") else ""))


def _fmt(col: str, v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if col == "n":
        return f"{int(v):,}"
    if col.startswith("acc_"):
        return f"{100 * v:.1f}"
    if col == "spearman":
        return f"{v:.3f}"
    return f"{v:.1f}"
