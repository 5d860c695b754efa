"""``mode=emulate``: the whole distributed system as real services on loopback, engines emulated on the CPU.

Starts N emulated engines (``block.engine``), N predictor side-cars (``block.predictor``, one per engine) and M
stateless global schedulers (``block.scheduler``) as subprocesses on free ports, waits for their health, replays the
same workload as ``mode=sim`` with the benchmark client (``block.benchmark``; requests are spread over the
schedulers round-robin), samples every engine's ``/state`` for ``instances.parquet``, writes the run records, and
stops every process -- on success, on failure and on Ctrl-C.

Auto-provisioning (``provisioning=reactive|predictive``, Fig 8): only ``initial_instances`` engines and predictors
start up front; each scheduler drives ``block.provisioning``'s controller and starts a back-pool instance on demand
through ``experiments.provision_live``'s agent (cold start measured); ``num_active`` per request and
``provisioning.parquet`` go to the run records.

Time: the stack runs ``mode.time_scale`` times faster than the modelled GPU; the client sends at ``qps x scale`` and
multiplies every measured time by the scale, so the records are in model seconds and compare with ``mode=sim``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from block.engine.config import engine_flags
from block.service import TOKEN_ENV
from experiments import wiring
from experiments.local_stack import LocalStack
from experiments.provision_live import ProvisionAgent, provisioning_args, provisioning_records, settle
from experiments.logger import interactive
from experiments.pools import describe as describe_pools, kinds as pool_kinds, run_pools
from vidur.records import instances_frame, summarize, write_run, write_yaml
from vidur.types import EngineConfig

logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per /state sample otherwise


def engine_args(cfg: DictConfig, conf_dir: Path, ecfg: Optional[EngineConfig] = None) -> list[str]:
    """The model/GPU/engine options of the engine and predictor command lines: the resolved config as YAML files,
    pinned by the override options to ``ecfg`` (the validated engine config; built from ``cfg`` when None)."""
    ec = wiring.engine_config(cfg) if ecfg is None else ecfg
    return [
        "--model-config", write_yaml(conf_dir / "model.yaml", cfg.model),
        "--gpu", write_yaml(conf_dir / "gpu.yaml", cfg.gpu),
        "--engine", write_yaml(conf_dir / "engine.yaml", cfg.engine),
        *engine_flags(ec),
    ]


def pool_engine_args(cfg: DictConfig, conf_dir: Path, pools: list) -> list[list[str]]:
    """Mixed pools (``experiments.pools``): per instance, ``engine_args`` of its pool -- the model, the pool's GPU and
    merged engine config as YAML files in ``conf_dir/pool<j>/``, pinned to the pool's validated engine config."""
    out: list[list[str]] = []
    for j, pool in enumerate(pools):
        d = conf_dir / f"pool{j}"
        d.mkdir(parents=True, exist_ok=True)
        args = ["--model-config", write_yaml(d / "model.yaml", cfg.model),
                "--gpu", write_yaml(d / "gpu.yaml", pool.gpu_config),
                "--engine", write_yaml(d / "engine.yaml", pool.engine_config), *engine_flags(pool.setup.engine)]
        out.extend([args] * pool.count)
    return out


def vllm_sized(cfg: DictConfig, flags: list[str]) -> list[str]:
    """The flags for a real vLLM engine and its predictor: with ``engine.num_blocks`` unset, no ``--num-blocks``,
    so vLLM sizes its KV cache from the memory it finds and each predictor adopts that count from the engine's
    ``vllm:cache_config_info``. (The count the simulator derives from conf/gpu would be forced on vLLM through
    ``--num-gpu-blocks-override``: wrong on a CPU, or on any host whose free memory differs from the spec.)"""
    if cfg.engine.get("num_blocks") is not None or "--num-blocks" not in flags:
        return list(flags)
    i = flags.index("--num-blocks")
    return flags[:i] + flags[i + 2:]


def scheduler_args(cfg: DictConfig, predictor_urls: list[str], log_file: Path) -> list[str]:
    """The scheduler's command line: the resolved policy config as a file, k explicit (null = all instances)."""
    policy_file = log_file.with_name("policy.yaml")
    write_yaml(policy_file, cfg.policy)
    k = cfg.policy.get("k")
    return ["--instances", ",".join(predictor_urls), "--policy-config", str(policy_file),
            "--k", "all" if k is None else str(int(k)), "--seed", str(int(cfg.seed)),
            "--probe-timeout-ms", str(int(cfg.mode.probe_timeout_ms)), "--log-file", str(log_file)]


class _Sampler:
    """Reads every engine's ``/state`` at a fixed model-time interval while the benchmark runs. ``urls``: a list,
    or a mapping instance -> URL that may grow meanwhile (back-pool slots started on demand)."""

    def __init__(self, urls: list[str] | dict[int, str], interval_model_s: float, scale: float,
                 token: str | None) -> None:
        self.urls = urls if isinstance(urls, dict) else dict(enumerate(urls))
        self.interval, self.scale = interval_model_s, scale
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self.rows: list[tuple] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        with httpx.Client(timeout=2.0) as client:
            k = 0
            while not self._stop.is_set():
                ts = k * self.interval
                for i, u in list(self.urls.items()):
                    try:
                        st = client.get(f"{u}/state", headers=self.headers).json()
                        self.rows.append((ts, i, len(st["running"]), len(st["waiting"]), int(st["free_blocks"]),
                                          int(st.get("num_preemptions", 0))))
                    except (httpx.HTTPError, ValueError, KeyError):
                        pass
                k += 1
                self._stop.wait(max(0.0, t0 + k * self.interval / self.scale - time.monotonic()))

    def __enter__(self) -> "_Sampler":
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


async def _replay(cfg: DictConfig, scheduler_urls: list[str], requests: list, token: str | None, bars: bool):
    from block.benchmark.client import BenchmarkConfig, benchmark

    scale = float(cfg.mode.time_scale)
    parts = [requests[i::len(scheduler_urls)] for i in range(len(scheduler_urls))]
    hint = str(cfg.mode.hint)
    jobs = []
    for url, part in zip(scheduler_urls, parts):
        if not part:
            continue
        bc = BenchmarkConfig(base_url=url, num_requests=len(part), request_rate=float(cfg.workload.qps or 1.0),
                             seed=int(cfg.seed), hint=hint, time_scale=scale, token=token,
                             disable_tqdm=not bars or len(scheduler_urls) > 1,
                             max_model_len=int(cfg.engine.max_model_len), timeout_s=float(cfg.mode.timeout_s))
        jobs.append(benchmark(bc, part))
    return await asyncio.gather(*jobs)


def run_emulate(cfg: DictConfig, run_dir: Path, ecfg: Optional[EngineConfig] = None) -> dict[str, Any]:
    """Run a validated ``cfg`` (``experiments.run.run_one``, which passes the engine config it built) on a local
    stack into ``run_dir``."""
    t0 = time.perf_counter()
    ecfg = wiring.engine_config(cfg) if ecfg is None else ecfg
    requests = wiring.workload(cfg)
    n = int(cfg.cluster.num_instances)
    m = int(cfg.mode.num_schedulers)
    scale = float(cfg.mode.time_scale)
    token = os.environ.get(TOKEN_ENV)  # never from the config: experiments.schema refuses mode.token
    run_dir = Path(run_dir)
    conf_dir = run_dir / "services"
    conf_dir.mkdir(parents=True, exist_ok=True)
    shared = engine_args(cfg, conf_dir, ecfg)
    real = str(cfg.mode.get("engine", "emulated")) == "vllm"  # real vLLM servers (stock vLLM has no /state)
    pools = run_pools(cfg)  # mixed pools: instance i's engine and predictor get its pool's files and flags
    if pools is not None and real:
        raise wiring.ConfigError("cluster.pools: mixed pools run on emulated engines (mode.engine=emulated)")
    args_of = [shared] * n if pools is None else pool_engine_args(cfg, conf_dir, pools)
    if real:
        shared = vllm_sized(cfg, shared)
    if real and (scale != 1.0 or str(cfg.mode.state_source) != "proxy"):
        raise wiring.ConfigError("mode.engine=vllm runs in real time with predictors tracking what they proxy: set "
                                 "mode.time_scale=1 and mode.state_source=proxy")
    # auto-provisioning: the first initial_instances start now, the back pool when a scheduler asks the agent
    controller = wiring.provisioning(cfg)
    initial = n if controller is None else controller.cfg.initial_instances
    state_urls: dict[int, str] = {}  # /state URL per started instance (the sampler reads new ones as they appear)
    services: dict[int, list] = {}  # the processes of each started instance (a scaled-down slot's are stopped)
    with LocalStack(run_dir / "logs", token=token, startup_timeout_s=float(cfg.mode.startup_timeout_s)) as stack:

        def start_instance(i: int, wait: bool = True) -> str:
            """Engine + predictor of instance ``i``; returns the predictor's URL."""
            e = _start_vllm(stack, cfg, shared, i) if real else \
                stack.start(f"engine{i}", "block.engine", [*args_of[i], "--time-scale", str(scale),
                                                           "--seed", str(int(cfg.seed) + i)])
            p = stack.start(f"predictor{i}", "block.predictor", [*args_of[i], "--engine-url", e.url, "--instance-id",
                                                                 str(i), "--state-source", str(cfg.mode.state_source),
                                                                 "--feedback-time-scale", str(scale),
                                                                 *(["--residual-correction"]
                                                                   if cfg.mode.get("residual_correction") else [])])
            if wait:
                stack.wait_healthy([e, p])
            state_urls[i] = str((p if real else e).url)
            services[i] = [p, e]
            return str(p.url)

        def stop_instance(i: int) -> None:
            """Scale-down (after the scheduler drained it): predictor, then engine; no longer part of the stack."""
            state_urls.pop(i, None)
            for svc in services.pop(i, []):
                svc.stop()
                stack.services.remove(svc)

        predictor_urls = [start_instance(i, wait=False) for i in range(initial)]
        with ProvisionAgent(start_instance, range(initial, n), token, stop_slot=stop_instance) as agent:
            schedulers = [stack.start(f"scheduler{j}", "block.scheduler",
                                      scheduler_args(cfg, predictor_urls, conf_dir / f"scheduler{j}.jsonl")
                                      + ([] if controller is None else
                                         provisioning_args(cfg, conf_dir, agent.url, n, j)))
                          for j in range(m)]
            stack.wait_healthy()
            records = drive(cfg, requests, [s.url for s in schedulers], state_urls, token,
                            bars=bool(cfg.get("progress", True)) and interactive())
            if controller is not None:  # starts still in flight finish and are recorded (not cut off)
                settle(agent, conf_dir, m, float(cfg.mode.startup_timeout_s))
            stack.check_alive()
    tables, extra = {}, {}
    if controller is not None:
        records.requests, tables["provisioning"], extra = provisioning_records(cfg, conf_dir, records.requests, m,
                                                                               agent.starts, agent.stops)
    if pools is not None:
        extra = {**extra, "pools": describe_pools(pools), "instance_kinds": pool_kinds(pools)}
    return write_records(cfg, run_dir, requests, records, mode="emulate", wall_s=time.perf_counter() - t0,
                         extra_tables=tables, ecfg=ecfg, **extra)


def _start_vllm(stack: LocalStack, cfg: DictConfig, shared: list[str], i: int) -> Any:
    """Engine ``i`` as a real ``vllm serve`` (``python -m block.engine.vllm``), pinned to core ``i mod ncpu``
    (set before the exec, so every process and thread of the server inherits it)."""
    core = i % (os.cpu_count() or 1)
    return stack.start(f"engine{i}", "block.engine.vllm", [*shared, f"--vllm-arg=--seed={int(cfg.seed) + i}"],
                       preexec_fn=lambda: os.sched_setaffinity(0, {core}))


@dataclass
class DriveResult:
    """What one replay against live schedulers measured: per-request rows, ITLs and the instance samples."""

    requests: pd.DataFrame
    itls_s: np.ndarray
    instances: pd.DataFrame


def drive(cfg: DictConfig, requests: list, scheduler_urls: list[str], state_urls: list[str] | dict[int, str],
          token: str | None, bars: bool) -> DriveResult:
    """Replay ``requests`` against running schedulers while sampling every instance's ``/state``.

    Shared by ``mode=emulate`` (local services) and ``mode=deploy`` (run on the scheduler host by
    ``python -m experiments.drive``); ``state_urls`` are engines (emulate) or predictors (deploy: they also serve
    ``/state``, for stock vLLM too). ``bars``: the benchmark client's progress bar (emulate: only on a terminal;
    deploy: as ``progress`` says, since the host's output is streamed back to the driver).
    """
    scale = float(cfg.mode.time_scale)
    with _Sampler(state_urls, float(cfg.mode.sample_interval_s), scale, token) as sampler:
        results = asyncio.run(_replay(cfg, scheduler_urls, requests, token, bars))
    req_df = pd.concat([r.requests for r in results], ignore_index=True).sort_values("id").reset_index(drop=True)
    itls = np.concatenate([r.itls_s for r in results]) if results else np.array([])
    return DriveResult(req_df, itls, instances_frame(sampler.rows))


def record_summary(cfg: DictConfig, requests: list, res: DriveResult, mode: str,
                   ecfg: Optional[EngineConfig] = None, **extra: Any) -> dict[str, Any]:
    """The run summary (vllm-bench keys) of a live replay, with ITL percentiles and the engines' preemptions."""
    ecfg = wiring.engine_config(cfg) if ecfg is None else ecfg
    summary = summarize(
        res.requests, mode=mode, policy=str(cfg.policy.name), k=cfg.policy.get("k"), qps=cfg.workload.qps,
        num_instances=int(cfg.cluster.num_instances), num_schedulers=int(cfg.mode.num_schedulers),
        num_requests=len(requests), num_blocks=ecfg.num_blocks, seed=int(cfg.seed), model=str(cfg.model.name),
        gpu=str(cfg.gpu.name), dataset=str(cfg.dataset.name), time_scale=float(cfg.mode.time_scale), **extra,
    )
    if res.itls_s.size:
        v = res.itls_s * 1e3
        summary.update(mean_itl_ms=float(v.mean()), median_itl_ms=float(np.median(v)),
                       p90_itl_ms=float(np.percentile(v, 90)), p99_itl_ms=float(np.percentile(v, 99)))
    inst = res.instances
    if len(inst):  # per-request preemptions are unknown live; the engines' counters give the total (as a
        # difference over the run: an engine kept from an earlier run starts with its old count)
        g = inst.groupby("instance")["num_preemptions"]
        summary["num_preemptions"] = int((g.max() - g.min()).sum())
    return summary


def write_records(cfg: DictConfig, run_dir: Path, requests: list, res: DriveResult, mode: str,
                  extra_tables: dict[str, pd.DataFrame] | None = None, ecfg: Optional[EngineConfig] = None,
                  **extra: Any) -> dict[str, Any]:
    summary = record_summary(cfg, requests, res, mode, ecfg, **extra)
    write_run(run_dir, redacted_yaml(cfg), res.requests, res.instances, summary, extra_tables)
    return summary


def redacted_yaml(cfg: DictConfig) -> str:
    """The resolved config with secrets replaced: a token never lands in the run records."""
    c = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(c.get("mode"), dict) and c["mode"].get("token"):
        c["mode"]["token"] = "***"
    return OmegaConf.to_yaml(OmegaConf.create(c))
