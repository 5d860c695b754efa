"""Fig 5 of the paper (prediction accuracy): how well the what-if latency prediction matches the latency a request
really gets, from runs with ``accuracy.sampling_rate > 0`` (sampled requests duplicated to every instance).

    python -m analysis.fig5 outputs/fig5
    python -m analysis.fig5 outputs/fig5 --max-samples 0        # plot every sample, not the first 100

One column per QPS, three rows:

1. running mean of the prediction error ratio |predicted - actual| / actual over the samples (x = sample index;
   a sample's error is the mean over its copies);
2. each sample's actual latencies on every instance (blue), their mean (black) and the actual latency on the instance
   with the lowest prediction, i.e. Block's pick (red);
3. histogram (% of samples) of the rank of Block's pick among the actual latencies (1 = truly fastest).

Runs with different engine configurations (``engine.chunked_prefill`` true/false) go to separate figures labelled
"Chunked prefill" / "Prefill prioritized" (``fig5_chunked_prefill``, ``fig5_prefill_prioritized``; ``fig5`` when
there is only one). CSV: ``fig5.csv`` (per configuration and QPS: samples, mean/median/P90 error ratio, fraction of
samples where the pick was rank 1, mean rank) and ``fig5_ranks.csv`` (the histogram's counts).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.common import (
    save_stamped,
    AnalysisError,
    add_common_args,
    base_label,
    load_runs,
    out_dir,
    policy_name,
    run_cli,
    run_qps,
    theme,
)
from analysis.records import Run, save_csv


def engine_label(run: Run) -> str:
    cp = run.get("engine.chunked_prefill")
    if cp is None:
        return "Engine config unknown"
    return "Chunked prefill" if str(cp).lower() in ("true", "1") else "Prefill prioritized"


def load_accuracy(run: Run) -> pd.DataFrame:
    p = run.path / "accuracy.parquet"
    if not p.is_file():
        return pd.DataFrame()
    return pd.read_parquet(p)


def per_sample(acc: pd.DataFrame) -> pd.DataFrame:
    """One row per sample: mean error ratio over its copies, its actual latencies, their mean, the pick's actual
    latency and the pick's rank (1 + number of copies strictly faster, as in the run summary)."""
    need = {"sample", "predicted_e2e_s", "actual_e2e_s", "block_pick"}
    if not need <= set(acc.columns):
        raise AnalysisError(f"accuracy.parquet lacks columns {sorted(need - set(acc.columns))}")
    ok = acc[np.isfinite(acc["actual_e2e_s"]) & (acc["actual_e2e_s"] > 0)].copy()
    ok["err"] = (ok["predicted_e2e_s"] - ok["actual_e2e_s"]).abs() / ok["actual_e2e_s"]
    rows = []
    for s, g in ok.groupby("sample", sort=True):
        actual = g["actual_e2e_s"].to_numpy(float)
        pick = g.loc[g["block_pick"].astype(bool), "actual_e2e_s"]
        pick_v = float(pick.iloc[0]) if len(pick) else math.nan
        rank = 1 + int((actual < pick_v - 1e-12).sum()) if len(pick) else None
        rows.append({"sample": s, "copies": len(g), "error_ratio": float(g["err"].mean()), "actual": actual,
                     "actual_mean": float(actual.mean()), "pick_actual": pick_v, "rank": rank})
    return pd.DataFrame(rows)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def plot_group(title: str, cols: list[tuple[float, pd.DataFrame]], max_samples: int) -> plt.Figure:
    n = len(cols)
    fig, axes = plt.subplots(3, n, figsize=(4.4 * n + 0.8, 10.5), squeeze=False)
    for j, (q, ps) in enumerate(cols):
        shown = ps.iloc[:max_samples] if max_samples > 0 else ps
        x = np.arange(len(shown))
        running = np.cumsum(shown["error_ratio"].to_numpy()) / (x + 1)
        ax = axes[0, j]
        ax.plot(x, running * 100, color="tab:blue", lw=1.6)
        ax.set(title=f"QPS {q:g}", xlabel="Sample", ylabel="Running mean error (%)" if j == 0 else "")
        ax.set_ylim(bottom=0)
        ax.text(0.98, 0.95, f"mean over all {len(ps)}: {ps['error_ratio'].mean() * 100:.1f}%",
                transform=ax.transAxes, ha="right", va="top", fontsize=9,
                bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})

        ax = axes[1, j]
        xs = np.concatenate([np.full(len(a), i) for i, a in enumerate(shown["actual"])]) if len(shown) else []
        ys = np.concatenate(list(shown["actual"])) if len(shown) else []
        ax.scatter(xs, ys, s=6, color="tab:blue", alpha=0.35, lw=0, label="Actual latency on each instance")
        ax.scatter(x, shown["actual_mean"], s=10, color="black", marker="_", lw=1.4, label="Mean over instances")
        ax.scatter(x, shown["pick_actual"], s=12, color="tab:red", lw=0, label="Block's pick (lowest prediction)")
        ax.set(xlabel="Sample", ylabel="E2E latency (s)" if j == 0 else "")

        ax = axes[2, j]
        ranks = ps["rank"].dropna().astype(int)
        ncopies = int(ps["copies"].max()) if len(ps) else 1
        bins = np.arange(1, ncopies + 1)
        pct = np.array([(ranks == b).sum() for b in bins]) / max(len(ranks), 1) * 100
        ax.bar(bins, pct, color=["tab:red" if b == 1 else "tab:blue" for b in bins], edgecolor="black", lw=0.5)
        ax.set(xlabel="Rank of the pick's actual latency (1 = fastest)", ylabel="Samples (%)" if j == 0 else "")
        ax.set_xticks(bins if len(bins) <= 16 else bins[::2])
        ax.text(0.98, 0.95, f"rank 1: {pct[0]:.0f}%\nmean rank: {ranks.mean():.2f}" if len(ranks) else "no picks",
                transform=ax.transAxes, ha="right", va="top", fontsize=9,
                bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
    longest = max(len(ps) for _, ps in cols)
    right = min(max_samples, longest) if max_samples > 0 else longest
    for j in range(n):
        axes[0, j].set_xlim(-0.5, max(right, 2) - 0.5)
        axes[1, j].set_xlim(-0.5, max(right, 2) - 0.5)
    h, lab = axes[1, 0].get_legend_handles_labels()
    shown_txt = f"first {right} samples in rows 1-2" if right < longest else "all samples"
    fig.tight_layout(rect=(0, 0, 1, 0.955))  # before the suptitle, which tight_layout would make room for again
    fig.suptitle(f"Prediction accuracy: {title} ({shown_txt})", y=1.0, fontweight="bold")
    fig.legend(h, lab, loc="lower center", bbox_to_anchor=(0.5, 0.953), ncol=3, frameon=False, markerscale=2)
    return fig


def fig5(args: argparse.Namespace) -> list[Path]:
    runs = load_runs(args.root, args.filter)
    with_acc = [(r, load_accuracy(r)) for r in runs]
    with_acc = [(r, a) for r, a in with_acc if len(a)]
    if not with_acc:
        raise AnalysisError(f"no run under {args.root} has accuracy samples (accuracy.parquet); run with "
                            "accuracy.sampling_rate > 0, e.g. 0.01")
    theme()
    policies = {policy_name(r) for r, _ in with_acc}
    groups: dict[str, dict[float, list[pd.DataFrame]]] = {}
    for r, a in sorted(with_acc, key=lambda t: str(t[0].path)):
        g = engine_label(r) + (f", {base_label(policy_name(r))}" if len(policies) > 1 else "")
        groups.setdefault(g, {}).setdefault(run_qps(r), []).append(a)
    out = out_dir(args)
    paths: list[Path] = []
    rows, rank_rows = [], []
    for g in sorted(groups):
        cols = []
        for q in sorted(groups[g]):
            if args.qps_list and not any(abs(q - t) < 1e-9 for t in args.qps_list):
                continue
            parts = []
            offset = 0
            for a in groups[g][q]:  # several runs at one point: their samples are numbered one after another
                a = a.copy()
                a["sample"] = a["sample"] + offset
                offset = int(a["sample"].max()) + 1
                parts.append(a)
            acc = pd.concat(parts, ignore_index=True)
            ps = per_sample(acc)
            if ps.empty:
                continue
            cols.append((q, ps))
            ok = acc[np.isfinite(acc["actual_e2e_s"]) & (acc["actual_e2e_s"] > 0)]
            err = (ok["predicted_e2e_s"] - ok["actual_e2e_s"]).abs() / ok["actual_e2e_s"]
            ranks = ps["rank"].dropna().astype(int)
            rows.append({"config": g, "qps": q, "samples": len(ps), "samples_with_pick": len(ranks),
                         "copies_per_sample": int(ps["copies"].max()), "mean_error_ratio": float(err.mean()),
                         "median_error_ratio": float(err.median()), "p90_error_ratio": float(err.quantile(0.9)),
                         "fraction_rank1": float((ranks == 1).mean()) if len(ranks) else math.nan,
                         "mean_rank": float(ranks.mean()) if len(ranks) else math.nan})
            for b in range(1, int(ps["copies"].max()) + 1):
                c = int((ranks == b).sum())
                rank_rows.append({"config": g, "qps": q, "rank": b, "count": c,
                                  "percent": c / max(len(ranks), 1) * 100})
        if not cols:
            continue
        fig = plot_group(g, cols, args.max_samples)
        stem = "fig5" if len(groups) == 1 else f"fig5_{_slug(g)}"
        paths += save_stamped(fig, [r for r, _ in with_acc if engine_label(r) in g], out, stem)
        plt.close(fig)
    if not rows:
        raise AnalysisError("no accuracy samples with a finite actual latency (or none at the QPS asked for)")
    paths.append(save_csv(pd.DataFrame(rows), out, "fig5"))
    paths.append(save_csv(pd.DataFrame(rank_rows), out, "fig5_ranks"))
    return paths


def _args(ap: argparse.ArgumentParser) -> None:
    add_common_args(ap, slo=False)
    ap.add_argument("--qps-list", type=float, nargs="+", default=None, metavar="QPS",
                    help="only these QPS values (default: every QPS with accuracy samples)")
    ap.add_argument("--max-samples", type=int, default=100,
                    help="samples shown in the first two rows (the paper: the first 100; 0 = all). The histogram "
                         "and the CSV always use every sample")


def main(argv=None) -> int:
    return run_cli(__doc__, _args, fig5, argv)


if __name__ == "__main__":
    raise SystemExit(main())
