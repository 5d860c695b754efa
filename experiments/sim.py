"""``mode=sim``: the whole cluster in one process with the simulator in ``vidur/``."""

from __future__ import annotations

import gc
import time
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from experiments import wiring
from experiments.logger import interactive
from experiments.pools import describe as describe_pools, engines as pool_engines, kinds as pool_kinds, run_pools
from vidur import compiled
from vidur.cluster import Cluster, rare_collections
from vidur.engine import Engine
from vidur.records import instance_columns, request_columns, summarize, write_run
from vidur.types import EngineConfig

if TYPE_CHECKING:
    import pandas as pd

# A command that runs one simulation and then ends without the interpreter's teardown (``python -m experiments.run``
# without -m: ``experiments.run.keep_run_to_exit``) sets this: the run's objects are then kept (``_KEPT``, until a
# next run replaces them or the process ends) instead of being freed one by one as ``run_sim`` returns -- the
# requests, their ``Seq`` and routing records, millions of objects at 100,000 requests: 60 ms of a 1.3 s process,
# spent on memory that the exit releases at once. A sweep (-m) or a library caller frees each run's objects as before.
KEEP_RUN_TO_EXIT = False
_KEPT: list[Any] = []

# Set by experiments.capacity for an early-stopped probe: called with the cluster every 100 arrivals, it may raise
# to end the run (nothing is written then).
WATCH: ContextVar[Optional[Callable[[Cluster], None]]] = ContextVar("sim_watch", default=None)


def model_fingerprint(cfg: DictConfig) -> str:
    """The fingerprint of the execution model(s) a sim run of ``cfg`` uses (one per pool, joined by '+'): it changes
    with the profiles, the fitting code and the model/GPU specs (``ExecutionModel.fingerprint``)."""
    pools = run_pools(cfg)
    if pools is None:
        return wiring.execution_model(cfg).fingerprint
    cache_dir = OmegaConf.select(cfg, "cache_dir", default=None)
    return "+".join(p.setup.execution_model(cache_dir).fingerprint for p in pools)


def run_sim(cfg: DictConfig, run_dir: Path, ecfg: EngineConfig) -> dict[str, Any]:
    """Simulate the run of a validated ``cfg`` (``experiments.run.run_one``) into ``run_dir``."""
    with rare_collections():  # the workload's requests and the run's records live to the end: see vidur.cluster
        summary = _run_sim(cfg, run_dir, ecfg)
        if KEEP_RUN_TO_EXIT:  # kept for the exit: no collection may read them again when the pacing ends (~20 ms)
            gc.freeze()
    return summary


def _run_sim(cfg: DictConfig, run_dir: Path, ecfg: EngineConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = wiring.execution_model(cfg)
    policy = wiring.policy(cfg)
    requests = wiring.workload(cfg)
    migrator = migrator_of(cfg)
    n = int(cfg.cluster.num_instances)
    pools = run_pools(cfg)  # mixed pools: each instance its own GPU, engine config and execution model
    engines = ([Engine(ecfg, model, i) for i in range(n)] if pools is None
               else pool_engines(pools, OmegaConf.select(cfg, "cache_dir", default=None)))
    controller = wiring.provisioning(cfg)
    cluster = Cluster(engines, policy, seed=int(cfg.seed), sample_interval_s=float(cfg.mode.sample_interval_s),
                      accuracy_sampling_rate=float(OmegaConf.select(cfg, "accuracy.sampling_rate", default=0.0)),
                      controller=controller, migrator=migrator)
    bar = None
    if cfg.get("progress", True) and interactive():  # tqdm only when shown (a hidden bar still takes a process lock)
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=f"sim {policy.name} qps={cfg.workload.qps}", unit="req", leave=False)
    watch = WATCH.get()

    def tick(n: int) -> None:
        if bar is not None:
            bar.update(n)
        if watch is not None:
            watch(cluster)

    try:
        result = cluster.run(requests, progress=tick if bar is not None or watch is not None else None)
    finally:
        if bar is not None:
            bar.close()
    req_cols = request_columns(result.request_columns)  # numpy columns: a sim run never imports pandas
    summary = summarize(
        req_cols, mode="sim", policy=policy.name, k=policy.k, qps=cfg.workload.qps,
        num_instances=n, num_requests=len(requests), num_blocks=ecfg.num_blocks, seed=int(cfg.seed),
        model=str(cfg.model.name), gpu=str(cfg.gpu.name), dataset=str(cfg.dataset.name),
        sim_wall_s=result.wall_s, wall_s=time.perf_counter() - t0,
        sim_requests_per_wall_s=len(requests) / max(result.wall_s, 1e-9),
        compiled_sim=compiled.active(),  # the speed figures above came from the compiled build (vidur.speedups)
    )
    # a resumed sweep reruns the run if this changes (the uniform cluster's model is in hand: no second fit lookup)
    summary["execution_model"] = model.fingerprint if pools is None else model_fingerprint(cfg)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    extra = {}
    if pools is not None:
        summary["pools"] = describe_pools(pools)
        summary["instance_kinds"] = pool_kinds(pools)  # by instance id: analysis.mixed_pool reads it
    if migrator is not None or result.accuracy or controller is not None:
        import pandas as pd  # only for these optional tables: a plain run writes numpy columns

    if migrator is not None:  # llumnix_full: what migration did (counts, bytes per GPU, downtime)
        summary.update(migrator.summary())
        extra["migrations"] = pd.DataFrame(result.migrations)
    if result.accuracy:
        acc = pd.DataFrame(result.accuracy)
        extra["accuracy"] = acc
        summary.update(accuracy_summary(acc))
    if controller is not None:
        extra["provisioning"] = pd.DataFrame(result.provisioning, columns=["time_s", "event", "instance", "num_active"])
        active = req_cols["num_active"]
        summary["max_active_instances"] = int(active.max()) if len(active) else 0
    write_run(run_dir, resolved, req_cols, instance_columns(result.instances), summary, extra)
    if KEEP_RUN_TO_EXIT:
        _KEPT[:] = [cluster, requests, result]
    return summary


def migrator_of(cfg: DictConfig):
    """The live-migration component (``vidur.migration``) of a policy that migrates (``llumnix_full``), else None.

    A token's KV bytes per GPU come from the model and ``engine.tensor_parallel``; the link from
    ``cluster.migration_gbps`` (one GPU's share between two instances, GB/s), else ``gpu.interconnect_gbps``.
    """
    from block.policies.llumnix_full import MIGRATING_POLICIES, make_migrator

    if str(cfg.policy.name) not in MIGRATING_POLICIES:
        return None
    spec = wiring.model_spec(cfg)
    tp = int(cfg.engine.tensor_parallel)
    gbps = OmegaConf.select(cfg, "cluster.migration_gbps", default=None)
    if gbps is None:
        gbps = OmegaConf.select(cfg, "gpu.interconnect_gbps", default=None)
    if gbps is None:
        raise wiring.ConfigError(f"policy={cfg.policy.name} copies KV caches between instances: set "
                                 "cluster.migration_gbps (GB/s per GPU) or gpu.interconnect_gbps")
    try:  # KV heads replicate when tp exceeds them (as vidur.memory counts them)
        return make_migrator(OmegaConf.to_container(cfg.policy, resolve=True),
                             kv_bytes_per_token=spec.kv_bytes_per_token / max(1, min(tp, spec.num_kv_heads)),
                             bandwidth_gbps=float(gbps))
    except (TypeError, ValueError) as err:
        raise wiring.ConfigError(f"policy.* / cluster.migration_gbps: {err}") from err


def accuracy_summary(acc: "pd.DataFrame") -> dict[str, Any]:
    """Fig 5's headline numbers: the mean |predicted - actual| / actual, and how often Block's pick was fastest."""
    import numpy as np

    ok = acc[np.isfinite(acc["actual_e2e_s"]) & (acc["actual_e2e_s"] > 0)]
    if ok.empty:
        return {}
    err = (ok["predicted_e2e_s"] - ok["actual_e2e_s"]).abs() / ok["actual_e2e_s"]
    ranks = []
    for _, g in ok.groupby("sample"):
        actual = g["actual_e2e_s"].to_numpy()
        pick = g[g["block_pick"]]["actual_e2e_s"]
        if len(pick):
            ranks.append(1 + int((actual < pick.iloc[0] - 1e-12).sum()))
    return {
        "accuracy_samples": int(ok["sample"].nunique()),
        "mean_error_ratio": float(err.mean()),
        "median_error_ratio": float(err.median()),
        "p90_error_ratio": float(err.quantile(0.9)),
        "pick_fastest_fraction": float(np.mean([r == 1 for r in ranks])) if ranks else None,
        "mean_pick_rank": float(np.mean(ranks)) if ranks else None,
    }
