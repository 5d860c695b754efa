"""N-ablation (Block's artifact): Block probing k instances per request, k = 2, 4, 6, 8 and all 12.

    python -m experiments.run -m experiment=nablation          # every k at QPS 30
    python -m experiments.capacity -m experiment=nablation     # capacity per k (several seeds)
    python -m analysis.nablation outputs/nablation

Writes under ``<dir>/figures/``: ``nablation.{png,pdf}``: mean and P99 E2E latency and TTFT at the runs' QPS
(default: the one most configurations share) against k, one line per policy (Block* = estimated lengths, Block = true lengths), and,
when capacity searches exist, capacity per k with its 95 % t-interval next to the published numbers (black marks);
``nablation.csv`` (the latencies per k) and ``nablation_capacity.csv`` (ours beside the published capacity).
"""

from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.capacity import Interval, mean_interval
from analysis.capacity_refine import (
    capacity_note,
    draw_capacity_bars,
    load_capacities,
    sweep_qps,
)
from analysis.common import (
    POLICY_COLORS,
    AnalysisError,
    add_common_args,
    base_label,
    comparable_runs,
    load_runs,
    out_dir,
    paired_over_seeds,
    policy_name,
    policy_params,
    run_cli,
    run_qps,
    save_figure_and_table,
    seeds_text,
    shared_legend,
    shared_seeds,
    theme,
    widest_searches,
)
from analysis.records import save_csv

# AE.md (systor-ae branch), 10 s P99 TTFT SLO, 12 A30s: capacity (QPS) per probing degree; 12 = query-all
PUBLISHED = {("block_star", 2): 31.6, ("block_star", 4): 31.9, ("block_star", 8): 31.7, ("block_star", 12): 31.7,
             ("block_oracle", 2): 32.4, ("block_oracle", 12): 32.6, ("llumnix", None): 31.5}
PUBLISHED_SLO_S = 10.0


def _k(v, n: int | None) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return n  # null = every instance


def latency_table(runs, qps: float | None, root: str | Path = "") -> tuple[pd.DataFrame, float, list[int]]:
    """Latencies per (policy, k) at QPS ``qps`` (default: the sweep's), over the seeds every configuration has
    (``shared_seeds``), and those seeds."""
    q = qps if qps is not None else sweep_qps(runs, root)
    rows = []
    for r in runs:
        if abs(run_qps(r) - q) > 1e-9:
            continue
        n = r.get("cluster.num_instances")
        s = r.summary
        rows.append({"policy": policy_name(r), "k": _k(policy_params(r).get("k"), n), "seed": r.get("seed"),
                     **{c: (s.get(f"{c}_ms") or math.nan) / 1e3 for c in ("mean_e2el", "p99_e2el", "mean_ttft",
                                                                         "p99_ttft")}})
    if not rows:
        raise AnalysisError(f"no run at QPS {q:g}")
    df, seeds = shared_seeds(pd.DataFrame(rows), ["policy", "k"])
    df = df.drop(columns="seed").groupby(["policy", "k"], as_index=False, dropna=False).mean(numeric_only=True)
    df["seeds"] = seeds_text(seeds)
    return df.sort_values(["policy", "k"]), q, seeds


def gain_over(row: pd.Series, base: pd.Series | None) -> tuple[float, int]:
    """Capacity minus ``base``'s (Llumnix-) over the seeds both searched, and how many: the seeds move capacity by
    1-2 QPS, the same way for every policy (the same requests and arrivals), so the paired gain is much tighter than
    either interval and is what the published gap compares with."""
    g = paired_gain(row, base)
    return g.mean, g.n


def paired_gain(row: pd.Series, base: pd.Series | None) -> Interval:
    """``gain_over`` with its 95 % t-interval over the shared seeds (n = 0 without ``base``)."""
    if base is None:
        return mean_interval([])
    return paired_over_seeds(row, base, lambda ours, theirs: ours - theirs)


def nablation(args: argparse.Namespace) -> list[Path]:
    runs = comparable_runs(load_runs(args.root, args.filter), "nablation")
    theme()
    out = out_dir(args)
    lat, q, seeds = latency_table(runs, args.qps, args.root)
    try:
        cap = widest_searches(load_capacities(args.root))
    except AnalysisError:
        cap = None
    ncol = 5 if cap is not None else 4
    fig, axes = plt.subplots(1, ncol, figsize=(4 * ncol, 4.2))
    cols = [("mean_e2el", "Average E2E (s)"), ("p99_e2el", "P99 E2E (s)"), ("mean_ttft", "Average TTFT (s)"),
            ("p99_ttft", "P99 TTFT (s)")]
    for ax, (col, title) in zip(axes, cols):
        for pol, g in lat.groupby("policy"):
            ax.plot(g["k"], g[col], marker="o", color=POLICY_COLORS.get(pol), label=base_label(pol))
        ax.set(xlabel="instances probed per request (k)", title=f"{title} at QPS {q:g}, {seeds_text(seeds)}")
        ax.set_xticks(sorted(lat["k"].dropna().unique()))
    paths: list[Path] = []
    if cap is not None:
        ax = axes[-1]
        cap = cap.copy()
        n = runs[0].get("cluster.num_instances")
        cap["k"] = [_k(v, n) for v in cap.get("policy.k", pd.Series([None] * len(cap)))]
        probing = [p for p in ("block_star", "block_oracle") if p in set(cap["policy.name"])]
        others = sorted(set(cap["policy.name"]) - set(probing))  # no k to vary (Llumnix-): a slot each, after the ks
        ks = sorted({k for k, p in zip(cap["k"], cap["policy.name"]) if p in probing and pd.notna(k)})
        width = 0.8 / max(len(probing), 1)
        rows = []
        llumnix = cap[cap["policy.name"] == "llumnix"]
        base = llumnix.iloc[0] if len(llumnix) else None
        for j, pol in enumerate(probing + others):
            g = cap[cap["policy.name"] == pol].sort_values("k")
            if pol in probing:
                xs = [ks.index(k) + (j - (len(probing) - 1) / 2) * width for k in g["k"]]
            else:
                xs = [len(ks) + others.index(pol)] * len(g)
            draw_capacity_bars(ax, g, xs, width=width, label=base_label(pol), annotate=False)
            for x, (_, row) in zip(xs, g.iterrows()):
                gain = paired_gain(row, base if pol != "llumnix" else None)
                pub = PUBLISHED.get((pol, row["k"] if pol in probing else None))
                if pub is not None:
                    first = not any(r["published"] is not None for r in rows)
                    ax.scatter([x], [pub], marker="_", s=300, color="black", zorder=4,
                               label=f"published ({PUBLISHED_SLO_S:g} s SLO)" if first else None)
                rows.append({"policy": pol, "k": row["k"] if pol in probing else None, "capacity": row["capacity"], "ci_low": row["ci_low"],
                             "ci_high": row["ci_high"], "seeds": row["seeds"], "slo_s": row["slo_s"],
                             "published": pub, "published_slo_s": PUBLISHED_SLO_S if pub is not None else None,
                             "per_seed": row.get("per_seed"), "gain_over_llumnix": gain.mean,
                             "gain_ci_low": gain.low, "gain_ci_high": gain.high, "gain_seeds": gain.n,
                             "published_gain": pub - PUBLISHED[("llumnix", None)] if pub is not None else None})
        ax.set_xticks(range(len(ks) + len(others)), [str(int(k)) for k in ks] + [base_label(p) for p in others])
        ax.set(xlabel="instances probed per request (k)", ylabel="Capacity (req/s)", title="Capacity per k")
        lo = np.nanmin(cap["ci_low"].fillna(cap["capacity"]).to_numpy(float))
        hi = np.nanmax(cap["ci_high"].fillna(cap["capacity"]).to_numpy(float))
        ax.set_ylim(max(0.0, lo - 3), hi + 0.3 * (hi - lo + 3))  # room above the bars for the legend
        ax.legend(fontsize=7, loc="upper left", ncol=2)
        paths.append(save_csv(pd.DataFrame(rows), out, "nablation_capacity"))
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    shared_legend(fig, axes[:4], y=0.9)
    note = capacity_note(cap) if cap is not None else ""
    return save_figure_and_table(fig, runs, out, "nablation", lat, note, extra=paths)


def main(argv=None) -> int:
    return run_cli(__doc__, partial(add_common_args, slo=False, qps_for="the latency panels"), nablation, argv)


if __name__ == "__main__":
    raise SystemExit(main())
