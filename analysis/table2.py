"""Table 2 of the paper (configuration search): capacity per engine/model/dataset setting and policy.

    python -m analysis.table2 outputs/table2
    python -m analysis.table2 outputs/table2 --slo 10

A *setting* is the model, dataset, batch size cap (``engine.max_num_seqs``) and chunk size (``engine.chunk_size``,
or "no chunked prefill"), plus the GPU, instance count and tensor parallelism when those vary across the runs.
Capacity is the highest QPS whose P99 TTFT stays within the SLO, by linear interpolation between the measured QPS
points (``analysis.capacity``); "≥" marks a lower bound (the SLO held up to the highest QPS measured), "<" an upper
bound (it failed already at the lowest).

Writes under ``<dir>/figures/``: ``table2.csv`` (one row per setting and policy), ``table2.md`` (a Markdown table,
settings x policies, to paste) and ``table2.{png,pdf}`` (grouped bars).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from analysis.common import (
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


def capacity_long(runs: list[Run], slo_s: float) -> pd.DataFrame:
    extra = [k for k in EXTRA_KEYS if len({repr(r.get(k)) for r in runs}) > 1]
    labels = policy_labels(runs)
    points: dict[tuple, list[tuple[float, float]]] = {}
    meta: dict[tuple, dict] = {}
    for r in runs:
        st = setting_of(r, extra)
        key = (st, labels[r.path])
        p99 = r.summary.get("p99_ttft_ms")
        points.setdefault(key, []).append((run_qps(r), float(p99) / 1e3 if p99 is not None else math.nan))
        vals = dict(zip((*BASE_KEYS, *extra), st))
        meta.setdefault(key, {"values": vals, "policy": policy_name(r), "experiment": r.get("experiment_name")})
    # the same label for two different settings (e.g. sharegpt vs sharegpt_predicted): add the raw values
    lab_of = {st: setting_label(m["values"]) for (st, _), m in meta.items()}
    dup = {lab for lab in lab_of.values() if list(lab_of.values()).count(lab) > 1}
    for st, lab in list(lab_of.items()):
        if lab in dup:
            lab_of[st] = lab + " [" + ", ".join(f"{k}={v}" for k, v in zip((*BASE_KEYS, *extra), st)) + "]"
    rows = []
    for (st, plab), pts in points.items():
        q, y = zip(*pts)
        c = capacity(q, y, slo_s)
        m = meta[(st, plab)]
        v = m["values"]
        rows.append({
            "setting": lab_of[st], "model": short_model(v.get("model.name")), "dataset": v.get("dataset.name"),
            "batch_size": v.get("engine.max_num_seqs"), "chunked_prefill": v.get("engine.chunked_prefill"),
            "chunk_size": v.get("engine.chunk_size"), **{k: v[k] for k in extra},
            "label": plab, "policy": m["policy"], "capacity_qps": c.qps, "bound": c.bound,
            "lower_bound": c.bound == "lower", "upper_bound": c.bound == "upper", "capacity_text": c.text(),
            "slo_s": slo_s,
            "qps_min": c.qps_min, "qps_max": c.qps_max, "points": c.points, "crossings": c.crossings,
            "experiment": m["experiment"],
        })
    df = pd.DataFrame(rows)
    df["_o"] = df["label"].map(label_sort_key)
    df["_b"] = pd.to_numeric(df["batch_size"], errors="coerce")
    df["_c"] = pd.to_numeric(df["chunk_size"], errors="coerce")
    order = ["model", "dataset", "_b", "_c", "setting", "_o"]
    return df.sort_values(order).drop(columns=["_o", "_b", "_c"]).reset_index(drop=True)


def markdown(df: pd.DataFrame, slo_s: float) -> str:
    labels = sorted(df["label"].unique(), key=label_sort_key)
    settings = list(dict.fromkeys(df["setting"]))
    head = ["Setting", *labels, "QPS tested"]
    lines = [
        (f"Capacity (req/s): the highest QPS whose P99 TTFT stays within the SLO of {slo_s:g} s, by linear "
         "interpolation between the measured QPS points. \"≥ x\": a lower bound (the SLO held up to the highest QPS "
         "measured); \"< x\": an upper bound (the SLO failed already at the lowest QPS measured); \"-\": not run."),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for s in settings:
        sub = df[df["setting"] == s].set_index("label")
        cells = [sub.loc[lab, "capacity_text"].replace("≥", "≥ ").replace("<", "< ") if lab in sub.index else "-"
                 for lab in labels]
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


def plot(df: pd.DataFrame, slo_s: float) -> plt.Figure:
    labels = sorted(df["label"].unique(), key=label_sort_key)
    settings = list(dict.fromkeys(df["setting"]))
    styles = label_style(labels)
    n, m = len(settings), len(labels)
    width = 0.8 / m
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 + n * (0.55 * m + 0.6)), 4.8))
    for j, lab in enumerate(labels):
        for i, s in enumerate(settings):
            row = df[(df["setting"] == s) & (df["label"] == lab)]
            if row.empty or not math.isfinite(row["capacity_qps"].iloc[0]):
                continue
            v, bound = row["capacity_qps"].iloc[0], row["bound"].iloc[0]
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, v, width * 0.92, color=styles[lab]["color"], edgecolor="black", lw=0.6,
                   hatch={"lower": "//", "upper": "xx"}.get(bound))
            ax.text(x, v, row["capacity_text"].iloc[0], ha="center", va="bottom", fontsize=8, rotation=90 if m > 4
                    else 0)
    ax.set_xticks(np.arange(n), [_wrap(s, 24) for s in settings], fontsize=9)
    ymax = np.nanmax(df["capacity_qps"].to_numpy(float)) if df["capacity_qps"].notna().any() else 1
    ax.set_ylim(0, ymax * 1.18)
    ax.set(ylabel="Capacity (req/s)", title=f"Max QPS before the SLO (P99 TTFT ≤ {slo_s:g} s) per configuration")
    handles = [Patch(facecolor=styles[lab]["color"], edgecolor="black", lw=0.6, label=lab) for lab in labels]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    if df["bound"].isin(["lower", "upper"]).any():
        ax.set_xlabel("hatched: a bound, the SLO is not crossed in the measured QPS range (// at least, xx below)",
                      fontsize=8, color="0.3")
    fig.tight_layout()
    return fig


def table2(args: argparse.Namespace) -> list[Path]:
    runs = runs_with_summary(args, "table2", "p99_ttft_ms", "a P99 TTFT")
    theme()
    slo_s = slo_from_runs(runs, args.slo)
    df = capacity_long(runs, slo_s)
    out = out_dir(args)
    paths = [save_csv(df, out, "table2"), write_atomic(out / "table2.md", markdown(df, slo_s).encode())]
    fig = plot(df, slo_s)
    paths += save_stamped(fig, runs, out, "table2")
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
