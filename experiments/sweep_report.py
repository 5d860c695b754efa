"""What a sweep would do, and what it did: ``--dry-run`` and the comparison table printed when a sweep ends.

* ``plan(argv)`` composes the command line the way Hydra would (``-m``: every job of the basic sweeper, the preset's
  ``hydra.sweeper.params`` then the command line) without running or writing anything, and sorts the run folders
  into those that would run and those a sweep skips (``summary.json`` present). ``python -m experiments.run ...
  --dry-run`` prints it (``experiments.run``).
* ``SweepTable`` (a Hydra callback, registered in conf/config.yaml under ``hydra.callbacks.sweep_table``) prints, when
  a ``-m`` sweep ends, one table comparing what it produced: for run sweeps the summary metrics per run and, when a
  configuration has several QPS points, its capacity (``analysis.capacity``: per seed, mean and 95 % t-interval); for
  capacity searches (``python -m experiments.capacity -m``) the capacity per configuration with its interval.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("experiments.sweep_report")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MULTIRUN_FLAGS = ("-m", "--multirun")
CAPACITY_CONFIG = "capacity_search"  # ``experiments.capacity``'s primary config (its searches write capacity.json)


@dataclass
class Plan:
    """The run folders of a command line, split by whether a run would start."""

    run: list[Path] = field(default_factory=list)
    skip: list[Path] = field(default_factory=list)
    stale: dict[Path, str] = field(default_factory=dict)  # finished runs among ``run`` that would be done again: why

    def lines(self) -> list[str]:
        out = [f"would run  {d}" + (f"  (again: {self.stale[d]})" if d in self.stale else "") for d in self.run]
        out += [f"skip       {d}  (summary.json exists)" for d in self.skip]
        total = len(self.run) + len(self.skip)
        out.append(f"dry run: {len(self.run)} of {total} run(s) would run, {len(self.skip)} would be skipped "
                   "(nothing was run or written)")
        return out


def compose_for(argv: Sequence[str], config_name: str = "config") -> tuple[DictConfig, bool]:
    """The config Hydra would compose for ``argv`` (overrides plus ``-m``), with its hydra node; and whether it is
    a multirun. Nothing is written (no run folder, no .hydra/)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    multirun = any(a in MULTIRUN_FLAGS for a in argv)
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    bad = [a for a in overrides if a.startswith("-")]
    if bad:
        raise ValueError(f"--dry-run takes overrides and -m only, not {' '.join(bad)}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        cfg = loader.load_configuration(config_name, overrides,
                                        run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN)
    return cfg, multirun


def run_dirs(cfg: DictConfig, multirun: bool) -> list[Path]:
    """The run folders of a composed config: every sweep job's (``experiments.logger.sweep_run_dirs``), or the one
    run's (``hydra.run.dir``: ``<output_root>/<experiment_name>/<override dirname>``)."""
    from experiments.logger import sweep_run_dirs
    from experiments.rundir import run_dirname

    if multirun:
        return sweep_run_dirs(cfg)
    od = cfg.hydra.job.config.override_dirname
    name = run_dirname(list(cfg.hydra.overrides.task), list(od.exclude_keys), str(od.item_sep), str(od.kv_sep))
    return [Path(str(cfg.hydra.sweep.dir)) / name]  # = hydra.run.dir (both configs keep a run beside a sweep's)


def plan(argv: Sequence[str]) -> Plan:
    """Which runs of ``argv`` would run and which would be skipped (``force=true`` reruns every one). A finished run
    whose summary records an execution-model fingerprint is checked against its job's own config (composed here,
    about 0.15 s a job) and listed to run again when it is stale (``experiments.run.stale``), as the sweep would."""
    from experiments.run import recorded_fingerprint, stale
    from vidur.records import is_complete

    cfg, multirun = compose_for(argv)
    force = bool(cfg.get("force", False))
    p = Plan()
    if multirun:
        from experiments.logger import sweep_jobs

        jobs = [list(j) for j in sweep_jobs(cfg)]
    else:
        jobs = [[a for a in argv if a not in MULTIRUN_FLAGS]]
    for d, job in zip(run_dirs(cfg, multirun), jobs):
        if not is_complete(d) or force:
            p.run.append(d)
            continue
        why = None
        old = recorded_fingerprint(d)
        if old is not None:  # else it is kept as is
            why = stale(compose_for(job)[0], d, recorded=old)
        if why is None:
            p.skip.append(d)
        else:
            p.run.append(d)
            p.stale[d] = why
    return p


def dry_run(argv: Sequence[str], planner: Callable[[Sequence[str]], list[str]] | None = None) -> int:
    """``python -m experiments.run [overrides] [-m] --dry-run``: print the plan (``planner``'s lines; default the
    runs of ``plan``, ``search_plan`` for ``experiments.capacity``); exit 2 on a bad command line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    planner = planner or (lambda args: plan(args).lines())
    try:
        lines = planner([a for a in argv if a != "--dry-run"])
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0


def search_plan(argv: Sequence[str]) -> list[str]:
    """``python -m experiments.capacity ... --dry-run``: each search's folder, its bracket and seeds, the most probe
    runs its bisection takes, and how many probe runs of an earlier search there are on disk and would be reused.
    Which QPS points a search probes depends on what its earlier probes find, so they are not listed."""
    from experiments.capacity import probes_per_seed, recorded_probes
    from experiments.logger import sweep_jobs

    cfg, multirun = compose_for(argv, CAPACITY_CONFIG)
    # each job's own config, as Hydra composes it (a sweep may set capacity.* per job)
    configs = [compose_for(job, CAPACITY_CONFIG)[0] for job in sweep_jobs(cfg)] if multirun else [cfg]
    lines, most = [], 0
    for d, job_cfg in zip(run_dirs(cfg, multirun), configs):
        c = job_cfg.capacity
        per_seed = probes_per_seed(float(c.lo), float(c.hi), float(c.tol), int(c.max_probes), c.get("grid"))
        seeds = c.get("seeds")  # a count, a list of seeds, or null (the run's own seed)
        n_seeds = 1 if seeds is None else len(seeds) if OmegaConf.is_list(seeds) else int(seeds)
        most += n_seeds * per_seed
        kept = recorded_probes(d)
        again = f"; {kept} probe run(s) of its last search on disk, reused" if kept else ""
        lines.append(f"would search  {d}  ({n_seeds} seed(s), QPS {float(c.lo):g}-{float(c.hi):g} to "
                     f"{float(c.tol):g}: at most {per_seed} probe runs per seed{again})")
    lines.append(f"dry run: {len(lines)} search(es), at most {most} probe run(s) (nothing was run or written)")
    return lines


# ---------------------------------------------------------------------- the table at the end of a sweep
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def runs_table(dirs: Sequence[Path]) -> str | None:
    """Summary metrics per finished run of the sweep, and capacity per configuration when it has several QPS."""
    import pandas as pd

    from analysis.capacity import capacity_table
    from analysis.common import steady_throughput
    from analysis.records import load_run

    runs = []
    for d in dirs:
        try:
            runs.append(load_run(d))
        except (FileNotFoundError, OSError, ValueError):
            continue
    if not runs:
        return None
    rows = []
    for r in runs:
        s = r.summary
        try:
            steady = steady_throughput(r.requests())
        except Exception:  # noqa: BLE001 - a table must never fail a sweep
            steady = math.nan
        rows.append({"run": r.name, "completed": s.get("completed"), "failed": s.get("failed"),
                     "p99_ttft_s": (s.get("p99_ttft_ms") or math.nan) / 1e3,
                     "mean_e2e_s": (s.get("mean_e2el_ms") or math.nan) / 1e3,
                     "p99_e2e_s": (s.get("p99_e2el_ms") or math.nan) / 1e3,
                     "steady_req_s": steady, "preemptions": s.get("num_preemptions"),
                     "sched_ms": s.get("mean_scheduler_overhead_ms")})
    df = pd.DataFrame(rows)
    text = "per run (steady_req_s: completions per second with warm-up and drain dropped):\n"
    text += df.to_string(index=False, formatters={c: _fmt for c in df.columns if c != "run"})
    slo = runs[0].get("slo.ttft_s", 3.0)
    try:
        cap = capacity_table(runs, slo_s=float(slo))
    except Exception:  # noqa: BLE001
        cap = None
    if cap is not None and len(cap) and int(cap["num_points"].max()) > 1:
        keys = [c for c in cap.columns if "." in c or c == "experiment_name"]
        cols = keys + ["capacity", "ci_low", "ci_high", "seeds", "num_points", "note"]
        text += f"\n\ncapacity (P99 TTFT <= {float(slo):g} s, linear interpolation per seed; mean and 95 % " \
                "t-interval over seeds):\n"
        text += cap[[c for c in cols if c in cap.columns]].to_string(
            index=False, formatters={c: _fmt for c in ("capacity", "ci_low", "ci_high")})
    return text


def capacity_searches_table(dirs: Sequence[Path]) -> str | None:
    """Capacity per search of a ``python -m experiments.capacity -m`` sweep (its capacity.json files)."""
    import pandas as pd

    from analysis.capacity import capacity_results

    frames = [capacity_results(d) for d in dirs if (d / "capacity.json").is_file()]
    frames = [f for f in frames if len(f)]
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    df.insert(0, "search", [Path(p).name for p in df["path"]])
    cols = ["search", "capacity", "ci_low", "ci_high", "seeds", "per_seed", "statuses", "slo_s", "num_requests"]
    return ("capacity per configuration (bisection; mean and 95 % t-interval over seeds):\n" +
            df[[c for c in cols if c in df.columns]].to_string(
                index=False, formatters={c: _fmt for c in ("capacity", "ci_low", "ci_high")}))


class SweepTable(Callback):
    """Hydra callback: print the comparison table of a ``-m`` sweep when it ends (stdout), and keep it as
    ``<sweep dir>/comparison.txt``. Never fails the sweep."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = bool(enabled)

    def __getstate__(self) -> dict[str, Any]:
        return {"enabled": self.enabled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            from experiments.logger import sweep_run_dirs

            dirs = sweep_run_dirs(config)
            # the entry point decides, not the config: run presets set ``capacity`` keys too (for the search)
            searches = OmegaConf.select(config, "hydra.job.config_name") == CAPACITY_CONFIG
            text = capacity_searches_table(dirs) if searches else runs_table(dirs)
        except Exception as err:  # noqa: BLE001 - a sweep must never fail because of its table
            log.warning("no comparison table: %s", err)
            return
        if not text:
            return
        print(f"\n== sweep {config.get('experiment_name', '')}: comparison ==\n{text}", flush=True)
        try:
            from vidur.records import write_text

            write_text(Path(str(config.hydra.sweep.dir)) / "comparison.txt", text + "\n")
        except Exception as err:  # noqa: BLE001
            log.warning("could not write comparison.txt: %s", err)
