"""Table 2 of the paper (configuration search): capacity per engine/model/dataset setting and policy.

    python -m analysis.table2 outputs/table2
    python -m analysis.table2 outputs/table2 --slo 10

A *setting* is the model, dataset, batch size cap (``engine.max_num_seqs``) and chunk size (``engine.chunk_size``,
or "no chunked prefill"), plus the GPU, instance count and tensor parallelism when those vary across the runs.
Capacity is the highest QPS whose P99 TTFT stays within the SLO, by linear interpolation between the measured QPS
points (``analysis.capacity``); "≥" marks a lower bound (the SLO held up to the highest QPS measured), "<" an upper
bound (it failed already at the lowest).

Seeds (a sweep with ``seed=0,1,2``): capacity is found per seed, on each seed's own curve, and a cell is their mean
with the half-width of its 95 % Student-t interval (``analysis.common.seeds_capacity``, as Fig 6). A seed whose SLO
held up to the highest QPS makes the mean only a lower bound: the cell says "≥ mean" and has no interval (an upper
bound alike; seeds bounded both ways give their capacities, no mean). One seed is reported as it is ("1 seed").

Writes under ``<dir>/figures/``: ``table2.csv`` (one row per setting and policy: ``capacity_qps``, ``ci_low``,
``ci_high``, ``seeds``, ``bound``, ``per_seed``, ...), ``table2_seeds.csv`` (one row per setting, policy and seed),
``table2.md`` (a Markdown table, settings x policies, to paste) and ``table2.{png,pdf}`` (grouped bars, the interval
as an error bar and the seeds as dots).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, fields
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from analysis.common import (
    Capacity,
    add_common_args,
    capacity,
    label_sort_key,
    label_style,
    out_dir,
    policy_labels,
    policy_name,
    run_cli,
    run_qps,
    runs_with_summary,
    save_stamped,
    seeds_capacity,
    slo_from_runs,
    theme,
)
from analysis.records import Run, save_csv
from vidur.records import write_atomic

BASE_KEYS = ("model.name", "dataset.name", "engine.max_num_seqs", "engine.chunked_prefill", "engine.chunk_size")
EXTRA_KEYS = ("gpu.name", "cluster.num_instances", "engine.tensor_parallel", "workload.arrival",
              "workload.burstiness")
DATASET_NAMES = {"sharegpt": "ShareGPT", "sharegpt_predicted": "ShareGPT", "sharegpt_58k": "ShareGPT",
                 "sharegpt_text": "ShareGPT", "burstgpt": "BurstGPT", "azure_conv": "Azure conv",
                 "azure_code": "Azure code", "arxiv": "ArXiv-Summ"}


def short_model(name: object) -> str:
    s = str(name)
    s = s.split("/")[-1]
    return s.removesuffix("-hf")


def _is_true(v: object) -> bool:
    return str(v).lower() in ("true", "1")


def setting_of(run: Run, extra: list[str]) -> tuple:
    return tuple(run.get(k) for k in (*BASE_KEYS, *extra))


def setting_label(values: dict) -> str:
    parts = [short_model(values.get("model.name")),
             DATASET_NAMES.get(str(values.get("dataset.name")), str(values.get("dataset.name")))]
    parts.append(f"batch {values.get('engine.max_num_seqs')}")
    if values.get("engine.chunked_prefill") is not None and not _is_true(values.get("engine.chunked_prefill")):
        parts.append("no chunked prefill")
    else:
        parts.append(f"chunk {values.get('engine.chunk_size')}")
    names = {"gpu.name": "{}", "cluster.num_instances": "{} instances", "engine.tensor_parallel": "TP {}",
             "workload.arrival": "{} arrivals", "workload.burstiness": "burstiness {}"}
    for k, fmt in names.items():
        if k in values:
            parts.append(fmt.format(values[k]))
    return ", ".join(parts)


def _seed_of(run: Run) -> object:
    return run.get("seed", run.summary.get("seed", 0))


def per_seed_table(runs: list[Run], slo_s: float) -> pd.DataFrame:
    """One row per setting, policy label and seed: that seed's own capacity (its P99-TTFT curve against the SLO).

    Seeds are found per seed rather than averaged point by point, so that their spread is the seed-to-seed spread
    of capacity itself (as Fig 6 does) and a bound stays a bound."""
    extra = [k for k in EXTRA_KEYS if len({repr(r.get(k)) for r in runs}) > 1]
    labels = policy_labels(runs)
    points: dict[tuple, list[tuple[float, float]]] = {}
    meta: dict[tuple, dict] = {}
    for r in runs:
        st = setting_of(r, extra)
        key = (st, labels[r.path])
        p99 = r.summary.get("p99_ttft_ms")
        points.setdefault((*key, _seed_of(r)), []).append((run_qps(r), float(p99) / 1e3 if p99 is not None
                                                           else math.nan))
        vals = dict(zip((*BASE_KEYS, *extra), st))
        meta.setdefault(key, {"values": vals, "policy": policy_name(r), "experiment": r.get("experiment_name")})
    # the same label for two different settings (e.g. sharegpt vs sharegpt_predicted): add the raw values
    lab_of = {st: setting_label(m["values"]) for (st, _), m in meta.items()}
    dup = {lab for lab in lab_of.values() if list(lab_of.values()).count(lab) > 1}
    for st, lab in list(lab_of.items()):
        if lab in dup:
            lab_of[st] = lab + " [" + ", ".join(f"{k}={v}" for k, v in zip((*BASE_KEYS, *extra), st)) + "]"
    rows = []
    for (st, plab, seed), pts in sorted(points.items(), key=lambda kv: repr(kv[0])):
        q, y = zip(*pts)
        c = capacity(q, y, slo_s)
        m = meta[(st, plab)]
        v = m["values"]
        rows.append({
            "setting": lab_of[st], "model": short_model(v.get("model.name")), "dataset": v.get("dataset.name"),
            "batch_size": v.get("engine.max_num_seqs"), "chunked_prefill": v.get("engine.chunked_prefill"),
            "chunk_size": v.get("engine.chunk_size"), **{k: v[k] for k in extra},
            "label": plab, "policy": m["policy"], "seed": seed, **asdict(c), "capacity_text": c.text(),
            "slo_s": slo_s, "experiment": m["experiment"],
        })
    df = pd.DataFrame(rows).rename(columns={"qps": "capacity_qps"})
    df["_s"] = pd.to_numeric(df["seed"], errors="coerce")
    return _sorted(df, ["_s"]).drop(columns="_s")


def _sorted(df: pd.DataFrame, then: list[str]) -> pd.DataFrame:
    """Rows in the table's order: model, dataset, batch cap, chunk size, setting, then the paper's policy order."""
    df = df.assign(_o=df["label"].map(label_sort_key), _b=pd.to_numeric(df["batch_size"], errors="coerce"),
                   _c=pd.to_numeric(df["chunk_size"], errors="coerce"))
    order = ["model", "dataset", "_b", "_c", "setting", "_o", *then]
    return df.sort_values(order, kind="stable").drop(columns=["_o", "_b", "_c"]).reset_index(drop=True)


CAP_FIELDS = [f.name for f in fields(Capacity)]


def capacity_long(per_seed: pd.DataFrame) -> pd.DataFrame:
    """One row per setting and policy label: the seeds' capacities combined (``analysis.common.seeds_capacity``):
    ``capacity_qps`` their mean, ``ci_low``/``ci_high`` its 95 % t-interval (NaN with one seed, or when a seed is a
    bound: then ``bound`` says which way the mean is bounded), ``seeds``, ``bound_seeds``, ``per_seed``."""
    meta_cols = [c for c in per_seed.columns if c not in (*CAP_FIELDS, "capacity_qps", "capacity_text", "seed")]
    rows = []
    for _, g in per_seed.groupby(["setting", "label"], sort=False):
        caps = [Capacity(**{f: (r["capacity_qps"] if f == "qps" else r[f]) for f in CAP_FIELDS})
                for _, r in g.iterrows()]
        sc = seeds_capacity(caps)
        rows.append({
            **{c: g[c].iloc[0] for c in meta_cols},
            "capacity_qps": sc.qps, "ci_low": sc.low, "ci_high": sc.high, "seeds": len(caps),
            "seeds_usable": sc.seeds, "bound_seeds": sc.bound_seeds, "bound": sc.bound,
            "lower_bound": sc.bound == "lower", "upper_bound": sc.bound == "upper", "capacity_text": sc.text(),
            "per_seed": ";".join(f"{s}:{c.text()}" for s, c in zip(g["seed"], caps)),
            "qps_min": min(c.qps_min for c in caps), "qps_max": max(c.qps_max for c in caps),
            "points": max(c.points for c in caps), "crossings": max(c.crossings for c in caps), "note": sc.note,
        })
    return _sorted(pd.DataFrame(rows), [])


def seeds_caption(df: pd.DataFrame, short: bool = False) -> str:
    """What a cell is, by how many seeds the rows have: one capacity ("1 seed"), or the mean of n seeds' capacities
    with the half-width of its 95 % t-interval (``short``: a few words for the figure's stamp)."""
    n = sorted({int(x) for x in df["seeds"]})
    if n == [1]:
        return "capacity of 1 seed (no interval)" if short else "1 seed (no interval)"
    ns = f"{n[0]}-{n[-1]}" if len(n) > 1 else str(n[0])
    if short:
        return f"capacity per seed, {ns} seeds: mean and 95 % t-interval"
    return (f"{ns} seeds: the mean of the seeds' capacities ± the half-width of its 95 % Student-t interval, "
            "capacity found per seed")


def markdown(df: pd.DataFrame, slo_s: float) -> str:
    labels = sorted(df["label"].unique(), key=label_sort_key)
    settings = list(dict.fromkeys(df["setting"]))
    head = ["Setting", *labels, "QPS tested"]
    several = int(df["seeds"].max()) > 1
    lines = [
        (f"Capacity (req/s): the highest QPS whose P99 TTFT stays within the SLO of {slo_s:g} s, by linear "
         f"interpolation between the measured QPS points; {seeds_caption(df)}. \"≥ x\": a lower bound (the SLO held up "
         "to the highest QPS measured"
         + (", for at least one seed: the mean is a lower bound and has no interval" if several else "")
         + "); \"< x\": an upper bound (the SLO failed already at the lowest QPS measured); \"-\": not run."
         + (" \"a / b\": the seeds' capacities, bounded both ways (no mean)." if (df["bound"] == "mixed").any()
            else "")),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    n_vary = df["seeds"].nunique() > 1
    for s in settings:
        sub = df[df["setting"] == s].set_index("label")
        cells = []
        for lab in labels:
            if lab not in sub.index:
                cells.append("-")
                continue
            cell = sub.loc[lab, "capacity_text"].replace("≥", "≥ ").replace("<", "< ")
            cells.append(cell + (f" (n={int(sub.loc[lab, 'seeds'])})" if n_vary else ""))
        lo, hi = sub["qps_min"].min(), sub["qps_max"].max()
        rng = f"{lo:g}–{hi:g}" if math.isfinite(lo) and math.isfinite(hi) else "-"
        lines.append("| " + " | ".join([s, *cells, rng]) + " |")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> str:
    """Join the comma-separated parts of a setting label into lines of about ``width`` characters."""
    lines: list[str] = []
    for part in text.split(", "):
        if lines and len(lines[-1]) + len(part) + 2 <= width:
            lines[-1] += ", " + part
        else:
            lines.append(part)
    return "\n".join(lines)


SEED_MARKERS = {"lower": "^", "upper": "v"}  # a seed's capacity that is a bound points the way it is open


def plot(df: pd.DataFrame, per_seed: pd.DataFrame, slo_s: float) -> plt.Figure:
    """Grouped bars, settings x policies: the capacity (the seeds' mean when several), its 95 % t-interval as an
    error bar, each seed's capacity as a dot (a triangle when it is a bound); hatched bars are bounds."""
    labels = sorted(df["label"].unique(), key=label_sort_key)
    settings = list(dict.fromkeys(df["setting"]))
    styles = label_style(labels)
    n, m = len(settings), len(labels)
    width = 0.8 / m
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 + n * (0.55 * m + 0.6)), 4.8))
    tops = [0.0]
    for j, lab in enumerate(labels):
        for i, s in enumerate(settings):
            row = df[(df["setting"] == s) & (df["label"] == lab)]
            if row.empty:
                continue
            row = row.iloc[0]
            x = i - 0.4 + width * (j + 0.5)
            v, top = row["capacity_qps"], math.nan
            if math.isfinite(v):
                ax.bar(x, v, width * 0.92, color=styles[lab]["color"], edgecolor="black", lw=0.6,
                       hatch={"lower": "//", "upper": "xx"}.get(row["bound"]))
                top = v
                if math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"]):
                    ax.errorbar(x, v, yerr=[[v - row["ci_low"]], [row["ci_high"] - v]], color="black",
                                capsize=3, lw=1.1)
                    top = row["ci_high"]
            seeds = per_seed[(per_seed["setting"] == s) & (per_seed["label"] == lab)]
            if row["seeds"] > 1:
                for bound, g in seeds.groupby("bound"):
                    ax.scatter(np.full(len(g), x), g["capacity_qps"], s=14, zorder=3, color="black",
                               marker=SEED_MARKERS.get(bound, "o"), edgecolors="white", linewidths=0.4)
                top = np.nanmax([top, *seeds["capacity_qps"]])
            if math.isfinite(top):
                ax.text(x, top, row["capacity_text"], ha="center", va="bottom", fontsize=8,
                        rotation=90 if m > 4 or row["bound"] == "mixed" else 0)
                tops.append(top)
    ax.set_xticks(np.arange(n), [_wrap(s, 24) for s in settings], fontsize=9)
    ax.set_ylim(0, (max(tops) or 1) * 1.18)
    ax.set(ylabel="Capacity (req/s)", title=f"Max QPS before the SLO (P99 TTFT ≤ {slo_s:g} s) per configuration")
    handles = [Patch(facecolor=styles[lab]["color"], edgecolor="black", lw=0.6, label=lab) for lab in labels]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    notes = []
    if int(df["seeds"].max()) > 1:
        notes.append("bar: mean of the seeds' capacities, error bar: its 95 % t-interval, dots: the seeds "
                     "(triangles: a bound)")
    if df["bound"].isin(["lower", "upper"]).any():
        notes.append("hatched: a bound, the SLO is not crossed in the measured QPS range (// at least, xx below)")
    if notes:
        ax.set_xlabel("\n".join(notes), fontsize=8, color="0.3")
    fig.tight_layout()
    return fig


def table2(args: argparse.Namespace) -> list[Path]:
    runs = runs_with_summary(args, "table2", "p99_ttft_ms", "a P99 TTFT")
    theme()
    slo_s = slo_from_runs(runs, args.slo)
    per_seed = per_seed_table(runs, slo_s)
    df = capacity_long(per_seed)
    out = out_dir(args)
    paths = [save_csv(df, out, "table2"), save_csv(per_seed, out, "table2_seeds"),
             write_atomic(out / "table2.md", markdown(df, slo_s).encode())]
    fig = plot(df, per_seed, slo_s)
    paths += save_stamped(fig, runs, out, "table2", seeds_caption(df, short=True))
    plt.close(fig)
    if args.print:
        print(markdown(df, slo_s))
    return paths


def _args(ap: argparse.ArgumentParser) -> None:
    add_common_args(ap)
    ap.add_argument("--print", action="store_true", help="also print the Markdown table")


def main(argv=None) -> int:
    return run_cli(__doc__, _args, table2, argv)


if __name__ == "__main__":
    raise SystemExit(main())
