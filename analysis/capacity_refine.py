"""Capacity refine (Block's artifact): capacity per configuration from the bisection searches of
``python -m experiments.capacity`` (to ``capacity.tol``, several seeds), drawn as bars with their 95 % t-interval.

    python -m experiments.capacity -m experiment=capacity_refine       # the searches (see conf/experiment/)
    python -m analysis.capacity_refine outputs/capacity_refine

Writes ``<dir>/figures/capacity_refine.{png,pdf}`` (one bar per configuration: the mean of its seeds' capacities,
the error bar its Student-t interval, the dots the seeds) and ``capacity_refine.csv`` (``analysis.capacity.
capacity_results`` plus the label). The other artifact modules (nablation, burstiness, error_heatmap) use
``load_capacities`` and ``draw_capacity_bars`` from here.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.capacity import capacity_results
from analysis.common import (
    POLICY_COLORS,
    AnalysisError,
    add_common_args,
    base_label,
    label_sort_key,
    main_qps,
    out_dir,
    paired_over_seeds,
    run_cli,
    save_figure_and_table,
    theme,
    widest_searches,
)
from analysis.records import Run, find_runs

# keys of capacity.json's config/overrides that tell searches apart (policy first), with short legend names
LABEL_KEYS = {"policy.name": "", "policy.k": "k", "block_k": "k", "workload.burstiness": "b",
              "policy.length_noise_pct": "len err %", "policy.latency_noise_pct": "lat err %",
              "engine.max_num_seqs": "batch", "engine.chunk_size": "chunk", "workload.num_requests": "requests",
              "slo_s": "SLO"}


def load_capacities(root: str | Path, filters: Sequence[str] = ()) -> pd.DataFrame:
    """The capacity searches under ``root`` with a ``label`` column; AnalysisError when there is none."""
    df = capacity_results(root)
    for f in filters:
        k, _, v = f.partition("=")
        if k in df.columns:
            df = df[df[k].astype(str) == v]
    if df.empty:
        raise AnalysisError(f"no capacity.json under {root}: run python -m experiments.capacity first "
                            "(e.g. python -m experiments.capacity -m experiment=capacity_refine)")
    df = widest_searches(df).copy()  # a search re-run with more seeds: its wider capacity.json only
    # map(str), not astype(str): pandas' string dtype keeps NaN (k = null, all instances) as missing, not "nan"
    varying = [k for k in LABEL_KEYS if k in df.columns and df[k].map(str).nunique() > 1]
    if "block_k" in varying and "policy.k" in varying:
        varying.remove("block_k")

    def label(row: pd.Series) -> str:
        name = base_label(str(row.get("policy.name", "?")))
        extra = [f"{LABEL_KEYS[k]}={'all' if k == 'policy.k' and pd.isna(row[k]) else _num(row[k])}"
                 for k in varying if k != "policy.name"]
        return name + (f" ({', '.join(extra)})" if extra else "")

    df["label"] = df.apply(label, axis=1)
    df["_o"] = df["label"].map(label_sort_key)
    return df.sort_values("_o").drop(columns="_o").reset_index(drop=True)


def _num(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(int(f)) if f.is_integer() else f"{f:g}"


def draw_capacity_bars(ax, df: pd.DataFrame, x: Sequence[float] | None = None, width: float = 0.8,
                       color=None, label: str | None = None, annotate: bool = True) -> None:
    """Bars of ``df.capacity`` (mean over seeds) with the t-interval as error bars and each seed as a dot."""
    x = np.arange(len(df)) if x is None else np.asarray(x, float)
    for xi, (_, row) in zip(x, df.iterrows()):
        v = row["capacity"]
        if not math.isfinite(v):
            continue
        c = color if color is not None else POLICY_COLORS.get(str(row.get("policy.name")), "0.6")
        ax.bar(xi, v, width=width, color=c, edgecolor="black", lw=0.6, label=label)
        label = None
        top = v
        if math.isfinite(row.get("ci_low", math.nan)) and math.isfinite(row.get("ci_high", math.nan)):
            ax.errorbar(xi, v, yerr=[[v - row["ci_low"]], [row["ci_high"] - v]], color="black", capsize=4, lw=1.2)
            top = row["ci_high"]
        seeds = [float(s) for s in str(row.get("per_seed", "")).split(";") if s not in ("", "none")]
        if len(seeds) > 1:
            ax.scatter(np.full(len(seeds), xi) + np.linspace(-width / 5, width / 5, len(seeds)), seeds, s=9,
                       color="black", alpha=0.6, zorder=3)
        if annotate:
            half = (row["ci_high"] - row["ci_low"]) / 2 if math.isfinite(row.get("ci_high", math.nan)) else None
            ax.text(xi, top, f"{v:.1f}" + (f"±{half:.1f}" if half is not None else ""), ha="center",
                    va="bottom", fontsize=7.5)


def capacity_note(df: pd.DataFrame) -> str:
    seeds = sorted({int(s) for s in df["seeds"].dropna()})
    tol = sorted({float(t) for t in df["tol"].dropna()}) if "tol" in df.columns else []
    slo = sorted({float(s) for s in df["slo_s"].dropna()})
    return (f"capacity: bisection to {', '.join(f'{t:g}' for t in tol) or '?'} QPS, P99 TTFT SLO "
            f"{', '.join(f'{s:g}' for s in slo)} s, mean of {'/'.join(map(str, seeds))} seeds, "
            "error bar: 95 % Student-t interval, dots: seeds")


def probe_dir_names(root: str | Path) -> set[str]:
    """The folder names of the runs that capacity searches under ``root`` probed (their ``capacity.json``)."""
    names: set[str] = set()
    for f in Path(root).rglob("capacity.json"):
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for seed in r.get("seeds") or []:
            names.update(Path(str(p.get("run_dir"))).name for p in seed.get("probes") or [] if p.get("run_dir"))
    return names


def sweep_qps(runs: Sequence[Run], root: str | Path) -> float:
    """``main_qps`` over the runs no capacity search probed (all runs when every one is a probe).

    A full search probes every configuration at its bracket (16 and 40 QPS) and its first midpoints at seed 0, so the
    probes' QPS tie with (or outnumber) the sweep's own QPS 30, and the latency panels would show QPS 16."""
    probes = probe_dir_names(root)
    return main_qps([r for r in runs if Path(r.path).name not in probes] or runs)


def probe_runs(root: str | Path) -> list[Run]:
    """The completed probe runs under ``root`` (for the figure's stamp); [] when there is none."""
    try:
        return find_runs(root)
    except FileNotFoundError:
        return []


def gains_over_llumnix(df: pd.DataFrame) -> pd.DataFrame:
    """Each search's capacity minus Llumnix-'s, seed by seed over the seeds both searched, with its 95 % t-interval
    (``gain_over_llumnix_qps``, ``gain_ci_low``, ``gain_ci_high``): the seeds move both alike (the same requests),
    so the gain is much tighter than the two intervals. Only when exactly one Llumnix- search is there (else which
    one is the reference is a guess): the frame is returned unchanged."""
    base = df[df["policy"] == "llumnix"] if "policy" in df.columns else df.iloc[:0]
    if len(base) != 1:
        return df
    gains = [paired_over_seeds(row, base.iloc[0], lambda ours, theirs: ours - theirs) for _, row in df.iterrows()]
    return df.assign(gain_over_llumnix_qps=[g.mean for g in gains], gain_ci_low=[g.low for g in gains],
                     gain_ci_high=[g.high for g in gains])


PUBLISHED_TOLERANCE_QPS = 0.3  # Block's artifact (AE.md, systor-ae): a capacity is accurate to +-0.3 QPS per run


def capacity_refine(args: argparse.Namespace) -> list[Path]:
    df = load_capacities(args.root, args.filter)
    theme()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(df) + 2), 4.6))
    draw_capacity_bars(ax, df)
    ax.set_xticks(np.arange(len(df)), df["label"], rotation=30, ha="right")
    tops = np.fmax(df["capacity"].to_numpy(float), df["ci_high"].to_numpy(float))
    ax.set_ylim(0, np.nanmax(tops) * 1.15 if np.isfinite(tops).any() else 1)
    ax.set(ylabel="Capacity (req/s)", title="Max QPS within the P99 TTFT SLO")
    fig.tight_layout()
    out = out_dir(args)
    df = gains_over_llumnix(df)
    # the seeds' spread against the artifact's stated tolerance: a half-interval wider than it means one run's
    # capacity is not the configuration's
    df["half_interval"] = (df["ci_high"] - df["ci_low"]) / 2
    df["published_tolerance"] = PUBLISHED_TOLERANCE_QPS
    note = (capacity_note(df) + f"; the artifact's published tolerance: +-{PUBLISHED_TOLERANCE_QPS:g} QPS per run"
            + (f" (our half-intervals {df['half_interval'].min():.2f}-{df['half_interval'].max():.2f})"
               if df["half_interval"].notna().any() else ""))
    return save_figure_and_table(fig, probe_runs(args.root), out, "capacity_refine", df, note)


def main(argv=None) -> int:
    return run_cli(__doc__, partial(add_common_args, slo=False), capacity_refine, argv)


if __name__ == "__main__":
    raise SystemExit(main())
