"""Run loggers (``logger=none`` | ``logger=wandb``) and the progress bar of a whole sweep.

* ``check(cfg)`` runs before a run starts (a missing ``wandb`` fails at once, not after the run), ``log_run(cfg,
  run_dir, summary)`` after it: with ``logger=wandb`` it logs the resolved config and the summary to one W&B run,
  offline unless ``logger.mode`` (default ``${oc.env:WANDB_MODE,offline}``) says otherwise; ``wandb sync
  <run_dir>/wandb/offline-run-*`` uploads it later.
* ``SweepProgress`` is a Hydra callback (conf/config.yaml registers it under ``hydra.callbacks``): on ``-m`` it works
  out the sweep's run directories from the sweeper's parameters and the command line, and a background thread counts
  those that hold a ``summary.json``. Counting files rather than job-end events makes it work with every launcher that
  shares the file system (basic, joblib, submitit); runs already complete (resumed sweeps) count from the start.
* Progress bars only where they can redraw: on a terminal, a tqdm bar (``interactive()``); when stderr is a file or a
  pipe (a log, a batch job), every redraw would be a line of escape codes, so the sweep prints one plain line per
  finished run instead and the per-run bars (simulated requests, benchmark client) stay off.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("experiments.logger")

LOGGERS = ("none", "wandb")


def interactive(stream: Any = None) -> bool:
    """Whether a progress bar may redraw on ``stream`` (default stderr): only a terminal can."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LoggerError(RuntimeError):
    """The chosen logger cannot run (e.g. ``wandb`` is not installed)."""


def _name(cfg: DictConfig) -> str:
    name = OmegaConf.select(cfg, "logger.name", default="none")
    return "none" if name in (None, "", "none") else str(name)


def _import_wandb():
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise LoggerError("logger=wandb needs the wandb package: pip install wandb "
                          "(or run with logger=none)") from err
    return wandb


def check(cfg: DictConfig) -> None:
    """Fail before the run if the logger cannot work."""
    name = _name(cfg)
    if name not in LOGGERS:
        raise LoggerError(f"logger.name={name!r}: choose one of {list(LOGGERS)}")
    if name == "wandb":
        _import_wandb()


def _scalars(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) and v is not None}


def log_run(cfg: DictConfig, run_dir: Path | str, summary: Optional[Mapping[str, Any]]) -> None:
    """Log one finished run (its resolved config and summary) to the configured logger; no-op for ``none``."""
    name = _name(cfg)
    if name == "none" or not summary:
        return
    if name != "wandb":
        raise LoggerError(f"logger.name={name!r}: choose one of {list(LOGGERS)}")
    wandb = _import_wandb()
    lg = cfg.logger
    mode = str(lg.get("mode") or "offline")
    os.environ["WANDB_MODE"] = mode  # the environment wins over wandb's own settings files
    run_dir = Path(run_dir)
    wb_dir = Path(lg.get("dir") or run_dir)
    wb_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    run = wandb.init(
        project=str(lg.get("project") or "block-repro"), entity=lg.get("entity"),
        group=str(lg.get("group") or cfg.get("experiment_name", "default")),
        name=run_dir.name, dir=str(wb_dir), config=config, mode=mode,
        tags=[str(t) for t in (lg.get("tags") or [])], job_type=str(OmegaConf.select(cfg, "mode.name", default="sim")),
    )
    try:
        run.summary.update(_scalars(summary))
    finally:
        run.finish()
    log.info("logged %s to wandb (mode=%s, dir=%s)", run_dir, mode, wb_dir)


# ---------------------------------------------------------------------- progress of a whole sweep
def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The override lines of each job a basic-sweeper multirun of ``config`` launches, in launch order.

    Mirrors ``BasicSweeper`` (``hydra.sweeper.params`` then the command line, later keys win)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hc = config.hydra
    node = hc.sweeper.get("params")
    params = {} if node is None else (OmegaConf.to_container(node, resolve=False) or {})
    lines = [f"{k}={v}" for k, v in params.items()]
    lines += list(OmegaConf.to_container(hc.overrides.task, resolve=False))
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(lines), None)
    return [list(job) for batch in batches for job in batch]


def sweep_run_dirs(config: DictConfig) -> list[Path]:
    """The run directories a basic-sweeper multirun of ``config`` will use, in launch order (``sweep_jobs``, named
    as conf/config.yaml names them: ``experiments.rundir.run_dirname``)."""
    from experiments.rundir import run_dirname

    hc = config.hydra
    od = hc.job.config.override_dirname
    exclude = list(od.exclude_keys)
    sweep_dir = Path(str(hc.sweep.dir))
    return [sweep_dir / run_dirname(job, exclude_keys=exclude, item_sep=str(od.item_sep), kv_sep=str(od.kv_sep))
            for job in sweep_jobs(config)]


class SweepProgress(Callback):
    """Hydra callback: progress over the runs of a ``-m`` sweep, counting run directories with a summary.json.

    On a terminal, one tqdm bar; otherwise one plain line per finished run (``sweep <name>: 3/8 runs complete
    (<run dir name>)``), so a log holds a readable record instead of escape codes. conf/config.yaml registers it::

        hydra:
          callbacks:
            sweep_progress:
              _target_: experiments.logger.SweepProgress
              interval_s: 1.0
    """

    def __init__(self, interval_s: float = 1.0, enabled: bool = True) -> None:
        self.interval_s = float(interval_s)
        self.enabled = bool(enabled)
        self._dirs: list[Path] = []
        self._done: set[Path] = set()
        self._name = ""
        self._bar = None
        self._plain = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # Launchers that run jobs in other processes (joblib, submitit) pickle the callbacks with each job: a copy
    # carries only the settings and stays inert there (the bar lives in the sweep's own process).
    def __getstate__(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s, "enabled": self.enabled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def active(self) -> bool:
        return self._bar is not None or self._plain

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            self._dirs = sweep_run_dirs(config)
        except Exception as err:  # a sweep must never fail because of its progress bar
            log.warning("sweep progress bar disabled: %s", err)
            return
        self._name = str(config.get("experiment_name", ""))
        self._done = self._finished()
        if interactive():
            from tqdm import tqdm

            self._bar = tqdm(total=len(self._dirs), desc=f"sweep {self._name}", unit="run", position=0,
                             dynamic_ncols=True, leave=True, initial=len(self._done))
        else:
            self._plain = True
            if self._done:
                self._print(f"{len(self._done)}/{len(self._dirs)} runs already complete (resumed)")
        self._thread = threading.Thread(target=self._poll, name="sweep-progress", daemon=True)
        self._thread.start()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.active:
            self._refresh()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.active:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._refresh()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif len(self._done) < len(self._dirs):
            self._print(f"{len(self._done)}/{len(self._dirs)} runs complete; the others have no summary.json "
                        "(failed or interrupted: the same command reruns them)")
        self._plain = False

    def completed(self) -> int:
        return len(self._finished())

    def _finished(self) -> set[Path]:
        def done(d: Path) -> bool:
            try:
                return (d / "summary.json").is_file()
            except OSError:  # an unusable name: the run itself reports it
                return False

        return {d for d in self._dirs if done(d)}

    def _print(self, text: str) -> None:
        print(f"sweep {self._name}: {text}", file=sys.stderr, flush=True)

    def _refresh(self) -> None:
        with self._lock:  # the poll thread and Hydra's job-end callback
            done = self._finished()
            new = sorted(done - self._done, key=self._dirs.index)
            self._done = done
            if self._bar is not None and new:
                self._bar.n = len(done)
                self._bar.refresh()
            elif self._plain:
                for i, d in enumerate(new, len(done) - len(new) + 1):
                    self._print(f"{i}/{len(self._dirs)} runs complete ({d.name})")

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._refresh()
