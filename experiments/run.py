"""One run: ``python -m experiments.run [overrides]`` (Hydra). ``-m`` runs a sweep; finished runs are skipped.

Examples::

    python -m experiments.run                                   # 4 A30 instances, round-robin, 1000 ShareGPT requests
    python -m experiments.run cluster=a30x12 policy=random workload.qps=24 workload.num_requests=10000
    python -m experiments.run -m workload.qps=20,24,28 policy=round_robin,random
    python -m experiments.run -m experiment=fig6 --dry-run          # which runs would run, which are skipped

Each run writes ``config.yaml``, ``requests.parquet``, ``instances.parquet`` and, last, ``summary.json`` into
``<output_root>/<experiment_name>/<override dirname>`` (see DESIGN.md, Outputs).
"""

from __future__ import annotations

import gc

if __name__ == "__main__":  # the command's imports collect no garbage: see settle_imports
    gc.disable()
    from experiments.blas_threads import import_numpy_single_threaded

    import_numpy_single_threaded()  # before anything imports numpy: no idle BLAS thread (experiments.blas_threads)

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
from omegaconf import DictConfig

from experiments import rundir  # noqa: F401  (registers ${run_dirname:} for conf/config.yaml)
from experiments import compose_cache, schema, wiring
from experiments.wiring import ConfigError

log = logging.getLogger("experiments.run")


def run_dir_of(cfg: DictConfig) -> Path:
    """The run directory Hydra resolved for this job (run or sweep)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def recorded_fingerprint(run_dir: Path) -> Optional[str]:
    """The execution-model fingerprint the summary in ``run_dir`` records; None without one (a summary written before
    fingerprints were recorded, a run in another mode) or without a readable summary."""
    import json

    from vidur.records import SUMMARY_FILE

    try:
        return json.loads((run_dir / SUMMARY_FILE).read_text()).get("execution_model")
    except (OSError, ValueError):
        return None


def stale(cfg: DictConfig, run_dir: Path, *, recorded: Optional[str] = None,
          fingerprint: Optional[str] = None) -> Optional[str]:
    """Why the finished sim run in ``run_dir`` is not ``cfg``'s any more, or None: its summary records the fingerprint
    of the execution model it ran under (``experiments.sim.model_fingerprint``), which changes with the profiles, the
    fitting code and the specs. A summary without one (written before fingerprints were recorded) is kept.
    ``recorded`` (``recorded_fingerprint(run_dir)``) and ``fingerprint`` (``cfg``'s own): when the caller has them."""
    if str(cfg.mode.name) != "sim":
        return None
    old = recorded if recorded is not None else recorded_fingerprint(run_dir)
    if old is None:
        return None
    from experiments.sim import model_fingerprint

    new = fingerprint if fingerprint is not None else model_fingerprint(cfg)
    if new == old:
        return None
    return f"its execution model changed since it ran ({old} -> {new}: profiles, fitting code or model/GPU specs)"


def reusable(cfg: DictConfig, run_dir: Path, fingerprint: Optional[str] = None) -> bool:
    """Whether ``run_dir`` holds a finished run of ``cfg`` to keep (a sweep resumes past it): it has its summary,
    ``force`` is off and it is not ``stale`` (``fingerprint``: ``cfg``'s, when the caller has it)."""
    from vidur.records import is_complete

    return (not cfg.get("force", False) and is_complete(run_dir)
            and stale(cfg, run_dir, fingerprint=fingerprint) is None)


def run_one(cfg: DictConfig, run_dir: Path) -> Optional[dict[str, Any]]:
    """Run ``cfg`` into ``run_dir`` unless it already holds that run (``reusable``: resume); return the summary.

    The one place a run's config is validated (``wiring.validate``: schema, engine, provisioning); the modes get the
    resolved engine config and do not check again. A run start owns its directory, so it first removes the temp
    files a killed writer left there, and the summary of a run it does again (so that an interrupted redo is not
    taken for finished).
    """
    from vidur.records import SUMMARY_FILE, is_complete, remove_stale_tmp

    if is_complete(run_dir) and not cfg.get("force", False):
        why = stale(cfg, run_dir)
        if why is None:
            log.info("skip %s: summary.json exists (force=true reruns)", run_dir)
            return None
        log.warning("rerun %s: %s", run_dir, why)
        (run_dir / SUMMARY_FILE).unlink()
    ecfg = wiring.validate(cfg)
    if str(cfg.mode.name) != "sim":
        from block.policies.llumnix_full import MIGRATING_POLICIES

        if str(cfg.policy.name) in MIGRATING_POLICIES:
            raise ConfigError(f"policy={cfg.policy.name} migrates running requests' KV caches between engines, "
                              f"which only mode=sim implements (mode={cfg.mode.name}: live migration is not)")
    for p in remove_stale_tmp(run_dir):
        log.info("removed %s: left by a killed run", p)
    mode = str(cfg.mode.name)
    if mode == "sim":
        from experiments.sim import run_sim

        return run_sim(cfg, run_dir, ecfg)
    if mode == "emulate":
        from experiments.emulate import run_emulate

        return run_emulate(cfg, run_dir, ecfg)
    if mode == "deploy":
        from experiments.deploy import run_deploy

        return run_deploy(cfg, run_dir, ecfg)
    raise ConfigError(f"mode={mode} is unknown (supported: sim, emulate, deploy)")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    from experiments import logger as run_logger

    compose_cache.install()  # a launcher's worker process composes its next jobs through the cache too
    keep_run_to_exit()
    run_dir = run_dir_of(cfg)
    try:
        run_logger.check(cfg)
        summary = run_one(cfg, run_dir)
    except (ConfigError, run_logger.LoggerError) as err:
        log.error("configuration error: %s", err)
        print(f"configuration error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:  # the modes stop what they started on the way out (LocalStack, deploy's finally)
        log.error("interrupted: %s has no summary.json; its services were stopped", run_dir)
        print(f"interrupted: {run_dir} has no summary.json (it reruns next time); every service was stopped",
              file=sys.stderr)
        raise SystemExit(130)
    run_logger.log_run(cfg, run_dir, summary)
    if summary:
        keys = ("completed", "failed", "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_e2el_ms",
                "p99_e2el_ms", "num_preemptions")
        print(" ".join(f"{k}={summary.get(k):.4g}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}"
                       for k in keys))
        return summary.get("p99_ttft_ms")
    return None


# Arguments after which the composed config might set ``hydra.mode`` (a preset, another config file or folder, the
# key itself): Hydra must then compose once more to read it.
_MODE_SOURCES = ("experiment=", "+experiment=", "++experiment=", "hydra.mode", "+hydra.mode", "++hydra.mode",
                 "hydra/", "--config-dir", "--config-name", "--config-path", "-cd", "-cn", "-cp")


def mode_probe_needed(argv: list[str]) -> bool:
    """Whether ``hydra.mode`` can be anything but unset (None) for this command line.

    Hydra 1.3's ``@hydra.main`` composes the whole config twice: once (``Hydra.get_mode``) only to read
    ``hydra.mode``, then for the run. Neither ``conf/config.yaml`` nor the groups it selects by default set that key
    (``tests/test_startup.py`` checks it), so only an argument in ``_MODE_SOURCES`` can; without one the first
    composition would return None, which is what :func:`skip_mode_probe` returns without composing.
    """
    return any(a.lstrip().startswith(_MODE_SOURCES) for a in argv)


def skip_mode_probe() -> None:
    """Let Hydra take ``hydra.mode`` as unset without composing the config for it (about 0.1 s of a run's start).

    With the mode unset Hydra runs ``-m`` as a sweep and anything else as one run, as it does after probing;
    ``Hydra.get_mode`` is Hydra's own (private) method, so an absent one is left alone.
    """
    from hydra._internal.hydra import Hydra

    if hasattr(Hydra, "get_mode"):
        Hydra.get_mode = lambda self, *args, **kwargs: None


def covering_jobs(batch: Sequence[Sequence[str]]) -> list[Sequence[str]]:
    """Jobs of a sweep batch that between them carry every override in it (each ``key=value`` at least once), found
    greedily: the job with the most overrides not yet carried, until none is left.

    A grid of P policies x Q loads needs max(P, Q) of them, not P x Q (fig6: 17 of 119).
    """
    left = {o for job in batch for o in job}
    jobs = [set(job) for job in batch]
    picked: list[int] = []
    while left:
        i = max(range(len(jobs)), key=lambda j: len(jobs[j] & left))
        picked.append(i)
        left -= jobs[i]
    return [batch[i] for i in sorted(picked)]  # in the sweep's order: an error names the first bad job first


def validate_sweeps_by_cover() -> None:
    """Have Hydra's sweepers check that the jobs :func:`covering_jobs` picks compose, instead of every job.

    Before launching anything a sweeper composes every job's config once more (``Sweeper.validate_batch_is_legal``),
    one after another in the sweep's process: about 75 ms each, 9-12 s of the fig6 preset before its first run
    starts. A composition error comes from an override (an unknown group option, a bad value, a missing key), and
    every override is composed at least once this way, so a misspelt one still fails before any run starts; the
    launcher composes every job anyway when it runs it. Hydra's own comment there calls it slow and
    "can potentially allow disabling from the config".
    """
    from hydra.plugins.sweeper import Sweeper

    full = Sweeper.validate_batch_is_legal
    if getattr(full, "by_cover", False):
        return

    def validate(self: Any, batch: Sequence[Sequence[str]]) -> None:
        full(self, covering_jobs(batch))

    validate.by_cover = True  # type: ignore[attr-defined]
    Sweeper.validate_batch_is_legal = validate  # type: ignore[method-assign]


def started_by_python_m() -> bool:
    """Whether this process is ``python [options] -m experiments.run`` itself, not a tool that runs the module and has
    work left when it returns (``python -m cProfile -m experiments.run`` writes its profile then)."""
    argv = list(getattr(sys, "orig_argv", []))
    return "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["experiments.run"]


def settle_imports() -> None:
    """Take what start-up imported out of the garbage collector's way, and collect from here on.

    ``python -m experiments.run`` imports with the cyclic collector off (the top of this module): pandas, Hydra,
    pydantic and the simulator allocate hundreds of thousands of long-lived objects, whose allocation would trigger
    collections that find next to nothing; ``gc.freeze`` then keeps them out of the full collections the run's own
    allocations trigger. About 5-8% of a run's CPU time; the run itself collects as before (a simulated run paces
    the collector to its objects: ``vidur.cluster.rare_collections``; a live run's client keeps Python's default
    pacing, whose passes are short).
    """
    gc.freeze()
    gc.enable()


def keep_run_to_exit() -> None:
    """Have a simulated run keep its objects to the process's end (``experiments.sim.KEEP_RUN_TO_EXIT``) when this
    process is one run that :func:`exit_now` ends: Hydra's mode is RUN (a sweep's runs free their objects before the
    next one) and it was started as ``python -m experiments.run`` (a launcher's worker, or a tool running the module,
    goes on after the run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if started_by_python_m() and HydraConfig.get().mode == RunMode.RUN:
        from experiments import sim

        sim.KEEP_RUN_TO_EXIT = True


def may_exit_now() -> bool:
    """Whether :func:`exit_now` may end the process: started by ``python -m experiments.run`` and no thread but
    daemons left (Python's own exit would wait for one)."""
    import threading

    main_thread = threading.main_thread()
    return started_by_python_m() and not any(t.is_alive() and not t.daemon for t in threading.enumerate()
                                             if t is not main_thread)


def exit_now() -> None:
    """End a finished command (exit status 0) without the interpreter's teardown, which only frees memory.

    Tearing down what a run imported (pandas, pyarrow, Hydra, the simulator) and collecting its objects takes about
    0.1-0.3 s, a tenth of a short run's process. By the time ``main`` returns every file of the run is closed
    (``vidur.records.write_atomic`` fsyncs them); the exit handlers still run here (logging's flush, multiprocessing's
    children, a logger's finish), then the standard streams are flushed. A tool running the module (a profiler)
    and a live non-daemon thread keep the normal exit: this returns.
    """
    import atexit

    if not may_exit_now():
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    schema.refuse_secret_arguments(sys.argv[1:])  # before Hydra writes the command line into .hydra/
    compose_cache.install()  # the same command line on the same config files composes once
    if "--dry-run" in sys.argv[1:]:  # list the runs that would run / be skipped; runs and writes nothing
        from experiments.sweep_report import dry_run

        raise SystemExit(dry_run(sys.argv[1:]))
    if not mode_probe_needed(sys.argv[1:]):
        skip_mode_probe()
    validate_sweeps_by_cover()
    settle_imports()
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C under a parallel launcher (joblib): each run said so; the sweep ends here
        print("interrupted: the sweep stopped; finished runs are kept, the others rerun next time", file=sys.stderr)
        raise SystemExit(130)
    exit_now()
