"""Mixed pools: capacity at the SLO per policy, and where each policy sends the work, on a cluster of several
instance kinds (``cluster.pools``, experiments/pools.py).

    python -m experiments.run -m experiment=mixed_pool
    python -m analysis.mixed_pool outputs/mixed_pool [--slo 3] [--qps 16]

Writes ``mixed_pool.{png,pdf}`` under ``<root>/figures/``: left, each policy's capacity (the QPS where its P99 TTFT
crosses the SLO, interpolated per seed, mean over seeds with a 95 % t-interval when there are several); right, the
share of the work (prompt + output tokens) each policy sent to each instance kind at one QPS (``--qps``; default
the highest QPS of the sweep at or below every policy's capacity, so every policy is in its stable regime), beside
the kinds' share of the instances. ``mixed_pool.csv`` holds both tables (one row per policy).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.capacity import interpolate_capacity, mean_interval
from analysis.common import (
    AnalysisError,
    add_common_args,
    comparable_runs,
    label_sort_key,
    label_style,
    load_runs,
    out_dir,
    policy_labels,
    run_cli,
    run_qps,
    save_stamped,
    slo_from_runs,
    theme,
)
from analysis.records import Run, save_csv


def pool_runs(runs: list[Run]) -> list[Run]:
    """The runs of a mixed pool: their summary names each instance's kind (``instance_kinds``)."""
    return [r for r in runs if r.summary.get("instance_kinds") and "p99_ttft_ms" in r.summary]


def capacity_by_label(runs: list[Run], slo_s: float) -> pd.DataFrame:
    """label -> capacity per seed (interpolated crossing of the SLO) and their mean with a 95 % t-interval."""
    labels = policy_labels(runs)
    pts = pd.DataFrame([{"label": labels[r.path], "seed": r.summary.get("seed", 0), "qps": run_qps(r),
                         "p99": float(r.summary["p99_ttft_ms"]) / 1e3} for r in runs])
    rows = []
    for lab, g in pts.groupby("label"):
        caps = [interpolate_capacity(s["qps"], s["p99"], slo_s) for _, s in g.groupby("seed")]
        iv = mean_interval([c.capacity for c in caps if c.capacity is not None])
        rows.append({"label": lab, "capacity": iv.mean, "ci_low": iv.low, "ci_high": iv.high, "seeds": iv.n,
                     "lower_bound": any(c.lower_bound for c in caps),
                     "below_grid": any(c.exceeds_at_min for c in caps)})
    return pd.DataFrame(rows)


def work_shares(runs: list[Run], qps: float) -> pd.DataFrame:
    """label -> share of requests and of tokens (prompt + output) sent to each kind at ``qps`` (over seeds)."""
    labels = policy_labels(runs)
    rows = []
    for r in runs:
        if not math.isclose(run_qps(r), qps):
            continue
        kinds = list(r.summary["instance_kinds"])
        req = r.requests()
        req = req[req["instance"] >= 0]
        kind = req["instance"].astype(int).map(dict(enumerate(kinds)))
        tokens = req["prompt_tokens"] + req["output_tokens"]
        for k in sorted(set(kinds)):
            m = kind == k
            rows.append({"label": labels[r.path], "kind": k, "requests": float(m.sum()), "tokens": float(tokens[m].sum()),
                         "instances": kinds.count(k) / len(kinds)})
    if not rows:
        raise AnalysisError(f"no mixed-pool run at QPS {qps:g}")
    df = pd.DataFrame(rows).groupby(["label", "kind"], as_index=False).agg(
        requests=("requests", "sum"), tokens=("tokens", "sum"), instances=("instances", "first"))
    for col in ("requests", "tokens"):
        df[col + "_share"] = df[col] / df.groupby("label")[col].transform("sum")
    return df


def pick_qps(runs: list[Run], caps: pd.DataFrame, qps: float | None) -> float:
    grid = sorted({run_qps(r) for r in runs})
    if qps is not None:
        return float(qps)
    ok = [q for q in grid if q <= caps["capacity"].min()]
    return ok[-1] if ok else grid[0]


def plot(caps: pd.DataFrame, shares: pd.DataFrame, qps: float, slo_s: float) -> plt.Figure:
    caps = caps.assign(_o=caps["label"].map(label_sort_key)).sort_values("_o")
    order = list(caps["label"])
    styles = label_style(order)
    fig, (ax, ax_w) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1, 1]})
    y = np.arange(len(order))
    err = np.vstack([caps["capacity"] - caps["ci_low"], caps["ci_high"] - caps["capacity"]])
    err = np.where(np.isfinite(err), err, 0.0)
    ax.barh(y, caps["capacity"], xerr=err, color=[styles[lab]["color"] for lab in order], alpha=0.85)
    for yi, (_, row) in zip(y, caps.iterrows()):
        mark = (" (>=)" if row["lower_bound"] else "") + (" (< grid)" if row["below_grid"] else "")
        ax.text(row["capacity"], yi, f" {row['capacity']:.1f}{mark}", va="center", fontsize=8)
    ax.set_yticks(y, order)
    ax.invert_yaxis()
    ax.set_xlabel(f"capacity (QPS at P99 TTFT = {slo_s:g} s)")
    ax.set_title("capacity per policy")
    kinds = sorted(shares["kind"].unique())
    left = np.zeros(len(order))
    cmap = plt.get_cmap("Set2")
    piv = shares.pivot(index="label", columns="kind", values="tokens_share").reindex(order).fillna(0.0)
    for j, k in enumerate(kinds):
        ax_w.barh(y, piv[k], left=left, color=cmap(j), label=f"{k}")
        left += piv[k].to_numpy()
    inst = shares.groupby("kind")["instances"].first()
    acc = 0.0
    for k in kinds[:-1]:
        acc += float(inst[k])
        ax_w.axvline(acc, color="black", ls="--", lw=1)
    ax_w.set_yticks(y, [""] * len(order))
    ax_w.invert_yaxis()
    ax_w.set_xlim(0, 1)
    ax_w.set_xlabel(f"share of the work (tokens) per kind at QPS {qps:g}; dashed: share of instances")
    ax_w.set_title("where the work goes")
    ax_w.legend(loc="lower right", fontsize=8, frameon=True)
    fig.tight_layout()
    return fig


def mixed_pool(args: argparse.Namespace) -> list[Path]:
    runs = pool_runs(comparable_runs(load_runs(args.root, args.filter), "mixed_pool"))
    if not runs:
        raise AnalysisError(f"no mixed-pool run under {args.root} (runs with cluster.pools; see experiment=mixed_pool)")
    slo = slo_from_runs(runs, args.slo)
    theme()
    caps = capacity_by_label(runs, slo)
    qps = pick_qps(runs, caps, args.qps)
    shares = work_shares(runs, qps)
    out = out_dir(args)
    fig = plot(caps, shares, qps, slo)
    pools = sorted({str(r.summary.get("pools")) for r in runs})
    paths = save_stamped(fig, runs, out, "mixed_pool", f"pools {', '.join(pools)}; A100 step times: roofline model")
    plt.close(fig)
    wide = shares.pivot(index="label", columns="kind", values="tokens_share").add_prefix("tokens_share_")
    table = caps.set_index("label").join(wide).reset_index()
    table["share_qps"] = qps
    paths.append(save_csv(table, out, "mixed_pool"))
    return paths


def _args(ap: argparse.ArgumentParser) -> None:
    add_common_args(ap)
    ap.add_argument("--qps", type=float, default=None, help="QPS of the work-share panel (default: see above)")


def main(argv=None) -> int:
    return run_cli(__doc__, _args, mixed_pool, argv)


if __name__ == "__main__":
    raise SystemExit(main())
