"""Figures for any logged run or set of runs: latency CDFs, per-instance load over time, a summary table.

    python -m analysis.report outputs/default          # writes outputs/default/figures/report.{png,pdf}, summary.csv

Reads run records only (see ``analysis.records``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.common import save_stamped  # noqa: E402
from analysis.records import figures_dir, find_runs, save_csv, summaries_frame  # noqa: E402

SUMMARY_KEYS = ("policy", "qps", "num_instances", "completed", "failed", "request_throughput", "median_ttft_ms",
                "p99_ttft_ms", "median_e2el_ms", "p99_e2el_ms", "median_tpot_ms", "num_preemptions")


def _label(run) -> str:
    s = run.summary
    return f"{s.get('policy', '?')} qps={s.get('qps', '?')}" if len(s) else run.name


def report(root: str | Path) -> list[Path]:
    runs = find_runs(root)
    out = figures_dir(root)
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_ttft, ax_e2e), (ax_run, ax_free) = axes
    for run in runs:
        req = run.requests()
        ok = req[req["status"] == "ok"]
        lab = _label(run)
        for ax, col in ((ax_ttft, "ttft_s"), (ax_e2e, "e2e_s")):
            v = np.sort(ok[col].to_numpy(float))
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, label=lab)
        inst = run.instances()
        if len(inst):
            g = inst.groupby("time_s")
            ax_run.plot(g["num_running"].mean().index, g["num_running"].mean().values, label=f"{lab} running")
            ax_run.plot(g["num_waiting"].mean().index, g["num_waiting"].mean().values, ls="--",
                        label=f"{lab} waiting")
            ax_free.plot(g["free_blocks"].mean().index, g["free_blocks"].mean().values, label=lab)
    ax_ttft.set(xlabel="TTFT (s)", ylabel="CDF", title="Time to first token", xscale="symlog")
    ax_e2e.set(xlabel="End-to-end latency (s)", ylabel="CDF", title="End-to-end latency")
    ax_run.set(xlabel="Time (s)", ylabel="Requests per instance (mean)", title="Running and waiting requests")
    ax_free.set(xlabel="Time (s)", ylabel="Free KV blocks per instance (mean)", title="Free KV blocks")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    paths = save_stamped(fig, runs, out, "report")
    plt.close(fig)
    df = summaries_frame(runs)
    cols = ["run"] + [k for k in SUMMARY_KEYS if k in df.columns]
    paths.append(save_csv(df[cols], out, "summary"))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="a run directory or a directory of runs")
    args = ap.parse_args(argv)
    try:
        paths = report(args.root)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
