"""The repository's config tree and the one builder of an engine's setup from its model, GPU and engine mappings.

Every launcher turns the same three mappings (``conf/model``, ``conf/gpu``, ``conf/engine``) into a ``ModelSpec``,
a ``GpuSpec`` and an ``EngineConfig``: Hydra runs (``experiments.wiring``, mappings composed by Hydra), the engine
and predictor command lines (``block.engine.config``: names or YAML paths plus flag overrides) and the profile
fitter (``vidur.profile_fit``). The rules -- ``num_blocks`` from GPU memory when null, ``max_model_len`` within the
model's, the engine config's own checks -- are written here once. It lives in ``vidur`` because every layer above
may import ``vidur`` and ``vidur``'s own tools need it too (docs/DESIGN.md, layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from vidur.specs import GpuSpec, ModelSpec, _plain
from vidur.types import EngineConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
PROFILE_ROOT = REPO_ROOT / "data" / "profiling"  # the bundled Vidur-format profiles (data/README.md)

ENGINE_DEFAULTS: dict[str, Any] = {  # what an engine mapping may leave out
    "gpu_memory_utilization": 0.9, "watermark": 0.01, "tensor_parallel": 1, "cpu_overhead_s": 0.0,
    "scheduler": "v0", "long_prefill_token_threshold": 0, "num_blocks": None,
}


def profile_root() -> Path:
    """The bundled Vidur-format profiles (data/profiling)."""
    return PROFILE_ROOT


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
    """Everything needed to build one engine: specs, engine config, and what the execution model is fitted with."""

    model: ModelSpec
    gpu: GpuSpec
    engine: EngineConfig
    tensor_parallel: int = 1
    cpu_overhead_s: float = 0.0
    engine_name: str = "vllm_chunked"

    def execution_model(self, cache_dir: Optional[str] = None):
        """The fitted (and cached) execution model of this model on this GPU at this tensor-parallel degree."""
        from vidur.execution_model import ExecutionModel

        return ExecutionModel.fit(self.model, self.gpu, tp=self.tensor_parallel, profile_root=PROFILE_ROOT,
                                  cache_dir=cache_dir, cpu_overhead_s=self.cpu_overhead_s)


def engine_setup(model: Mapping[str, Any], gpu: Mapping[str, Any], engine: Mapping[str, Any],
                 engine_name: Optional[str] = None) -> EngineSetup:
    """Build the setup from the three mappings (dicts or OmegaConf nodes); a ValueError names the keys at fault.

    ``engine.num_blocks: null`` is resolved from GPU memory as vLLM does (``vidur.memory``), with the token budget
    of one step (``chunk_size`` under chunked prefill, else ``max_num_batched_tokens``) for the activations.
    """
    from vidur.memory import kv_capacity_blocks

    md, gd = _plain(model), _plain(gpu)
    ed = {**ENGINE_DEFAULTS, **{k: v for k, v in _plain(engine).items() if v is not None or k == "num_blocks"}}
    ms, gs = ModelSpec.from_dict(md), GpuSpec.from_dict(gd)
    tp = int(ed["tensor_parallel"])
    num_blocks = ed["num_blocks"]
    if num_blocks is None:
        try:
            num_blocks = kv_capacity_blocks(
                ms, gs, gpu_memory_utilization=float(ed["gpu_memory_utilization"]), block_size=int(ed["block_size"]),
                tp=tp, max_num_batched_tokens=int(ed["chunk_size"] if ed["chunked_prefill"]
                                                   else ed["max_num_batched_tokens"]),
                max_num_seqs=int(ed["max_num_seqs"]),
            )
        except ValueError as err:
            raise ValueError(f"model={ms.name} gpu={gs.name} engine.tensor_parallel={tp}: {err}") from err
    max_len = int(ed["max_model_len"])
    if max_len > ms.max_model_len:
        raise ValueError(f"engine.max_model_len={max_len} exceeds model.max_model_len={ms.max_model_len} ({ms.name})")
    ec = EngineConfig(
        max_num_seqs=int(ed["max_num_seqs"]), max_num_batched_tokens=int(ed["max_num_batched_tokens"]),
        chunked_prefill=bool(ed["chunked_prefill"]), chunk_size=int(ed["chunk_size"]),
        block_size=int(ed["block_size"]), num_blocks=int(num_blocks), watermark=float(ed["watermark"]),
        max_model_len=max_len, scheduler=str(ed["scheduler"]),
        long_prefill_token_threshold=int(ed["long_prefill_token_threshold"] or 0),
    )
    try:
        ec.validate()
    except ValueError as err:
        raise ValueError(str(err).replace("invalid engine config: ", "invalid engine config (engine.*): ")) from err
    return EngineSetup(model=ms, gpu=gs, engine=ec, tensor_parallel=tp, cpu_overhead_s=float(ed["cpu_overhead_s"] or 0),
                       engine_name=str(engine_name or ed.get("name", "engine")))
