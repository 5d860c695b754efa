"""``mode=sim``: the whole cluster in one process with the simulator in ``vidur/``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments import wiring
from vidur.cluster import Cluster
from vidur.engine import Engine
from vidur.records import instances_frame, requests_frame, summarize, write_run


def run_sim(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    ecfg = wiring.validate(cfg)
    model = wiring.execution_model(cfg)
    policy = wiring.policy(cfg)
    requests = wiring.workload(cfg)
    n = int(cfg.cluster.num_instances)
    engines = [Engine(ecfg, model, i) for i in range(n)]
    cluster = Cluster(engines, policy, seed=int(cfg.seed), sample_interval_s=float(cfg.mode.sample_interval_s))
    bar = tqdm(total=len(requests), desc=f"sim {policy.name} qps={cfg.workload.qps}", unit="req",
               disable=not cfg.get("progress", True), leave=False)
    result = cluster.run(requests, progress=bar.update)
    bar.close()
    req_df = requests_frame(result.requests)
    summary = summarize(
        req_df, mode="sim", policy=policy.name, k=policy.k, qps=cfg.workload.qps,
        num_instances=n, num_requests=len(requests), num_blocks=ecfg.num_blocks, seed=int(cfg.seed),
        model=str(cfg.model.name), gpu=str(cfg.gpu.name), dataset=str(cfg.dataset.name),
        sim_wall_s=result.wall_s, wall_s=time.perf_counter() - t0,
        sim_requests_per_wall_s=len(requests) / max(result.wall_s, 1e-9),
    )
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    write_run(run_dir, resolved, req_df, instances_frame(result.instances), summary)
    return summary
