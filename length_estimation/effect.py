"""The effect of response-length estimation on Block's capacity and tail latency, in simulation.

``python -m length_estimation.effect [--estimator cpu] [--qps 20,24,27,30,33,36] [--num-requests 2000] [--seeds 0,1,2]``

1. Tags the held-out test split of ``sharegpt_text`` (``features.load_split``; rows the estimator never saw) with the
   estimator's predictions and writes it as ``<out>/data/test-<tag>.parquet`` (``prompt_tokens``,
   ``output_tokens``, ``predicted_length``, ``prompt``: the format ``data.load_dataset`` reads).
2. Runs the sweeps with ``python -m experiments.run -m`` and the overrides of ``sim_overrides`` (12 A30 instances,
   Llama-2-7B, Fig 6's engine: chunked prefill 512, batch cap 48; k = 12, ``dataset.path`` = that file,
   ``dataset.predicted_length=column``): Block* (``block_star``, the estimator's lengths), Block with oracle lengths
   (``block_oracle``) and Block with noisy oracles (``block_noisy``, ``length_noise_pct`` 10/25/50/100: Block's
   per-instance Gaussian noise on the true length). Runs go to ``<out>/<estimator tag>/<policy,qps,seed...>``.
   Every point is run with each workload seed (different requests and arrivals); the table and figure show the
   mean over seeds (the figure shades min..max). Finished runs are skipped (resume); ``--force`` reruns.
3. Capacity per variant with ``python -m analysis.capacity`` (linear interpolation of P99 TTFT against the SLO,
   3 s), and writes ``<out>/<tag>/effect.csv`` (every point), ``effect.md`` (the table) and ``effect.png``/``.pdf``.

Everything runs through the command lines (no import of ``experiments``/``analysis``: this package sits below them).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from length_estimation.serve import load_estimator
from vidur.records import write_atomic, write_text

log = logging.getLogger("length_estimation.effect")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("outputs") / "length_effect"
DEFAULT_QPS = (20, 24, 27, 30, 33, 36)
DEFAULT_NOISE = (10, 25, 50, 100)


def estimator_tag(spec: str) -> str:
    """A short directory-safe name of an estimator spec (``cpu``, a file stem, a checkpoint dir name)."""
    s = spec.strip().rstrip("/")
    base = s if s.lower() in ("cpu", "auto") else Path(s).stem or Path(s).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base)


def write_tagged_test_split(spec: str, path: Path, dataset: str = "sharegpt_text", seed: int = 42) -> dict:
    """Write the held-out split tagged by the estimator ``spec``; return its accuracy on those rows."""
    from length_estimation.features import load_split
    from length_estimation.metrics import length_metrics

    est = load_estimator(spec)
    if est is None:
        raise ValueError("--estimator none: nothing to evaluate")
    _, te = load_split(dataset, seed=seed)
    t0 = time.perf_counter()
    pred = np.asarray(est.predict(te["prompt"].astype(str).tolist()), dtype=np.int64)
    dt = time.perf_counter() - t0
    out = pd.DataFrame({"row": te["row"].to_numpy(), "prompt_tokens": te["prompt_tokens"].to_numpy(),
                        "output_tokens": te["output_tokens"].to_numpy(), "predicted_length": pred,
                        "prompt": te["prompt"].astype(str).to_numpy()})
    write_atomic(path, lambda tmp: out.to_parquet(tmp, index=False))
    m = length_metrics(out["output_tokens"], out["predicted_length"])
    m.update(estimator=getattr(est, "name", spec), rows=len(out), predict_s=round(dt, 2))
    return m


def variants(noise: Sequence[float]) -> list[tuple[str, list[str]]]:
    """(label, experiments.run overrides) per curve."""
    out = [("Block* (estimator)", ["policy=block_star"]), ("Block (oracle)", ["policy=block_oracle"])]
    out += [(f"Block noisy {n:g}%", ["policy=block_noisy", f"policy.length_noise_pct={float(n)}"]) for n in noise]
    return out


# keys fixed by the study: left out of the run directory names (Hydra's override_dirname)
_FIXED_KEYS = ["experiment", "output_root", "force", "progress", "logger", "hydra.verbose", "experiment_name",
               "cluster", "model", "engine", "dataset", "provisioning", "dataset.path", "dataset.predicted_length",
               "engine.max_num_seqs", "engine.chunk_size", "engine.max_model_len"]


def sim_overrides(data_file: Path, tag: str, out_root: Path, num_requests: int, k: Optional[int] = 12) -> list[str]:
    """``experiments.run`` overrides of the study (everything but policy, QPS and seed)."""
    return [f"output_root={out_root}", f"experiment_name={tag}", "cluster=a30x12", "model=llama2_7b",
            "engine=vllm_chunked", "dataset=sharegpt_text", "provisioning=none", f"dataset.path={data_file}",
            "dataset.predicted_length=column", "engine.max_num_seqs=48", "engine.chunk_size=512",
            "engine.max_model_len=4096", f"policy.k={'null' if k is None else int(k)}",
            f"workload.num_requests={num_requests}", "progress=false",
            "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(_FIXED_KEYS) + "]"]


def run_sweeps(data_file: Path, tag: str, out_root: Path, qps: Sequence[float], num_requests: int,
               noise: Sequence[float], k: Optional[int], force: bool, jobs: int, seeds: Sequence[int]) -> None:
    common = sim_overrides(data_file, tag, out_root, num_requests, k) + [
        "workload.qps=" + ",".join(f"{q:g}" for q in qps), "seed=" + ",".join(str(int(x)) for x in seeds)]
    if force:
        common.append("force=true")
    if jobs > 1:
        common += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    noisy = ["policy=block_noisy", "policy.length_noise_pct=" + ",".join(f"{float(n)}" for n in noise)]
    for extra in (["policy=block_star,block_oracle"], noisy if len(noise) else None):
        if extra is None:
            continue
        cmd = [sys.executable, "-m", "experiments.run", "-m", *common, *extra]
        log.info("running: %s", " ".join(cmd))
        r = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"experiments.run failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def collect(run_root: Path) -> pd.DataFrame:
    """One row per finished run under ``run_root``: variant label, QPS, P99/median TTFT and E2E (s), completed."""
    import yaml

    rows = []
    for s in sorted(run_root.rglob("summary.json")):
        if "figures" in s.parts:
            continue
        summ = json.loads(s.read_text())
        cfg = yaml.safe_load((s.parent / "config.yaml").read_text())
        pol = cfg["policy"]
        name = pol["name"]
        if name == "block_star":
            label = "Block* (estimator)"
        elif name == "block_oracle":
            label = "Block (oracle)"
        elif name == "block_noisy":
            label = f"Block noisy {float(pol.get('length_noise_pct') or 0):g}%"
        else:
            label = name
        rows.append({"variant": label, "policy": name, "length_noise_pct": pol.get("length_noise_pct"),
                     "k": pol.get("k"), "qps": float(cfg["workload"]["qps"]), "seed": cfg.get("seed"),
                     "num_requests": summ.get("num_requests"), "completed": summ.get("completed"),
                     "p99_ttft_s": summ.get("p99_ttft_ms", np.nan) / 1e3,
                     "p99_e2e_s": summ.get("p99_e2el_ms", np.nan) / 1e3,
                     "median_ttft_s": summ.get("median_ttft_ms", np.nan) / 1e3,
                     "median_e2e_s": summ.get("median_e2el_ms", np.nan) / 1e3,
                     "num_preemptions": summ.get("num_preemptions"), "run": str(s.parent),
                     "mode": (cfg.get("mode") or {}).get("name"), "profile": (cfg.get("gpu") or {}).get("profile_dir")})
    if not rows:
        raise FileNotFoundError(f"no finished runs under {run_root}")
    return pd.DataFrame(rows).sort_values(["variant", "qps", "seed"]).reset_index(drop=True)


def mean_over_seeds(points: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, QPS): the mean of each latency over the seeds, their min/max and the seed count."""
    cols = ["p99_ttft_s", "p99_e2e_s", "median_ttft_s", "median_e2e_s"]
    g = points.groupby(["variant", "qps"])
    out = g[cols].mean()
    for c in ("p99_ttft_s", "p99_e2e_s"):
        out[c + "_min"] = g[c].min()
        out[c + "_max"] = g[c].max()
    out["seeds"] = g["seed"].nunique()
    return out.reset_index()


def capacities(run_root: Path, slo_s: float) -> pd.DataFrame:
    """``python -m analysis.capacity`` on the runs, read back from its CSV: variant -> capacity and flags."""
    cmd = [sys.executable, "-m", "analysis.capacity", str(run_root), "--slo", f"{slo_s:g}",
           "--group-by", "policy.name,policy.length_noise_pct"]
    r = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    if r.returncode != 0:
        raise RuntimeError(f"analysis.capacity failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    m = re.search(r"wrote (\S+\.csv)", r.stdout)
    csv = Path(m.group(1)) if m else run_root / "figures" / f"capacity_slo{slo_s:g}s.csv"
    if not csv.is_absolute():
        csv = REPO / csv
    cap = pd.read_csv(csv)
    labels = []
    for _, row in cap.iterrows():
        name = row["policy.name"]
        if name == "block_star":
            labels.append("Block* (estimator)")
        elif name == "block_oracle":
            labels.append("Block (oracle)")
        else:
            labels.append(f"Block noisy {float(row['policy.length_noise_pct']):g}%")
    cap["variant"] = labels
    return cap


def order_key(label: str) -> tuple:
    if label.startswith("Block*"):
        return (0, 0.0)
    if label.startswith("Block (oracle)"):
        return (1, 0.0)
    num = re.findall(r"[\d.]+", label)
    return (2, float(num[0]) if num else 0.0)


def table(points: pd.DataFrame, cap: pd.DataFrame, acc: Optional[dict]) -> str:
    qps = sorted(points["qps"].unique())
    head = ["variant", "length error told to the what-if", "capacity (QPS) @ P99 TTFT 3 s"] + \
        [f"QPS {q:g}: P99 TTFT / E2E (s)" for q in qps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in sorted(points["variant"].unique(), key=order_key):
        g = points[points["variant"] == label].set_index("qps")
        c = cap[cap["variant"] == label]
        if len(c):
            cv = c.iloc[0]
            cap_s = f"{cv['capacity']:.1f}"
            if bool(cv.get("lower_bound")):
                cap_s = ">= " + cap_s
            elif bool(cv.get("exceeds_at_min")) and int(cv.get("crossings", 0)) == 0:
                cap_s = "< " + cap_s
        else:
            cap_s = "-"
        if label.startswith("Block*"):
            err = f"estimator: MAE {acc['mae']:.0f} tok, MAPE {acc['mape']:.0f}%" if acc else "estimator"
        elif label.startswith("Block (oracle)"):
            err = "none (true length)"
        else:
            pct = re.findall(r"[\d.]+", label)[0]
            err = f"x clip(1 + N(0, {pct}%), 0.1, 5)"
        cells = [label, err, cap_s]
        for q in qps:
            if q in g.index:
                r = g.loc[q]
                cells.append(f"{r['p99_ttft_s']:.2f} / {r['p99_e2e_s']:.1f}")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(points: pd.DataFrame, cap: pd.DataFrame, slo_s: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(points["variant"].unique(), key=order_key)
    cmap = plt.get_cmap("viridis")
    noisy = [lb for lb in labels if lb.startswith("Block noisy")]
    colors = {"Block* (estimator)": "tab:red", "Block (oracle)": "black"}
    for i, lb in enumerate(noisy):
        colors[lb] = cmap(0.15 + 0.7 * i / max(1, len(noisy) - 1))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for lb in labels:
        g = points[points["variant"] == lb].sort_values("qps")
        style = dict(color=colors.get(lb), marker="o", ms=4, lw=2.2 if lb.startswith("Block*") else 1.4,
                     ls="--" if lb.startswith("Block noisy") else "-")
        axes[0].plot(g["qps"], g["p99_ttft_s"], label=lb, **style)
        axes[1].plot(g["qps"], g["p99_e2e_s"], label=lb, **style)
        if "p99_ttft_s_min" in g and (g["seeds"] > 1).any():
            for ax, c in ((axes[0], "p99_ttft_s"), (axes[1], "p99_e2e_s")):
                ax.fill_between(g["qps"], g[c + "_min"], g[c + "_max"], color=colors.get(lb), alpha=0.08, lw=0)
    axes[0].axhline(slo_s, color="grey", lw=1, ls=":")
    axes[0].text(points["qps"].min(), slo_s * 1.1, f"SLO {slo_s:g} s", color="grey", fontsize=8)
    for ax, name in ((axes[0], "P99 TTFT (s), log scale"), (axes[1], "P99 E2E latency (s)")):
        ax.set_xlabel("QPS")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    caps = [cap[cap["variant"] == lb]["capacity"].iloc[0] if (cap["variant"] == lb).any() else np.nan
            for lb in labels]
    axes[2].bar(range(len(labels)), caps, color=[colors.get(lb) for lb in labels])
    axes[2].set_xticks(range(len(labels)))
    axes[2].set_xticklabels([lb.replace(" (", "\n(").replace("noisy ", "noisy\n") for lb in labels], fontsize=8)
    axes[2].set_ylabel(f"capacity (QPS at P99 TTFT = {slo_s:g} s)")
    finite = [c for c in caps if np.isfinite(c)]
    if finite:
        axes[2].set_ylim(min(finite) * 0.9, max(finite) * 1.04)
    for i, c in enumerate(caps):
        if np.isfinite(c):
            axes[2].text(i, c, f"{c:.1f}", ha="center", va="bottom", fontsize=8)
    axes[2].grid(axis="y", alpha=0.3)
    handles, lbls = axes[0].get_legend_handles_labels()
    fig.legend(handles, lbls, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title, y=0.03, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 0.92))
    path.parent.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        write_atomic(path.with_suffix(f".{ext}"), lambda tmp, ext=ext: fig.savefig(tmp, dpi=130, format=ext))
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m length_estimation.effect", description=__doc__.split("\n\n")[0])
    ap.add_argument("--estimator", default="cpu", help="cpu (shipped), an .npz CPU model or a transformer "
                                                       "checkpoint directory (default cpu)")
    ap.add_argument("--qps", default=",".join(str(q) for q in DEFAULT_QPS), help="comma-separated QPS points")
    ap.add_argument("--num-requests", type=int, default=2000, help="requests per run (held-out rows: ~2,160)")
    ap.add_argument("--noise", default=",".join(str(n) for n in DEFAULT_NOISE),
                    help="length_noise_pct values of block_noisy (empty: none)")
    ap.add_argument("--k", type=int, default=12, help="instances probed per request (default 12 = fan-out, as the "
                                                     "arXiv Fig 6; 2 = Po2)")
    ap.add_argument("--slo", type=float, default=3.0, help="P99 TTFT SLO for capacity, seconds (default 3)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"output root (default {DEFAULT_OUT})")
    ap.add_argument("--jobs", type=int, default=1, help="parallel runs (hydra joblib launcher) (default 1)")
    ap.add_argument("--seeds", default="0,1,2", help="workload seeds, each point runs once per seed (default 0,1,2)")
    ap.add_argument("--force", action="store_true", help="rerun finished runs")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table and figure")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    tag = estimator_tag(args.estimator)
    data_file = out / "data" / f"test-{tag}.parquet"
    run_root = out / tag
    qps = [float(q) for q in args.qps.split(",") if q.strip()]
    noise = [float(n) for n in args.noise.split(",") if n.strip()]
    acc_file = out / "data" / f"test-{tag}.accuracy.json"
    t0 = time.perf_counter()
    if not args.report_only:
        acc = write_tagged_test_split(args.estimator, data_file)
        write_text(acc_file, json.dumps(acc, indent=1))
        log.info("estimator %s on the %d held-out rows: MAE %.1f, MAPE %.1f%%", acc["estimator"], acc["rows"],
                 acc["mae"], acc["mape"])
        run_sweeps(data_file.resolve(), tag, out.resolve(), qps, args.num_requests, noise, args.k, args.force,
                   args.jobs, [int(x) for x in args.seeds.split(",") if x.strip()])
    acc = json.loads(acc_file.read_text()) if acc_file.exists() else None
    raw = collect(run_root)
    cap = capacities(run_root, args.slo)
    merged = raw.merge(cap[["variant", "capacity"]], on="variant", how="left")
    write_atomic(run_root / "effect.csv", lambda tmp: merged.to_csv(tmp, index=False))
    points = mean_over_seeds(raw)
    n_req = int(raw["num_requests"].iloc[0])
    k = raw["k"].iloc[0]
    n_seeds = int(points["seeds"].max())
    kinds = ", ".join("SIMULATED (vidur execution model, in-process)" if m == "sim" else f"mode {m}"
                      for m in sorted(raw["mode"].dropna().unique())) or "mode unknown"
    profiles = ", ".join(str(x) for x in sorted(raw["profile"].dropna().unique())) or "unknown"
    title = (f"{kinds}, profile {profiles} | "  # what the figure is, as analysis.common.stamp_text says it
             f"sharegpt_text held-out prompts (Llama-2 counts), {n_req} requests per point, mean of {n_seeds} "
             f"seed(s), 12 x A30 Llama-2-7B, k={k}, chunked prefill 512, batch cap 48; capacity at P99 TTFT "
             f"{args.slo:g} s (analysis.capacity)")
    md = (f"# Effect of length estimation ({tag})\n\n{title}.\n\n" + table(points, cap, acc))
    write_text(run_root / "effect.md", md)
    figure(points, cap, args.slo, run_root / "effect", title)
    sys.stdout.write(md)
    print(f"\nwrote {run_root / 'effect.csv'}, {run_root / 'effect.md'}, {run_root / 'effect.png'} "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
