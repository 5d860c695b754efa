"""Training samples for the learned routers from the project's own run records (any mode: sim, emulate, deploy).

    python -m vidur.learned_data RUN_DIR [RUN_DIR ...] -o samples.npz
    python -m experiments.run policy=routebalance policy.warm_start=samples.npz ...

A run's ``requests.parquet`` does not store the instance's load at each dispatch, but it stores enough to rebuild
the features ``vidur.learned`` uses (``FEATURES``) from the requests themselves, per instance at each dispatch
time ``t``: the requests dispatched before ``t`` and not finished are in the instance; those without a first token
yet are *waiting* (a prefill in progress counts as waiting: the records do not tell when it started), the others
*running*; tokens in flight = the waiting ones' prompt + output plus the running ones' output still to come
(linear in time between first token and finish); the KV used fraction comes from ``instances.parquet``'s last
sample at or before ``t`` (free blocks of ``summary.num_blocks``). The targets are the request's TTFT, TPOT and
E2E. The reconstruction is approximate (the live policies see the exact figures), which is why the online
training that follows in the run itself matters more than the warm start.
"""

from __future__ import annotations

import argparse
import bisect
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from vidur.learned import FEATURES, save_samples


def samples_from_frames(req: pd.DataFrame, inst: Optional[pd.DataFrame], total_blocks: int) -> dict[str, np.ndarray]:
    """``x`` (n x len(FEATURES)), ``instance``, ``ttft``, ``tpot``, ``e2e`` for every finished request."""
    ok = req[(req["status"] == "ok") & np.isfinite(req["e2e_s"]) & np.isfinite(req["ttft_s"])]
    ok = ok.sort_values(["instance", "dispatch_s"])
    rows, ids, ttft, tpot, e2e = [], [], [], [], []
    for i, g in ok.groupby("instance", sort=True):
        d = g["dispatch_s"].to_numpy(float)
        ft = g["first_token_s"].to_numpy(float)
        fin = g["finish_s"].to_numpy(float)
        prompt = g["prompt_tokens"].to_numpy(float)
        out = g["output_tokens"].to_numpy(float)
        pred = g["predicted_tokens"].to_numpy(float) if "predicted_tokens" in g else out
        told = np.where(pred > 0, pred, out)
        kv = _kv_at(inst, int(i), d, total_blocks)
        live: list[int] = []  # dispatched earlier (sorted by dispatch), not finished by t
        for k in range(len(g)):
            t = d[k]
            live = [j for j in live if fin[j] > t]
            waiting = [j for j in live if ft[j] > t]
            running = [j for j in live if ft[j] <= t]
            in_flight = sum(prompt[j] + out[j] for j in waiting)
            for j in running:
                span = fin[j] - ft[j]
                in_flight += out[j] * ((fin[j] - t) / span if span > 0 else 0.0)
            rows.append((kv[k], prompt[k], told[k], float(len(waiting)), float(len(running)), in_flight,
                         float(sum(prompt[j] for j in waiting))))
            ids.append(int(i))
            ttft.append(float(g["ttft_s"].iloc[k]))
            tp = g["tpot_s"].iloc[k]
            tpot.append(float(tp) if np.isfinite(tp) else 0.0)
            e2e.append(float(g["e2e_s"].iloc[k]))
            live.append(k)
    return {"x": np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES)), "instance": np.asarray(ids),
            "ttft": np.asarray(ttft), "tpot": np.asarray(tpot), "e2e": np.asarray(e2e)}


def _kv_at(inst: Optional[pd.DataFrame], instance: int, times: np.ndarray, total_blocks: int) -> np.ndarray:
    """Used KV fraction of ``instance`` at each time: the last sample at or before it (0 without samples)."""
    if inst is None or inst.empty or total_blocks <= 0:
        return np.zeros(len(times))
    s = inst[inst["instance"] == instance].sort_values("time_s")
    ts = s["time_s"].tolist()
    free = s["free_blocks"].to_numpy(float)
    out = np.zeros(len(times))
    for k, t in enumerate(times):
        j = bisect.bisect_right(ts, t) - 1
        if j >= 0:
            out[k] = (total_blocks - free[j]) / total_blocks
    return out


def samples_from_runs(run_dirs: Sequence[str | Path]) -> dict[str, np.ndarray]:
    """The samples of several complete runs, concatenated (instance ids kept as they are)."""
    from vidur.records import load_run

    parts = []
    for d in run_dirs:
        run = load_run(d)
        inst_file = Path(d) / "instances.parquet"
        inst = run.instances() if inst_file.is_file() else None
        parts.append(samples_from_frames(run.requests(), inst, int(run.summary.get("num_blocks") or 0)))
    return {k: np.concatenate([p[k] for p in parts]) for k in ("x", "instance", "ttft", "tpot", "e2e")}


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vidur.learned_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (with summary.json and requests.parquet)")
    ap.add_argument("-o", "--output", required=True, help="the .npz to write (policy.warm_start reads it)")
    args = ap.parse_args(argv)
    s = samples_from_runs(args.runs)
    save_samples(args.output, [tuple(r) for r in s["x"]], s["instance"].tolist(), s["ttft"].tolist(),
                 s["tpot"].tolist(), s["e2e"].tolist())
    print(f"{len(s['e2e'])} samples from {len(args.runs)} run(s) -> {args.output}")


if __name__ == "__main__":
    main()
