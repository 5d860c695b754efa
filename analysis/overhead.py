"""Scheduling overhead (Block's artifact): the global scheduler's decision time per request against QPS.

    python -m experiments.run -m experiment=overhead
    python -m analysis.overhead outputs/overhead

Reads ``decision_ms`` of every request (``requests.parquet``): in ``mode=sim`` the wall time of the in-process
decision (signals, what-if predictions and the policy) on the machine that ran the simulation; in emulate/deploy the
scheduler's measured time. Writes ``<dir>/figures/overhead.{png,pdf}`` (mean, median and P99 decision time per
request vs QPS, one line per policy label; the decision time as a share of E2E latency) and ``overhead.csv``.
"""

from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.common import (
    AnalysisError,
    add_common_args,
    comparable_runs,
    label_sort_key,
    label_style,
    load_runs,
    ok_requests,
    out_dir,
    plain_log_axis,
    policy_labels,
    run_cli,
    run_qps,
    save_figure_and_table,
    theme,
)


def overhead_table(runs) -> pd.DataFrame:
    labels = policy_labels(runs)
    rows = []
    for r in runs:
        req = ok_requests(r.requests())
        if "decision_ms" not in req.columns:
            continue
        d = req["decision_ms"].to_numpy(float)
        e2e = req["e2e_s"].to_numpy(float) * 1e3
        m = np.isfinite(d)
        if not m.any():
            continue
        share = d[m & (e2e > 0)] / e2e[m & (e2e > 0)] * 100
        rows.append({"label": labels[r.path], "qps": run_qps(r), "seed": r.get("seed"), "requests": int(m.sum()),
                     "mean_ms": float(d[m].mean()), "median_ms": float(np.median(d[m])),
                     "p99_ms": float(np.percentile(d[m], 99)), "max_ms": float(d[m].max()),
                     "share_of_e2e_pct": float(share.mean()) if share.size else math.nan})
    if not rows:
        raise AnalysisError("no run has per-request decision times (decision_ms in requests.parquet)")
    df = pd.DataFrame(rows).groupby(["label", "qps"], as_index=False).mean(numeric_only=True)
    df["_o"] = df["label"].map(label_sort_key)
    return df.sort_values(["_o", "qps"]).drop(columns="_o").reset_index(drop=True)


def overhead(args: argparse.Namespace) -> list[Path]:
    runs = comparable_runs(load_runs(args.root, args.filter), "overhead")
    tab = overhead_table(runs)
    theme()
    styles = label_style(tab["label"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for lab, g in tab.groupby("label", sort=False):
        st = styles[lab]
        axes[0].plot(g["qps"], g["mean_ms"], marker=st["marker"], color=st["color"], label=f"{lab} mean")
        axes[0].plot(g["qps"], g["median_ms"], marker=st["marker"], color=st["color"], ls="--", ms=3,
                     label=f"{lab} median")
        axes[0].plot(g["qps"], g["p99_ms"], marker=st["marker"], color=st["color"], ls=":", ms=3,
                     label=f"{lab} P99")
        axes[1].plot(g["qps"], g["share_of_e2e_pct"], marker=st["marker"], color=st["color"], label=lab)
    axes[0].set(xlabel="QPS (req/s)", ylabel="decision time per request (ms)", title="Scheduling overhead")
    axes[1].set(xlabel="QPS (req/s)", ylabel="decision time / E2E latency (%)", title="Share of E2E latency (mean)")
    for ax in axes:
        plain_log_axis(ax)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = out_dir(args)
    return save_figure_and_table(
        fig, runs, out, "overhead", tab,
        "decision time: wall time of the scheduler's decision per request on the machine that ran it")


def main(argv=None) -> int:
    return run_cli(__doc__, partial(add_common_args, slo=False), overhead, argv)


if __name__ == "__main__":
    raise SystemExit(main())
