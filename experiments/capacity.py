"""Capacity search by bisection on QPS: ``python -m experiments.capacity [overrides] capacity.slo_ttft_s=3
capacity.lo=10 capacity.hi=60 capacity.tol=0.25`` (``--help`` lists the keys).

Capacity is the highest QPS whose P99 TTFT stays within the SLO. Each probe is an ordinary run at one QPS, in the
directory ``python -m experiments.run <same overrides> workload.qps=<q>`` would use
(``<output_root>/<experiment_name>/<override dirname>``), so a search resumes, reuses runs of earlier searches and
sweeps with the same overrides, and its probes feed ``analysis.capacity`` like any run. The search:

1. probe ``lo``: above the SLO -> capacity < lo (``status: below_lo``, capacity null);
2. probe ``hi``: within the SLO -> capacity >= hi (``status: at_least_hi``, capacity = hi, a lower bound);
3. otherwise halve [lo, hi] (lo within the SLO, hi above it) until ``hi - lo <= tol``; midpoints are rounded to a
   multiple of ``capacity.grid`` (default: tol) so probe directories have short names and are shared between
   searches. ``capacity`` = the final lo (the highest QPS probed within the SLO); ``capacity_interpolated`` = where
   the straight line between the final lo and hi points crosses the SLO (the paper's rule, analysis.capacity).

It assumes P99 TTFT grows with QPS (the fixed seed keeps the request sample the same at every QPS, but queueing
noise can make the curve locally non-monotone: ``analysis.capacity`` on a grid sweep shows it).
The result, ``capacity.json`` (method, slo, probes, capacity), is written atomically to
``<output_root>/<experiment_name>/capacity/<override dirname>/``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments import schema
from experiments.rundir import run_dirname
from experiments.wiring import ConfigError

log = logging.getLogger("experiments.capacity")

HELP = """== experiments.capacity ==
Bisection on workload.qps for the highest QPS whose P99 TTFT stays within the SLO; every probe is a normal
simulated run (resumable, shared with sweeps). Writes capacity.json atomically into
  <output_root>/<experiment_name>/capacity/<override dirname>/

  python -m experiments.capacity cluster=local4 policy=block_oracle workload.num_requests=1000 \\
      capacity.slo_ttft_s=3 capacity.lo=1 capacity.hi=20 capacity.tol=0.25
  python -m experiments.capacity experiment=fig6 policy=block_star capacity.lo=20 capacity.hi=40

== capacity keys ==
  capacity.slo_ttft_s  P99 TTFT SLO in seconds (default: slo.ttft_s = 3; the SYSTOR artifact uses 10)
  capacity.lo, .hi     the QPS bracket (lo is expected within the SLO, hi above it)
  capacity.tol         stop when hi - lo <= tol (QPS)
  capacity.grid        probes are rounded to multiples of grid (default null: tol); 0 = no rounding
  capacity.max_probes  safety cap on the number of runs
Every other key is a run's (see python -m experiments.run --help).

== Config groups ==
$APP_CONFIG_GROUPS
== Config ==
$CONFIG
"""

# The entry point's primary config: conf/config.yaml plus the capacity node (stored here, so conf/ has no extra file).
ConfigStore.instance().store(name="capacity_search", node={
    "defaults": ["config", "_self_"],
    "capacity": {"slo_ttft_s": "${slo.ttft_s}", "lo": 10.0, "hi": 60.0, "tol": 0.25, "grid": None, "max_probes": 30},
    "hydra": {
        "run": {"dir": "${output_root}/${experiment_name}/capacity/${run_dirname:}"},
        "help": {"app_name": "experiments.capacity", "template": HELP},
    },
})


def fmt_qps(q: float) -> str:
    """A QPS as it appears in a run directory name (20.0 -> '20', 28.75 -> '28.75')."""
    return f"{q:.6g}"


def probe_dir(cfg: DictConfig, qps: float) -> Path:
    """The run directory ``python -m experiments.run <this job's overrides> workload.qps=<qps>`` would use."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hc = HydraConfig.get()
    keep = [o.input_line for o in OverridesParser.create().parse_overrides(list(hc.overrides.task))
            if not o.key_or_group.startswith("capacity.") and o.key_or_group != "workload.qps"]
    od = hc.job.config.override_dirname
    name = run_dirname(keep + [f"workload.qps={fmt_qps(qps)}"], exclude_keys=list(od.exclude_keys),
                       item_sep=str(od.item_sep), kv_sep=str(od.kv_sep))
    return Path(str(cfg.output_root)) / str(cfg.experiment_name) / name


def run_probe(cfg: DictConfig, qps: float) -> dict[str, Any]:
    """One run at ``qps`` (skipped if its summary exists); returns its summary."""
    from experiments import logger as run_logger
    from experiments.run import run_one

    run_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(run_cfg):
        run_cfg.pop("capacity", None)
        run_cfg.workload.qps = float(qps)
    OmegaConf.set_struct(run_cfg, True)
    run_dir = probe_dir(cfg, qps)
    summary = run_one(run_cfg, run_dir)
    run_logger.log_run(run_cfg, run_dir, summary)
    if summary is None:
        summary = json.loads((run_dir / "summary.json").read_text())
    summary = dict(summary)
    summary["_run_dir"] = str(run_dir)
    return summary


def _snap(x: float, grid: float) -> float:
    return round(x / grid) * grid if grid > 0 else x


def bisect(probe, slo_s: float, lo: float, hi: float, tol: float, grid: Optional[float] = None,
           max_probes: int = 30) -> dict[str, Any]:
    """Bisection on QPS. ``probe(qps) -> summary`` (with p99_ttft_ms); returns the capacity.json content."""
    if not (0 < lo < hi):
        raise ConfigError(f"capacity.lo={lo} and capacity.hi={hi} must satisfy 0 < lo < hi")
    if tol <= 0:
        raise ConfigError(f"capacity.tol={tol} must be > 0")
    if slo_s <= 0:
        raise ConfigError(f"capacity.slo_ttft_s={slo_s} must be > 0")
    grid = tol if grid is None else float(grid)
    probes: list[dict[str, Any]] = []

    def measure(q: float) -> bool:
        s = probe(q)
        p99 = s.get("p99_ttft_ms")
        p99_s = math.inf if p99 is None else float(p99) / 1e3
        ok = p99_s <= slo_s
        probes.append({"qps": q, "p99_ttft_s": None if math.isinf(p99_s) else p99_s, "within_slo": ok,
                       "completed": s.get("completed"), "failed": s.get("failed"), "run_dir": s.get("_run_dir")})
        log.info("probe qps=%s: p99 TTFT %.3f s -> %s", fmt_qps(q), p99_s, "within SLO" if ok else "above SLO")
        return ok

    result: dict[str, Any] = {"method": "bisection", "slo_ttft_s": slo_s, "lo": lo, "hi": hi, "tol": tol,
                              "grid": grid, "probes": probes}
    if not measure(lo):
        result.update(capacity=None, capacity_interpolated=None, status="below_lo",
                      note=f"P99 TTFT exceeds the SLO already at capacity.lo={lo:g}: capacity < {lo:g}")
        return result
    if measure(hi):
        result.update(capacity=hi, capacity_interpolated=None, status="at_least_hi",
                      note=f"within the SLO at capacity.hi={hi:g}: capacity >= {hi:g} (a lower bound)")
        return result
    a, b = lo, hi
    while b - a > tol and len(probes) < max_probes:
        mid = _snap((a + b) / 2, grid)
        if not a < mid < b:  # the grid is too coarse for this bracket
            mid = (a + b) / 2
        if measure(mid):
            a = mid
        else:
            b = mid
    pa = next(p for p in probes if p["qps"] == a)
    pb = next(p for p in probes if p["qps"] == b)
    interp = None
    if pa["p99_ttft_s"] is not None and pb["p99_ttft_s"] is not None and pb["p99_ttft_s"] != pa["p99_ttft_s"]:
        interp = a + (slo_s - pa["p99_ttft_s"]) * (b - a) / (pb["p99_ttft_s"] - pa["p99_ttft_s"])
    status = "converged" if b - a <= tol else "max_probes"
    result.update(capacity=a, capacity_interpolated=interp, bracket=[a, b], status=status,
                  note=f"capacity in [{a:g}, {b:g}): highest QPS probed within the SLO = {a:g}")
    return result


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    from vidur.records import write_text

    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@hydra.main(config_path="../conf", config_name="capacity_search", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig

    from experiments import logger as run_logger

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    c = cfg.capacity
    try:
        run_logger.check(cfg)
        result = bisect(lambda q: run_probe(cfg, q), float(c.slo_ttft_s), float(c.lo), float(c.hi), float(c.tol),
                        None if c.get("grid") is None else float(c.grid), int(c.max_probes))
    except (ConfigError, run_logger.LoggerError) as err:
        log.error("configuration error: %s", err)
        print(f"configuration error: {err}", file=sys.stderr)
        raise SystemExit(2)
    result["config"] = {k: OmegaConf.select(cfg, k) for k in (
        "experiment_name", "policy.name", "policy.k", "cluster.num_instances", "model.name", "dataset.name",
        "engine.name", "engine.max_num_seqs", "engine.chunk_size", "workload.num_requests", "workload.arrival",
        "seed")}
    write_json_atomic(out_dir / "capacity.json", result)
    cap = result["capacity"]
    print(f"capacity={'none' if cap is None else fmt_qps(cap)} status={result['status']} "
          f"slo_ttft_s={result['slo_ttft_s']:g} probes={len(result['probes'])} -> {out_dir / 'capacity.json'}")
    return cap


if __name__ == "__main__":
    schema.refuse_secret_arguments(sys.argv[1:])  # before Hydra writes the command line into .hydra/
    main()
