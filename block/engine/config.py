"""Turn the repository's config files (conf/model, conf/gpu, conf/engine) into an EngineConfig and an ExecutionModel.

This mirrors ``experiments.wiring.engine_config`` / ``execution_model`` for one engine; it is copied rather than
imported because ``block/*`` must not import ``experiments`` (DESIGN.md, layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vidur.types import EngineConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


def profile_root() -> Path:
    """The bundled Vidur-format profiles (data/profiling)."""
    from data import DATA_DIR

    return Path(DATA_DIR) / "profiling"


def conf_names(group: str) -> list[str]:
    """The config names of a group (``conf/<group>/*.yaml`` without the suffix)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_conf(group: str, name_or_path: str) -> dict[str, Any]:
    """A config of ``group`` by name (``llama2_7b``) or by path to a YAML file, as a plain dict."""
    from omegaconf import OmegaConf

    p = Path(name_or_path).expanduser()
    if not (p.suffix in (".yaml", ".yml") and p.is_file()):
        p = CONF_DIR / group / f"{name_or_path}.yaml"
        if not p.is_file():
            raise ValueError(f"unknown {group} config {name_or_path!r}: use one of {conf_names(group)} "
                             f"or a path to a YAML file")
    d = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a mapping")
    d.pop("defaults", None)
    return d  # type: ignore[return-value]


@dataclass
class EngineSetup:
    """Everything needed to build one emulated engine."""

    model: Any  # vidur.specs.ModelSpec
    gpu: Any  # vidur.specs.GpuSpec
    engine: EngineConfig
    tensor_parallel: int = 1
    cpu_overhead_s: float = 0.0
    engine_name: str = "vllm_chunked"
    raw: dict[str, Any] = field(default_factory=dict)

    def execution_model(self, cache_dir: Optional[str] = None):
        from vidur.execution_model import ExecutionModel

        return ExecutionModel.fit(self.model, self.gpu, tp=self.tensor_parallel, profile_root=profile_root(),
                                  cache_dir=cache_dir, cpu_overhead_s=self.cpu_overhead_s)


def build_setup(model: str = "llama2_7b", gpu: str = "a30", engine: str = "vllm_chunked", *,
                max_num_seqs: Optional[int] = None, chunk_size: Optional[int] = None,
                max_num_batched_tokens: Optional[int] = None, num_blocks: Optional[int] = None,
                chunked_prefill: Optional[bool] = None, max_model_len: Optional[int] = None,
                tensor_parallel: Optional[int] = None, gpu_memory_utilization: Optional[float] = None,
                cpu_overhead_s: Optional[float] = None) -> EngineSetup:
    """Resolve the configs (names or YAML paths) plus CLI overrides; raise ValueError naming the bad key."""
    from vidur.specs import GpuSpec, ModelSpec

    md, gd, ed = load_conf("model", model), load_conf("gpu", gpu), load_conf("engine", engine)
    for key, val in (("max_num_seqs", max_num_seqs), ("chunk_size", chunk_size),
                     ("max_num_batched_tokens", max_num_batched_tokens), ("num_blocks", num_blocks),
                     ("chunked_prefill", chunked_prefill), ("max_model_len", max_model_len),
                     ("tensor_parallel", tensor_parallel), ("gpu_memory_utilization", gpu_memory_utilization),
                     ("cpu_overhead_s", cpu_overhead_s)):
        if val is not None:
            ed[key] = val
    if ed.get("chunked_prefill") and chunk_size is not None and int(ed.get("max_num_batched_tokens", 0)) < chunk_size:
        ed["max_num_batched_tokens"] = chunk_size  # --chunk-size alone should not trip the chunk <= batched check
    ms, gs = ModelSpec.from_dict(md), GpuSpec.from_dict(gd)
    tp = int(ed.get("tensor_parallel", 1))
    nb = ed.get("num_blocks")
    if nb is None:
        from vidur.memory import kv_capacity_blocks

        nb = kv_capacity_blocks(
            ms, gs, gpu_memory_utilization=float(ed.get("gpu_memory_utilization", 0.9)),
            block_size=int(ed["block_size"]), tp=tp,
            max_num_batched_tokens=int(ed["chunk_size"] if ed["chunked_prefill"] else ed["max_num_batched_tokens"]),
            max_num_seqs=int(ed["max_num_seqs"]),
        )
    max_len = int(ed["max_model_len"])
    if max_len > ms.max_model_len:
        raise ValueError(f"engine max_model_len={max_len} exceeds model.max_model_len={ms.max_model_len} ({ms.name})")
    ec = EngineConfig(
        max_num_seqs=int(ed["max_num_seqs"]), max_num_batched_tokens=int(ed["max_num_batched_tokens"]),
        chunked_prefill=bool(ed["chunked_prefill"]), chunk_size=int(ed["chunk_size"]),
        block_size=int(ed["block_size"]), num_blocks=int(nb), watermark=float(ed.get("watermark", 0.01)),
        max_model_len=max_len, scheduler=str(ed.get("scheduler", "v0")),
        long_prefill_token_threshold=int(ed.get("long_prefill_token_threshold", 0) or 0),
    )
    ec.validate()
    return EngineSetup(model=ms, gpu=gs, engine=ec, tensor_parallel=tp,
                       cpu_overhead_s=float(ed.get("cpu_overhead_s", 0.0) or 0.0),
                       engine_name=str(ed.get("name", engine)), raw={"model": md, "gpu": gd, "engine": ed})


def setup_from_args(args) -> EngineSetup:
    """``build_setup`` from the model/GPU/engine options that the engine and predictor command lines share."""
    return build_setup(
        args.model_config or args.model or "llama2_7b", args.gpu, args.engine,
        max_num_seqs=args.max_num_seqs, chunk_size=args.chunk_size,
        max_num_batched_tokens=args.max_num_batched_tokens, num_blocks=args.num_blocks,
        chunked_prefill=args.chunked_prefill, max_model_len=args.max_model_len,
        tensor_parallel=args.tensor_parallel, gpu_memory_utilization=args.gpu_memory_utilization,
    )
