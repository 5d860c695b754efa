"""Fitting each component from profile rows: token ops, KV-cache save, prefill and decode attention, tensor-parallel
scaling, all-reduce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from vidur.execution_model.cleaning import _pav, clean_series
from vidur.execution_model.numerics import SHARDED_OPS, TOKEN_OPS, PathLike, _knots, _pl_eval, _wls_rel

if TYPE_CHECKING:  # imported where used: a cached model (every run but a profile's first) needs no pandas
    import pandas as pd


def fit_token_ops(mlp: pd.DataFrame) -> tuple[dict[str, dict], dict[str, dict]]:
    """Cleaned monotone knots (per-layer ms; emb once) for each token op from mlp.csv rows of one TP degree."""
    ops, info = {}, {}
    for op in TOKEN_OPS:
        x, y, i = clean_series(mlp["num_tokens"].to_numpy(), mlp[op].to_numpy())
        ops[op] = _knots(x, y, 1.0)
        info[op] = i
    return ops, info


def fit_kv_save(att: pd.DataFrame) -> tuple[dict, dict]:
    """attn_kv_cache_save (per layer) by tokens written: chunk for prefill rows, batch for decode rows."""
    tokens = np.where(att["is_prefill"], att["chunk"], att["batch"])
    x, y, i = clean_series(tokens, att["kv_save"].to_numpy())
    return _knots(x, y, 1.0), i


def fit_prefill(att: pd.DataFrame) -> dict:
    """Prefill attention per layer: ``alpha0(c)`` for a chunk of ``c`` tokens with nothing cached (a prompt's
    first chunk) and ``alpha1(c) + beta(c) * kv`` after ``kv`` cached tokens.

    The A30 FlashInfer profile has two regimes: with kv = 0 a chunk of <= 128 tokens costs 16-22 us, but with any
    cached context the same chunk costs 45-70 us plus a linear term in kv (another kernel path). So kv = 0 rows
    give alpha0 (median per chunk size) and, for each chunk size with two or more context lengths kv > 0, a least
    squares fit in relative error on (1, kv) gives alpha1 and beta (linear in kv within a few %). Chunk sizes
    without kv > 0 rows (above 2,048 in the A30 profile) take alpha1 = alpha0 (the regimes coincide from 160
    tokens on) and beta interpolated over c, or growing in proportion to c beyond the last fitted chunk (the work
    per cached token is proportional to the chunk's query rows). All three are made non-decreasing in c
    (isotonic regression in relative error) and alpha1 >= alpha0; alpha0/alpha1 grow like c^2 beyond the last
    profiled chunk size.
    """
    p = att[att["is_prefill"] & (att["chunk"] > 0) & np.isfinite(att["prefill"]) & (att["prefill"] > 0)]
    if len(p) == 0:
        raise ValueError("prefill attention: no rows")
    chunks = np.array(sorted(p["chunk"].unique()), dtype=float)
    a0 = np.full(len(chunks), np.nan)
    a1 = np.full(len(chunks), np.nan)
    be = np.full(len(chunks), np.nan)
    for i, c in enumerate(chunks):
        g = p[p["chunk"] == c]
        z = g[g["kv"] == 0]
        if len(z):
            a0[i] = float(z["prefill"].median())
        k = g[g["kv"] > 0]
        if k["kv"].nunique() >= 2:
            a, b = _wls_rel(np.c_[np.ones(len(k)), k["kv"].to_numpy(float)], k["prefill"].to_numpy())
            a1[i], be[i] = max(a, 0.0), max(b, 0.0)
    fitted = np.isfinite(be)
    if not np.any(fitted):
        raise ValueError("prefill attention: no chunk size has two context lengths")
    have0 = np.isfinite(a0)
    if not np.any(have0):  # no kv = 0 rows at all: the kv > 0 line at kv = 0
        a0 = np.where(fitted, a1, np.nan)
        have0 = fitted
    a0 = np.interp(chunks, chunks[have0], a0[have0])
    cf = chunks[fitted]
    bf = _pav(be[fitted], 1.0 / np.maximum(be[fitted], 1e-12) ** 2)
    beta = np.where(chunks <= cf[-1], np.interp(chunks, cf, bf), bf[-1] * chunks / cf[-1])
    a1 = np.where(fitted, a1, np.where(chunks > cf[-1], a0, np.interp(chunks, cf, a1[fitted])))
    a0 = _pav(a0, 1.0 / a0**2)
    a1 = np.maximum(_pav(a1, 1.0 / np.maximum(a1, 1e-12) ** 2), a0)
    return {
        "alpha0": _knots(chunks, a0, 2.0),
        "alpha1": _knots(chunks, a1, 2.0),
        "beta": _knots(chunks, beta, 1.0),
        "chunks_with_kv": int(fitted.sum()),
    }


def _prefill_ms(fp: dict, c, kv) -> np.ndarray:
    c = np.asarray(c, dtype=float)
    kv = np.asarray(kv, dtype=float)
    return np.where(kv > 0, _pl_eval(fp["alpha1"], c) + _pl_eval(fp["beta"], c) * kv, _pl_eval(fp["alpha0"], c))


def fit_decode(att: pd.DataFrame) -> dict:
    """Decode attention per layer: a_b + s_b * S for b sequences with S KV tokens in total (S = b * kv).

    One least-squares fit in relative error per profiled batch size; then a_b and b * s_b are made
    non-decreasing in b (so adding a sequence of the same length is never faster). Batch sizes beyond the profile
    use a global linear model in (1, b, S) fitted on every decode row: a_b grows by its per-sequence coefficient
    from the last profiled batch size, and s_b stays at the last profiled value.
    """
    d = att[(~att["is_prefill"]) & np.isfinite(att["decode"]) & (att["decode"] > 0)]
    batches = np.array(sorted(d["batch"].unique()), dtype=int)
    a = np.full(len(batches), np.nan)
    s = np.full(len(batches), np.nan)
    for i, b in enumerate(batches):
        g = d[d["batch"] == b]
        S = (g["kv"] * b).to_numpy(float)
        if len(g) >= 2 and np.ptp(S) > 0:
            a[i], s[i] = _wls_rel(np.c_[np.ones(len(g)), S], g["decode"].to_numpy())
        else:
            a[i], s[i] = float(g["decode"].median()), 0.0
    s = np.maximum(s, 0.0)
    a = np.maximum(a, 0.0)
    # dense over 1..bmax
    bmax = int(batches[-1])
    bs = np.arange(1, bmax + 1)
    a_d = np.interp(bs, batches, a)
    bs_d = np.interp(bs, batches, s * batches)
    a_d = _pav(a_d, 1.0 / np.maximum(a_d, 1e-12) ** 2)
    bs_d = _pav(bs_d, 1.0 / np.maximum(bs_d, 1e-12) ** 2)
    s_d = bs_d / bs
    g = _wls_rel(np.c_[np.ones(len(d)), d["batch"].to_numpy(float), (d["batch"] * d["kv"]).to_numpy(float)],
                 d["decode"].to_numpy())
    return {"a": [float(v) for v in a_d], "s": [float(v) for v in s_d],
            "global": [float(v) for v in g], "per_seq_growth": float(max(g[1], 0.0))}


def scale_token_ops_tp(ops: dict[str, dict], tp: int, cal: Optional[dict]) -> dict[str, dict]:
    """TP-1 token ops -> ``tp`` shards: sharded ops (qkv, rope, o_proj, up, act, down) become o + (t - o) / tp with
    o the op's fixed overhead from the roofline calibration (kernel launch and tail, which do not shrink), the
    replicated ops (norms, add, emb) stay. On the Llama-2-7B A30 rows this is better than t / tp at TP 4 and 8."""
    out = {}
    for op, k in ops.items():
        if op in SHARDED_OPS:
            o = float(cal[op]["overhead_ms"]) if cal and op in cal else 0.0
            o = min(o, float(k["y"][0]))
            out[op] = {**k, "y": [o + (v - o) / tp for v in k["y"]]}
        else:
            out[op] = dict(k)
    return out


def _decode_coef_ms(dec: dict, b: int) -> tuple[float, float]:
    a, s = dec["a"], dec["s"]
    bmax = len(a)
    if b <= bmax:
        return a[b - 1], s[b - 1]
    return a[-1] + dec["per_seq_growth"] * (b - bmax), s[-1]


def fit_allreduce(path: PathLike, tp: int, hidden: int, dtype_bytes: int) -> Optional[dict]:
    """All-reduce time (ms) by tokens (bytes = tokens * hidden * dtype), from rows with num_workers == tp, else a
    ring formula calibrated on the rows of the nearest worker count: a + 2 (p-1)/p * bytes / bw."""
    import pandas as pd

    raw = pd.read_csv(path)
    if "collective" in raw.columns:
        raw = raw[raw["collective"] == "all_reduce"]
    y = raw["time_stats.all_reduce.median"].to_numpy(float)
    size = raw["size"].to_numpy(float)
    workers = raw["num_workers"].to_numpy(int)
    if np.any(workers == tp):
        m = workers == tp
        x, yk, _ = clean_series(size[m] / (hidden * dtype_bytes), y[m])
        return {"kind": "profile", **_knots(x, yk, 1.0)}
    p0 = int(workers[np.argmin(np.abs(workers - tp))])
    m = workers == p0
    a, b = _wls_rel(np.c_[np.ones(m.sum()), size[m] * 2 * (p0 - 1) / p0], y[m])
    return {"kind": "ring_from_profile", "p0": p0, "latency_ms": float(max(a, 0.0)),
            "ms_per_byte": float(max(b, 0.0))}
