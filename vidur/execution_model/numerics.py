"""Constants and the small numerical helpers every part shares: op names, table sizes, knot tables, relative-error
least squares and error statistics (numpy only at fit time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

CODE_VERSION = "execution-model-v1"


PathLike = Union[str, Path]


LAYER_OPS = (
    "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
    "mlp_up_proj", "mlp_act", "mlp_down_proj", "add",
)


ONCE_OPS = ("emb",)


TOKEN_OPS = LAYER_OPS + ONCE_OPS


SHARDED_OPS = frozenset({"attn_pre_proj", "attn_rope", "attn_post_proj", "mlp_up_proj", "mlp_act", "mlp_down_proj"})


GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")


TABLE_TOKENS = 16384  # precomputed range of the token / chunk tables (extended on demand)


TABLE_BATCH = 512  # precomputed decode batch sizes (extended on demand)


def _wls_rel(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares in relative error: minimise sum(((y - X b) / y)^2)."""
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    A = X / y[:, None]
    coef, *_ = np.linalg.lstsq(A, np.ones_like(y), rcond=None)
    return coef


def _ape(pred, obs) -> np.ndarray:
    pred = np.asarray(pred, dtype=float)
    obs = np.asarray(obs, dtype=float)
    return np.abs(pred - obs) / obs


def _err_stats(pred, obs) -> dict[str, float]:
    e = _ape(pred, obs)
    if len(e) == 0:
        return {"n": 0, "mape": float("nan"), "p90": float("nan"), "max": float("nan")}
    return {"n": int(len(e)), "mape": float(np.mean(e)), "p90": float(np.quantile(e, 0.9)), "max": float(e.max())}


def _pl_eval(knots: dict, xs: np.ndarray) -> np.ndarray:
    """Evaluate a piecewise-linear knot table. Below the first knot: flat; above the last: y_last*(x/x_last)^p."""
    x = np.asarray(knots["x"], dtype=float)
    y = np.asarray(knots["y"], dtype=float)
    p = float(knots.get("p", 1.0))
    xs = np.asarray(xs, dtype=float)
    out = np.interp(xs, x, y)
    hi = xs > x[-1]
    if np.any(hi):
        out[hi] = y[-1] * (xs[hi] / x[-1]) ** p
    return out


def _knots(x, y, p: float = 1.0, **extra) -> dict:
    d = {"x": [float(v) for v in x], "y": [float(v) for v in y], "p": float(p)}
    d.update(extra)
    return d
