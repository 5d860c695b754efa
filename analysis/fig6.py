"""Fig 6 of the paper (main comparison): latency, throughput and capacity vs QPS per policy, plus CDFs, cluster load
over time and scheduler overhead.

    python -m analysis.fig6 outputs/fig6                       # SLO from the runs' slo.ttft_s (else 3 s)
    python -m analysis.fig6 outputs/fig6 --slo 10 --qps-list 20 28 36 --load-qps 36

Writes under ``<dir>/figures/``:

- ``fig6_qps.{png,pdf}``: 2x3 panels: average and P99 E2E latency, average and P99 TTFT (with the SLO line),
  steady-state request throughput vs QPS (requests finished per second from the arrival of the 10 % quantile
  request plus the median E2E latency to the arrival of the 90 % quantile request: warm-up and drain dropped,
  ``analysis.common.steady_throughput``; completions over the
  whole run, ``request_throughput`` in the CSV, sit below the offered load because of the drain), and the capacity
  bars (max QPS before the P99 TTFT crosses the SLO, linear interpolation per seed; with several seeds the bar is
  their mean and the error bar its 95 % Student-t interval; hatched bars are bounds: the SLO was not crossed inside
  the measured QPS range);
- ``fig6_cdf.{png,pdf}``: TTFT and E2E CDFs at up to five QPS values (those present closest to 20/24/28/32/36);
- ``fig6_load.{png,pdf}``: mean and variance of free KV blocks across instances, and cumulative preemptions, over
  time, Gaussian-smoothed, one line per policy at one QPS (default: the highest present);
- ``fig6_overhead.{png,pdf}``: scheduler decision time (mean and P99) vs QPS, as a share of E2E latency, and per
  request (smoothed) at the load-panel QPS;
- ``fig6_summary.csv`` (one row per policy label and QPS), ``fig6_capacity.csv`` (one row per policy label),
  ``fig6_load.csv`` (the smoothed timelines).

Every figure carries a line saying what it is (simulated or measured, device and profile, requests per point,
seeds: ``analysis.common.stamp``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.common import (
    AnalysisError,
    add_common_args,
    capacity,
    comparable_runs,
    ecdf,
    gaussian_smooth,
    label_sort_key,
    label_style,
    load_runs,
    STEADY_CAPTION,
    ok_requests,
    out_dir,
    pick_qps,
    plain_log_axis,
    policy_labels,
    run_cli,
    save_stamped,
    seeds_capacity,
    shared_legend,
    slo_from_runs,
    steady_throughput,
    summary_table,
    theme,
)
from analysis.records import Run, save_csv

NUMERIC = ["achieved_qps", "completed", "failed", "mean_e2e_s", "p99_e2e_s", "mean_ttft_s", "p99_ttft_s",
           "median_ttft_s", "request_throughput", "steady_throughput", "output_throughput", "num_preemptions",
           "mean_overhead_ms", "p99_overhead_ms", "overhead_pct_e2e"]


def _overhead_pct(req: pd.DataFrame) -> float:
    ok = ok_requests(req)
    if "decision_ms" not in ok.columns or ok.empty:
        return math.nan
    e2e_ms = ok["e2e_s"].to_numpy(float) * 1e3
    d = ok["decision_ms"].to_numpy(float)
    m = np.isfinite(e2e_ms) & np.isfinite(d) & (e2e_ms > 0)
    return float(np.mean(d[m] / e2e_ms[m]) * 100) if m.any() else math.nan


def per_run_table(runs: list[Run], labels: dict[Path, str]) -> pd.DataFrame:
    """One row per run (``summary_table``) plus the overhead share of E2E and the steady-state throughput."""
    per_run = summary_table(runs, labels)
    by_path = {str(r.path): r for r in runs}
    reqs = [by_path[p].requests() for p in per_run["run"]]
    per_run["overhead_pct_e2e"] = [_overhead_pct(q) for q in reqs]
    per_run["steady_throughput"] = [steady_throughput(q) for q in reqs]
    return per_run


def per_point_table(runs: "list[Run] | pd.DataFrame", labels: dict[Path, str] | None = None) -> pd.DataFrame:
    """One row per (policy label, QPS); several runs at one point (e.g. seeds) are averaged (``runs`` counts them)."""
    per_run = runs.copy() if isinstance(runs, pd.DataFrame) else per_run_table(runs, labels)
    agg = {c: "mean" for c in NUMERIC if c in per_run.columns}
    agg.update({"policy": "first", "k": "first", "run": "count"})
    for c in NUMERIC:
        per_run[c] = pd.to_numeric(per_run[c], errors="coerce")
    tab = per_run.groupby(["label", "qps"], as_index=False).agg(agg).rename(columns={"run": "runs"})
    tab["_o"] = tab["label"].map(label_sort_key)
    return tab.sort_values(["_o", "qps"]).drop(columns="_o").reset_index(drop=True)


def capacity_table(tab: pd.DataFrame, slo_s: float) -> pd.DataFrame:
    """One row per policy label. ``tab``: one row per run (with ``seed``) or per point. Capacity is found per seed
    (each seed's own P99-TTFT curve) and averaged; ``ci_low``/``ci_high`` are the 95 % Student-t interval over the
    seeds (NaN with one seed, or when a seed is a bound: ``analysis.common.seeds_capacity``)."""
    rows = []
    for lab, g in tab.groupby("label", sort=False):
        seeds = g["seed"].astype(str) if "seed" in g.columns else pd.Series("0", index=g.index)
        caps = [capacity(gs["qps"].to_numpy(), pd.to_numeric(gs["p99_ttft_s"], errors="coerce").to_numpy(), slo_s)
                for _, gs in g.groupby(seeds, sort=True)]
        sc = seeds_capacity(caps)
        rows.append({"label": lab, "policy": g["policy"].iloc[0], "capacity_qps": sc.qps,
                     "ci_low": sc.low, "ci_high": sc.high, "seeds": len(caps), "bound": sc.bound,
                     "capacity_text": sc.text(), "slo_s": slo_s, "qps_min": min(c.qps_min for c in caps),
                     "qps_max": max(c.qps_max for c in caps), "points": max(c.points for c in caps),
                     "crossings": max(c.crossings for c in caps), "note": sc.note})
    return pd.DataFrame(rows)


def searched_capacities(cap: pd.DataFrame, root: str, slo_s: float) -> tuple[pd.DataFrame, str]:
    """``cap`` with each policy's capacity taken from its bisection search under ``root`` (``python -m
    experiments.capacity``, e.g. the capacity_refine preset: mean over seeds and its t-interval) instead of the
    sweep's interpolation; and the stamp's line saying which is which. A policy with no search there keeps its
    interpolated bar (marked "interp."); searches at another SLO are refused, as are two searches of one policy."""
    from analysis.capacity_refine import load_capacities

    found = load_capacities(root)
    slos = sorted({float(s) for s in found["slo_s"].dropna()})
    if any(abs(s - slo_s) > 1e-9 for s in slos):
        raise AnalysisError(f"the capacity searches under {root} are for a {'/'.join(f'{s:g}' for s in slos)} s "
                            f"SLO, the figure's is {slo_s:g} s (--slo)")
    dup = found["policy"][found["policy"].duplicated()].unique()
    if len(dup):
        raise AnalysisError(f"several capacity searches of {', '.join(dup)} under {root}: pass a folder with one "
                            "search per policy")
    by_policy = found.set_index("policy")
    cap = cap.copy()
    kept = []
    for i, row in cap.iterrows():
        if row["policy"] not in by_policy.index:
            kept.append(row["label"])
            cap.loc[i, "capacity_text"] = f"{row['capacity_text']} interp."
            continue
        s = by_policy.loc[row["policy"]]
        cap.loc[i, ["capacity_qps", "ci_low", "ci_high", "seeds"]] = [s["capacity"], s["ci_low"], s["ci_high"],
                                                                       s["seeds"]]
        cap.loc[i, "bound"] = None
        cap.loc[i, "capacity_text"] = f"{s['capacity']:.1f}"
        cap.loc[i, "note"] = f"bisection, {int(s['seeds'])} seeds: {s['path']}"
    seeds = sorted({int(x) for x in found["seeds"].dropna()})
    tol = sorted({float(x) for x in found["tol"].dropna()}) if "tol" in found.columns else []
    nreq = sorted({int(x) for x in found["num_requests"].dropna()}) if "num_requests" in found.columns else []
    how = (f"capacity: bisection to {'/'.join(f'{x:g}' for x in tol) or '?'} QPS over {'/'.join(map(str, seeds))} "
           f"seeds (mean, 95 % t-interval), {'/'.join(map(str, nreq)) or '?'} requests per probe, from the searches "
           f"in {root}"
           + (f"; {', '.join(kept)}: linear interpolation between this sweep's QPS points" if kept else ""))
    return cap, how


# ------------------------------------------------------------------------------------------------ figures
def plot_qps(tab: pd.DataFrame, cap: pd.DataFrame, slo_s: float, styles: dict) -> plt.Figure:
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4))
    panels = [
        (axes[0, 0], "mean_e2e_s", "Average E2E latency (s)", "Average request latency"),
        (axes[0, 1], "p99_e2e_s", "P99 E2E latency (s)", "P99 request latency"),
        (axes[0, 2], "mean_ttft_s", "Average TTFT (s)", "Average TTFT"),
        (axes[1, 0], "p99_ttft_s", "P99 TTFT (s)", "P99 TTFT"),
        (axes[1, 1], "steady_throughput", "Steady-state throughput (req/s)", "Request throughput"),
    ]
    for ax, col, ylabel, title in panels:
        for lab, g in tab.groupby("label", sort=False):
            st = styles[lab]
            ax.plot(g["qps"], g[col], label=lab, color=st["color"], marker=st["marker"], ls=st["ls"], ms=5, lw=1.6)
        ax.set(xlabel="QPS (req/s)", ylabel=ylabel, title=title)
    axes[1, 0].axhline(slo_s, color="black", ls="--", lw=1.2, label=f"SLO (P99 TTFT {slo_s:g} s)")
    for ax in (axes[0, 2], axes[1, 0]):
        plain_log_axis(ax)
    lo, hi = tab["qps"].min(), tab["qps"].max()
    axes[1, 1].plot([lo, hi], [lo, hi], color="0.6", ls=":", lw=1, label="_offered")
    axes[1, 1].text(hi, hi, " offered", color="0.4", fontsize=8, va="center")
    axes[1, 1].set_xlabel("QPS (req/s)\n" + STEADY_CAPTION.replace(" to the", "\nto the"), fontsize=8)

    ax = axes[1, 2]
    x = np.arange(len(cap))
    for i, row in cap.reset_index(drop=True).iterrows():
        v = row["capacity_qps"]
        if not math.isfinite(v):
            continue
        bound = row["bound"]
        ax.bar(i, v, color=styles[row["label"]]["color"], edgecolor="black", lw=0.6,
               hatch={"lower": "//", "upper": "xx"}.get(bound))
        top = v
        if math.isfinite(row.get("ci_low", math.nan)) and math.isfinite(row.get("ci_high", math.nan)):
            ax.errorbar(i, v, yerr=[[v - row["ci_low"]], [row["ci_high"] - v]], color="black", capsize=4, lw=1.2)
            top = row["ci_high"]
        ax.text(i, top, row["capacity_text"], ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, cap["label"], rotation=30, ha="right")
    tops = np.fmax(cap["capacity_qps"].to_numpy(float), cap["ci_high"].to_numpy(float))
    ymax = np.nanmax(tops) if np.isfinite(tops).any() else 1
    ax.set_ylim(0, ymax * 1.15)
    seeds = int(cap["seeds"].max()) if len(cap) else 1
    if seeds > 1:
        ax.text(0.01, 0.99, f"mean of {seeds} seeds' capacities, error bar: 95 % t-interval",
                transform=ax.transAxes, fontsize=8, va="top", color="0.3")
    ax.set(ylabel="Capacity (req/s)", title=f"Max QPS before the SLO (P99 TTFT ≤ {slo_s:g} s)")
    if (cap["bound"].isin(["lower", "upper"])).any():
        ax.set_xlabel("hatched: a bound, the SLO is not crossed in the measured QPS range (// at least, xx below)",
                      fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    shared_legend(fig, axes[:, :2], y=0.955)
    return fig


def plot_cdfs(runs_at: dict[float, list[tuple[str, Run]]], styles: dict) -> plt.Figure:
    qs = sorted(runs_at)
    n = len(qs)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 1, 6.6), squeeze=False)
    for j, q in enumerate(qs):
        for lab, run in sorted(runs_at[q], key=lambda t: label_sort_key(t[0])):
            ok = ok_requests(run.requests())
            st = styles[lab]
            for i, col in enumerate(("ttft_s", "e2e_s")):
                v, p = ecdf(ok[col].to_numpy(float))
                if v.size:
                    axes[i, j].plot(v, p, label=lab, color=st["color"], ls=st["ls"], lw=1.5)
        axes[0, j].set(title=f"QPS {q:g}", xlabel="TTFT (s)")
        plain_log_axis(axes[0, j], "x")
        axes[1, j].set(xlabel="E2E latency (s)")
        for i in range(2):
            axes[i, j].set_ylim(0, 1.01)
            axes[i, j].set_ylabel("CDF" if j == 0 else "")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    shared_legend(fig, axes, y=0.935)
    return fig


def load_timelines(runs: list[tuple[str, Run]], smooth_s: float) -> pd.DataFrame:
    frames = []
    for lab, run in runs:
        inst = run.instances()
        if inst.empty:
            continue
        g = inst.groupby("time_s")
        t = np.asarray(sorted(inst["time_s"].unique()), float)
        mean = g["free_blocks"].mean().reindex(t).to_numpy(float)
        var = g["free_blocks"].var(ddof=0).reindex(t).to_numpy(float)
        pre = g["num_preemptions"].sum().reindex(t).to_numpy(float)
        dt = float(np.median(np.diff(t))) if t.size > 1 else 1.0
        sigma = smooth_s / dt if dt > 0 else 0.0
        frames.append(pd.DataFrame({
            "label": lab, "time_s": t - t[0], "free_blocks_mean": mean, "free_blocks_var": var,
            "preemptions_cum": pre, "free_blocks_mean_smooth": gaussian_smooth(mean, sigma),
            "free_blocks_var_smooth": gaussian_smooth(var, sigma),
            "preemptions_cum_smooth": gaussian_smooth(pre, sigma),
        }))
    if not frames:
        raise AnalysisError("the runs have no instances.parquet samples for the load timelines")
    return pd.concat(frames, ignore_index=True)


def plot_load(tl: pd.DataFrame, qps: float, smooth_s: float, styles: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    cols = [("free_blocks_mean_smooth", "Free KV blocks (mean over instances)", "Free GPU blocks: mean"),
            ("free_blocks_var_smooth", "Free KV blocks (variance over instances)", "Free GPU blocks: variance"),
            ("preemptions_cum_smooth", "Preemptions (cumulative, all instances)", "Preemptions")]
    for ax, (col, ylabel, title) in zip(axes, cols):
        for lab, g in sorted(tl.groupby("label", sort=False), key=lambda t: label_sort_key(t[0])):
            st = styles[lab]
            ax.plot(g["time_s"], g[col], label=lab, color=st["color"], ls=st["ls"], lw=1.5)
        ax.set(xlabel="Time (s)", ylabel=ylabel, title=title)
    fig.tight_layout(rect=(0, 0, 1, 0.86))  # before the suptitle, which tight_layout would make room for again
    fig.suptitle(f"Cluster load over time at QPS {qps:g} (Gaussian smoothing, σ = {smooth_s:g} s)", y=1.0)
    shared_legend(fig, axes, y=0.865)
    return fig


def plot_overhead(tab: pd.DataFrame, runs_q: list[tuple[str, Run]], qps: float, sigma: float,
                  styles: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    for lab, g in tab.groupby("label", sort=False):
        st = styles[lab]
        axes[0].plot(g["qps"], g["mean_overhead_ms"], label=lab, color=st["color"], marker=st["marker"], ms=5)
        axes[0].plot(g["qps"], g["p99_overhead_ms"], color=st["color"], marker=st["marker"], ms=3, ls=":",
                     label="_p99")
        axes[1].plot(g["qps"], g["overhead_pct_e2e"], label=lab, color=st["color"], marker=st["marker"], ms=5)
    axes[0].set(xlabel="QPS (req/s)", ylabel="Scheduling decision time (ms)",
                title="Scheduler overhead (solid: mean, dotted: P99)")
    axes[1].set(xlabel="QPS (req/s)", ylabel="Overhead / E2E latency (%)",
                title="Overhead as a share of E2E (mean)")
    for lab, run in sorted(runs_q, key=lambda t: label_sort_key(t[0])):
        req = ok_requests(run.requests()).sort_values("id")
        if "decision_ms" not in req.columns or req.empty:
            continue
        st = styles[lab]
        axes[2].plot(req["id"], gaussian_smooth(req["decision_ms"].to_numpy(float), sigma), label=lab,
                     color=st["color"], ls=st["ls"], lw=1.3)
    axes[2].set(xlabel="Request id", ylabel="Scheduling decision time (ms)",
                title=f"Per request at QPS {qps:g} (smoothed, σ = {sigma:g} req)")
    for ax in axes:
        plain_log_axis(ax)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    shared_legend(fig, axes, y=0.88)
    return fig


# ------------------------------------------------------------------------------------------------ main
def fig6(args: argparse.Namespace) -> list[Path]:
    runs = comparable_runs(load_runs(args.root, args.filter), "fig6")
    need = ("p99_ttft_ms", "mean_e2el_ms", "request_throughput")
    runs = [r for r in runs if all(k in r.summary for k in need)]
    if not runs:
        raise AnalysisError(f"no run under {args.root} has the latency summary Fig 6 needs ({', '.join(need)})")
    theme()
    slo_s = slo_from_runs(runs, args.slo)
    labels = policy_labels(runs)
    styles = label_style(labels.values())
    out = out_dir(args)
    per_run = per_run_table(runs, labels)
    tab = per_point_table(per_run)
    cap = capacity_table(per_run, slo_s)
    cap["_o"] = cap["label"].map(label_sort_key)
    cap = cap.sort_values("_o").drop(columns="_o").reset_index(drop=True)
    n_seeds = int(cap["seeds"].max())
    how = (f"capacity: the QPS where P99 TTFT crosses {slo_s:g} s, linear interpolation between the QPS points "
           + (f"per seed, mean of {n_seeds} seeds with a 95 % t-interval" if n_seeds > 1 else "of one seed (no interval)")
           + "; to 0.1 QPS by bisection over seeds: python -m experiments.capacity (experiment=capacity_refine)")
    if args.capacity_from:
        cap, how = searched_capacities(cap, args.capacity_from, slo_s)
    paths = []
    fig = plot_qps(tab, cap, slo_s, styles)
    paths += save_stamped(fig, runs, out, "fig6_qps", how)
    plt.close(fig)

    # one run per (label, qps) for the per-request panels: the first by path when several (seeds)
    by_point: dict[tuple[str, float], Run] = {}
    for r in sorted(runs, key=lambda r: str(r.path)):
        by_point.setdefault((labels[r.path], float(r.summary.get("qps", r.get("workload.qps")))), r)
    present = sorted({q for _, q in by_point})
    cdf_qps = pick_qps(present, args.qps_list)
    runs_at = {q: [(lab, r) for (lab, qq), r in by_point.items() if qq == q] for q in cdf_qps}
    fig = plot_cdfs(runs_at, styles)
    paths += save_stamped(fig, [r for q in runs_at.values() for _, r in q], out, "fig6_cdf",
                          "one run per policy and QPS (the first seed when several)")
    plt.close(fig)

    load_q = max(present) if args.load_qps is None else min(present, key=lambda p: abs(p - args.load_qps))
    runs_q = [(lab, r) for (lab, qq), r in by_point.items() if qq == load_q]
    tl = load_timelines(runs_q, args.smooth_s)
    fig = plot_load(tl, load_q, args.smooth_s, styles)
    paths += save_stamped(fig, [r for _, r in runs_q], out, "fig6_load")
    plt.close(fig)

    fig = plot_overhead(tab, runs_q, load_q, args.overhead_sigma, styles)
    paths += save_stamped(fig, runs, out, "fig6_overhead",
                          "decision time = wall time of the scheduler's decision on the machine that ran the runs")
    plt.close(fig)

    paths.append(save_csv(tab, out, "fig6_summary"))
    paths.append(save_csv(cap, out, "fig6_capacity"))
    tl.insert(1, "qps", load_q)
    paths.append(save_csv(tl, out, "fig6_load"))
    return paths


def _args(ap: argparse.ArgumentParser) -> None:
    add_common_args(ap)
    ap.add_argument("--capacity-from", default=None, metavar="DIR",
                    help="draw each policy's capacity from its bisection search under DIR (python -m "
                         "experiments.capacity, e.g. -m experiment=capacity_refine: several seeds, 0.1 QPS) instead "
                         "of interpolating this sweep's QPS points")
    ap.add_argument("--qps-list", type=float, nargs="+", default=None, metavar="QPS",
                    help="QPS values for the CDF panels (the closest present are used; default: all when at most 5 "
                         "are present, else those closest to 20 24 28 32 36)")
    ap.add_argument("--load-qps", type=float, default=None,
                    help="QPS for the load-over-time and per-request overhead panels (default: the highest present)")
    ap.add_argument("--smooth-s", type=float, default=5.0,
                    help="Gaussian smoothing of the load timelines, sigma in seconds (default 5; 0 = none)")
    ap.add_argument("--overhead-sigma", type=float, default=20.0,
                    help="Gaussian smoothing of the per-request overhead, sigma in requests (default 20)")


def main(argv=None) -> int:
    return run_cli(__doc__, _args, fig6, argv)


if __name__ == "__main__":
    raise SystemExit(main())
