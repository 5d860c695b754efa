"""Mixed pools: one cluster of several instance kinds (``cluster.pools``), each with its own GPU, engine config and
execution model.

```yaml
cluster:
  num_instances: 8            # must equal the pools' counts summed
  pools:
    - {count: 6, gpu: a30}
    - {count: 2, gpu: a100_80gb, engine: {max_num_seqs: 128}, name: a100}
```

A pool's ``gpu`` names a ``conf/gpu/<name>.yaml`` (absent: the run's ``gpu``); its ``engine`` overrides keys of the
run's ``engine`` (only keys the engine config has). A pool on another GPU gets its KV blocks from that GPU's memory
(``num_blocks`` is recomputed unless the pool sets it). The model is the run's. Instances are numbered pool by pool,
in the order given (instance 0..5 the A30s above, 6..7 the A100s): ``instance_kinds`` maps them back for analysis.

In ``mode=sim`` every engine is built with its pool's config and fitted step-time model, and the simulated what-if of
an instance (``vidur.whatif.predict_engine``) runs on that engine, so a prediction uses the instance's own
execution model and engine config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vidur.config import REPO_ROOT, EngineSetup, engine_setup

GPU_DIR = REPO_ROOT / "conf" / "gpu"
POOL_KEYS = {"count", "gpu", "engine", "name"}


@dataclass(frozen=True)
class Pool:
    """``count`` instances of one kind: its label (figures, records) and everything an engine of it needs."""

    name: str
    count: int
    gpu: str
    setup: EngineSetup
    gpu_config: dict  # the GPU mapping and the (merged) engine mapping: what mode=emulate writes for its services
    engine_config: dict


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def gpu_names() -> list[str]:
    return sorted(p.stem for p in GPU_DIR.glob("*.yaml"))


def gpu_config(name: str) -> dict[str, Any]:
    """``conf/gpu/<name>.yaml`` as a dict; ValueError naming the choices when there is none."""
    path = GPU_DIR / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        raise ValueError(f"gpu {name!r} is not one of {gpu_names()} (conf/gpu/<name>.yaml)")
    return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def build_pools(model: Mapping[str, Any], gpu: Mapping[str, Any], engine: Mapping[str, Any],
                pools: Sequence[Mapping[str, Any]], num_instances: int | None = None) -> list[Pool]:
    """The pools of a run from its model, GPU and engine mappings; ValueError naming ``cluster.pools[i]`` keys."""
    model, gpu, engine = _plain(model), _plain(gpu), _plain(engine)
    if not pools:
        raise ValueError("cluster.pools: give at least one pool {count, gpu, engine} or leave it null")
    out: list[Pool] = []
    for i, raw in enumerate(_plain(pools)):
        key = f"cluster.pools[{i}]"
        if not isinstance(raw, Mapping):
            raise ValueError(f"{key}: a mapping {{count, gpu, engine, name}}, got {raw!r}")  # noqa: TRY004 (a config error)
        extra = sorted(set(raw) - POOL_KEYS)
        if extra:
            raise ValueError(f"{key}: unknown key(s) {extra}; a pool has {sorted(POOL_KEYS)}")
        count = raw.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{key}.count={count!r}: an integer >= 1")
        gname = raw.get("gpu")
        gd = dict(gpu)
        if gname is not None:
            try:
                gd = gpu_config(str(gname))
            except ValueError as err:
                raise ValueError(f"{key}.gpu: {err}") from None
        over = dict(raw.get("engine") or {})
        unknown = sorted(set(over) - set(engine))
        if unknown:
            raise ValueError(f"{key}.engine: unknown key(s) {unknown}; the engine has {sorted(engine)}")
        ed = {**engine, **over}
        if gname is not None and "num_blocks" not in over:
            ed["num_blocks"] = None  # another GPU: its own memory decides
        try:
            setup = engine_setup(model, gd, ed)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
        label = str(gname) if gname is not None else str(gpu.get("name", "gpu"))
        out.append(Pool(str(raw.get("name") or label), count, label, setup, gd, ed))
    names = [p.name for p in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"cluster.pools: pools {dup} share a name: give each a name (cluster.pools[i].name)")
    total = sum(p.count for p in out)
    if num_instances is not None and total != num_instances:
        raise ValueError(f"cluster.num_instances={num_instances} but cluster.pools count {total} instances")
    return out


def run_pools(cfg: DictConfig) -> list[Pool] | None:
    """The run's pools, or None for a uniform cluster (``cluster.pools`` unset or null)."""
    pools = OmegaConf.select(cfg, "cluster.pools", default=None)
    if pools is None:
        return None
    return build_pools(cfg.model, cfg.gpu, cfg.engine, pools, int(cfg.cluster.num_instances))


def instance_kinds(cfg: DictConfig) -> list[str]:
    """Each instance's pool name, by instance id (a uniform cluster: the GPU's name for every instance)."""
    pools = run_pools(cfg)
    if pools is None:
        return [str(cfg.gpu.name)] * int(cfg.cluster.num_instances)
    return kinds(pools)


def kinds(pools: Sequence[Pool]) -> list[str]:
    """Each instance's pool name, by instance id (what a run's summary records as ``instance_kinds``)."""
    return [p.name for p in pools for _ in range(p.count)]


def engines(pools: Sequence[Pool], cache_dir: str | None = None) -> list:
    """One simulated engine per instance, pool by pool, each with its pool's config and execution model (fitted
    once per pool)."""
    from vidur.engine import Engine

    out = []
    for p in pools:
        model = p.setup.execution_model(cache_dir)
        for _ in range(p.count):
            out.append(Engine(p.setup.engine, model, len(out)))
    return out


def describe(pools: Sequence[Pool]) -> str:
    """``6xa30+2xa100`` (summaries, figure stamps)."""
    return "+".join(f"{p.count}x{p.name}" for p in pools)
