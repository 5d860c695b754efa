"""Cleaning one profiled series into monotone knots: duplicates, broken (collapsed) measurements, Hampel outliers,
isotonic regression.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

# Cleaning knobs (see clean_series)
COLLAPSE_FRACTION = 0.5  # a value below half of the smallest-n times is a broken measurement


HAMPEL_HALF_WINDOW = 3  # rolling median over 7 neighbouring token counts


HAMPEL_TOLERANCE = 0.25  # flag points more than 25 % away from that median


def _pav(y: np.ndarray, w: Optional[np.ndarray] = None) -> np.ndarray:
    """Weighted isotonic (non-decreasing) least-squares fit: pool-adjacent-violators."""
    y = np.asarray(y, dtype=float)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=float)
    vals: list[float] = []
    wts: list[float] = []
    cnts: list[int] = []
    for yi, wi in zip(y, w):
        vals.append(float(yi))
        wts.append(float(wi))
        cnts.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v2, w2, c2 = vals.pop(), wts.pop(), cnts.pop()
            v1, w1, c1 = vals.pop(), wts.pop(), cnts.pop()
            wt = w1 + w2
            vals.append((v1 * w1 + v2 * w2) / wt)
            wts.append(wt)
            cnts.append(c1 + c2)
    return np.repeat(np.array(vals), cnts)


def _rolling_median(v: np.ndarray, k: int) -> np.ndarray:
    n = len(v)
    width = 2 * k + 1
    out = np.empty(n)
    for i in range(n):
        lo, hi = max(0, i - k), min(n, i + k + 1)
        if hi - lo < width:
            if lo == 0:
                hi = min(n, width)
            else:
                lo = max(0, n - width)
        out[i] = np.median(v[lo:hi])
    return out


def clean_series(x, y) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Clean one profiled op, time ``y`` (ms) against ``x`` (tokens), into monotone knots.

    1. duplicate ``x`` rows: median; 2. drop NaN / non-positive; 3. drop "collapsed" values below
    COLLAPSE_FRACTION x the median of the three smallest-x times (e.g. Qwen2's attn_pre_proj reads 0.0018 ms at
    1,168-4,096 tokens, 30-600x below its neighbours: the kernel was not timed); 4. Hampel filter: drop points
    more than HAMPEL_TOLERANCE away (in log) from the rolling median of 7 neighbours, which keeps the real steps
    of GEMM wave quantisation (a plateau has more than 3 points) and removes isolated spikes and dips;
    5. isotonic (non-decreasing) regression weighted in relative error, so more tokens are never faster.
    """
    import pandas as pd

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    df = pd.DataFrame({"x": x, "y": y}).groupby("x", sort=True)["y"].median()
    xs, ys = df.index.to_numpy(dtype=float), df.to_numpy(dtype=float)
    info = {"points": int(len(xs)), "nan": int(np.sum(~np.isfinite(ys) | (ys <= 0)))}
    ok = np.isfinite(ys) & (ys > 0)
    xs, ys = xs[ok], ys[ok]
    if len(xs) == 0:
        raise ValueError("no valid measurements")
    floor = COLLAPSE_FRACTION * float(np.median(ys[: min(3, len(ys))]))
    ok = ys >= floor
    info["collapsed"] = int(np.sum(~ok))
    xs, ys = xs[ok], ys[ok]
    if len(xs) >= 2 * HAMPEL_HALF_WINDOW + 1:
        ly = np.log(ys)
        med = _rolling_median(ly, HAMPEL_HALF_WINDOW)
        ok = np.abs(ly - med) <= math.log1p(HAMPEL_TOLERANCE)
        info["hampel"] = int(np.sum(~ok))
        xs, ys = xs[ok], ys[ok]
    else:
        info["hampel"] = 0
    yk = _pav(ys, 1.0 / ys**2)
    info["kept"] = int(len(xs))
    info["pav_max_rel_change"] = float(np.max(np.abs(yk - ys) / ys)) if len(ys) else 0.0
    info["collapse_floor_ms"] = floor
    return xs, yk, info
