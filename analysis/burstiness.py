"""Burstiness (Block's artifact): Gamma arrivals with burstiness b = 0.25, 0.5, 1 (Poisson), 2.

    python -m experiments.run -m experiment=burstiness         # P99 TTFT at QPS 30 per b and policy
    python -m experiments.capacity -m experiment=burstiness    # capacity per b and policy (several seeds)
    python -m analysis.burstiness outputs/burstiness

Writes ``<dir>/figures/burstiness.{png,pdf}``: P99 TTFT and mean E2E at the runs' QPS against b, one line per policy,
and, when capacity searches exist, capacity per b with its 95 % t-interval and its change against b = 1 (published:
about +-1 %); ``burstiness.csv`` and ``burstiness_capacity.csv`` (``change_vs_b1_pct``: the ratio of the means;
``paired_change_pct``, ``paired_ci_low``, ``paired_ci_high``, ``paired_seeds``: seed by seed against b = 1's search,
mean and 95 % t-interval).
"""

from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import NullLocator

from analysis.capacity_refine import (
    capacity_note,
    draw_capacity_bars,
    load_capacities,
    sweep_qps,
)
from analysis.common import (
    PAIRED,
    POLICY_COLORS,
    AnalysisError,
    add_common_args,
    base_label,
    comparable_runs,
    load_runs,
    out_dir,
    paired_change,
    policy_name,
    run_cli,
    run_qps,
    save_figure_and_table,
    seeds_text,
    shared_seeds,
    theme,
)
from analysis.records import save_csv


def burstiness_of(run) -> float:
    if str(run.get("workload.arrival")) != "gamma":
        return 1.0 if str(run.get("workload.arrival")) == "poisson" else math.nan
    return float(run.get("workload.burstiness", 1.0))


def _b_ticks(ax, bs) -> None:
    """Ticks at the swept b only: a log axis' minor labels (2x10^-1 ...) would overprint 0.25 and 0.5."""
    ax.set_xticks(bs, [f"{b:g}" for b in bs])
    ax.xaxis.set_minor_locator(NullLocator())


def burstiness(args: argparse.Namespace) -> list[Path]:
    runs = comparable_runs(load_runs(args.root, args.filter), "burstiness")
    rows = [{"policy": policy_name(r), "burstiness": burstiness_of(r), "qps": run_qps(r), "seed": r.get("seed"),
             "p99_ttft_s": (r.summary.get("p99_ttft_ms") or math.nan) / 1e3,
             "mean_e2e_s": (r.summary.get("mean_e2el_ms") or math.nan) / 1e3} for r in runs]
    lat = pd.DataFrame(rows).dropna(subset=["burstiness"])
    if lat.empty:
        raise AnalysisError(f"no run under {args.root} has workload.arrival=gamma or poisson")
    q = args.qps if args.qps is not None else sweep_qps(runs, args.root)
    lat, seeds = shared_seeds(lat[np.isclose(lat["qps"], q)], ["policy", "burstiness"])
    lat = lat.drop(columns="seed").groupby(["policy", "burstiness"], as_index=False).mean(numeric_only=True)
    lat["seeds"] = seeds_text(seeds)
    try:
        cap = load_capacities(args.root)
    except AnalysisError:
        cap = None
    theme()
    ncol = 4 if cap is not None else 2
    fig, axes = plt.subplots(1, ncol, figsize=(4.4 * ncol, 4.2))
    for ax, (col, title) in zip(axes, [("p99_ttft_s", "P99 TTFT (s)"), ("mean_e2e_s", "Average E2E (s)")]):
        for pol, g in lat.groupby("policy"):
            ax.plot(g["burstiness"], g[col], marker="o", color=POLICY_COLORS.get(pol), label=base_label(pol))
        ax.set(xscale="log", xlabel="burstiness b (Gamma shape; 1 = Poisson, < 1 burstier)",
               title=f"{title} at QPS {q:g}, {seeds_text(seeds)}")
        _b_ticks(ax, sorted(lat["burstiness"].unique()))
        ax.legend(fontsize=8)
    out = out_dir(args)
    paths: list[Path] = []
    if cap is not None:
        cap = cap.copy()
        cap["burstiness"] = [1.0 if str(a) == "poisson" else float(b) for a, b in
                             zip(cap.get("workload.arrival", "gamma"), cap.get("workload.burstiness", 1.0))]
        bs = sorted(cap["burstiness"].unique())
        pols = sorted(cap["policy.name"].unique())
        width = 0.8 / len(pols)
        cap[PAIRED] = math.nan
        for j, pol in enumerate(pols):
            g = cap[cap["policy.name"] == pol].sort_values("burstiness")
            xs = [bs.index(b) + (j - (len(pols) - 1) / 2) * width for b in g["burstiness"]]
            draw_capacity_bars(axes[2], g, xs, width=width, label=base_label(pol), annotate=False)
            base = g.loc[np.isclose(g["burstiness"], 1.0)]
            rel = (g["capacity"] / base["capacity"].iloc[0] - 1) * 100 if len(base) else g["capacity"] * math.nan
            cap.loc[g.index, "change_vs_b1_pct"] = rel
            # the seeds move every b alike (the same requests; b = 1 draws Poisson's gaps): the change read against
            # "about +-1 %" is the per-seed one, with its t-interval, not the ratio of two means
            paired = g.apply(paired_change, axis=1, base=base.iloc[0] if len(base) else None)
            cap.loc[g.index, PAIRED] = paired[PAIRED].to_numpy(float)
            ch = cap.loc[g.index]
            dodge = 1.04 ** (j - (len(pols) - 1) / 2)  # side by side on the log axis: the intervals overlap
            axes[3].errorbar(ch["burstiness"] * dodge, ch["paired_change_pct"],
                             yerr=[ch["paired_change_pct"] - ch["paired_ci_low"],
                                   ch["paired_ci_high"] - ch["paired_change_pct"]],
                             marker="o", capsize=3, color=POLICY_COLORS.get(pol), label=base_label(pol))
        axes[2].set_xticks(range(len(bs)), [f"{b:g}" for b in bs])
        axes[2].set(xlabel="burstiness b", ylabel="Capacity (req/s)", title="Capacity per burstiness")
        lo = np.nanmin(cap["ci_low"].fillna(cap["capacity"]).to_numpy(float))
        axes[2].set_ylim(max(0.0, lo - 3), None)
        axes[2].legend(fontsize=8, loc="lower right")
        axes[3].axhspan(-1, 1, color="0.85", label="published: about ±1 %")
        axes[3].axhline(0, color="0.4", lw=0.8)
        axes[3].set(xscale="log", xlabel="burstiness b", ylabel="capacity change vs b = 1 (%)",
                    title="Capacity change (seed by seed, 95 % t)")
        _b_ticks(axes[3], bs)
        axes[3].legend(fontsize=8)
        paths.append(save_csv(cap, out, "burstiness_capacity"))
    fig.tight_layout()
    return save_figure_and_table(fig, runs, out, "burstiness", lat, capacity_note(cap) if cap is not None else "",
                                 extra=paths)


def main(argv=None) -> int:
    return run_cli(__doc__, partial(add_common_args, slo=False, qps_for="the latency panels"), burstiness, argv)


if __name__ == "__main__":
    raise SystemExit(main())
