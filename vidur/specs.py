"""Model and GPU specifications (the ``conf/model/*.yaml`` and ``conf/gpu/*.yaml`` groups as dataclasses).

Both accept a plain dict or an OmegaConf ``DictConfig`` in ``from_dict``; unknown keys (e.g. Hydra's) are ignored,
missing required keys raise ``ValueError`` naming them. Units: bytes, decimal GB (1e9) where a key says ``_gb``,
MiB (2**20) where it says ``_mib``, TFLOP/s and GB/s as vendors state them.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Mapping, Optional


def _plain(d: Any) -> dict[str, Any]:
    """A plain dict from a dict or an OmegaConf container (resolved), without importing omegaconf eagerly."""
    if type(d).__module__.split(".")[0] == "omegaconf":
        from omegaconf import OmegaConf

        return dict(OmegaConf.to_container(d, resolve=True))  # type: ignore[arg-type]
    if isinstance(d, Mapping):
        return dict(d)
    raise TypeError(f"expected a dict or an OmegaConf DictConfig, got {type(d).__name__}")


def _build(cls, d: Any):
    d = _plain(d)
    kw = {}
    missing = []
    for f in fields(cls):
        if f.name in d:
            kw[f.name] = d[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:  # type: ignore[misc]
            missing.append(f.name)
    if missing:
        raise ValueError(f"{cls.__name__}: missing key(s) {', '.join(missing)}")
    return cls(**kw)


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer (Llama/Qwen2 family: RMSNorm, RoPE, gated SiLU MLP, GQA)."""

    name: str  # HF id, e.g. meta-llama/Llama-2-7b-hf
    profile_name: str  # folder under <profile_root>/compute/<gpu>/ (Vidur's spelling, e.g. Qwen/Qwen-2-7B)
    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_params: float  # total parameters incl. embeddings and LM head
    dtype_bytes: int = 2
    max_model_len: int = 4096
    tokenizer: str = "llama2"

    def __post_init__(self) -> None:
        for k in ("num_layers", "hidden_size", "num_q_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size", "dtype_bytes", "max_model_len"):
            v = getattr(self, k)
            if int(v) != v or v <= 0:
                raise ValueError(f"ModelSpec {self.name}: {k}={v} must be a positive integer")
            object.__setattr__(self, k, int(v))
        if self.num_params <= 0:
            raise ValueError(f"ModelSpec {self.name}: num_params={self.num_params} must be > 0")
        object.__setattr__(self, "num_params", float(self.num_params))
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"ModelSpec {self.name}: num_q_heads={self.num_q_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_dict(cls, d: Any) -> "ModelSpec":
        return _build(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers (whole model, all TP shards together)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def kv_bytes_per_token_per_gpu(self, tp: int = 1) -> float:
        """K and V of one token held by one tensor-parallel shard (KV heads split across ``tp`` GPUs)."""
        return self.kv_bytes_per_token / tp

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes

    @property
    def q_width(self) -> int:
        return self.num_q_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model. ``memory_gb`` is the vendor's figure; HBM/GDDR sizes are binary in truth (an "A30 24GB" has
    24 GiB), and the driver reports a little less: ``visible_memory_mib`` is what ``nvidia-smi`` /
    ``cudaMemGetInfo`` show as total, the base vLLM's ``gpu_memory_utilization`` multiplies."""

    name: str
    memory_gb: float
    fp16_tflops: float  # dense FP16/BF16 tensor-core peak
    hbm_gbps: float  # peak memory bandwidth, GB/s (1e9)
    profile_dir: Optional[str] = None  # <profile_root>/compute/<profile_dir>; None: no profile (roofline)
    cuda_context_gb: float = 0.5  # CUDA context + non-torch allocations (cuBLAS/NCCL workspaces), decimal GB
    visible_memory_mib: Optional[float] = None  # None: memory_gb GiB less 1.3 % (the A30's driver reservation)
    network_profile_dir: Optional[str] = None  # <profile_root>/network/<dir>/all_reduce.csv
    interconnect_gbps: Optional[float] = None  # all-reduce bus bandwidth when there is no network profile

    @classmethod
    def from_dict(cls, d: Any) -> "GpuSpec":
        return _build(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def visible_memory_bytes(self) -> float:
        if self.visible_memory_mib:
            return float(self.visible_memory_mib) * 2**20
        return float(self.memory_gb) * 2**30 * (24258 / 24576)


# The GPU whose profile calibrates the roofline fallback (must agree with conf/gpu/a30.yaml; a test checks it).
A30 = GpuSpec(
    name="A30", memory_gb=24, fp16_tflops=165.0, hbm_gbps=933.0, profile_dir="a30", cuda_context_gb=0.65,
    visible_memory_mib=24258, network_profile_dir="a30_single_gpu", interconnect_gbps=None,
)
