"""The run config's schema: types, choices and ranges of the keys a user sets, checked once before a run starts.

Hydra composes the YAML tree without types, so ``workload.num_requests=abc`` or ``workload.arrival=poison`` compose
fine and would fail as a traceback halfway through a run. ``check(cfg)`` validates the composed config against the
models below (pydantic's semantics and messages, by ``experiments.validation``, which costs a run no pydantic import)
and raises one ``ConfigError`` whose message names every bad key (``workload.arrival='poison':
Input should be 'poisson', 'gamma', 'constant' or 'trace'``). Only the keys modelled here are checked; every other
key passes through (kept as ``model_extra``), so a group can grow keys without touching this file. Once every key has
its type, ``RunConfig``'s last check tries the combinations by building what the run builds: the engine setup
(``vidur.config.engine_setup``: KV blocks from GPU memory, max_model_len, the engine config's rules), the
provisioning config and the policy (its own parameters). ``experiments.run.run_one`` calls this once per run
(through ``wiring.validate``); the modes trust the result.

Secrets: the bearer token comes from ``$BLOCK_API_TOKEN`` only. ``mode.token`` is refused in every mode, on the
command line (``refuse_secret_arguments``, before Hydra writes ``.hydra/overrides.yaml``) and in a config
(``ConfigGuard`` before Hydra writes ``.hydra/config.yaml``; ``check`` for configs composed by other tools).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from data.arrivals import ARRIVALS
from data.workload import PREDICTED_LENGTH_MODES
from experiments.validation import Field, Node, ValidationError, ValidationInfo, field_validator, model_validator
from experiments.wiring import ConfigError
from vidur.types import SCHEDULERS, EngineConfig

SECRET_KEYS = ("mode.token",)
SECRET_MESSAGE = ("{key} is refused: give the bearer token in $BLOCK_API_TOKEN (a command line or config keeps it "
                  "in the shell history, `ps` and the run's .hydra/ folder)")
# the data layer's choices, plus what experiments adds: estimator = tagged by the length estimator before the run
PREDICTED_LENGTHS = (*PREDICTED_LENGTH_MODES, "estimator")
MODES = ("sim", "emulate", "deploy")


class _Node(Node):
    """A config node: the listed keys are checked, the others pass through."""


class Workload(_Node):
    arrival: Literal[ARRIVALS]  # first: the checks of qps and burstiness read it
    qps: Optional[float] = None
    num_requests: int = Field(gt=0)
    burstiness: float = 1.0
    start_index: int = Field(0, ge=0)
    shuffle: bool = True
    wrap: bool = False
    min_prompt_tokens: int = Field(4, ge=0)

    @field_validator("qps")
    @classmethod
    def _qps(cls, v: Optional[float], info: ValidationInfo) -> Optional[float]:
        arrival = info.data.get("arrival")
        if v is not None and v <= 0 and arrival != "trace":
            raise ValueError(f"must be > 0 (arrival={arrival}; only arrival=trace takes 0/null: the trace's rate)")
        if v is None and arrival not in ("trace", None):
            raise ValueError(f"must be set for arrival={arrival}")
        return v

    @field_validator("burstiness")
    @classmethod
    def _burstiness(cls, v: float, info: ValidationInfo) -> float:
        if info.data.get("arrival") == "gamma" and not v > 0:
            raise ValueError("must be > 0 for arrival=gamma")
        return v


class Dataset(_Node):
    name: str
    path: Optional[str] = None
    tokenizer: str = "llama2"
    predicted_length: Literal[PREDICTED_LENGTHS] = "none"

    @field_validator("path")
    @classmethod
    def _path(cls, v: Optional[str]) -> Optional[str]:
        if v in (None, ""):
            return None
        p = Path(v).expanduser()
        if not p.exists():
            raise ValueError(f"no such file ({p.resolve()})")
        if not p.is_file():
            raise ValueError("is not a file (a CSV / parquet / JSONL file is expected)")
        return v

    @model_validator(mode="after")
    def _bundled(self) -> "Dataset":
        from data.datasets import DATASETS

        if self.path is None and self.name not in DATASETS:  # with a path, the name only labels the user's file
            raise ValueError(f"dataset.name={self.name!r} is no bundled dataset ({', '.join(DATASETS)}); "
                             "set dataset.path=<file> to use your own")
        return self


class Cluster(_Node):
    num_instances: int = Field(ge=1)


class Policy(_Node):
    name: str
    k: Optional[int] = Field(None, ge=1)


class Mode(_Node):
    name: Literal[MODES]

    @model_validator(mode="after")
    def _no_secret(self) -> "Mode":
        if (self.model_extra or {}).get("token") is not None:
            raise ValueError(SECRET_MESSAGE.format(key="mode.token"))
        return self


class Accuracy(_Node):
    sampling_rate: float = Field(0.0, ge=0.0, le=1.0)
    warmup_rounds: int = Field(2, ge=0)  # benchmarks/vllm_accuracy.py: warm-up rounds per real engine


class Model(_Node):  # conf/model: vidur.specs.ModelSpec
    name: str
    profile_name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_q_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    num_params: float = Field(gt=0)
    dtype_bytes: int = Field(2, gt=0)
    max_model_len: int = Field(4096, gt=0)
    tokenizer: str = "llama2"


class Gpu(_Node):  # conf/gpu: vidur.specs.GpuSpec
    name: str
    memory_gb: float = Field(gt=0)
    fp16_tflops: float = Field(gt=0)
    hbm_gbps: float = Field(gt=0)
    profile_dir: Optional[str] = None
    cuda_context_gb: float = Field(0.5, ge=0)
    visible_memory_mib: Optional[float] = Field(None, gt=0)
    network_profile_dir: Optional[str] = None
    interconnect_gbps: Optional[float] = Field(None, gt=0)


class Engine(_Node):  # conf/engine: vidur.types.EngineConfig and what sizes it (vidur.config.engine_setup)
    chunked_prefill: bool
    max_num_seqs: int = Field(gt=0)
    chunk_size: int = Field(gt=0)
    max_num_batched_tokens: int = Field(gt=0)
    block_size: int = Field(gt=0)
    num_blocks: Optional[int] = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    watermark: float = Field(0.01, ge=0.0, lt=1.0)
    max_model_len: int = Field(gt=0)
    tensor_parallel: int = Field(1, ge=1)
    cpu_overhead_s: float = Field(0.0, ge=0.0)
    scheduler: Literal[SCHEDULERS] = "v0"
    long_prefill_token_threshold: int = Field(0, ge=0)
    enable_prefix_caching: bool = False


class Provisioning(_Node):  # conf/provisioning: block.provisioning.ProvisioningConfig
    enabled: bool = False
    strategy: Literal["reactive", "predictive"] = "reactive"
    initial_instances: int = Field(6, ge=1)
    slo_s: float = Field(70.0, gt=0)
    metric: Literal["e2e", "ttft"] = "e2e"
    cold_start_s: float = Field(0.0, ge=0)
    cooldown_s: float = Field(0.0, ge=0)
    scale_down: bool = False
    scale_down_fraction: float = Field(0.5, gt=0, lt=1)
    scale_down_window_s: float = Field(60.0, gt=0)




class RunConfig(_Node):
    seed: int
    output_root: str
    experiment_name: str
    force: bool = False
    progress: bool = True
    workload: Workload
    dataset: Dataset
    cluster: Cluster
    policy: Policy
    mode: Mode
    accuracy: Accuracy = Accuracy()
    model: Model
    gpu: Gpu
    engine: Engine
    provisioning: Optional[Provisioning] = None
    _engine_config: Optional[EngineConfig] = None  # private (a leading underscore): set by _combinations

    @model_validator(mode="after")
    def _combinations(self) -> "RunConfig":
        """Build what the run builds from the typed keys; each failure names its keys."""
        from vidur.config import engine_setup

        self._engine_config = engine_setup(self.model.model_dump(), self.gpu.model_dump(),
                                           self.engine.model_dump()).engine
        pools = (self.cluster.model_extra or {}).get("pools")
        if pools is not None:  # mixed pools (experiments.pools): every pool's engine is built here once
            from experiments.pools import build_pools

            if self.mode.name == "deploy":
                raise ValueError("cluster.pools: mixed pools run in mode=sim and mode=emulate, not yet mode=deploy")
            build_pools(self.model.model_dump(), self.gpu.model_dump(), self.engine.model_dump(), pools,
                        self.cluster.num_instances)
        from block.policies import policy_from_config

        try:
            policy = policy_from_config(self.policy.model_dump())
        except (ValueError, TypeError) as err:
            raise ValueError(f"policy.*: {err}") from err
        p = self.provisioning
        if p is not None and p.enabled:
            if p.initial_instances > self.cluster.num_instances:
                raise ValueError(f"provisioning.initial_instances={p.initial_instances} exceeds "
                                 f"cluster.num_instances={self.cluster.num_instances}")
            if p.strategy == "predictive" and policy.signal != "prediction":
                raise ValueError(f"provisioning.strategy=predictive needs predicted latencies: policy.name="
                                 f"{self.policy.name} asks for none (a policy with signal 'prediction', e.g. block)")
        return self

    @property
    def engine_config(self) -> EngineConfig:
        """The engine config the checks built (num_blocks resolved)."""
        assert self._engine_config is not None
        return self._engine_config


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    inp = err.get("input")
    if loc and not isinstance(inp, dict) and err["type"] != "missing":
        return f"{loc}={inp!r}: {msg}"
    if loc and msg.startswith(loc):  # a node-level check names its keys itself
        return msg
    return f"{loc}: {msg}" if loc else msg


def check(cfg: DictConfig) -> RunConfig:
    """Validate the composed run config; a ConfigError names every bad key on one line."""
    # the run's keys only: Hydra's own node (present in compose(return_hydra_config=True)) resolves only in a job
    node = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items() if k != "hydra"}
    try:
        return RunConfig.model_validate(node)
    except ValidationError as err:
        raise ConfigError("; ".join(_describe(e) for e in err.errors(include_url=False))) from None


# ---------------------------------------------------------------------- before Hydra writes anything
def secret_keys_in(cfg: DictConfig) -> list[str]:
    """The secret keys set (non-null) in a composed config."""
    return [k for k in SECRET_KEYS if OmegaConf.select(cfg, k, default=None, throw_on_missing=False) is not None]


def output_root_problem(output_root: str) -> Optional[str]:
    """Why runs cannot be written under ``output_root`` (None when they can): checked before Hydra makes the dir."""
    p = Path(output_root).expanduser().absolute()
    probe = p
    while not probe.exists():  # the nearest existing ancestor must be a writable directory
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == p else f"is below a file ({probe})"
        return f"output_root={output_root}: {what}, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == p else f" ({probe} is not)"
        return f"output_root={output_root}: not writable{where}"
    return None


def _fail(message: str) -> None:
    print(f"configuration error: {message}", file=sys.stderr)
    raise SystemExit(2)


def refuse_secret_arguments(argv: Sequence[str]) -> None:
    """Exit with one line if a command-line override sets a secret (``mode.token=``, ``+mode.token=``, ...)."""
    for arg in argv:
        key = arg.lstrip("+~").split("=", 1)[0].strip()
        if key in SECRET_KEYS:
            _fail(SECRET_MESSAGE.format(key=key))


class ConfigGuard(Callback):
    """Hydra callback (conf/config.yaml registers it): the checks that must run before Hydra creates the run
    directory and writes ``.hydra/`` into it -- no secret in the config, and an ``output_root`` that can hold runs."""

    def _guard(self, config: DictConfig) -> None:
        keys = secret_keys_in(config)
        if keys:
            _fail(SECRET_MESSAGE.format(key=keys[0]))
        problem = output_root_problem(str(config.output_root))
        if problem:
            _fail(problem)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._guard(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._guard(config)
