"""The engine and predictor command lines' model/GPU/engine options: one flag set, turned into an ``EngineSetup``.

The options are declared once (``ENGINE_OVERRIDES``, ``add_engine_args``) for ``python -m block.engine`` and
``python -m block.predictor``; ``engine_flags`` writes the same options back from an ``EngineConfig`` for the
launchers that start those services (``experiments.emulate``, ``experiments.deploy``). The setup itself is built by
``vidur.config.engine_setup``, the builder every launcher shares.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from vidur.config import CONF_DIR, REPO_ROOT, EngineSetup, conf_names, engine_setup, load_conf
from vidur.types import EngineConfig

__all__ = ["CONF_DIR", "ENGINE_OVERRIDES", "REPO_ROOT", "EngineSetup", "add_engine_args", "build_setup",
           "conf_names", "engine_flags", "load_conf", "setup_from_args"]

# engine.<key> a command-line option overrides: (key, type, help); the option is --<key with dashes>
ENGINE_OVERRIDES: tuple[tuple[str, type, str], ...] = (
    ("max_num_seqs", int, "override engine.max_num_seqs"),
    ("chunk_size", int, "override engine.chunk_size (chunked prefill)"),
    ("max_num_batched_tokens", int, "override engine.max_num_batched_tokens (prefill-first engines)"),
    ("num_blocks", int, "override the KV block count (default: from GPU memory, as vLLM)"),
    ("max_model_len", int, "override engine.max_model_len"),
    ("chunked_prefill", bool, "override engine.chunked_prefill"),
    ("tensor_parallel", int, "override engine.tensor_parallel"),
    ("gpu_memory_utilization", float, "override engine.gpu_memory_utilization (when --num-blocks is not given)"),
)
TOKENIZERS = ("auto", "none", "llama2", "qwen2")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_engine_args(ap: argparse.ArgumentParser | Any, *, num_blocks_help: Optional[str] = None,
                    tokenizer_help: str = "tokenizer for text prompts (auto: the model's; none: ceil(utf8 bytes / 4))"
                    ) -> None:
    """Add the model/GPU/engine options (config names or YAML paths, then the overrides), ``--tokenizer`` and
    ``--cache-dir`` to a parser or an argument group."""
    m = ap.add_mutually_exclusive_group()
    m.add_argument("--model", default=None, help="model config name under conf/model (default llama2_7b)")
    m.add_argument("--model-config", default=None, help="path to a model YAML (conf/model format)")
    ap.add_argument("--gpu", default="a30", help="GPU config name under conf/gpu, or a YAML path (default a30)")
    ap.add_argument("--engine", default="vllm_chunked",
                    help="engine config name under conf/engine, or a YAML path (default vllm_chunked)")
    for key, typ, text in ENGINE_OVERRIDES:
        text = num_blocks_help if key == "num_blocks" and num_blocks_help else text
        if typ is bool:
            ap.add_argument(_flag(key), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            ap.add_argument(_flag(key), type=typ, default=None, help=text)
    ap.add_argument("--tokenizer", choices=TOKENIZERS, default="auto", help=tokenizer_help)
    ap.add_argument("--cache-dir", default=None, help="execution-model cache directory")


def engine_flags(ec: EngineConfig) -> list[str]:
    """The override options that pin an engine to ``ec`` (the inverse of ``setup_from_args`` for its keys)."""
    out: list[str] = []
    for key, typ, _ in ENGINE_OVERRIDES:
        if not hasattr(ec, key):
            continue
        val = getattr(ec, key)
        if typ is bool:
            out.append(_flag(key) if val else "--no-" + key.replace("_", "-"))
        else:
            out += [_flag(key), str(val)]
    return out


def build_setup(model: str = "llama2_7b", gpu: str = "a30", engine: str = "vllm_chunked",
                **overrides: Any) -> EngineSetup:
    """Resolve the configs (names or YAML paths) plus overrides (``engine.<key>=value``, None = keep); raise
    ValueError naming the bad key."""
    unknown = set(overrides) - {k for k, _, _ in ENGINE_OVERRIDES} - {"cpu_overhead_s"}
    if unknown:
        raise TypeError(f"build_setup: unknown override(s) {sorted(unknown)}")
    md, gd, ed = load_conf("model", model), load_conf("gpu", gpu), load_conf("engine", engine)
    ed.update({k: v for k, v in overrides.items() if v is not None})
    chunk_size = overrides.get("chunk_size")
    if ed.get("chunked_prefill") and chunk_size is not None and int(ed.get("max_num_batched_tokens", 0)) < chunk_size:
        ed["max_num_batched_tokens"] = chunk_size  # --chunk-size alone should not trip the chunk <= batched check
    return engine_setup(md, gd, ed, engine_name=str(ed.get("name", engine)))


def setup_from_args(args: argparse.Namespace) -> EngineSetup:
    """``build_setup`` from the options ``add_engine_args`` declared."""
    return build_setup(args.model_config or args.model or "llama2_7b", args.gpu, args.engine,
                       **{key: getattr(args, key) for key, _, _ in ENGINE_OVERRIDES})
