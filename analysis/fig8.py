"""Fig 8 of the paper (auto-provisioning): per-request E2E latency and the number of available instances over the
run, for a statically provisioned cluster and the two provisioning strategies.

    python -m analysis.fig8 outputs/fig8
    python -m analysis.fig8 outputs/fig8 --qps 24

Variants, from each run's ``provisioning`` config: disabled -> "Full provisioned", ``strategy=reactive`` ->
"Relief (reactive)", ``strategy=predictive`` -> "Preemptive (predictive)". Top panel: E2E latency (s) of each
request vs request id, with the provisioning SLO (``provisioning.slo_s``); bottom panel: available instances at
dispatch (``num_active``) vs request id, dashed. One figure per QPS (``fig8``, or ``fig8_qps<q>`` when several).

CSV ``fig8.csv``: per variant mean/P99 E2E and TTFT, share of requests over the SLO, max and mean instances,
instance-seconds used (the number of active instances integrated over the run, from ``provisioning.parquet`` when
present, else from the requests' ``num_active`` at dispatch), instances added. Simulated and emulated runs
(``mode=emulate`` with auto-provisioning) are drawn alike: both record ``num_active`` per request and the pool's
events on the model-time axis.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.common import (
    save_stamped,
    AnalysisError,
    add_common_args,
    base_label,
    is_accuracy_run,
    load_runs,
    ok_requests,
    out_dir,
    policy_name,
    run_cli,
    run_qps,
    theme,
)
from analysis.records import Run, save_csv

VARIANTS = {"static": "Full provisioned", "reactive": "Relief (reactive)", "predictive": "Preemptive (predictive)"}
VARIANT_COLORS = {"static": "tab:blue", "reactive": "tab:orange", "predictive": "tab:red"}
VARIANT_LINES = {"static": "-", "reactive": "-", "predictive": "--"}
VARIANT_ORDER = list(VARIANTS)
# events of provisioning.parquet that add an instance: sim "add" (no cold start) or "ready" (after it); live "ready"
# (the scheduler that started the slot; the others "adopt" it)
ADDED_EVENTS = ("add", "ready")


def variant(run: Run) -> str:
    enabled = run.get("provisioning.enabled")
    strategy = run.get("provisioning.strategy")
    if not enabled or str(enabled).lower() == "false" or strategy in (None, "none"):
        return "static"
    return str(strategy)


def variant_label(v: str) -> str:
    return VARIANTS.get(v, v.capitalize())


def _provisioning(run: Run) -> pd.DataFrame:
    """The run's pool events. A live run with several schedulers logs each one's view (``scheduler_index``): they
    converge on one pool (one starts a slot, the others adopt it), so the first scheduler's view is the pool's."""
    p = run.path / "provisioning.parquet"
    if not p.is_file():
        return pd.DataFrame()
    prov = pd.read_parquet(p)
    if "scheduler_index" in prov.columns and len(prov):
        first = prov["scheduler_index"].min()
        prov = prov.assign(_added=prov["event"].isin(ADDED_EVENTS))
        n_added = int(prov["_added"].sum())  # over all schedulers: each slot is started (and ready) once
        prov = prov[prov["scheduler_index"] == first].drop(columns="_added")
        prov.attrs["instances_added"] = n_added
    return prov


def instance_seconds(run: Run, req: pd.DataFrame) -> tuple[float, float, int]:
    """(instance-seconds, run span in s, instances added) over [first arrival, last finish]: the number of active
    instances as a step function, from provisioning events when recorded, else from ``num_active`` at dispatch
    (else ``cluster.num_instances`` throughout)."""
    t0 = float(req["arrival_s"].min())
    t1 = float(np.nanmax(req["finish_s"].to_numpy(float))) if req["finish_s"].notna().any() else t0
    span = max(t1 - t0, 0.0)
    prov = _provisioning(run)
    if len(prov) and {"time_s", "num_active"} <= set(prov.columns):
        ev = prov.sort_values("time_s", kind="stable")
        times, counts = np.array(ev["time_s"], float), np.array(ev["num_active"], float)
        added = prov.attrs.get("instances_added", int(ev["event"].isin(ADDED_EVENTS).sum())
                                if "event" in ev.columns else 0)
    elif "num_active" in req.columns and req["num_active"].notna().any():
        ev = req.sort_values("dispatch_s")
        times, counts = np.array(ev["dispatch_s"], float), np.array(ev["num_active"], float)
        times[0] = min(times[0], t0)
        added = int(max(0, np.nanmax(counts) - counts[0]))
    else:
        n = float(run.get("cluster.num_instances") or run.summary.get("num_instances") or math.nan)
        return n * span, span, 0
    # step function: counts[i] holds from times[i] until times[i+1]; integrate over [t0, t1]
    edges = np.clip(np.append(times, t1), t0, t1)
    total = float(np.sum(counts * np.diff(edges)))
    if times[0] > t0:  # nothing recorded before the first event: count the first value from the start
        total += float(counts[0]) * (min(times[0], t1) - t0)
    return total, span, added


def fig8_tables(runs: list[Run], slo_override: float | None) -> tuple[pd.DataFrame, dict]:
    rows, series = [], {}
    for r in sorted(runs, key=lambda r: (run_qps(r), VARIANT_ORDER.index(variant(r)) if variant(r) in VARIANT_ORDER
                                         else 99, str(r.path))):
        req = r.requests()
        if req.empty:
            continue
        v = variant(r)
        q = run_qps(r)
        # a static run's provisioning.slo_s is unused (provisioning.enabled false): take it from its peers below
        enabled = bool(r.get("provisioning.enabled", v != "static"))
        slo = slo_override if slo_override is not None else (r.get("provisioning.slo_s") if enabled else None)
        ok = ok_requests(req).sort_values("id")
        e2e = ok["e2e_s"].to_numpy(float)
        inst_s, span, added = instance_seconds(r, req)
        num_active = req["num_active"] if "num_active" in req.columns else pd.Series(dtype=float)
        n_cluster = r.get("cluster.num_instances") or r.summary.get("num_instances")
        mode = str(r.get("mode.name") or r.summary.get("mode") or "sim")
        label = variant_label(v) + ("" if mode == "sim" else f", {mode}")  # live runs drawn beside simulated ones
        key = (q, label)
        if key in series:  # several runs of one variant at one QPS (other policy, SLO...): tell them apart
            label = f"{variant_label(v)}, {base_label(policy_name(r))}"
            if slo is not None:
                label += f", SLO {float(slo):g} s"
            key = (q, label)
        if key in series:
            label = f"{variant_label(v)} ({r.name})"
            key = (q, label)
        rows.append({
            "qps": q, "variant": v, "label": label, "mode": mode, "requests": len(req), "completed": len(ok),
            "mean_e2e_s": float(np.mean(e2e)) if e2e.size else math.nan,
            "p99_e2e_s": float(np.percentile(e2e, 99)) if e2e.size else math.nan,
            "mean_ttft_s": float(ok["ttft_s"].mean()), "p99_ttft_s": float(ok["ttft_s"].quantile(0.99)),
            "slo_s": float(slo) if slo is not None else math.nan,
            "frac_over_slo": float(np.mean(e2e > float(slo))) if slo is not None and e2e.size else math.nan,
            "initial_instances": int(num_active.iloc[0]) if len(num_active) else n_cluster,
            "max_instances": int(num_active.max()) if len(num_active) else n_cluster,
            "mean_instances": inst_s / span if span > 0 else math.nan,
            "instance_seconds": inst_s, "span_s": span, "instances_added": added, "run": str(r.path),
        })
        series[key] = (v, ok)
    if not rows:
        raise AnalysisError("the runs have no request records")
    tab = pd.DataFrame(rows)
    # a static run has no provisioning SLO: compare it with the SLO of the provisioning runs at its QPS
    for i, row in tab.iterrows():
        if math.isnan(row["slo_s"]):
            others = tab[(tab["qps"] == row["qps"])]["slo_s"].dropna().unique()
            if len(others) == 1:
                e2e = series[(row["qps"], row["label"])][1]["e2e_s"].to_numpy(float)
                tab.loc[i, "slo_s"] = float(others[0])
                tab.loc[i, "frac_over_slo"] = float(np.mean(e2e > others[0])) if e2e.size else math.nan
    return tab, series


def plot_qps(q: float, tab: pd.DataFrame, series: dict, marker_size: float, window: int) -> plt.Figure:
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7.2), sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    sub = tab[tab["qps"] == q]
    for _, row in sub.iterrows():
        v, ok = series[(q, row["label"])]
        c = VARIANT_COLORS.get(v)
        live = row.get("mode", "sim") != "sim"  # emulate/deploy: dotted beside the simulated run
        ax1.scatter(ok["id"], ok["e2e_s"], s=marker_size, alpha=0.35, lw=0, color=c,
                    label=f"{row['label']} (P99 {row['p99_e2e_s']:.1f} s)")
        if window > 1 and len(ok) > window:
            roll = ok["e2e_s"].rolling(window, center=True, min_periods=max(window // 4, 1)).mean()
            ax1.plot(ok["id"], roll, color=c, lw=2.2, ls=":" if live else VARIANT_LINES.get(v, "-"), label="_mean")
        if "num_active" in ok.columns:
            ax2.step(ok["id"], ok["num_active"], where="post", ls=":" if live else "--", lw=1.8, color=c,
                     label=row["label"])
    slos = sorted(set(sub["slo_s"].dropna()))
    for s in slos:
        ax1.axhline(s, color="black", ls="--", lw=1.2, label=f"Provisioning SLO ({s:g} s)")
    title = f"Per-request latency and available instances at QPS {q:g}"
    if window > 1:
        title += f"\n(dots: requests; lines: rolling mean over {window} requests)"
    ax1.set(ylabel="E2E latency (s)", title=title)
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="upper left", markerscale=3, fontsize=9)
    ax2.set(xlabel="Request id", ylabel="Available instances")
    ax2.yaxis.get_major_locator().set_params(integer=True)
    lo, hi = np.nanmin(sub["initial_instances"]), np.nanmax(sub["max_instances"])
    ax2.set_ylim(lo - 1, hi + 1)
    ax2.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    return fig


def fig8(args: argparse.Namespace) -> list[Path]:
    runs = load_runs(args.root, args.filter)
    if args.qps is not None:
        runs = [r for r in runs if abs(run_qps(r) - args.qps) < 1e-9]
        if not runs:
            raise AnalysisError(f"no run at QPS {args.qps:g} under {args.root}")
    prov_qps = {run_qps(r) for r in runs if variant(r) != "static"}
    if not prov_qps:
        raise AnalysisError(f"no provisioning run (provisioning=reactive or predictive) under {args.root}; Fig 8 "
                            "compares them with a static run")
    # static runs only where there is something to compare them with; accuracy runs duplicate requests: leave out
    runs = [r for r in runs if run_qps(r) in prov_qps and not is_accuracy_run(r)]
    theme()
    tab, series = fig8_tables(runs, args.slo)
    out = out_dir(args)
    paths: list[Path] = []
    qs = sorted(tab["qps"].unique())
    for q in qs:
        fig = plot_qps(q, tab, series, args.marker_size, args.window)
        paths += save_stamped(fig, [r for r in runs if run_qps(r) == q], out,
                              "fig8" if len(qs) == 1 else f"fig8_qps{q:g}")
        plt.close(fig)
    paths.append(save_csv(tab, out, "fig8"))
    return paths


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--slo", type=float, default=None,
                    help="latency SLO line in seconds (default: each run's provisioning.slo_s)")
    add_common_args(ap, slo=False)
    ap.add_argument("--qps", type=float, default=None, help="only runs at this QPS (default: a figure per QPS)")
    ap.add_argument("--marker-size", type=float, default=6.0, help="scatter marker size (points^2)")
    ap.add_argument("--window", type=int, default=50,
                    help="rolling mean of the E2E latency over this many requests, drawn as a line (0 = none)")


def main(argv=None) -> int:
    return run_cli(__doc__, _args, fig8, argv)


if __name__ == "__main__":
    raise SystemExit(main())
