"""Turn a composed Hydra config into the objects a run needs, and refuse impossible combinations early.

Every check names the config keys involved, so a bad sweep point fails before its run starts, not halfway through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vidur.types import EngineConfig, Request

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """An impossible or inconsistent configuration; the message names the keys."""


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    v = OmegaConf.select(cfg, key, default=default)
    return default if v is None else v


def profile_root() -> Path:
    """The bundled Vidur-format profiles (data/profiling)."""
    from data import DATA_DIR

    return Path(DATA_DIR) / "profiling"


def model_spec(cfg: DictConfig):
    from vidur.specs import ModelSpec

    return ModelSpec.from_dict(cfg.model)


def gpu_spec(cfg: DictConfig):
    from vidur.specs import GpuSpec

    return GpuSpec.from_dict(cfg.gpu)


def engine_config(cfg: DictConfig) -> EngineConfig:
    """The engine config with ``num_blocks`` resolved from GPU memory when it is null."""
    e = cfg.engine
    num_blocks = e.get("num_blocks")
    if num_blocks is None:
        from vidur.memory import kv_capacity_blocks

        try:
            num_blocks = kv_capacity_blocks(
                model_spec(cfg), gpu_spec(cfg), gpu_memory_utilization=float(e.gpu_memory_utilization),
                block_size=int(e.block_size), tp=int(e.tensor_parallel),
                max_num_batched_tokens=int(e.chunk_size if e.chunked_prefill else e.max_num_batched_tokens),
                max_num_seqs=int(e.max_num_seqs),
            )
        except ValueError as err:
            raise ConfigError(f"model={cfg.model.name} gpu={cfg.gpu.name} engine.tensor_parallel="
                              f"{e.tensor_parallel}: {err}") from err
    max_len = int(e.max_model_len)
    model_max = _get(cfg, "model.max_model_len")
    if model_max is not None and max_len > int(model_max):
        raise ConfigError(f"engine.max_model_len={max_len} exceeds model.max_model_len={model_max} ({cfg.model.name})")
    ec = EngineConfig(
        max_num_seqs=int(e.max_num_seqs), max_num_batched_tokens=int(e.max_num_batched_tokens),
        chunked_prefill=bool(e.chunked_prefill), chunk_size=int(e.chunk_size), block_size=int(e.block_size),
        num_blocks=int(num_blocks), watermark=float(e.watermark), max_model_len=max_len,
        scheduler=str(e.get("scheduler", "v0")),
        long_prefill_token_threshold=int(e.get("long_prefill_token_threshold", 0) or 0),
    )
    try:
        ec.validate()
    except ValueError as err:
        raise ConfigError(str(err).replace("invalid engine config: ", "invalid engine config (engine.*): ")) from err
    return ec


def execution_model(cfg: DictConfig):
    from vidur.execution_model import ExecutionModel

    cache = _get(cfg, "cache_dir")
    return ExecutionModel.fit(
        model_spec(cfg), gpu_spec(cfg), tp=int(cfg.engine.tensor_parallel), profile_root=profile_root(),
        cache_dir=cache, cpu_overhead_s=float(_get(cfg, "engine.cpu_overhead_s", 0.0)),
    )


def workload_config(cfg: DictConfig):
    from data import WorkloadConfig

    w, d = cfg.workload, cfg.dataset
    return WorkloadConfig(
        dataset=str(d.name), path=d.get("path"), num_requests=int(w.num_requests),
        qps=None if w.qps is None else float(w.qps), arrival=str(w.arrival), burstiness=float(w.burstiness),
        seed=int(cfg.seed), start_index=int(w.start_index), shuffle=bool(w.shuffle), wrap=bool(w.wrap),
        max_model_len=int(cfg.engine.max_model_len), min_prompt_tokens=int(w.min_prompt_tokens),
        tokenizer=str(d.get("tokenizer", "llama2")), predicted_length=str(d.get("predicted_length", "none")),
    )


# WorkloadConfig field -> the config key a user sets (the others are workload.<field>)
WORKLOAD_KEYS = {"path": "dataset.path", "dataset": "dataset.name", "tokenizer": "dataset.tokenizer",
                 "predicted_length": "dataset.predicted_length", "max_model_len": "engine.max_model_len",
                 "seed": "seed"}


def workload(cfg: DictConfig) -> list[Request]:
    """The run's requests; what the data cannot give (unknown columns, no timestamps for arrival=trace, too few
    rows) is a ConfigError naming the config key to change."""
    from data import WorkloadError, build_workload

    wc = workload_config(cfg)
    estimator = wc.predicted_length == "estimator"
    if estimator:  # tag with a length estimator before the run (block_star reads it)
        wc.predicted_length = "none"
    try:
        requests = build_workload(wc)
    except WorkloadError as err:
        key = WORKLOAD_KEYS.get(err.field, f"workload.{err.field}")
        raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: {err}") from None
    if estimator:
        from length_estimation.serve import tag_workload

        return tag_workload(cfg, requests)
    return requests


def policy(cfg: DictConfig):
    from block.policies import policy_from_config

    try:
        return policy_from_config(OmegaConf.to_container(cfg.policy, resolve=True))
    except ValueError as err:
        raise ConfigError(f"policy.*: {err}") from err


def validate(cfg: DictConfig) -> EngineConfig:
    """All the checks that need no data, run once per run (``experiments.run.run_one``): the schema's types, choices
    and ranges (``experiments.schema``), then the engine and provisioning combinations. Returns the engine config."""
    from experiments import schema

    schema.check(cfg)
    ec = engine_config(cfg)
    provisioning(cfg, int(cfg.cluster.num_instances))
    return ec


def provisioning(cfg: DictConfig, num_instances: int):
    """The auto-provisioning controller, or None when ``provisioning.enabled`` is false."""
    p = cfg.get("provisioning")
    if p is None or not p.get("enabled", False):
        return None
    from block.provisioning import ProvisioningConfig, ProvisioningController

    try:
        pc = ProvisioningConfig.from_dict(OmegaConf.to_container(p, resolve=True))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if pc.initial_instances > num_instances:
        raise ConfigError(f"provisioning.initial_instances={pc.initial_instances} exceeds "
                          f"cluster.num_instances={num_instances}")
    if pc.strategy == "predictive" and str(cfg.policy.name) not in ("block", "block_star", "block_oracle",
                                                                     "block_noisy"):
        raise ConfigError(f"provisioning.strategy=predictive needs predicted latencies: policy.name="
                          f"{cfg.policy.name} predicts none (use the block family)")
    return ProvisioningController(pc)
