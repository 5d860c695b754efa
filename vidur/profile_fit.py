"""Fit the execution model from per-step measurements of a real engine (e.g. ``vllm serve --load-format dummy``).

Input: a CSV with one row per engine step (schema :data:`STEP_COLUMNS`, documented in docs/vllm.md)::

    prefill_chunks,num_decode,decode_kv_sum,step_s
    "512:0;128:1024",12,5310,0.0871

``prefill_chunks``: ``tokens:cached`` pairs separated by ``;`` (empty for a decode-only step); ``num_decode``:
decode sequences; ``decode_kv_sum``: KV tokens they hold in total (each including its new token); ``step_s``:
measured wall seconds of the step. This is exactly the argument list of ``ExecutionModel.step_time``.

Method: the step time is linear in unknown piecewise-linear tables (hat-function bases on fixed knots), the same
structure the simulator evaluates: token ops ``T(n)`` over the step's total tokens, one prefill launch floor, the
per-chunk prefill cost ``P0(c)`` (nothing cached) or ``P1(c) + B(c) * kv`` (after ``kv`` cached tokens), and decode
attention ``A(b) + S(b) * sum_kv``. A non-negative least squares in relative error (rows weighted by 1 / step_s,
a small ridge on second differences for smoothness) gives all tables at once. Step measurements cannot separate
the individual Vidur ops (qkv, MLP, norms, ...), so the result is saved as ExecutionModel parameters (JSON), not
as Vidur CSVs: ``ExecutionModel(json.load(open(path)))`` loads it directly (see :func:`load_fitted`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd

from vidur.execution_model import CODE_VERSION, LAYER_OPS, ExecutionModel
from vidur.records import write_atomic, write_text
from vidur.specs import GpuSpec, ModelSpec

STEP_COLUMNS = ("prefill_chunks", "num_decode", "decode_kv_sum", "step_s")
TOKEN_KNOTS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 640, 768, 1024, 1536, 2048, 3072, 4096,
               6144, 8192, 16384)
CHUNK_KNOTS = (1, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192)
BATCH_KNOTS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
PathLike = Union[str, Path]
Step = tuple[list[tuple[int, int]], int, int]


# ---------------------------------------------------------------------------------------------------------------
# the measurement format
# ---------------------------------------------------------------------------------------------------------------


def format_chunks(chunks: Iterable[tuple[int, int]]) -> str:
    return ";".join(f"{int(c)}:{int(k)}" for c, k in chunks)


def parse_chunks(s: Any) -> list[tuple[int, int]]:
    if s is None or (isinstance(s, float) and math.isnan(s)) or not str(s).strip():
        return []
    out = []
    for part in str(s).split(";"):
        c, k = part.split(":")
        out.append((int(c), int(k)))
    return out


def write_steps(path: PathLike, steps: Sequence[Step], times: Sequence[float]) -> Path:
    df = pd.DataFrame({"prefill_chunks": [format_chunks(p) for p, _, _ in steps],
                       "num_decode": [int(b) for _, b, _ in steps], "decode_kv_sum": [int(s) for _, _, s in steps],
                       "step_s": [float(t) for t in times]})
    write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))
    return Path(path)


def read_steps(path: PathLike) -> tuple[list[Step], np.ndarray]:
    df = pd.read_csv(path, keep_default_na=False, dtype={"prefill_chunks": str})
    missing = [c for c in STEP_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (schema: {', '.join(STEP_COLUMNS)})")
    steps = [(parse_chunks(p), int(b), int(s)) for p, b, s in
             zip(df["prefill_chunks"], df["num_decode"], df["decode_kv_sum"])]
    return steps, df["step_s"].to_numpy(float)


# ---------------------------------------------------------------------------------------------------------------
# design matrix
# ---------------------------------------------------------------------------------------------------------------


def _hat(knots: np.ndarray, x: float) -> np.ndarray:
    """Weights of x on the hat basis over ``knots`` (value 0 at x = 0 below the first knot: linear from 0;
    linear extrapolation from the last two knots above the last one)."""
    w = np.zeros(len(knots))
    if x <= 0:
        return w
    if x <= knots[0]:
        w[0] = x / knots[0]
        return w
    i = int(np.searchsorted(knots, x)) - 1
    if i >= len(knots) - 1:
        i = len(knots) - 2
    t = (x - knots[i]) / (knots[i + 1] - knots[i])
    w[i], w[i + 1] = 1.0 - t, t
    return w


class _Layout:
    def __init__(self, tk=TOKEN_KNOTS, ck=CHUNK_KNOTS, bk=BATCH_KNOTS):
        self.tk, self.ck, self.bk = (np.asarray(v, float) for v in (tk, ck, bk))
        sizes = [("tok", len(self.tk)), ("floor", 1), ("p0", len(self.ck)), ("p1", len(self.ck)),
                 ("beta", len(self.ck)), ("da", len(self.bk)), ("ds", len(self.bk))]
        self.sl, off = {}, 0
        for name, n in sizes:
            self.sl[name] = slice(off, off + n)
            off += n
        self.n = off

    def row(self, chunks: Sequence[tuple[int, int]], b: int, S: int) -> np.ndarray:
        r = np.zeros(self.n)
        n = b + sum(c for c, _ in chunks)
        r[self.sl["tok"]] = _hat(self.tk, n)
        if chunks:
            r[self.sl["floor"]] = 1.0
            for c, kv in chunks:
                if kv > 0:
                    r[self.sl["p1"]] += _hat(self.ck, c)
                    r[self.sl["beta"]] += _hat(self.ck, c) * kv
                else:
                    r[self.sl["p0"]] += _hat(self.ck, c)
        if b > 0:
            hb = _hat(self.bk, b)
            r[self.sl["da"]] += hb
            r[self.sl["ds"]] += hb * S
        return r

    def smoothness(self, scale: np.ndarray) -> np.ndarray:
        """Second differences within each table (scaled per column), as extra ridge rows."""
        rows = []
        for name in ("tok", "p0", "p1", "beta", "da", "ds"):
            s = self.sl[name]
            for j in range(s.start, s.stop - 2):
                r = np.zeros(self.n)
                r[j], r[j + 1], r[j + 2] = 1 / scale[j], -2 / scale[j + 1], 1 / scale[j + 2]
                rows.append(r)
        return np.array(rows)


def fit_steps(steps: Sequence[Step], times: Sequence[float], ridge: float = 1e-4) -> dict[str, Any]:
    """Fit the tables (seconds, all layers) from measured steps; returns the coefficient tables and fit stats."""
    from scipy.optimize import lsq_linear

    lay = _Layout()
    y = np.asarray(times, float)
    if len(y) != len(steps) or len(y) == 0:
        raise ValueError("need one time per step and at least one step")
    if np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("step times must be positive and finite")
    X = np.array([lay.row(*s) for s in steps])
    w = 1.0 / y
    Xw, yw = X * w[:, None], y * w
    # column scaling so the ridge acts on comparable magnitudes
    scale = np.maximum(np.abs(Xw).max(axis=0), 1e-12)
    used = np.abs(X).sum(axis=0) > 0
    Xs = Xw / scale
    # smoothness: second differences of the scaled variables, weighted by ridge (0 disables)
    R = lay.smoothness(np.ones(lay.n)) * math.sqrt(ridge)
    A = np.vstack([Xs, R, np.diag(np.where(used, 0.0, 1.0))]) if ridge > 0 else \
        np.vstack([Xs, np.diag(np.where(used, 0.0, 1.0))])  # unused columns pinned to 0
    bvec = np.zeros(A.shape[0])
    bvec[: len(yw)] = yw
    sol = lsq_linear(A, bvec, bounds=(0.0, np.inf), method="bvls")
    coef = sol.x / scale
    pred = X @ coef
    ape = np.abs(pred - y) / y
    return {"layout": lay, "coef": coef, "used": used,
            "train": {"n": int(len(y)), "mape": float(ape.mean()), "p90": float(np.quantile(ape, 0.9))}}


def _knot_table(knots: np.ndarray, vals: np.ndarray, used: np.ndarray, per_layer_ms: float, p: float,
                add: float = 0.0) -> dict:
    """Knots (x from 0) in per-layer ms for ExecutionModel params; unused trailing knots are dropped (beyond the
    last measured point the simulator extrapolates with exponent p)."""
    keep = np.nonzero(used)[0]
    last = int(keep[-1]) + 1 if len(keep) else 1
    xs = [0.0] + [float(v) for v in knots[:last]]
    ys = [add] + [add + float(v) * per_layer_ms for v in vals[:last]]
    return {"x": xs, "y": ys, "p": float(p)}


def to_params(fit: dict[str, Any], model: ModelSpec, gpu: GpuSpec, tp: int = 1,
              source: str = "step measurements") -> dict[str, Any]:
    """ExecutionModel parameters from :func:`fit_steps` (token ops lumped into ``mlp_up_proj``: only their sum
    is identifiable from whole-step times)."""
    lay, coef, used = fit["layout"], fit["coef"], fit["used"]
    L = model.num_layers
    k = 1e3 / L  # seconds (all layers) -> per-layer ms
    g = {name: coef[s] for name, s in lay.sl.items()}
    u = {name: used[s] for name, s in lay.sl.items()}
    zero = {"x": [0.0, 1.0], "y": [0.0, 0.0], "p": 1.0}
    token_ops = {op: dict(zero) for op in LAYER_OPS}
    token_ops["emb"] = dict(zero)
    token_ops["mlp_up_proj"] = _knot_table(lay.tk, g["tok"], u["tok"], k, 1.0)
    floor = float(g["floor"][0]) * k
    prefill = {"alpha0": _knot_table(lay.ck, g["p0"], u["p0"] | u["p1"], k, 2.0, add=floor),
               "alpha1": _knot_table(lay.ck, g["p1"], u["p0"] | u["p1"], k, 2.0, add=floor),
               "beta": _knot_table(lay.ck, g["beta"], u["p0"] | u["p1"], k, 1.0), "chunks_with_kv": int(u["p1"].sum())}
    bk = lay.bk
    ub = np.nonzero(u["da"])[0]
    bmax = int(bk[ub[-1]]) if len(ub) else 1
    bs = np.arange(1, bmax + 1, dtype=float)
    a = np.interp(bs, np.r_[0.0, bk], np.r_[0.0, g["da"]]) * k
    s = np.interp(bs, bk, g["ds"]) * k
    if len(ub) >= 2:
        i0, i1 = ub[-2], ub[-1]
        growth = max((g["da"][i1] - g["da"][i0]) / (bk[i1] - bk[i0]), 0.0) * k
    else:
        growth = 0.0
    decode = {"a": [float(v) for v in a], "s": [float(v) for v in s], "global": [0.0, 0.0, 0.0],
              "per_seq_growth": float(growth)}
    return {
        "version": CODE_VERSION, "model": model.to_dict(), "gpu": gpu.to_dict(), "tp": int(tp),
        "token_ops": token_ops, "prefill": prefill, "decode": decode, "kv_save": dict(zero), "allreduce": None,
        "sources": {"all": f"fitted from {source} (vidur.profile_fit)"},
        "methods": {"all": "NNLS in relative error on hat-function tables: token ops T(n) (lumped into mlp_up_proj; "
                           "includes KV save, all-reduce and emb), prefill floor + P0(c) / P1(c) + B(c) kv, decode "
                           "A(b) + S(b) sum_kv"},
        "holdout": {"train_steps": fit["train"]}, "cleaning": {}, "notes": [], "fitted_from_steps": True,
    }


def fit_profile(steps_csv: PathLike, model: ModelSpec, gpu: GpuSpec, out_json: PathLike, tp: int = 1,
                ridge: float = 1e-4) -> dict[str, Any]:
    """Read measured steps, fit, write the ExecutionModel parameter JSON to ``out_json``; return the params."""
    steps, times = read_steps(steps_csv)
    params = to_params(fit_steps(steps, times, ridge), model, gpu, tp, source=str(steps_csv))
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    write_text(out_json, json.dumps(params))
    return params


def load_fitted(path: PathLike, cpu_overhead_s: float = 0.0) -> ExecutionModel:
    """An ExecutionModel from a JSON written by :func:`fit_profile`. Saved as
    ``<profile_root>/fitted/<gpu profile_dir>/<model profile_name>/tp<tp>.json`` it is what ``ExecutionModel.fit``
    (and so every run and service) loads for that GPU and model."""
    return ExecutionModel.from_json(path, cpu_overhead_s)


# ---------------------------------------------------------------------------------------------------------------
# synthetic steps (tests, and the shape of a real capture)
# ---------------------------------------------------------------------------------------------------------------


def synthetic_steps(n: int, seed: int = 0, max_batch: int = 48, chunk: int = 512,
                    max_len: int = 4096) -> list[Step]:
    """Steps like a chunked-prefill vLLM produces: decode-only batches, and mixes of <= 2 prefill chunks (first
    chunks and continuation chunks with context) with decodes; the token budget ``chunk`` is respected."""
    rng = np.random.default_rng(seed)
    out: list[Step] = []
    for _ in range(n):
        b = int(rng.integers(0, max_batch + 1))
        kv = rng.integers(16, max_len // 2, size=b)
        S = int(kv.sum()) if b else 0
        chunks: list[tuple[int, int]] = []
        if rng.random() < 0.5 or b == 0:
            budget = max(chunk - b, 1)
            for _ in range(int(rng.integers(1, 3))):
                if budget <= 0:
                    break
                c = int(rng.integers(1, budget + 1))
                ctx = 0 if rng.random() < 0.5 else int(rng.integers(1, max_len - c))
                chunks.append((c, ctx))
                budget -= c
        if not chunks and b == 0:
            b, S = 1, int(rng.integers(16, max_len))
        out.append((chunks, b, S))
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse

    from vidur.config import load_conf

    ap = argparse.ArgumentParser(prog="python -m vidur.profile_fit", description=__doc__.split("\n\n")[0])
    ap.add_argument("steps_csv")
    ap.add_argument("out_json")
    ap.add_argument("--model", default="llama2_7b")
    ap.add_argument("--gpu", default="a30")
    ap.add_argument("--tp", type=int, default=1)
    a = ap.parse_args(argv)
    p = fit_profile(a.steps_csv, ModelSpec.from_dict(load_conf("model", a.model)),
                    GpuSpec.from_dict(load_conf("gpu", a.gpu)), a.out_json, a.tp)
    print(json.dumps(p["holdout"]))


if __name__ == "__main__":
    main()
