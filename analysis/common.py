"""Shared helpers for the figure modules (fig5, fig6, fig8, table2): legend names, colours, grouping, smoothing.

Reads run records only (``analysis.records``); never imports the simulator, the services or the experiments.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from analysis.records import Run, find_runs

log = logging.getLogger(__name__)

DEFAULT_SLO_S = 3.0

# The paper's legend names (its Block is our block_oracle, its Block* our block_star) and names for our extra policies.
POLICY_LABELS: dict[str, str] = {
    "block_oracle": "Block",
    "block_star": "Block*",
    "llumnix": "Llumnix-",
    "llumnix_full": "Llumnix (migration)",
    "infaas": "INFaaS++",
    "min_qpm": "Min QPM",
    "round_robin": "Round Robin",
    "random": "Random",
    "block": "Block (hint)",
    "block_noisy": "Block (noisy len)",
    "block_nosim": "Block-NoSim",
    "least_requests": "Least requests",
    "llmd": "llm-d",
    "sglang_least_load": "SGLang least_load",
    "dynamo_kv": "Dynamo KV",
    "lmetric": "LMetric",
    "llmd_latency": "llm-d predicted latency",
    "routebalance": "RouteBalance-style",
    "block_residual": "Block + residual",
    "block_ttft": "Block-TTFT (ours)",
    "block_social": "Block-social (ours)",
}
POLICY_ORDER = list(POLICY_LABELS)

# One fixed colour per policy so that a policy looks the same in every figure.
_PALETTE = sns.color_palette("tab10") + sns.color_palette("Dark2")
POLICY_COLORS: dict[str, Any] = {
    "block_oracle": _PALETTE[3],     # red
    "block_star": _PALETTE[1],       # orange
    "llumnix": _PALETTE[0],          # blue
    "llumnix_full": _PALETTE[14],
    "infaas": _PALETTE[2],           # green
    "min_qpm": _PALETTE[4],          # purple
    "round_robin": _PALETTE[5],      # brown
    "random": _PALETTE[7],           # grey
    "block": _PALETTE[6],            # pink
    "block_noisy": _PALETTE[8],      # olive
    "block_nosim": _PALETTE[9],      # cyan
    "least_requests": _PALETTE[10],
    "llmd": _PALETTE[11],
    "sglang_least_load": _PALETTE[12],
    "dynamo_kv": _PALETTE[13],
    "lmetric": _PALETTE[15],
    "llmd_latency": _PALETTE[16],
    "routebalance": _PALETTE[17],
    "block_residual": sns.color_palette("pastel")[3],  # a light Block red
    "block_ttft": sns.color_palette("dark")[3],  # a dark Block red
    "block_social": sns.color_palette("dark")[4],
}
POLICY_MARKERS: dict[str, str] = {
    "block_oracle": "o", "block_star": "s", "llumnix": "^", "infaas": "v", "min_qpm": "D", "round_robin": "P",
    "random": "X", "block": "<", "block_noisy": ">", "block_nosim": "h", "least_requests": "p", "llmd": "*",
    "sglang_least_load": "d", "dynamo_kv": "H",
    "llumnix_full": "8",
    "lmetric": "1", "llmd_latency": "2", "routebalance": "3", "block_residual": "4", "block_ttft": "<",
    "block_social": ">",
}
# Short names for policy parameters that tell apart runs of one policy (e.g. "Block (k=2)").
_PARAM_NAMES = {"k": "k", "length_noise_pct": "len noise %", "latency_noise_pct": "lat noise %"}


class AnalysisError(Exception):
    """The runs lack what a figure needs (the command exits 2 with this message)."""


def theme() -> None:
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.15)
    plt.rcParams.update({"legend.frameon": True, "axes.titleweight": "bold"})


# ------------------------------------------------------------------------------------------------ run attributes
def policy_name(run: Run) -> str:
    return str(run.get("policy.name") or run.summary.get("policy") or "?")


def policy_params(run: Run) -> dict[str, Any]:
    pol = run.config.get("policy") if isinstance(run.config.get("policy"), dict) else {}
    out = {k: v for k, v in (pol or {}).items() if k != "name" and not isinstance(v, (dict, list))}
    if "k" not in out and run.summary.get("k") is not None:
        out["k"] = run.summary.get("k")
    return out


def run_qps(run: Run) -> float:
    q = run.summary.get("qps", run.get("workload.qps"))
    if q is None:
        raise AnalysisError(f"{run.path}: no QPS in summary.json or config.yaml")
    return float(q)


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def base_label(policy: str) -> str:
    return POLICY_LABELS.get(policy, policy)


def policy_labels(runs: Sequence[Run]) -> dict[Path, str]:
    """A legend label per run: the paper's policy name, plus the policy parameters that vary among runs of that
    policy (e.g. "Block (k=2)" and "Block (k=12)" when both are present; plain "Block" otherwise)."""
    by_policy: dict[str, list[Run]] = {}
    for r in runs:
        by_policy.setdefault(policy_name(r), []).append(r)
    labels: dict[Path, str] = {}
    for pol, rs in by_policy.items():
        params = [policy_params(r) for r in rs]
        keys = sorted({k for p in params for k in p})
        varying = [k for k in keys if len({repr(p.get(k)) for p in params}) > 1]
        for r, p in zip(rs, params):
            lab = base_label(pol)
            if varying:
                lab += " (" + ", ".join(f"{_PARAM_NAMES.get(k, k)}={_fmt(p.get(k))}" for k in varying) + ")"
            labels[r.path] = lab
    return labels


def label_policy(label: str) -> str:
    """The policy name behind a label (for colours and ordering): an exact legend name, else the longest legend name
    the label starts with followed by its parameters, e.g. "Block (hint) (k=2)" -> block, "Block (k=2)" ->
    block_oracle."""
    for pol, lab in POLICY_LABELS.items():
        if label == lab:
            return pol
    best = None
    for pol, lab in POLICY_LABELS.items():
        if label.startswith(lab + " (") and (best is None or len(lab) > len(POLICY_LABELS[best])):
            best = pol
    return best or label


def label_sort_key(label: str) -> tuple:
    """Paper order of the policies, then the label with numbers compared as numbers ("k=2" before "k=12")."""
    import re

    pol = label_policy(label)
    idx = POLICY_ORDER.index(pol) if pol in POLICY_ORDER else len(POLICY_ORDER)
    natural = tuple((0, float(t), "") if re.fullmatch(r"\d+(\.\d+)?", t) else (1, 0.0, t)
                    for t in re.split(r"(\d+(?:\.\d+)?)", label) if t)
    return (idx, natural)


def label_style(labels: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Colour, marker and line style per label; several labels of one policy share its colour, differ in style."""
    styles: dict[str, dict[str, Any]] = {}
    seen: Counter = Counter()
    extra = iter(sns.color_palette("husl", 24))
    dashes = ["-", "--", ":", "-."]
    for lab in sorted(set(labels), key=label_sort_key):
        pol = label_policy(lab)
        color = POLICY_COLORS.get(pol)
        if color is None:
            color = next(extra)
        n = seen[pol]
        seen[pol] += 1
        if n:  # further variants of one policy: the same hue, alternately lighter and darker, and another dash
            mix, toward = (0.35 * ((n + 1) // 2), 1.0) if n % 2 else (0.3 * (n // 2), 0.0)
            color = tuple((1 - mix) * c + mix * toward for c in matplotlib.colors.to_rgb(color))
        styles[lab] = {"color": color, "marker": POLICY_MARKERS.get(pol, "o"), "ls": dashes[n % len(dashes)]}
    return styles


def slo_from_runs(runs: Sequence[Run], override: float | None = None) -> float:
    """The TTFT SLO (s): ``override``, else the runs' ``slo.ttft_s`` (the most common), else 3 s."""
    if override is not None:
        return float(override)
    vals = [r.get("slo.ttft_s") for r in runs if r.get("slo.ttft_s") is not None]
    if not vals:
        return DEFAULT_SLO_S
    return float(Counter(float(v) for v in vals).most_common(1)[0][0])


def parse_filters(items: Sequence[str] | None) -> list[tuple[str, str]]:
    out = []
    for it in items or []:
        if "=" not in it:
            raise AnalysisError(f"--filter expects key=value (a dotted config key), got {it!r}")
        k, v = it.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def apply_filters(runs: Sequence[Run], filters: Sequence[tuple[str, str]]) -> list[Run]:
    """Keep runs whose config value at each dotted key equals the given value (compared as strings/numbers)."""

    def match(r: Run, k: str, v: str) -> bool:
        got = r.get(k)
        if got is None:
            return v.lower() in ("none", "null")
        if str(got).lower() == v.lower():
            return True
        try:
            return float(got) == float(v)
        except (TypeError, ValueError):
            return False

    return [r for r in runs if all(match(r, k, v) for k, v in filters)]


def load_runs(root: str | Path, filters: Sequence[str] | None = None) -> list[Run]:
    runs = find_runs(root)  # FileNotFoundError when there are none
    flt = parse_filters(filters)
    if flt:
        runs = apply_filters(runs, flt)
        if not runs:
            raise AnalysisError(f"no runs under {root} match the filters {filters}")
    return runs


def is_provisioning_run(run: Run) -> bool:
    en = run.get("provisioning.enabled")
    return bool(en) and str(en).lower() != "false"


def is_accuracy_run(run: Run) -> bool:
    try:
        return float(run.get("accuracy.sampling_rate") or 0.0) > 0.0
    except (TypeError, ValueError):
        return False


def comparable_runs(runs: Sequence[Run], what: str) -> list[Run]:
    """Drop the runs a policy comparison must not mix in: auto-provisioning runs (a changing instance count) and
    accuracy runs (sampled requests are duplicated to every instance, which adds load). Says what it dropped."""
    keep = [r for r in runs if not is_provisioning_run(r) and not is_accuracy_run(r)]
    dropped = len(runs) - len(keep)
    if dropped:
        log.warning("%s: left out %d auto-provisioning or accuracy-sampling run(s)", what, dropped)
    if not keep:
        raise AnalysisError(f"{what}: every run found is an auto-provisioning or accuracy-sampling run; "
                            "point it at a policy sweep")
    return one_run_length(keep, what)


def one_run_length(runs: Sequence[Run], what: str) -> list[Run]:
    """The runs of one request count: where a folder holds runs of several ``workload.num_requests`` (a sweep re-run
    at another scale writes beside the old one: the README's main job went from 3,000 to 10,000 requests), a figure
    would average them as if they were seeds and interpolate between them. Keeps the largest count's runs and says
    what it left out and how to draw it (``--filter workload.num_requests=N``)."""
    def count(r: Run) -> int | None:
        v = r.get("workload.num_requests")
        v = r.summary.get("num_requests") if v is None else v
        return None if v is None else int(v)

    counts = {count(r) for r in runs}
    if len(counts) < 2:
        return list(runs)
    best = max((c for c in counts if c is not None), default=None)
    keep = [r for r in runs if count(r) == best]
    others = sorted((c for c in counts if c != best), key=lambda c: (c is None, c or 0))
    log.warning("%s: runs of %s requests found; drawing the %d of %s requests, leaving out %d of %s (draw those with "
                "--filter workload.num_requests=N)", what, ", ".join(str(c) for c in sorted(c for c in counts if c)),
                len(keep), best, len(runs) - len(keep), ", ".join(map(str, others)))
    return keep


# ------------------------------------------------------------------------------------------------ numbers
def ok_requests(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if "status" in df.columns else df


def ecdf(values: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float))
    v = v[np.isfinite(v)]
    return v, np.arange(1, v.size + 1) / max(v.size, 1)


def gaussian_smooth(y: Sequence[float], sigma: float) -> np.ndarray:
    """Gaussian smoothing (as scipy.ndimage.gaussian_filter1d, truncate=4) with edge renormalisation; NaNs ignored."""
    y = np.asarray(y, dtype=float)
    if sigma <= 0 or y.size < 2:
        return y.copy()
    radius = int(4 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    kern = np.exp(-0.5 * (x / sigma) ** 2)
    valid = np.isfinite(y)
    num = np.convolve(np.where(valid, y, 0.0), kern, mode="same")
    den = np.convolve(valid.astype(float), kern, mode="same")
    if kern.size > y.size:  # np.convolve 'same' returns max(len) when the kernel is longer: centre-crop
        start = (kern.size - y.size) // 2
        num, den = num[start:start + y.size], den[start:start + y.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def pick_qps(present: Sequence[float], targets: Sequence[float] | None = None, limit: int = 5) -> list[float]:
    """The QPS values for the CDF panels: the present ones closest to ``targets`` (default the paper's 20, 24, 28,
    32, 36; all of them when no more than ``limit`` are present), without repeats, at most ``limit``."""
    present = sorted({float(q) for q in present})
    if not present:
        return []
    if targets is None:
        if len(present) <= limit:
            return present
        targets = (20, 24, 28, 32, 36)
    chosen: list[float] = []
    for t in targets:
        q = min(present, key=lambda p: (abs(p - float(t)), p))
        if q not in chosen:
            chosen.append(q)
    return sorted(chosen)[:limit]


@dataclass
class Capacity:
    """Max QPS before the P99 TTFT crosses the SLO (``analysis.capacity.interpolate_capacity``), as the figures show it.

    ``bound``: "exact" (an interpolated crossing), "lower" (the SLO holds up to the highest QPS measured: capacity is
    at least that), "upper" (the SLO fails already at the lowest QPS measured and is never crossed: capacity is
    below it), or "none" (no usable point). ``crossings`` > 1 flags a non-monotone curve (the last crossing is kept).
    """

    qps: float
    bound: str
    points: int
    qps_min: float = math.nan
    qps_max: float = math.nan
    crossings: int = 0
    note: str = ""

    def text(self, digits: int = 1) -> str:
        if not math.isfinite(self.qps):
            return "n/a"
        v = f"{self.qps:.{digits}f}"
        return {"lower": f"≥{v}", "upper": f"<{v}"}.get(self.bound, v)


def capacity(qps: Sequence[float], p99_ttft_s: Sequence[float], slo_s: float) -> Capacity:
    """Capacity by linear interpolation of P99 TTFT (s) vs QPS against the SLO (the rule of ``analysis.capacity``)."""
    from analysis.capacity import interpolate_capacity

    c = interpolate_capacity(list(qps), list(p99_ttft_s), slo_s)
    if c.capacity is None:
        return Capacity(math.nan, "none", c.num_points)
    bound = "lower" if c.lower_bound else ("upper" if c.exceeds_at_min and c.crossings == 0 else "exact")
    nan = math.nan
    return Capacity(float(c.capacity), bound, c.num_points, c.min_qps if c.min_qps is not None else nan,
                    c.max_qps if c.max_qps is not None else nan, c.crossings, c.note)


@dataclass
class SeedsCapacity:
    """One configuration's capacity over its seeds (one ``Capacity`` each), as the figures and tables report it.

    A seed whose SLO held up to the highest QPS has only a lower bound, so the mean with it is a lower bound too and a
    t-interval over censored values would look like a measurement it is not: ``bound`` is then "lower" and there is
    no interval ("upper" alike); seeds bounded both ways ("mixed") have no mean at all. ``seeds`` counts the seeds
    with a usable point; ``low``/``high`` (the 95 % Student-t interval, ``analysis.capacity.mean_interval``) are NaN
    unless at least two seeds all crossed the SLO."""

    qps: float
    low: float
    high: float
    seeds: int
    bound: str                 # exact | lower | upper | mixed | none
    bound_seeds: int           # seeds whose capacity is a bound
    per_seed: list[Capacity]

    def text(self, digits: int = 1) -> str:
        if len(self.per_seed) == 1:
            return self.per_seed[0].text(digits)
        if self.bound == "mixed":
            return " / ".join(c.text(digits) for c in self.per_seed if math.isfinite(c.qps))
        if not math.isfinite(self.qps):
            return "n/a"
        v = f"{self.qps:.{digits}f}"
        if self.bound in ("lower", "upper"):
            return {"lower": "≥", "upper": "<"}[self.bound] + v
        if math.isfinite(self.low) and math.isfinite(self.high):
            return f"{v} ± {(self.high - self.low) / 2:.{digits}f}"
        return v

    @property
    def note(self) -> str:
        notes = sorted({c.note for c in self.per_seed if c.note})
        n = len(self.per_seed)
        if n > 1 and self.bound in ("lower", "upper", "mixed"):
            what = {"lower": "the mean is a lower bound", "upper": "the mean is an upper bound",
                    "mixed": "bounds both ways, no mean"}[self.bound]
            notes.insert(0, f"{self.bound_seeds} of {n} seeds are bounds: {what}, no interval")
        if self.seeds < n:
            notes.append(f"{n - self.seeds} of {n} seeds without a usable point")
        return "; ".join(notes)


def seeds_capacity(per_seed: Sequence[Capacity], confidence: float = 0.95) -> SeedsCapacity:
    """Combine the seeds' capacities (``SeedsCapacity``): mean and t-interval when every usable seed crossed the SLO,
    else the bound they share (or "mixed"). One seed is reported as it is."""
    from analysis.capacity import mean_interval

    caps = list(per_seed)
    usable = [c for c in caps if c.bound != "none" and math.isfinite(c.qps)]
    kinds = {c.bound for c in usable}
    nb = sum(c.bound in ("lower", "upper") for c in usable)
    if not usable:
        return SeedsCapacity(math.nan, math.nan, math.nan, 0, "none", 0, caps)
    if {"lower", "upper"} <= kinds:
        return SeedsCapacity(math.nan, math.nan, math.nan, len(usable), "mixed", nb, caps)
    ci = mean_interval([c.qps for c in usable], confidence)
    bound = next((b for b in ("lower", "upper") if b in kinds), "exact")
    if bound != "exact":
        return SeedsCapacity(ci.mean, math.nan, math.nan, ci.n, bound, nb, caps)
    return SeedsCapacity(ci.mean, ci.low, ci.high, ci.n, bound, nb, caps)


# ------------------------------------------------------------------------------------------------ per-run table
def summary_table(runs: Sequence[Run], labels: dict[Path, str] | None = None) -> pd.DataFrame:
    """One row per run: label, policy, QPS and the latency/throughput figures in seconds (from summary.json, with
    the overhead share of E2E from requests.parquet)."""
    labels = labels or policy_labels(runs)
    rows = []
    def sec(s: dict, key: str) -> float:
        v = s.get(key)
        return float(v) / 1e3 if v is not None else math.nan

    for r in runs:
        s = r.summary
        row = {
            "label": labels[r.path], "policy": policy_name(r), "k": policy_params(r).get("k"), "qps": run_qps(r),
            "seed": r.get("seed", r.summary.get("seed")),
            "achieved_qps": s.get("achieved_qps"), "completed": s.get("completed"), "failed": s.get("failed"),
            "mean_e2e_s": sec(s, "mean_e2el_ms"), "p99_e2e_s": sec(s, "p99_e2el_ms"),
            "mean_ttft_s": sec(s, "mean_ttft_ms"), "p99_ttft_s": sec(s, "p99_ttft_ms"),
            "median_ttft_s": sec(s, "median_ttft_ms"), "request_throughput": s.get("request_throughput"),
            "output_throughput": s.get("output_throughput"), "num_preemptions": s.get("num_preemptions"),
            "mean_overhead_ms": s.get("mean_scheduler_overhead_ms"),
            "p99_overhead_ms": s.get("p99_scheduler_overhead_ms"),
            "run": str(r.path),
        }
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df["_o"] = df["label"].map(label_sort_key)
        df = df.sort_values(["_o", "qps"]).drop(columns="_o").reset_index(drop=True)
    return df


# ------------------------------------------------------------------------------------------------ CLI
def run_cli(description: str, add_args: Callable[[argparse.ArgumentParser], None],
            body: Callable[[argparse.Namespace], list[Path]], argv=None) -> int:
    """Parse arguments, run ``body``, print the written paths; exit 2 when there are no runs or they lack data."""
    mod = body.__module__
    if mod == "__main__":  # run as python -m analysis.<name>
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        mod = spec.name if spec is not None else None
    ap = argparse.ArgumentParser(prog=f"python -m {mod}" if mod else None, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="a run directory or a directory of runs (searched recursively)")
    add_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = body(args)
    except (FileNotFoundError, AnalysisError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        plt.close("all")
    for p in paths:
        print(p)
    return 0


def add_common_args(ap: argparse.ArgumentParser, slo: bool = True, qps_for: str | None = None) -> None:
    """The arguments every figure module takes; ``qps_for`` (e.g. "the latency panels") adds ``--qps``, the QPS those
    panels show."""
    if slo:
        ap.add_argument("--slo", type=float, default=None,
                        help="P99 TTFT SLO in seconds (default: the runs' slo.ttft_s, else 3)")
    ap.add_argument("--filter", action="append", metavar="KEY=VALUE", default=[],
                    help="keep only runs whose config has this value at this dotted key, e.g. engine.max_num_seqs=48 "
                         "(repeatable)")
    ap.add_argument("--out", default=None, help="output directory (default: <root>/figures)")
    if qps_for:
        ap.add_argument("--qps", type=float, default=None,
                        help=f"QPS of {qps_for} (default: the one most configurations share)")


def out_dir(args: argparse.Namespace) -> Path:
    from analysis.records import figures_dir

    if getattr(args, "out", None):
        p = Path(args.out)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return figures_dir(args.root)


def shared_legend(fig, axes, ncol: int | None = None, y: float = 1.0, **kw) -> None:
    """One legend for the figure, from the union of the axes' labelled artists (first occurrence wins)."""
    handles, labels = [], []
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, y), ncol=ncol or min(len(labels), 8),
                   frameon=False, **kw)


def plain_log_axis(ax, axis: str = "y") -> None:
    """Log scale with plain numbers (0.5, 1, 2, 5, 10 ...) instead of 10^x labels; minor ticks at 2 and 5 are
    labelled when the axis spans at most two decades, all of them when it spans less than a factor of 4. Data that
    span less than a factor of 3 keep a linear axis."""
    from matplotlib.ticker import FuncFormatter

    lo_d, hi_d = (ax.dataLim.y0, ax.dataLim.y1) if axis == "y" else (ax.dataLim.x0, ax.dataLim.x1)
    if np.isfinite(lo_d) and np.isfinite(hi_d) and lo_d > 0 and hi_d / lo_d < 3:
        return  # less than a factor of 3: a linear axis reads better (call after plotting)
    getattr(ax, f"set_{axis}scale")("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    lim = ax.get_ylim if axis == "y" else ax.get_xlim

    def major(v, _pos):
        return f"{v:g}"

    def minor(v, _pos):
        lo, hi = lim()
        if lo <= 0 or hi / lo > 100:
            return ""
        mant = v / 10 ** math.floor(math.log10(v) + 1e-9)
        keep = range(2, 10) if hi / lo <= 4 else (2, 5)
        return f"{v:g}" if round(mant) in keep and abs(mant - round(mant)) < 1e-6 else ""

    target.set_major_formatter(FuncFormatter(major))
    target.set_minor_formatter(FuncFormatter(minor))


# ------------------------------------------------------------------------------------------------ what a figure is
def _values_of(runs: Sequence[Run], key: str, summary_key: str | None = None) -> list[str]:
    """The distinct values (as text, in first-seen order) of a config key, else of a summary key, over ``runs``."""
    seen: dict[str, None] = {}
    for r in runs:
        v = r.get(key)
        if v is None and summary_key is not None:
            v = r.summary.get(summary_key)
        if v is not None:
            seen.setdefault(_fmt(v), None)
    return list(seen)


def _join(vals: Sequence[str], limit: int = 6) -> str:
    """'0, 1, 2' (a run of integers as '0-4'), '?' when empty, the first ``limit`` and a count when many."""
    if not vals:
        return "?"
    try:
        ints = sorted(int(v) for v in vals)
        if len(ints) > 2 and ints == list(range(ints[0], ints[-1] + 1)):
            return f"{ints[0]}-{ints[-1]}"
        vals = [str(i) for i in ints]
    except ValueError:
        pass
    return ", ".join(vals[:limit]) + (f" (+{len(vals) - limit})" if len(vals) > limit else "")


def stamp_text(runs: Sequence[Run], note: str = "") -> str:
    """One line saying what a figure shows: simulated or measured (and on what), device and execution-model
    profile, requests per point and seeds, read from the runs' configs and summaries.

    Figures leave the machine and get compared with the paper's; without this line a 1,000-request simulation
    looks like a 10,000-request measurement (issue 17)."""
    modes = _values_of(runs, "mode.name", "mode")
    gpus = _values_of(runs, "gpu.name", "gpu")
    n_inst = _values_of(runs, "cluster.num_instances", "num_instances")
    models = [m.split("/")[-1] for m in _values_of(runs, "model.name", "model")]
    tps = _values_of(runs, "engine.tensor_parallel")
    rules = _values_of(runs, "engine.scheduler")
    profiles = _values_of(runs, "gpu.profile_dir")
    kinds = []
    for m in modes or ["?"]:
        if m == "sim":
            kinds.append("SIMULATED (vidur execution model, in-process)")
        elif m == "emulate":
            engine = _values_of([r for r in runs if r.get("mode.name") == "emulate"], "mode.engine")
            kinds.append("MEASURED on loopback, real vLLM on CPU" if "vllm" in engine
                         else "EMULATED services on loopback (engines follow the execution model)")
        elif m == "deploy":
            kinds.append("MEASURED on deployed hosts")
        else:
            kinds.append(m)
    device = f"{_join(n_inst)} x {_join(gpus)}"
    if tps and tps != ["1"]:
        device += f" TP {_join(tps)}"
    parts = [" + ".join(kinds), f"{device}, {_join(models)}"]
    if "sim" in modes or "emulate" in modes:
        parts.append((f"profile {_join(profiles)}" if profiles else "no profile: roofline step times")
                     + (f", vLLM {_join(rules)} rules" if rules else ""))
    req = _values_of(runs, "workload.num_requests", "num_requests")
    parts.append(f"{_join(req)} requests per point")
    seeds = _values_of(runs, "seed", "seed")
    parts.append(f"seed{'s' if len(seeds) > 1 else ''} {_join(seeds)}")
    parts.append(f"{len(runs)} run{'s' if len(runs) != 1 else ''}")
    text = " | ".join(parts)
    return f"{text}\n{note}" if note else text


def stamp(fig, runs: Sequence[Run], note: str = "") -> None:
    """Write ``stamp_text`` under the figure (saved with bbox_inches='tight', so it is kept)."""
    fig.text(0.005, -0.005, stamp_text(runs, note), ha="left", va="top", fontsize=7.5, color="0.3",
             transform=fig.transFigure)


def save_stamped(fig, runs: Sequence[Run], out: Path, stem: str, note: str = "") -> list[Path]:
    """Stamp the figure with what it is, then save it as PNG and PDF (``analysis.records.save_figure``)."""
    from analysis.records import save_figure

    stamp(fig, runs, note)
    return save_figure(fig, out, stem)


def save_figure_and_table(fig, runs: Sequence[Run], out: Path, stem: str, table: pd.DataFrame, note: str = "",
                          extra: Sequence[Path] = ()) -> list[Path]:
    """The ending of a one-figure module: the stamped figure (``save_stamped``), then the ``extra`` files the module
    already wrote, then ``table`` as ``<stem>.csv``, in that order; the figure is closed. One place so that every
    module writes its figure and its numbers alike."""
    from analysis.records import save_csv

    paths = save_stamped(fig, runs, out, stem, note) + list(extra)
    plt.close(fig)
    paths.append(save_csv(table, out, stem))
    return paths


def runs_with_summary(args: argparse.Namespace, what: str, key: str, desc: str) -> list[Run]:
    """The comparable runs (``comparable_runs``) under ``args.root``, kept by ``args.filter``, whose summary has
    ``key``; ``AnalysisError`` naming ``desc`` (what ``key`` is) when none has."""
    runs = [r for r in comparable_runs(load_runs(args.root, args.filter), what) if key in r.summary]
    if not runs:
        raise AnalysisError(f"no run under {args.root} has {desc} in its summary")
    return runs


# ------------------------------------------------------------------------------------------------ throughput
STEADY_TRIM = 0.1  # share of the arrivals dropped at each end: warm-up before, drain after


def steady_window(req: pd.DataFrame, trim: float = STEADY_TRIM) -> tuple[float, float]:
    """The steady-state window (s): from the arrival of the ``trim`` quantile request plus the median E2E latency
    (the time a request takes to flow through) to the arrival of the ``1 - trim`` quantile request (no drain); when
    the latency leaves no room, from the first quantile's arrival. (nan, nan) without usable rows."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim={trim} must be in [0, 0.5)")
    if req.empty or "arrival_s" not in req.columns or "finish_s" not in req.columns:
        return math.nan, math.nan
    arr = np.sort(req["arrival_s"].to_numpy(float))
    t0, t1 = float(np.quantile(arr, trim)), float(np.quantile(arr, 1 - trim))
    ok = ok_requests(req)
    e2e = (ok["finish_s"] - ok["arrival_s"]).to_numpy(float)
    e2e = e2e[np.isfinite(e2e)]
    lag = float(np.median(e2e)) if e2e.size else 0.0
    if t1 > t0 + lag:
        t0 += lag
    return (t0, t1) if t1 > t0 else (math.nan, math.nan)


def steady_throughput(req: pd.DataFrame, trim: float = STEADY_TRIM) -> float:
    """Steady-state request throughput (req/s): requests finished inside ``steady_window``, per second.

    Completions over the whole run (``request_throughput``) include the warm-up (an empty cluster) and the drain after
    the last arrival, so every curve sits below the offered load and an overloaded policy with a long drain seems to
    lose throughput as load rises; inside the window a cluster below capacity finishes what arrives (= the offered
    load) and one past capacity finishes at its service rate."""
    t0, t1 = steady_window(req, trim)
    if not math.isfinite(t0):
        return math.nan
    fin = ok_requests(req)["finish_s"].to_numpy(float)
    return float(np.count_nonzero((fin >= t0) & (fin <= t1)) / (t1 - t0))


STEADY_CAPTION = (f"steady state: requests finished per second from the {STEADY_TRIM:.0%} quantile arrival + the "
                  f"median E2E to the {1 - STEADY_TRIM:.0%} quantile arrival (warm-up and drain dropped)")


def main_qps(runs: Sequence[Run]) -> float:
    """The QPS shared by the most configurations (policy, its parameters, arrivals): the QPS a preset sweeps its
    configurations at. A capacity search leaves probes at many QPS in the same folder, each for a few configurations
    only, so the most frequent QPS would pick a probe's."""
    configs: dict[float, set] = {}
    for r in runs:
        key = (policy_name(r), tuple(sorted((k, repr(v)) for k, v in policy_params(r).items())),
               r.get("workload.arrival"), r.get("workload.burstiness"))
        configs.setdefault(run_qps(r), set()).add(key)
    if not configs:
        raise AnalysisError("no runs")
    return max(configs, key=lambda q: (len(configs[q]), -q))


def shared_seeds(df: pd.DataFrame, by: Sequence[str], seed: str = "seed") -> tuple[pd.DataFrame, list[int]]:
    """The rows of ``df`` of the seeds the most configurations (groups of ``by``) share, and those seeds.

    A capacity search leaves probes of its other seeds at the sweep's QPS for some configurations only (wherever its
    bisection happened to land), and a sweep runs seed 0 for all: averaging whatever is there would set one
    configuration's seed-4 request sample beside another's seed 0. A configuration without those seeds is left out
    (with a warning naming it) rather than drawn from another request sample."""
    if df.empty:
        return df, []
    seeds = pd.to_numeric(df[seed], errors="coerce").fillna(0).astype(int)
    groups = {key: set(s) for key, s in seeds.groupby([df[b] for b in by], dropna=False)}
    count = Counter(s for g in groups.values() for s in g)
    best = min(count, key=lambda s: (-count[s], s))  # the seed the most configurations have (the lowest on a tie)
    common = sorted(set.intersection(*[g for g in groups.values() if best in g]))
    left_out = [key for key, g in groups.items() if not set(common) <= g]
    if left_out:
        log.warning("left out %s: no run with seed(s) %s, which the other configurations share", left_out, common)
    return df[seeds.isin(common)], common


def per_seed_capacities(row: pd.Series) -> dict[str, float]:
    """A capacity search's capacity per seed id (a row of ``analysis.capacity.capacity_results``; a seed without
    one, below the bracket, is left out)."""
    caps, ids = str(row.get("per_seed", "")).split(";"), str(row.get("seed_ids", "")).split(";")
    return {i: float(c) for i, c in zip(ids, caps) if c not in ("", "none", "nan")}


def paired_over_seeds(row: pd.Series, base: pd.Series, change: Callable[[float, float], float],
                      confidence: float = 0.95):
    """``change(row's capacity, base's)`` on every seed both searches have: its mean and t-interval
    (``analysis.capacity.Interval``; n = 0 without a shared seed). The seed moves every configuration's capacity
    the same way (the same requests and arrivals), so the paired change is much tighter than the difference of
    the two intervals, and the same seeds keep one request sample on both sides."""
    from analysis.capacity import mean_interval

    a, b = per_seed_capacities(row), per_seed_capacities(base)
    return mean_interval([change(a[s], b[s]) for s in sorted(set(a) & set(b))], confidence)


# Overrides that do not change what a run computes (conf/config.yaml's override_dirname exclude_keys, less
# `experiment`, which does): two capacity searches differing only in these searched the same configuration.
RUN_CONTROL_KEYS = ("output_root", "force", "progress", "logger", "hydra.verbose")
_SEARCH_RESULT_COLUMNS = ("path", "label", "capacity", "ci_low", "ci_high", "seeds", "sd", "per_seed", "seed_ids",
                          "statuses")


PAIRED = ["paired_change_pct", "paired_ci_low", "paired_ci_high", "paired_seeds"]


def paired_change(row: pd.Series, base: pd.Series | None) -> pd.Series:
    """A search's capacity change against a reference search (%), seed by seed over the seeds both searched, with its
    95 % t-interval (``PAIRED``): the seeds move both alike (same requests), so this is what a claim such as "100 %
    length noise costs under 3 %" (error heatmap, against the noise-free cell) or "burstiness moves capacity about
    1 %" (against b = 1) is read against; NaN without a reference."""
    if base is None:
        return pd.Series(dict.fromkeys(PAIRED, math.nan))
    c = paired_over_seeds(row, base, lambda new, ref: (new / ref - 1) * 100)
    return pd.Series(dict(zip(PAIRED, (c.mean, c.low, c.high, c.n))))


def widest_searches(cap: pd.DataFrame) -> pd.DataFrame:
    """One capacity search per configuration (rows of ``analysis.capacity.capacity_results``): the one with the most
    seeds.

    Adding seeds to a search (``capacity.seeds=5`` after ``capacity.seeds=2``) resumes its probes but writes a new
    ``capacity.json`` beside the old one (the folder is named by the overrides), so without this a figure draws
    both bars and a heatmap cell averages a 2-seed mean with the 5-seed mean that contains it. A dropped search
    whose seed the kept one lacks or reports differently is named in a warning (a search under other code)."""
    if cap.empty:
        return cap
    same = [c for c in cap.columns if c not in _SEARCH_RESULT_COLUMNS and c not in RUN_CONTROL_KEYS]
    config = cap[same].apply(lambda row: tuple(map(str, row)), axis=1)  # NaN as "nan": both lacking a key agree
    width = cap["seed_ids"].map(lambda s: len(str(s).split(";")))
    kept: dict[tuple, Any] = {}
    for i in width.sort_values(ascending=False, kind="stable").index:
        if config[i] not in kept:
            kept[config[i]] = i
            continue
        top = cap.loc[kept[config[i]]]
        theirs = per_seed_capacities(top)
        if any(theirs.get(seed) != c for seed, c in per_seed_capacities(cap.loc[i]).items()):
            log.warning("capacity search %s (seeds %s: %s) disagrees with %s (seeds %s: %s), which is kept",
                        cap.at[i, "path"], cap.at[i, "seed_ids"], cap.at[i, "per_seed"], top["path"],
                        top["seed_ids"], top["per_seed"])
    return cap.loc[sorted(kept.values())]


def seeds_text(seeds: Sequence[int]) -> str:
    """'seed 0' or 'seeds 0, 1' for a panel title ('no runs' for none)."""
    if not seeds:
        return "no runs"
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))
