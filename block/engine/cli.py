"""Command line of the emulated engine: ``python -m block.engine``."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from block.engine.config import add_engine_args
from block.service import add_common_args

DEFAULT_PORT = 8000


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m block.engine",
        description="Emulated vLLM engine: vLLM's OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), "
                    "/metrics with vLLM's names, /state with the exact engine state; the simulator's engine "
                    "scheduler runs in real time, each step taking step_time / time_scale seconds.",
    )
    add_common_args(ap, DEFAULT_PORT)
    add_engine_args(ap)
    ap.add_argument("--served-model-name", default=None, help="model name of the API (default: the model's HF name)")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="run S times faster than the modelled GPU: each step takes step_time / S real seconds")
    ap.add_argument("--seed", type=int, default=0, help="seed of the filler output text")
    ap.add_argument("--abort-on-disconnect", action=argparse.BooleanOptionalAction, default=True,
                    help="remove a request from the engine when its client disconnects (vLLM does; default on)")
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
