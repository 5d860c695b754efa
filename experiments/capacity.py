"""Capacity search by bisection on QPS, over several seeds: ``python -m experiments.capacity [overrides]
capacity.slo_ttft_s=3 capacity.lo=10 capacity.hi=60 capacity.tol=0.1 capacity.seeds=5`` (``--help`` lists the keys).

Capacity is the highest QPS whose P99 TTFT stays within the SLO. Each probe is an ordinary run at one QPS, in the
directory ``python -m experiments.run <same overrides> workload.qps=<q>`` would use
(``<output_root>/<experiment_name>/<override dirname>``), so a search resumes, reuses runs of earlier searches and
sweeps with the same overrides, and its probes feed ``analysis.capacity`` like any run. Seeds: the job's own
``seed`` probes in exactly that directory; every further seed adds ``seed=<s>`` to the overrides (its own runs).
Per seed, the search:

1. probe ``lo``: above the SLO -> capacity < lo (``status: below_lo``, capacity null);
2. probe ``hi``: within the SLO -> capacity >= hi (``status: at_least_hi``, capacity = hi, a lower bound);
3. otherwise halve [lo, hi] (lo within the SLO, hi above it) until ``hi - lo <= tol``; midpoints are rounded to a
   multiple of ``capacity.grid`` (default: tol) so probe directories have short names and are shared between
   searches. ``capacity`` = the final lo (the highest QPS probed within the SLO); ``capacity_interpolated`` = where
   the straight line between the final lo and hi points crosses the SLO (the paper's rule, analysis.capacity).

The seeds' capacities give the result's ``capacity`` (their mean) and a Student-t interval (``ci_low``,
``ci_high``, ``capacity.confidence``, default 95 %): capacity moves with the seed (the request sample and the
arrivals), and one seed's number hides it (issue 17).

Early stop (``capacity.early_stop``, default true): a probe that is certain to violate the SLO stops as soon as it
is certain. Every 100 arrivals the simulated cluster is advanced to the current arrival and the requests whose TTFT
already exceeds the SLO are counted (those with a first token later than arrival + SLO, and those still without one
after the SLO: their TTFT can only grow). The P99 over ``n`` requests (numpy's linear rule) exceeds the SLO once more
than ``n - floor(0.99 (n - 1))`` of them do, whatever the rest do, so the verdict is exact; requests that could
still be rejected (too long for the engine) are not counted. A stopped probe writes no run records (it is not a
complete run) but its verdict, in ``<output_root>/<experiment_name>/capacity/early_stop/<run dirname>.json``, so a
rerun skips it too. Probes within the SLO run to the end (their records are ordinary runs).

It assumes P99 TTFT grows with QPS (the fixed seed keeps the request sample the same at every QPS, but queueing
noise can make the curve locally non-monotone: ``analysis.capacity`` on a grid sweep shows it).
The result, ``capacity.json`` (method, slo, per-seed probes and capacities, the mean and interval), is written
atomically to ``<output_root>/<experiment_name>/capacity/<override dirname>/``; ``python -m analysis.capacity_refine``
draws the capacities with their intervals.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional

if __name__ == "__main__":
    from experiments.blas_threads import import_numpy_single_threaded

    import_numpy_single_threaded()  # before anything imports numpy: no idle BLAS thread (experiments.blas_threads)

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments import compose_cache, schema
from experiments.rundir import run_dirname
from experiments.wiring import ConfigError

log = logging.getLogger("experiments.capacity")

HELP = """== experiments.capacity ==
Bisection on workload.qps for the highest QPS whose P99 TTFT stays within the SLO; every probe is a normal
simulated run (resumable, shared with sweeps). Writes capacity.json atomically into
  <output_root>/<experiment_name>/capacity/<override dirname>/

  python -m experiments.capacity cluster=local4 policy=block_oracle workload.num_requests=1000 \\
      capacity.slo_ttft_s=3 capacity.lo=1 capacity.hi=20 capacity.tol=0.25 capacity.seeds=3
  python -m experiments.capacity experiment=fig6 policy=block_star capacity.lo=20 capacity.hi=40
  python -m experiments.capacity -m experiment=capacity_refine          # every Fig 6 policy, 5 seeds, 0.1 QPS
  python -m experiments.capacity -m experiment=capacity_refine --dry-run  # the searches, the most probe runs each
                                                                         # takes, the probes on disk it would reuse

== capacity keys ==
  capacity.slo_ttft_s  P99 TTFT SLO in seconds (default: slo.ttft_s = 3; the SYSTOR artifact uses 10)
  capacity.lo, .hi     the QPS bracket (lo is expected within the SLO, hi above it)
  capacity.tol         stop when hi - lo <= tol (QPS)
  capacity.grid        probes are rounded to multiples of grid (default null: tol); 0 = no rounding
  capacity.max_probes  safety cap on the number of runs (per seed)
  capacity.seeds       how many seeds (an int: seed, seed+1, ...) or a list of seeds (default 5)
  capacity.confidence  of the t-interval over the seeds' capacities (default 0.95)
  capacity.early_stop  stop a probe once its P99 TTFT is certain to exceed the SLO (default true; exact)
Every other key is a run's (see python -m experiments.run --help).

== Config groups ==
$APP_CONFIG_GROUPS
== Config ==
$CONFIG
"""

# The entry point's primary config (stored here, so conf/ has no extra file): the capacity keys first, so a preset
# (conf/experiment/*.yaml, inside `config`) may set them, then conf/config.yaml, then where the search writes.
CAPACITY_DEFAULTS = {"slo_ttft_s": "${slo.ttft_s}", "lo": 10.0, "hi": 60.0, "tol": 0.1, "grid": None,
                     "max_probes": 30, "seeds": 5, "confidence": 0.95, "early_stop": True}
ConfigStore.instance().store(name="capacity_keys", node={"capacity": CAPACITY_DEFAULTS})
ConfigStore.instance().store(name="capacity_search", node={
    "defaults": ["capacity_keys", "config", "_self_"],
    "hydra": {
        "run": {"dir": "${output_root}/${experiment_name}/capacity/${run_dirname:}"},
        "sweep": {"dir": "${output_root}/${experiment_name}/capacity", "subdir": "${run_dirname:}"},
        # -m: the searches write capacity.json, not summary.json (the comparison table reports them at the end)
        "callbacks": {"sweep_progress": {"enabled": False}},
        "help": {"app_name": "experiments.capacity", "template": HELP},
    },
})
EARLY_STOP_DIR = "early_stop"


def fmt_qps(q: float) -> str:
    """A QPS as it appears in a run directory name (20.0 -> '20', 28.75 -> '28.75')."""
    return f"{q:.6g}"


def job_overrides() -> list[str]:
    """This job's task overrides minus the search's own keys and the ones every probe sets (QPS, seed)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.input_line for o in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
            if not o.key_or_group.startswith("capacity.") and o.key_or_group not in ("workload.qps", "seed")]


def probe_dir(cfg: DictConfig, qps: float, seed: Optional[int] = None) -> Path:
    """The run directory ``python -m experiments.run <this job's overrides> workload.qps=<qps>`` would use; a
    ``seed`` other than the job's own adds ``seed=<seed>`` (the job's own seed keeps its overrides as given)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hc = HydraConfig.get()
    keep = job_overrides()
    own = [o.input_line for o in OverridesParser.create().parse_overrides(list(hc.overrides.task))
           if o.key_or_group == "seed"]
    if seed is None or int(seed) == int(cfg.seed):
        keep += own
    else:
        keep.append(f"seed={int(seed)}")
    od = hc.job.config.override_dirname
    name = run_dirname(keep + [f"workload.qps={fmt_qps(qps)}"], exclude_keys=list(od.exclude_keys),
                       item_sep=str(od.item_sep), kv_sep=str(od.kv_sep))
    return Path(str(cfg.output_root)) / str(cfg.experiment_name) / name


class SloViolated(Exception):
    """Raised inside a simulated run by ``ViolationWatch`` once its P99 TTFT is certain to exceed the SLO."""

    def __init__(self, violations: int, needed: int, at_s: float, arrived: int) -> None:
        super().__init__(f"{violations} requests already over the SLO (>= {needed} make the P99 exceed it) at "
                         f"t={at_s:.1f} s after {arrived} arrivals")
        self.violations, self.needed, self.at_s, self.arrived = violations, needed, at_s, arrived


def violations_needed(n: int, pct: float = 99.0) -> int:
    """How many of ``n`` values above a level make numpy's (linear) ``pct``-th percentile exceed it: the value at
    index floor(h), h = pct/100 (n - 1), must be above it, i.e. n - floor(h) values. Non-decreasing in ``n``, so a
    count for the run's request count also holds for the (possibly fewer) requests that complete."""
    return n - math.floor(pct / 100 * (n - 1))


class ViolationWatch:
    """Called with the simulated cluster every 100 arrivals (``experiments.sim.WATCH``); raises ``SloViolated`` when
    enough requests have a TTFT above ``slo_s`` that the run's P99 TTFT must exceed it.

    A request counts when its first token came later than arrival + SLO, or when it has none yet and arrival + SLO
    is past (its TTFT can only be larger). Requests the engine could still reject (more blocks than it can ever
    hold, or a prompt over max_model_len) never count, so every counted request is among the completed ones whose
    P99 the summary reports. Finished requests are counted once (incrementally); queued ones at every check."""

    def __init__(self, slo_s: float, num_requests: int) -> None:
        self.slo_s = float(slo_s)
        self.num_requests = int(num_requests)
        self.needed = violations_needed(self.num_requests)
        self.arrived = 0
        self._finished_seen: dict[int, int] = {}
        self._finished_over = 0

    def _counts(self, e: Any, s: Any, t: float) -> bool:
        if isinstance(s.tag, tuple):  # an accuracy duplicate, not a request of the run
            return False
        if -(-(s.prompt + s.out) // e.bs) > e.total_blocks - e.watermark_blocks or s.prompt > e.cfg.max_model_len:
            return False
        ft = s.first_token
        return (ft - s.arrival > self.slo_s) if ft is not None else (t - s.arrival > self.slo_s)

    def __call__(self, cluster: Any) -> None:
        self.arrived = min(self.arrived + 100, self.num_requests)  # the run calls it every 100 arrivals, then at the end
        t = float(cluster.now)
        live = 0
        for e in cluster.engines:
            e.sync(t)  # the cluster syncs engines lazily; committing the steps before t changes none of them
            # (a decode run committed in two parts sums its step times in another order: ~1e-13 s of rounding)
            fin = e.finished
            start = self._finished_seen.get(id(e), 0)
            self._finished_over += sum(1 for s in fin[start:] if self._counts(e, s, t))
            self._finished_seen[id(e)] = len(fin)
            live += sum(1 for s in e.running.values() if self._counts(e, s, t))
            live += sum(1 for s in e.waiting if self._counts(e, s, t))
        if self._finished_over + live >= self.needed:
            raise SloViolated(self._finished_over + live, self.needed, t, self.arrived)


def _early_stop_file(cfg: DictConfig, run_dir: Path) -> Path:
    return Path(str(cfg.output_root)) / str(cfg.experiment_name) / "capacity" / EARLY_STOP_DIR / f"{run_dir.name}.json"


def run_probe(cfg: DictConfig, qps: float, seed: Optional[int] = None) -> dict[str, Any]:
    """One run at ``qps`` (and ``seed``; default the job's), skipped if its summary exists or an earlier search
    stopped it early at an SLO at least as strict; returns its summary (``_early_stop`` set when stopped early)."""
    from experiments import logger as run_logger
    from experiments.run import reusable, run_one
    from experiments.sim import model_fingerprint
    from vidur.records import is_complete

    seed = int(cfg.seed) if seed is None else int(seed)
    run_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(run_cfg):
        run_cfg.pop("capacity", None)
        run_cfg.workload.qps = float(qps)
        run_cfg.seed = seed
    OmegaConf.set_struct(run_cfg, True)
    run_dir = probe_dir(cfg, qps, seed)
    slo_s = float(cfg.capacity.slo_ttft_s)
    early = bool(cfg.capacity.get("early_stop", False)) and str(cfg.mode.name) == "sim"
    stop_file = _early_stop_file(cfg, run_dir)
    fingerprint = model_fingerprint(run_cfg) if early else None
    if early and not is_complete(run_dir) and not cfg.get("force", False) and stop_file.is_file():
        verdict = json.loads(stop_file.read_text())
        # TTFTs over a larger SLO are over this one too; a verdict under another execution model is not this run's
        if (float(verdict["slo_ttft_s"]) >= slo_s
                and verdict.get("execution_model", fingerprint) == fingerprint):
            return {"p99_ttft_ms": None, "_early_stop": verdict, "_run_dir": str(run_dir)}
    if early and not reusable(run_cfg, run_dir, fingerprint):
        from experiments.sim import WATCH

        token = WATCH.set(ViolationWatch(slo_s, int(run_cfg.workload.num_requests)))
        try:
            summary = run_one(run_cfg, run_dir)
        except SloViolated as stop:
            verdict = {"slo_ttft_s": slo_s, "violations": stop.violations, "needed": stop.needed,
                       "stopped_at_s": stop.at_s, "arrived": stop.arrived,
                       "num_requests": int(run_cfg.workload.num_requests), "qps": float(qps), "seed": seed,
                       "execution_model": fingerprint}
            write_json_atomic(stop_file, verdict)
            log.info("probe qps=%s seed=%d stopped early: %s", fmt_qps(qps), seed, stop)
            return {"p99_ttft_ms": None, "_early_stop": verdict, "_run_dir": str(run_dir)}
        finally:
            WATCH.reset(token)
    else:
        summary = run_one(run_cfg, run_dir)
    run_logger.log_run(run_cfg, run_dir, summary)
    if summary is None:
        summary = json.loads((run_dir / "summary.json").read_text())
    summary = dict(summary)
    summary["_run_dir"] = str(run_dir)
    return summary


def _snap(x: float, grid: float) -> float:
    """``x`` rounded to a multiple of ``grid`` (28.7, not 28.700000000000003: the value names folders and results)."""
    return round(round(x / grid) * grid, 9) if grid > 0 else x


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
                       "completed": s.get("completed"), "failed": s.get("failed"), "run_dir": s.get("_run_dir"),
                       "early_stop": s.get("_early_stop")})
        log.info("probe qps=%s: p99 TTFT %s -> %s", fmt_qps(q),
                 "certain to exceed the SLO (stopped early)" if s.get("_early_stop") else f"{p99_s:.3f} s",
                 "within SLO" if ok else "above SLO")
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
    eps = 1e-9 * max(1.0, tol)  # 28.8 - 28.7 > 0.1 in floats: a bracket one grid step wide is done
    while b - a > tol + eps and len(probes) < max_probes:
        mid = _midpoint(a, b, grid)
        if measure(mid):
            a = mid
        else:
            b = mid
    pa = next(p for p in probes if p["qps"] == a)
    pb = next(p for p in probes if p["qps"] == b)
    interp = None
    if pa["p99_ttft_s"] is not None and pb["p99_ttft_s"] is not None and pb["p99_ttft_s"] != pa["p99_ttft_s"]:
        interp = a + (slo_s - pa["p99_ttft_s"]) * (b - a) / (pb["p99_ttft_s"] - pa["p99_ttft_s"])
    status = "converged" if b - a <= tol + eps else "max_probes"
    result.update(capacity=a, capacity_interpolated=interp, bracket=[a, b], status=status,
                  note=f"capacity in [{a:g}, {b:g}): highest QPS probed within the SLO = {a:g}")
    return result


def _midpoint(a: float, b: float, grid: float) -> float:
    """The next probe of bracket [a, b]: its middle on the grid (the plain middle where the grid is too coarse)."""
    mid = _snap((a + b) / 2, grid)
    return mid if a < mid < b else (a + b) / 2


def probes_per_seed(lo: float, hi: float, tol: float, max_probes: int, grid: Optional[float] = None) -> int:
    """The most probe runs ``bisect`` takes for one seed: lo, hi, then one per halving of the bracket, following
    the larger half each time (grid snapping can make one half larger)."""
    grid = tol if grid is None else float(grid)
    a, b, n = lo, hi, 2
    eps = 1e-9 * max(1.0, tol)
    while b - a > tol + eps and n < max_probes:
        mid = _midpoint(a, b, grid)
        a, b = (a, mid) if mid - a >= b - mid else (mid, b)
        n += 1
    return min(n, max_probes)


def recorded_probes(search_dir: Path) -> int:
    """Probe runs of the last search in ``search_dir`` (its capacity.json) that are on disk: a new search there
    reuses them (a finished run, or an early-stop verdict)."""
    try:
        result = json.loads((search_dir / "capacity.json").read_text())
    except (OSError, ValueError):
        return 0
    probes = [p for s in result.get("seeds", [result]) for p in s.get("probes", [])]
    return sum(1 for p in probes if p.get("early_stop") or (p.get("run_dir") and
                                                             (Path(p["run_dir"]) / "summary.json").is_file()))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    from vidur.records import write_text

    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def seed_list(cfg: DictConfig) -> list[int]:
    """``capacity.seeds``: an int n -> seed, seed+1, ..., seed+n-1; a list -> those; null -> [seed]."""
    v = cfg.capacity.get("seeds")
    if v is None:
        return [int(cfg.seed)]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if int(v) < 1 or int(v) != v:
            raise ConfigError(f"capacity.seeds={v} must be a positive integer or a list of seeds")
        return [int(cfg.seed) + i for i in range(int(v))]
    try:
        seeds = [int(x) for x in v]
    except (TypeError, ValueError):
        raise ConfigError(f"capacity.seeds={v} must be a positive integer or a list of integer seeds") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"capacity.seeds={list(v)} must be a non-empty list without repeats")
    return seeds


CONFIG_KEYS = ("experiment_name", "policy.name", "policy.k", "policy.length_noise_pct", "policy.latency_noise_pct",
               "cluster.num_instances", "model.name", "gpu.name", "dataset.name", "engine.name",
               "engine.max_num_seqs", "engine.chunk_size", "workload.num_requests", "workload.arrival",
               "workload.burstiness", "mode.name", "seed")


def search(cfg: DictConfig, probe=None) -> dict[str, Any]:
    """Bisection per seed, then the seeds' mean capacity and its t-interval: the content of capacity.json.

    With one seed the keys are those of ``bisect`` (as before seeds existed); with several, ``seeds`` lists each
    seed's ``bisect`` result and ``capacity`` is their mean (a seed without a capacity, ``below_lo``, is left out of
    the mean and named in ``note``)."""
    from analysis.capacity import mean_interval

    c = cfg.capacity
    probe = probe or (lambda q, seed: run_probe(cfg, q, seed))
    seeds = seed_list(cfg)
    confidence = float(c.get("confidence", 0.95))
    if not 0 < confidence < 1:
        raise ConfigError(f"capacity.confidence={confidence} must be in (0, 1)")
    per_seed = []
    for seed in seeds:
        r = bisect(lambda q, seed=seed: probe(q, seed), float(c.slo_ttft_s), float(c.lo), float(c.hi),
                   float(c.tol), None if c.get("grid") is None else float(c.grid), int(c.max_probes))
        r["seed"] = seed
        per_seed.append(r)
        log.info("seed %d: capacity %s (%s)", seed, r["capacity"], r["status"])
    if len(per_seed) == 1:
        result = dict(per_seed[0])
    else:
        caps = [r["capacity"] for r in per_seed]
        ci = mean_interval([x for x in caps if x is not None], confidence)
        statuses = sorted({r["status"] for r in per_seed})
        result = {"method": "bisection", "slo_ttft_s": float(c.slo_ttft_s), "lo": float(c.lo), "hi": float(c.hi),
                  "tol": float(c.tol), "grid": per_seed[0]["grid"], "status": ",".join(statuses),
                  "capacity": None if ci.n == 0 else ci.mean, "ci_low": ci.low if ci.n > 1 else None,
                  "ci_high": ci.high if ci.n > 1 else None, "sd": ci.sd if ci.n > 1 else None, "seeds": per_seed}
        missing = [r["seed"] for r in per_seed if r["capacity"] is None]
        note = f"mean of {ci.n} seeds' capacities with a {confidence:.0%} Student-t interval"
        if missing:
            note += f"; seeds {missing} have no capacity (below capacity.lo) and are left out"
        if any(r["status"] == "at_least_hi" for r in per_seed):
            note += "; some seeds are within the SLO at capacity.hi (lower bounds): raise capacity.hi"
        result["note"] = note
    result["confidence"] = confidence
    result["early_stop"] = bool(c.get("early_stop", False))
    result["runs"] = sum(len(r["probes"]) for r in per_seed)
    result["stopped_early"] = sum(1 for r in per_seed for p in r["probes"] if p.get("early_stop"))
    return result


@hydra.main(config_path="../conf", config_name="capacity_search", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig

    from experiments import logger as run_logger

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run_logger.check(cfg)
        schema.check(cfg)  # the search's own keys (num_requests, ...) are read before any run validates them
        result = search(cfg)
    except (ConfigError, run_logger.LoggerError) as err:
        log.error("configuration error: %s", err)
        print(f"configuration error: {err}", file=sys.stderr)
        raise SystemExit(2)
    result["config"] = {k: OmegaConf.select(cfg, k) for k in CONFIG_KEYS}
    result["overrides"] = job_overrides()
    write_json_atomic(out_dir / "capacity.json", result)
    print(capacity_line(result, out_dir / "capacity.json"))
    return result["capacity"]


def capacity_line(result: dict[str, Any], path: Any = None) -> str:
    """One line: capacity (with its interval when there are seeds), status, SLO, runs."""
    cap = result.get("capacity")
    text = "none" if cap is None else fmt_qps(round(cap, 3))
    if result.get("ci_low") is not None:
        text += f" [{result['ci_low']:.2f}, {result['ci_high']:.2f}] ({len(result['seeds'])} seeds, " \
                f"{result.get('confidence', 0.95):.0%} t-interval)"
    runs = result.get("runs", len(result.get("probes", [])))
    line = (f"capacity={text} status={result['status']} slo_ttft_s={result['slo_ttft_s']:g} probes={runs} "
            f"stopped_early={result.get('stopped_early', 0)}")
    return f"{line} -> {path}" if path is not None else line


if __name__ == "__main__":
    schema.refuse_secret_arguments(sys.argv[1:])  # before Hydra writes the command line into .hydra/
    compose_cache.install()  # the same command line on the same config files composes once (experiments.compose_cache)
    if "--dry-run" in sys.argv[1:]:  # the searches a command would make, and the probes they would reuse
        from experiments.sweep_report import dry_run, search_plan

        raise SystemExit(dry_run(sys.argv[1:], search_plan))
    main()
