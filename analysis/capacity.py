"""Capacity from a QPS sweep: the paper's linear interpolation of the P99-TTFT curve against the SLO.

``python -m analysis.capacity outputs/fig6 [--slo 3] [--group-by policy.name,engine.chunk_size]`` prints one row
per configuration and writes ``<dir>/figures/capacity_slo<slo>s.csv``.

Rule (Block's ``experiment_plot.py``: the P99-TTFT polyline intersected with the horizontal SLO line, the last
intersection if several): runs are grouped by configuration, sorted by QPS (several runs at one QPS, e.g. seeds, are
averaged) and each segment between consecutive points that reaches the SLO contributes one crossing, at the QPS
where the straight line between the two points equals the SLO; capacity is the last (highest) crossing. Flags:

* ``lower_bound``: never crossed and every point is within the SLO: capacity is reported as the highest QPS tested
  and the real capacity is at least that (Block's plot drops such a policy from the bar chart);
* ``exceeds_at_min``: the first (lowest) QPS already exceeds the SLO. With no crossing at all capacity is the lowest
  QPS tested, an upper bound (the real capacity is below it); with later crossings the last crossing is still
  reported, but the curve is not monotone;
* ``crossings``: how many times the curve crosses; more than one means a noisy, non-monotone curve.

Seeds: when the runs of a configuration have several ``seed`` values, capacity is found per seed (each seed's own
curve) and the row gives their mean with a 95 % Student-t interval (``ci_low``, ``ci_high``, ``seeds``); a single
seed has no interval. ``capacity_results(root)`` reads the bisection searches (``experiments.capacity``'s
``capacity.json`` files) into the same kind of table.

Only summaries are read (``analysis.records``); nothing here runs the simulator.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from analysis.records import Run, figures_dir, find_runs, save_csv, summaries_frame

QPS_KEY = "workload.qps"
# config keys that tell configurations apart; the ones that actually vary across the runs form the groups
CANDIDATE_KEYS = (
    "experiment_name", "model.name", "gpu.name", "cluster.num_instances", "dataset.name", "dataset.predicted_length",
    "workload.arrival", "workload.burstiness", "workload.num_requests", "engine.name", "engine.chunked_prefill",
    "engine.max_num_seqs", "engine.chunk_size", "engine.max_num_batched_tokens", "engine.num_blocks",
    "engine.tensor_parallel", "policy.name", "policy.k", "policy.length_noise_pct", "policy.latency_noise_pct",
    "provisioning.strategy", "accuracy.sampling_rate", "mode.name",
)


@dataclass
class Capacity:
    capacity: Optional[float]   # QPS; None only when there is no usable point
    lower_bound: bool           # never crossed, all within SLO: capacity >= this (the highest QPS tested)
    exceeds_at_min: bool        # the lowest QPS tested already violates the SLO
    crossings: int              # number of crossings of the SLO line
    min_qps: Optional[float]
    max_qps: Optional[float]
    num_points: int

    @property
    def note(self) -> str:
        if self.capacity is None:
            return "no data"
        notes = []
        if self.lower_bound:
            notes.append(f">= {self.capacity:g} (never exceeded the SLO up to the highest QPS tested)")
        if self.exceeds_at_min:
            notes.append("exceeds the SLO at the lowest QPS tested" +
                         (f" (capacity < {self.capacity:g})" if self.crossings == 0 else ""))
        if self.crossings > 1:
            notes.append(f"{self.crossings} crossings (non-monotone; last one kept)")
        return "; ".join(notes)


@dataclass
class Interval:
    """Mean of ``n`` values and its two-sided Student-t confidence interval (NaN bounds for n < 2)."""

    mean: float
    low: float
    high: float
    n: int
    sd: float
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def text(self, digits: int = 1) -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        if self.n < 2 or not math.isfinite(self.half_width):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_interval(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """Mean and t-interval of the finite ``values`` (one capacity per seed): mean +- t_{(1+c)/2, n-1} * sd / sqrt(n)."""
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan, confidence)
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1, math.nan, confidence)
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, confidence)


def crossings(qps: Sequence[float], y: Sequence[float], slo: float) -> list[float]:
    """Every QPS where the polyline through (qps, y), sorted by qps, meets the level ``slo`` (ascending)."""
    x = np.asarray(qps, float)
    v = np.asarray(y, float)
    out: list[float] = []
    for i in range(len(x) - 1):
        d0, d1 = v[i] - slo, v[i + 1] - slo
        if d0 == 0:
            out.append(float(x[i]))
        elif d0 * d1 < 0:
            out.append(float(x[i] + (slo - v[i]) * (x[i + 1] - x[i]) / (v[i + 1] - v[i])))
    if len(x) and v[-1] == slo:
        out.append(float(x[-1]))
    return sorted(set(out))


def interpolate_capacity(qps: Iterable[float], p99_ttft_s: Iterable[float], slo_s: float) -> Capacity:
    """Capacity of one configuration from its (QPS, P99 TTFT in seconds) points; see the module docstring.

    A missing P99 (no request completed) counts as an SLO violation (+inf)."""
    if slo_s <= 0:
        raise ValueError(f"slo_s={slo_s} must be > 0")
    df = pd.DataFrame({"qps": list(qps), "y": list(p99_ttft_s)}, dtype=float)
    df = df[np.isfinite(df["qps"])]
    if df.empty:
        return Capacity(None, False, False, 0, None, None, 0)
    df["y"] = df["y"].fillna(math.inf)
    pts = df.groupby("qps", as_index=False)["y"].mean().sort_values("qps")
    x, y = pts["qps"].to_numpy(), pts["y"].to_numpy()
    # an infinite point cannot be interpolated; a very large finite stand-in crosses right next to its neighbour
    y_fin = np.where(np.isfinite(y), y, max(slo_s * 1e9, np.nanmax(y[np.isfinite(y)], initial=0.0) * 10))
    cross = crossings(x, y_fin, slo_s)
    first_exceeds = bool(y[0] > slo_s)
    if cross:
        cap, lower = cross[-1], False
    elif first_exceeds:
        cap, lower = float(x[0]), False
    else:
        cap, lower = float(x[-1]), True
    return Capacity(cap, lower, first_exceeds, len(cross), float(x[0]), float(x[-1]), len(x))


def varying_keys(frame: pd.DataFrame, candidates: Sequence[str] = CANDIDATE_KEYS) -> list[str]:
    """The candidate config keys that take more than one value across the runs."""
    out = []
    for k in candidates:
        if k in frame.columns and frame[k].astype(str).nunique(dropna=False) > 1:
            out.append(k)
    return out


def runs_frame(runs: list[Run], group_by: Optional[Sequence[str]] = None) -> tuple[pd.DataFrame, list[str]]:
    keys = tuple(dict.fromkeys([QPS_KEY, "seed", *CANDIDATE_KEYS, *(group_by or ())]))
    frame = summaries_frame(runs, keys=keys)
    if QPS_KEY in frame.columns and "qps" in frame.columns:
        frame[QPS_KEY] = frame[QPS_KEY].fillna(frame["qps"])
    groups = list(group_by) if group_by else varying_keys(frame)
    if not groups:
        groups = ["policy.name"]
    return frame, groups


def capacity_table(runs: "list[Run] | str | Path", slo_s: float = 3.0,
                   group_by: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per configuration: the group keys, capacity (QPS), its flags and the QPS range tested.

    ``group_by`` (dotted config keys) defaults to the keys of ``CANDIDATE_KEYS`` that vary across the runs.
    """
    if isinstance(runs, (str, Path)):
        runs = find_runs(runs)
    frame, groups = runs_frame(runs, group_by)
    if "p99_ttft_ms" not in frame.columns:
        raise ValueError("the runs' summaries have no p99_ttft_ms")
    groups = [k for k in groups if k != "seed"]  # seeds are repetitions of one configuration, not configurations
    seeds = frame["seed"].astype(str) if "seed" in frame.columns else pd.Series("0", index=frame.index)
    rows = []
    for key, g in frame.groupby([frame[k].astype(str) for k in groups], sort=True, dropna=False):
        per_seed = []
        for _, gs in g.groupby(seeds.loc[g.index], sort=True):
            p99_s = pd.to_numeric(gs["p99_ttft_ms"], errors="coerce") / 1e3
            per_seed.append(interpolate_capacity(pd.to_numeric(gs[QPS_KEY], errors="coerce"), p99_s, slo_s))
        row = {k: g[k].iloc[0] for k in groups}
        if len(per_seed) == 1:
            c = per_seed[0]
        else:  # the mean of the seeds' capacities; flags if any seed has them
            ci = mean_interval([p.capacity for p in per_seed])
            c = Capacity(ci.mean, any(p.lower_bound for p in per_seed), any(p.exceeds_at_min for p in per_seed),
                         max(p.crossings for p in per_seed), min(p.min_qps for p in per_seed),
                         max(p.max_qps for p in per_seed), max(p.num_points for p in per_seed))
        ci = mean_interval([p.capacity for p in per_seed])
        row.update(asdict(c))
        row.update(seeds=len(per_seed), ci_low=ci.low, ci_high=ci.high, slo_s=slo_s, note=c.note)
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- bisection results (experiments.capacity)
def capacity_results(root: "str | Path") -> pd.DataFrame:
    """One row per ``capacity.json`` at or under ``root`` (``experiments.capacity``): the searched configuration (its
    main config keys and every override of the search), capacity mean and t-interval over its seeds, per-seed
    capacities, SLO, status. Empty frame when there is none."""
    rows = []
    for f in sorted(Path(root).rglob("capacity.json")):
        if "figures" in f.parts:
            continue
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        row: dict = {"path": str(f.parent)}
        row.update(r.get("config") or {})
        for o in r.get("overrides") or []:
            k, _, v = str(o).partition("=")
            row.setdefault(k.lstrip("+~"), v)
        per_seed = r.get("seeds") or [{"seed": (r.get("config") or {}).get("seed"), "capacity": r.get("capacity"),
                                       "status": r.get("status")}]
        caps = [s.get("capacity") for s in per_seed]
        ci = mean_interval([c for c in caps if c is not None], float(r.get("confidence", 0.95)))
        row.update(capacity=ci.mean, ci_low=ci.low, ci_high=ci.high, seeds=ci.n, sd=ci.sd,
                   per_seed=";".join("none" if c is None else f"{c:g}" for c in caps),
                   seed_ids=";".join(str(s.get("seed")) for s in per_seed),
                   statuses=";".join(sorted({str(s.get("status")) for s in per_seed})),
                   slo_s=r.get("slo_ttft_s"), tol=r.get("tol"), num_requests=(r.get("config") or {}).get(
                       "workload.num_requests"))
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: Optional[list[str]] = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(prog="python -m analysis.capacity",
                                 description="Capacity (the QPS where the linearly interpolated P99-TTFT curve "
                                             "crosses the SLO, last crossing) per configuration of a sweep.")
    ap.add_argument("root", help="a directory of runs, e.g. outputs/fig6 or outputs/table2")
    ap.add_argument("--slo", type=float, default=3.0, help="P99 TTFT SLO in seconds (paper: 3; SYSTOR AE: 10)")
    ap.add_argument("--group-by", default=None,
                    help="comma-separated config keys (default: the keys that vary across the runs)")
    ap.add_argument("--no-csv", action="store_true", help="only print")
    a = ap.parse_args(argv)
    table = capacity_table(a.root, a.slo, a.group_by.split(",") if a.group_by else None)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 80):
        print(table.to_string(index=False))
    if not a.no_csv:
        p = save_csv(table, figures_dir(a.root), f"capacity_slo{a.slo:g}s")
        print(f"wrote {p}")
    return table


if __name__ == "__main__":
    main()
