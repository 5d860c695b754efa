"""Command line of the emulated engine: ``python -m block.engine``."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from block.service import add_common_args

DEFAULT_PORT = 8000
TOKENIZERS = ("auto", "none", "llama2", "qwen2")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m block.engine",
        description="Emulated vLLM engine: vLLM's OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), "
                    "/metrics with vLLM's names, /state with the exact engine state; the simulator's engine "
                    "scheduler runs in real time, each step taking step_time / time_scale seconds.",
    )
    add_common_args(ap, DEFAULT_PORT)
    m = ap.add_mutually_exclusive_group()
    m.add_argument("--model", default=None, help="model config name under conf/model (default llama2_7b)")
    m.add_argument("--model-config", default=None, help="path to a model YAML (conf/model format)")
    ap.add_argument("--gpu", default="a30", help="GPU config name under conf/gpu, or a YAML path (default a30)")
    ap.add_argument("--engine", default="vllm_chunked",
                    help="engine config name under conf/engine, or a YAML path (default vllm_chunked)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="override engine.max_num_seqs")
    ap.add_argument("--chunk-size", type=int, default=None, help="override engine.chunk_size (chunked prefill)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="override engine.max_num_batched_tokens (prefill-first engines)")
    ap.add_argument("--num-blocks", type=int, default=None,
                    help="override the KV block count (default: from GPU memory, as vLLM)")
    ap.add_argument("--max-model-len", type=int, default=None, help="override engine.max_model_len")
    ap.add_argument("--chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                    help="override engine.chunked_prefill")
    ap.add_argument("--tensor-parallel", type=int, default=None, help="override engine.tensor_parallel")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="override engine.gpu_memory_utilization (when --num-blocks is not given)")
    ap.add_argument("--served-model-name", default=None, help="model name of the API (default: the model's HF name)")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="run S times faster than the modelled GPU: each step takes step_time / S real seconds")
    ap.add_argument("--seed", type=int, default=0, help="seed of the filler output text")
    ap.add_argument("--tokenizer", choices=TOKENIZERS, default="auto",
                    help="tokenizer for text prompts (auto: the model's; none: ceil(utf8 bytes / 4))")
    ap.add_argument("--abort-on-disconnect", action=argparse.BooleanOptionalAction, default=True,
                    help="remove a request from the engine when its client disconnects (vLLM does; default on)")
    ap.add_argument("--cache-dir", default=None, help="execution-model cache directory")
    return ap


def make_service(args: argparse.Namespace):
    """The EngineService for parsed arguments (raises ValueError on a bad configuration)."""
    from block.engine.app import EngineService
    from block.engine.config import setup_from_args

    if not args.time_scale > 0:
        raise ValueError(f"--time-scale={args.time_scale} must be > 0")
    setup = setup_from_args(args)
    em = setup.execution_model(args.cache_dir)
    tok = setup.model.tokenizer if args.tokenizer == "auto" else args.tokenizer
    return EngineService(setup.engine, em, served_model_name=args.served_model_name or setup.model.name,
                         time_scale=args.time_scale, tokenizer=tok, seed=args.seed,
                         vocab_size=setup.model.vocab_size, abort_on_disconnect=args.abort_on_disconnect)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from block.engine.app import build_app
    from block.service import run_cli

    run_cli(build_parser(), make_service, build_app, None if argv is None else list(argv))


if __name__ == "__main__":
    main()
