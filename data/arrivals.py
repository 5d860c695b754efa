"""Request arrival times, with the semantics of ``vllm bench serve``.

Inter-arrival gaps (``rate`` in requests/s):

- ``"poisson"``: exponential gaps with mean 1/rate (Gamma with shape 1; ``burstiness`` must stay 1);
- ``"gamma"``: Gamma(shape=b, scale=1/(rate*b)) gaps: mean 1/rate, coefficient of variation 1/sqrt(b)
  (b < 1 is burstier than Poisson, b > 1 smoother), exactly vLLM's ``--burstiness``;
- ``"constant"``: every gap is 1/rate;
- ``"trace"``: the dataset's own timestamps, see ``trace_arrivals``.

Convention (as vLLM >= 0.10 does it): one gap is drawn per request *including the first*, and arrival i is the
cumulative sum of gaps 0..i, so the first request arrives after one gap, not at 0. Unlike vLLM we do not rescale the
sum to end exactly at n/rate by default (``normalize=True`` does); the sampled process is kept as drawn so that its
statistics are those of the named distribution. ``rate=inf`` sends everything at 0, as vLLM does.
"""

from __future__ import annotations

import math

import numpy as np

ARRIVALS = ("poisson", "gamma", "constant", "trace")


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def interarrival_gaps(n: int, rate: float, kind: str = "poisson", burstiness: float = 1.0,
                      seed: int | np.random.Generator | None = 0) -> np.ndarray:
    """n gaps in seconds for a synthetic process (``kind`` in poisson / gamma / constant)."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if not rate > 0:
        raise ValueError(f"rate={rate} must be > 0 (or inf) for {kind!r} arrivals")
    if math.isinf(rate):
        return np.zeros(n)
    if kind == "poisson":
        if burstiness != 1.0:
            raise ValueError(f"burstiness={burstiness} has no effect with arrival='poisson'; use arrival='gamma'")
        return _rng(seed).exponential(1.0 / rate, n)
    if kind == "gamma":
        if not burstiness > 0:
            raise ValueError(f"burstiness={burstiness} must be > 0")
        if math.isinf(burstiness):  # vLLM's limit: constant gaps
            return np.full(n, 1.0 / rate)
        return _rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    if kind == "constant":
        return np.full(n, 1.0 / rate)
    raise ValueError(f"unknown arrival process {kind!r}: use one of {ARRIVALS}")


def arrival_times(n: int, rate: float, kind: str = "poisson", burstiness: float = 1.0,
                  seed: int | np.random.Generator | None = 0, normalize: bool = False) -> np.ndarray:
    """Arrival times (s) of n requests: cumulative sums of ``interarrival_gaps`` (first request after one gap).

    ``normalize=True`` rescales them so the last arrival is exactly n/rate (vLLM's stabilisation across seeds).
    """
    t = np.cumsum(interarrival_gaps(n, rate, kind, burstiness, seed))
    if normalize and n and t[-1] > 0:
        t *= (n / rate) / t[-1]
    return t


def tile_timestamps(ts: np.ndarray, n: int) -> np.ndarray:
    """Repeat a sorted timestamp sequence cyclically to n entries, each repetition starting one mean gap after the
    previous one ended, so a short trace can drive a long run without overlapping itself."""
    ts = np.asarray(ts, dtype=np.float64)
    m = len(ts)
    if m == 0:
        raise ValueError("cannot tile an empty trace")
    base = ts - ts[0]
    span = base[-1]
    period = span + (span / (m - 1) if m > 1 and span > 0 else 1.0)
    idx = np.arange(n)
    return base[idx % m] + (idx // m) * period


def trace_arrivals(timestamps: np.ndarray, rate: float | None = None) -> np.ndarray:
    """A trace's own arrival times, shifted to start at 0 and scaled so the mean rate, (n-1)/span, equals ``rate``.

    ``rate`` None or 0 keeps the original spacing. Timestamps must be sorted (the caller keeps rows in time order).
    """
    t = np.asarray(timestamps, dtype=np.float64)
    if len(t) == 0:
        return t
    if not np.all(np.isfinite(t)):
        raise ValueError("trace timestamps must be finite")
    if np.any(np.diff(t) < 0):
        raise ValueError("trace timestamps must be sorted")
    t = t - t[0]
    if not rate:
        return t
    if rate < 0:
        raise ValueError(f"rate={rate} must be > 0, or None/0 to keep the trace's own rate")
    if math.isinf(rate):
        return np.zeros_like(t)
    if len(t) < 2 or t[-1] <= 0:
        raise ValueError("cannot rescale a trace with fewer than 2 distinct timestamps to a target rate")
    return t * ((len(t) - 1) / t[-1] / rate)
