"""Turn a composed Hydra config into the objects a run needs, and refuse impossible combinations early.

Every check names the config keys involved, so a bad sweep point fails before its run starts, not halfway through.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from vidur.config import REPO_ROOT, EngineSetup, profile_root  # noqa: F401  (REPO_ROOT, profile_root: re-exported)
from vidur.config import engine_setup as build_engine_setup
from vidur.specs import GpuSpec, ModelSpec
from vidur.types import EngineConfig, Request


class ConfigError(ValueError):
    """An impossible or inconsistent configuration; the message names the keys."""


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    v = OmegaConf.select(cfg, key, default=default)
    return default if v is None else v


def model_spec(cfg: DictConfig) -> ModelSpec:
    return ModelSpec.from_dict(cfg.model)


def gpu_spec(cfg: DictConfig) -> GpuSpec:
    return GpuSpec.from_dict(cfg.gpu)


def engine_setup(cfg: DictConfig) -> EngineSetup:
    """The run's specs and engine config (``vidur.config.engine_setup``, the builder every launcher uses), with
    ``num_blocks`` resolved from GPU memory when it is null; a ConfigError names the keys at fault."""
    try:
        return build_engine_setup(cfg.model, cfg.gpu, cfg.engine)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def engine_config(cfg: DictConfig) -> EngineConfig:
    """The engine config of the run (see ``engine_setup``)."""
    return engine_setup(cfg).engine


def execution_model(cfg: DictConfig):
    """The run's fitted execution model (cached under ``cache_dir`` or the user cache)."""
    return engine_setup(cfg).execution_model(_get(cfg, "cache_dir"))


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
    """The run's routing policy (its parameters were checked by ``validate``)."""
    from block.policies import policy_from_config

    return policy_from_config(OmegaConf.to_container(cfg.policy, resolve=True))


def validate(cfg: DictConfig) -> EngineConfig:
    """All the checks that need no data, run once per run (``experiments.run.run_one``): the schema's types, choices
    and ranges, then the combinations -- engine, provisioning, policy (``experiments.schema``). Returns the engine
    config the checks built, which the modes use as it is."""
    from experiments import schema

    return schema.check(cfg).engine_config


def provisioning(cfg: DictConfig):
    """The auto-provisioning controller, or None when ``provisioning.enabled`` is false (checked by ``validate``:
    ``initial_instances`` within ``num_instances``, a predicting policy for the predictive strategy)."""
    p = cfg.get("provisioning")
    if p is None or not p.get("enabled", False):
        return None
    from block.provisioning import ProvisioningConfig, ProvisioningController

    return ProvisioningController(ProvisioningConfig.from_dict(OmegaConf.to_container(p, resolve=True)))
