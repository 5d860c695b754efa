"""Driver and task side of ``RayClusterLauncher``.

Driver: joins (or starts) Ray, composes each job's sweep config as Hydra's own launchers do, submits one task per
job and waits for all of them, so one failed run does not stop the others (as with joblib): Hydra reports the
failures at the end. Task: runs the job with Hydra's ``run_job`` in the driver's working directory and, when the run
wrote its ``summary.json`` during this task, records where it ran in ``<run dir>/ray_node.json`` (node id, IP,
host, pid): the proof of placement the tests check, and a hint when one node is slower or broken.
"""

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

NODE_RECORD = "ray_node.json"
SUMMARY = "summary.json"  # the run's last file (DESIGN.md, Outputs): written means the run is complete


@dataclass
class TaskExit:
    """A job that called ``sys.exit`` (the entry point's configuration error, exit 2): a BaseException that Hydra's
    ``run_job`` lets through. Returned, not raised, so Ray keeps the worker's answer and the other runs go on."""

    code: Any
    overrides: List[str]


def _enter_workdir(cwd: str) -> str:
    """Run where the driver runs: relative paths (``output_root``, data caches) then mean the same on every node."""
    if not os.path.isdir(cwd):
        raise RuntimeError(f"node {socket.gethostname()} has no directory {cwd}: every Ray node needs this "
                           "repository at the driver's path and the sweep directory on a shared file system "
                           "(hydra.launcher.workdir=same_path)")
    before = os.getcwd()
    os.chdir(cwd)
    return before


def _node_record(run_dir: Path, started: float) -> None:
    import ray

    ctx = ray.get_runtime_context()
    record = {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
              "hostname": socket.gethostname(), "pid": os.getpid(), "started_unix": started,
              "finished_unix": time.time()}
    from vidur.records import write_atomic

    write_atomic(run_dir / NODE_RECORD, (json.dumps(record, indent=1) + "\n").encode())


def run_job_on_node(hydra_context: HydraContext, sweep_config: DictConfig, task_function: TaskFunction,
                    singleton_state: Dict[Any, Any], cwd: str) -> Any:
    """The Ray task: one job of the sweep, as Hydra's ``run_job`` runs it, in the driver's working directory."""
    started = time.time()
    before = _enter_workdir(cwd)
    try:
        setup_globals()
        Singleton.set_state(singleton_state)
        HydraConfig.instance().set_config(sweep_config)
        hc = sweep_config.hydra
        run_dir = Path(str(hc.sweep.dir)) / str(hc.sweep.subdir)
        had_summary = (run_dir / SUMMARY).is_file()
        try:
            ret = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                          job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        except SystemExit as stop:
            return TaskExit(stop.code, list(hc.overrides.task))
        if not had_summary and (run_dir / SUMMARY).is_file():
            _node_record(run_dir.absolute(), started)
        return ret
    finally:
        os.chdir(before)


class NoCluster(RuntimeError):
    """No Ray cluster answers at the configured address (said at once, not after Ray's minutes of retries)."""


HINT = ("start one (`ray start --head` on the head, `ray start --address=<head ip>:6379` on the others) and pass "
        "hydra.launcher.address=<head ip>:6379, or use hydra/launcher=ray_local for a private Ray on this machine")


def check_reachable(address: Optional[str], timeout_s: float = 10.0) -> None:
    """Fail fast when a ``host:port`` GCS address takes no TCP connection: ``ray.init`` would retry for minutes
    (measured: still waiting after 3 minutes) before it gave up. ``None``, ``auto`` and ``ray://`` are Ray's."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise NoCluster(f"hydra.launcher.address={address!r}: expected <host>:<port>, auto or ray://<host>:<port>")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise NoCluster(f"no Ray cluster at hydra.launcher.address={address} ({err}): {HINT}") from None


def _start_ray(address: Optional[str], init: Dict[str, Any]) -> None:
    import ray

    if ray.is_initialized():
        log.info("Ray is already initialized in this process")
        return
    check_reachable(address)
    kwargs = {"address": address, **init}
    host = str(address or "").rpartition(":")[0]
    if host.startswith("127.") and host != "127.0.0.1":
        # a cluster on this machine's loopback (_local_cluster.LOOPBACK): the driver's node has that address too;
        # Ray would otherwise look for a local node at its outward address and not find one
        kwargs.setdefault("_node_ip_address", host)
    log.info("ray.init(%s)", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
    try:
        ray.init(**kwargs)
    except ConnectionError as err:  # address=auto and no cluster started on this host
        raise NoCluster(f"no Ray cluster at hydra.launcher.address={address} ({err}): {HINT}") from None


def _failed(overrides: Sequence[str], config: DictConfig, err: BaseException) -> JobReturn:
    """A job whose task never returned (worker or node died): reported by Hydra like a run that raised."""
    return JobReturn(overrides=list(overrides), cfg=config, hydra_cfg=None, status=JobStatus.FAILED,
                     _return_value=err)


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    import ray

    setup_globals()
    config, hydra_context = launcher.config, launcher.hydra_context
    assert config is not None and hydra_context is not None and launcher.task_function is not None
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _start_ray(launcher.address, launcher.init)
    remote = ray.remote(**launcher.remote)(run_job_on_node) if launcher.remote else ray.remote(run_job_on_node)
    log.info("Ray launcher: %d jobs on %d node(s), remote=%s, sweep dir %s", len(job_overrides),
             sum(1 for n in ray.nodes() if n.get("Alive")), launcher.remote, sweep_dir.absolute())
    cwd = os.getcwd()
    singleton_state = Singleton.get_state()
    configs = []  # composed first, submitted together: the cluster sees every run at once and spreads them
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
            sweep_config.hydra.job.num = idx
        configs.append(sweep_config)
    refs = [remote.remote(hydra_context, c, launcher.task_function, singleton_state, cwd) for c in configs]
    results: List[JobReturn] = []
    exits: List[TaskExit] = []
    for overrides, ref in zip(job_overrides, refs):
        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as err:  # the task never returned: its worker or node died
            log.error("run %s failed on Ray: %s", " ".join(overrides), err)
            results.append(_failed(overrides, config, err))
            continue
        if isinstance(out, TaskExit):
            exits.append(out)
            continue
        results.append(out)
    if exits:  # as under the basic launcher, where sys.exit in a run ends the sweep with its code
        log.error("%d run(s) exited: %s", len(exits), "; ".join(" ".join(e.overrides) for e in exits))
        raise SystemExit(exits[0].code)
    return results
