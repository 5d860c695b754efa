"""Error heatmap (Block's artifact): Block with noise on the length it tells each instance (rows) and on each
predicted latency (columns), each 0, 25, 50, 100 %.

    python -m experiments.run -m experiment=error_heatmap          # 16 runs at QPS 30
    python -m experiments.capacity -m experiment=error_heatmap     # capacity per cell (several seeds)
    python -m analysis.error_heatmap outputs/error_heatmap

Writes ``<dir>/figures/error_heatmap.{png,pdf}``: the P99 TTFT at the runs' QPS per cell and, when capacity
searches exist, the capacity per cell (mean over seeds, the t-interval's half width below it) and its change against
the noise-free cell (published: 100 % length noise costs under 3 %); ``error_heatmap.csv`` (with the change
paired seed by seed and its 95 % t-interval: ``paired_change_pct``, ``paired_ci_low``, ``paired_ci_high``).
"""

from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.capacity_refine import capacity_note, load_capacities, sweep_qps
from analysis.common import (
    PAIRED,
    AnalysisError,
    add_common_args,
    comparable_runs,
    load_runs,
    out_dir,
    paired_change,
    policy_params,
    run_cli,
    run_qps,
    save_figure_and_table,
    seeds_text,
    shared_seeds,
    theme,
    widest_searches,
)

ROW, COL = "policy.length_noise_pct", "policy.latency_noise_pct"


def _grid(df: pd.DataFrame, value: str) -> pd.DataFrame:
    return df.pivot_table(index=ROW, columns=COL, values=value, aggfunc="mean").sort_index().sort_index(axis=1)


def _heat(ax, grid: pd.DataFrame, title: str, fmt: str, cmap: str, sub: pd.DataFrame | None = None,
          centred: bool = False) -> None:
    """One heatmap with its values written in the cells; ``centred``: colour limits symmetric about 0, so that a
    diverging map shows a loss in one colour and a gain in the other whatever the range."""
    a = grid.to_numpy(float)
    lim = float(np.nanmax(np.abs(a))) if centred and np.isfinite(a).any() else None
    im = ax.imshow(a, cmap=cmap, aspect="auto", origin="lower", vmin=-lim if lim else None, vmax=lim or None)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(grid.shape[1]), [f"{c:g}" for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{r:g}" for r in grid.index])
    ax.set(xlabel="latency error (%)", ylabel="length error (%)", title=title)
    ax.grid(False)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid.iat[i, j]
            if math.isfinite(v):
                t = format(v, fmt)
                if sub is not None and math.isfinite(sub.iat[i, j]):
                    t += f"\n±{sub.iat[i, j]:.1f}"
                r, g, b, _ = im.cmap(im.norm(v))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"  # readable on dark cells
                ax.text(j, i, t, ha="center", va="center", fontsize=8, color=ink)


def error_heatmap(args: argparse.Namespace) -> list[Path]:
    runs = comparable_runs(load_runs(args.root, args.filter), "error_heatmap")
    rows = []
    for r in runs:
        p = policy_params(r)
        rows.append({ROW: float(p.get("length_noise_pct") or 0.0), COL: float(p.get("latency_noise_pct") or 0.0),
                     "qps": run_qps(r), "seed": r.get("seed"), "p99_ttft_s": (r.summary.get("p99_ttft_ms") or math.nan) / 1e3,
                     "mean_e2e_s": (r.summary.get("mean_e2el_ms") or math.nan) / 1e3})
    lat = pd.DataFrame(rows)
    q = args.qps if args.qps is not None else sweep_qps(runs, args.root)
    lat = lat[np.isclose(lat["qps"], q)]
    if lat.empty:
        raise AnalysisError(f"no run at QPS {q:g}")
    lat, seeds = shared_seeds(lat, [ROW, COL])
    lat = lat.drop(columns="seed")
    try:
        cap = widest_searches(load_capacities(args.root))
        for k in (ROW, COL):
            cap[k] = pd.to_numeric(cap.get(k, 0.0), errors="coerce").fillna(0.0)
    except AnalysisError:
        cap = None
    theme()
    ncol = 3 if cap is not None else 1
    fig, axes = plt.subplots(1, ncol, figsize=(5.2 * ncol, 4.4), squeeze=False)
    axes = axes[0]
    _heat(axes[0], _grid(lat, "p99_ttft_s"), f"P99 TTFT (s) at QPS {q:g}, {seeds_text(seeds)}", ".2f", "magma_r")
    out = out_dir(args)
    paths: list[Path] = []
    table = lat.groupby([ROW, COL], as_index=False).mean(numeric_only=True)
    if cap is not None:
        cap["half"] = (cap["ci_high"] - cap["ci_low"]) / 2
        base = cap.loc[(cap[ROW] == 0) & (cap[COL] == 0)]
        cap["change_pct"] = (cap["capacity"] / base["capacity"].iloc[0] - 1) * 100 if len(base) else math.nan
        cap = cap.join(cap.apply(lambda row: paired_change(row, base.iloc[0] if len(base) else None), axis=1))
        _heat(axes[1], _grid(cap, "capacity"), "Capacity (req/s), ± 95 % t", ".1f", "viridis", _grid(cap, "half"))
        _heat(axes[2], _grid(cap, "change_pct"), "Capacity change vs no error (%)\npublished: 100 % length error costs < 3 %", "+.1f",
              "RdBu", centred=True)
        table = table.merge(cap[[ROW, COL, "capacity", "ci_low", "ci_high", "seeds", "change_pct", *PAIRED]],
                            on=[ROW, COL], how="outer")
    fig.tight_layout()
    return save_figure_and_table(fig, runs, out, "error_heatmap", table,
                                 capacity_note(cap) if cap is not None else "", extra=paths)


def main(argv=None) -> int:
    return run_cli(__doc__, partial(add_common_args, slo=False, qps_for="the latency panel"), error_heatmap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
