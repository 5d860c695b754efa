"""Block's artifact, Llama-2-70B with TP 4 on two A100-40GB instances: Block against full Llumnix (dispatch plus live
migration, ``llumnix_full``) and Llumnix's dispatch alone (Llumnix-): mean end-to-end latency against QPS, with the
published points (full Llumnix 89,027 ms, Block 7,505 ms, both at QPS 36) drawn beside ours, and what migration did.

    python -m experiments.run -m experiment=llumnix_full
    python -m analysis.llumnix_full outputs/llumnix_full

Writes ``llumnix_full.{png,pdf}`` (left: mean latency, log scale; right: migrations per run and GB moved per GPU)
and ``llumnix_full.csv`` (one row per policy and QPS, the mean over seeds) under ``<root>/figures/``.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from analysis.common import (
    add_common_args,
    label_sort_key,
    label_style,
    out_dir,
    plain_log_axis,
    policy_labels,
    policy_name,
    run_cli,
    run_qps,
    runs_with_summary,
    save_figure_and_table,
    shared_legend,
    theme,
)

# Block's artifact (AE.md, systor-ae branch): mean latency in ms at QPS 36
PUBLISHED = pd.DataFrame([
    {"policy": "llumnix_full", "qps": 36.0, "mean_e2el_ms": 89027.0},
    {"policy": "block_oracle", "qps": 36.0, "mean_e2el_ms": 7505.0},
])
_COLUMNS = ("completed", "mean_e2el_ms", "p99_e2el_ms", "mean_ttft_ms", "p99_ttft_ms", "num_migrations",
            "num_migrations_aborted", "migration_bytes", "mean_migration_downtime_ms")


def summary_table(runs) -> pd.DataFrame:
    """One row per (label, QPS): the mean over the runs (seeds) of the latency and migration figures."""
    labels = policy_labels(runs)
    rows = []
    for r in runs:
        row = {"label": labels[r.path], "policy": policy_name(r), "qps": run_qps(r),
               "num_requests": r.summary.get("num_requests"), "seed": r.summary.get("seed")}
        for k in _COLUMNS:
            v = r.summary.get(k)
            row[k] = float(v) if v is not None else (0.0 if k.startswith(("num_migr", "migration")) else None)
        rows.append(row)
    df = pd.DataFrame(rows)
    agg = {k: "mean" for k in _COLUMNS}
    agg.update({"num_requests": "first", "policy": "first", "seed": "count"})
    out = df.groupby(["label", "qps"], as_index=False).agg(agg).rename(columns={"seed": "seeds"})
    out["_o"] = out["label"].map(label_sort_key)
    return out.sort_values(["_o", "qps"]).drop(columns="_o").reset_index(drop=True)


def plot(tab: pd.DataFrame) -> plt.Figure:
    styles = label_style(tab["label"])
    fig, (ax, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for lab, g in tab.groupby("label", sort=False):
        st = styles[lab]
        ax.plot(g["qps"], g["mean_e2el_ms"] / 1e3, color=st["color"], marker=st["marker"], ls=st["ls"], label=lab)
        if (g["num_migrations"] > 0).any():
            ax_m.plot(g["qps"], g["num_migrations"], color=st["color"], marker=st["marker"], label=lab)
            ax_b = ax_m.twinx()
            ax_b.plot(g["qps"], g["migration_bytes"] / 1e9, color=st["color"], ls=":", marker="", label="_bytes")
            ax_b.set_ylabel("GB moved per GPU (dotted)")
            ax_b.grid(False)
    policy_of = dict(zip(tab["label"], tab["policy"]))
    for _, p in PUBLISHED.iterrows():
        labs = [lab for lab, pol in policy_of.items() if pol == p["policy"]]
        st = styles[labs[0]] if labs else {"color": "black", "marker": "o"}
        name = "published: " + (labs[0] if labs else p["policy"])
        ax.scatter([p["qps"]], [p["mean_e2el_ms"] / 1e3], s=110, facecolors="none", edgecolors=st["color"],
                   marker=st["marker"], linewidths=2, zorder=5, label=name)
    ax.set_xlabel("QPS (whole cluster)")
    ax.set_ylabel("mean end-to-end latency (s)")
    ax.set_title("Llama-2-70B, TP 4, 2 x A100-40GB")
    plain_log_axis(ax)
    ax_m.set_xlabel("QPS (whole cluster)")
    ax_m.set_ylabel("migrations per run")
    ax_m.set_title("live migration")
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    shared_legend(fig, [ax, ax_m], ncol=3, y=0.86)
    return fig


def llumnix_full(args: argparse.Namespace) -> list[Path]:
    runs = runs_with_summary(args, "llumnix_full", "mean_e2el_ms", "a mean latency (mean_e2el_ms)")
    theme()
    tab = summary_table(runs)
    out = out_dir(args)
    fig = plot(tab)
    links = sorted({str(r.get("cluster.migration_gbps")) for r in runs if r.get("cluster.migration_gbps") is not None})
    note = ("step times: roofline model (no profile for this GPU), published points: Block's artifact"
            + (f" | migration link {', '.join(links)} GB/s per GPU (assumed)" if links else ""))
    return save_figure_and_table(fig, runs, out, "llumnix_full", tab, note)


def main(argv=None) -> int:
    return run_cli(__doc__, partial(add_common_args, slo=False), llumnix_full, argv)


if __name__ == "__main__":
    raise SystemExit(main())
