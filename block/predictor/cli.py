"""Command line of the predictor side-car: ``python -m block.predictor``."""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from block.engine.config import add_engine_args
from block.service import add_common_args

DEFAULT_PORT = 8100  # Block's predictor port


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m block.predictor",
        description="Predictor side-car, one per engine on the same host: a pass-through proxy for the engine's "
                    "OpenAI API that tracks every request it forwards, POST /predict (what-if: predicted e2e, TTFT "
                    "and queueing of one more request, vidur.whatif.predict on the current instance state), "
                    "GET /stats, /state, /metrics, /health.",
    )
    add_common_args(ap, DEFAULT_PORT)
    ap.add_argument("--engine-url", default="http://127.0.0.1:8000",
                    help="base URL of the engine (vLLM or python -m block.engine; default http://127.0.0.1:8000)")
    ap.add_argument("--engine-token", default=os.environ.get("BLOCK_ENGINE_TOKEN"),
                    help="bearer token the engine requires (default: $BLOCK_ENGINE_TOKEN; unset = none)")
    ap.add_argument("--forward-client-auth", action="store_true",
                    help="without --engine-token, forward the client's Authorization header to the engine")
    ap.add_argument("--state-source", choices=("proxy", "engine"), default="proxy",
                    help="proxy: build the state from the proxied requests (any OpenAI server, stock vLLM too); "
                         "engine: read GET {engine}/state (the emulated engine exports it). Default proxy")
    ap.add_argument("--metrics-interval-s", type=float, default=0.5,
                    help="proxy mode: poll the engine's /metrics this often for running/waiting/KV usage "
                         "(0 = never; default 0.5)")
    ap.add_argument("--state-interval-s", type=float, default=0.05,
                    help="engine mode: poll GET {engine}/state this often (0 = fetch on every /predict, as Block "
                         "does; default 0.05)")
    ap.add_argument("--connect-timeout-s", type=float, default=2.0, help="engine connect timeout (default 2)")
    ap.add_argument("--read-timeout-s", type=float, default=300.0,
                    help="engine read timeout: longest silence between two chunks, including the wait for the "
                         "first token (default 300)")
    ap.add_argument("--engine-down-after-s", type=float, default=0.0,
                    help="report the engine down after this long without an answer (default max(3, 5 polls))")
    ap.add_argument("--force-stream", action=argparse.BooleanOptionalAction, default=True,
                    help="send non-streaming requests upstream as streams (include_usage, continuous_usage_stats) "
                         "and reassemble the answer, so their progress is tracked (default on)")
    ap.add_argument("--instance-id", type=int, default=0, help="instance id reported in predictions and stats")
    ap.add_argument("--overrun-tokens", type=int, default=10,
                    help="a request past its expected length is assumed to end this many tokens later (Block: 10)")
    ap.add_argument("--residual-correction", action="store_true",
                    help="scale /predict's answers by the residual learned from the requests this predictor served "
                         "(predicted vs actual; block/predictor/feedback.py). Off: the error is still recorded")
    ap.add_argument("--feedback-time-scale", type=float, default=1.0,
                    help="measured latencies x this = model time (an emulated engine's --time-scale; default 1)")
    ap.add_argument("--debug-allow-state-injection", action="store_true",
                    help="enable POST/DELETE /debug/state to replace the state with a given InstanceState "
                         "(benchmarks and debugging only; off by default)")
    g = ap.add_argument_group("execution model and engine config (as python -m block.engine)")
    add_engine_args(g, num_blocks_help="total KV blocks (default: the engine's vllm:cache_config_info when it "
                                       "reports it, else from GPU memory as vLLM)",
                    tokenizer_help="how text prompts are counted until the engine reports usage (auto: the model's)")
    return ap


def make_service(args: argparse.Namespace):
    """The PredictorService for parsed arguments (raises ValueError on a bad configuration)."""
    from block.engine.config import setup_from_args
    from block.predictor.app import PredictorService

    for name in ("metrics_interval_s", "state_interval_s", "engine_down_after_s"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("connect_timeout_s", "read_timeout_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    if args.overrun_tokens < 0:
        raise ValueError("--overrun-tokens must be >= 0")
    if not args.engine_url.startswith(("http://", "https://")):
        raise ValueError(f"--engine-url {args.engine_url!r} must start with http:// or https://")
    setup = setup_from_args(args)
    em = setup.execution_model(args.cache_dir)
    tok = setup.model.tokenizer if args.tokenizer == "auto" else args.tokenizer
    return PredictorService(
        setup.engine, em, engine_url=args.engine_url, engine_token=args.engine_token,
        state_source=args.state_source, metrics_interval_s=args.metrics_interval_s,
        state_interval_s=args.state_interval_s, connect_timeout_s=args.connect_timeout_s,
        read_timeout_s=args.read_timeout_s, instance_id=args.instance_id, overrun_tokens=args.overrun_tokens,
        tokenizer=tok, force_stream=args.force_stream, num_blocks_fixed=args.num_blocks is not None,
        engine_down_after_s=args.engine_down_after_s, allow_state_injection=args.debug_allow_state_injection,
        forward_client_auth=args.forward_client_auth, residual_correction=args.residual_correction,
        feedback_time_scale=args.feedback_time_scale,
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    from block.predictor.app import build_app
    from block.service import run_cli

    run_cli(build_parser(), make_service, build_app, None if argv is None else list(argv))


if __name__ == "__main__":
    main()
