"""Command line of the benchmark client: ``python -m block.benchmark``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
from typing import Any, Optional, Sequence

TOKEN_ENV = "BLOCK_API_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m block.benchmark",
        description="Load generator with `vllm bench serve` semantics against any OpenAI-compatible endpoint (the "
                    "Block scheduler, a predictor, an emulated engine, plain vLLM). Streams every request, measures "
                    "TTFT / TPOT / ITL / E2E on the client, prints vLLM's summary and writes the run records "
                    "(requests.parquet, instances.parquet, config.yaml, summary.json) with --output-dir.",
    )
    ap.add_argument("--base-url", default="http://127.0.0.1:8200",
                    help="server base URL (default http://127.0.0.1:8200, Block's scheduler)")
    ap.add_argument("--endpoint", default="/v1/completions", choices=("/v1/completions", "/v1/chat/completions"))
    ap.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    ap.add_argument("--dataset", "--dataset-name", dest="dataset", default="sharegpt",
                    help="a bundled dataset name (data/: sharegpt, sharegpt_predicted, sharegpt_text, arxiv, "
                         "azure_conv, azure_code, ...); default sharegpt")
    ap.add_argument("--dataset-path", default=None,
                    help="a file instead (vidur CSV, lengths CSV/parquet/JSONL, or text JSONL: see data/README.md)")
    ap.add_argument("--num-requests", "--num-prompts", dest="num_requests", type=int, default=1000)
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="requests/s (model time); inf (default) sends all at once")
    ap.add_argument("--burstiness", type=float, default=1.0,
                    help="Gamma shape of the gaps: 1 = Poisson, < 1 burstier, > 1 smoother (vLLM's --burstiness)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling and the arrivals")
    ap.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    ap.add_argument("--hint", choices=("none", "oracle", "predicted"), default="none",
                    help="send header x-expected-output-tokens with the true (oracle) or the dataset's predicted "
                         "output length (default none)")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="S: send at request_rate*S and multiply every measured time by S, so a stack running S "
                         "times faster than real time (engines with --time-scale S) gives model-time records")
    ap.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS",
                    help="SLOs for request_goodput, e.g. --goodput ttft:500 tpot:50 e2el:10000 (ms, model time)")
    ap.add_argument("--output-dir", default=None, help="write the run records into this directory")
    ap.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                    help=f"bearer token for the server (default: ${TOKEN_ENV}; unset = none)")
    ap.add_argument("--tokenizer", choices=("llama2", "qwen2"), default="llama2",
                    help="tokenizer that counts a text dataset's prompts (default llama2)")
    ap.add_argument("--max-model-len", type=int, default=4096,
                    help="drop dataset rows with prompt + output >= this (default 4096)")
    ap.add_argument("--start-index", type=int, default=0, help="skip the dataset's first rows")
    ap.add_argument("--timeout-s", type=float, default=1800.0,
                    help="longest wait (real seconds) for the next piece of an answer (default 1800)")
    ap.add_argument("--metadata", nargs="+", default=[], metavar="KEY=VALUE",
                    help="extra KEY=VALUE pairs for summary.json and config.yaml (e.g. policy.name=block k=2)")
    ap.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    ap.add_argument("--result-json", default=None, help="also write the summary to this file")
    ap.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return ap


def _value(v: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def config_from_args(args: argparse.Namespace):
    from block.benchmark.client import BenchmarkConfig, parse_goodput

    meta = {}
    for kv in args.metadata:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"--metadata expects KEY=VALUE, got {kv!r}")
        meta[k.strip()] = _value(v)
    cfg = BenchmarkConfig(
        base_url=args.base_url.rstrip("/"), endpoint=args.endpoint, model=args.model, dataset=args.dataset,
        dataset_path=args.dataset_path, num_requests=args.num_requests, request_rate=args.request_rate,
        burstiness=args.burstiness, seed=args.seed, max_concurrency=args.max_concurrency, hint=args.hint,
        time_scale=args.time_scale, goodput=parse_goodput(args.goodput), output_dir=args.output_dir,
        token=args.token or None, tokenizer=args.tokenizer, max_model_len=args.max_model_len,
        start_index=args.start_index, timeout_s=args.timeout_s, disable_tqdm=args.disable_tqdm, metadata=meta,
    )
    cfg.validate()
    return cfg


def format_summary(s: dict[str, Any]) -> str:
    """The summary as ``vllm bench serve`` prints it."""
    def num(v: Any, fmt: str = ".2f") -> str:
        return "n/a" if v is None else format(v, fmt) if isinstance(v, (int, float)) else str(v)

    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, v: Any, fmt: str = ".2f") -> None:
        lines.append("{:<40} {:<10}".format(label, num(v, fmt)))

    row("Successful requests:", s.get("completed"), "d")
    row("Failed requests:", s.get("failed"), "d")
    if s.get("max_concurrency") is not None:
        row("Maximum request concurrency:", s.get("max_concurrency"), "d")
    row("Benchmark duration (s):", s.get("duration"))
    row("Total input tokens:", s.get("total_input_tokens"), "d")
    row("Total generated tokens:", s.get("total_output_tokens"), "d")
    row("Request throughput (req/s):", s.get("request_throughput"))
    if s.get("request_goodput") is not None:
        row("Request goodput (req/s):", s.get("request_goodput"))
    row("Output token throughput (tok/s):", s.get("output_throughput"))
    row("Peak output token throughput (tok/s):", s.get("max_output_tokens_per_s"))
    row("Peak concurrent requests:", s.get("max_concurrent_requests"), "d")
    row("Total Token throughput (tok/s):", s.get("total_token_throughput"))
    for key, title, long in (("ttft", "Time to First Token", "TTFT"),
                             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                             ("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL")):
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        row(f"Mean {long} (ms):", s.get(f"mean_{key}_ms"))
        row(f"Median {long} (ms):", s.get(f"median_{key}_ms"))
        row(f"P90 {long} (ms):", s.get(f"p90_{key}_ms"))
        row(f"P99 {long} (ms):", s.get(f"p99_{key}_ms"))
    if s.get("mean_scheduler_overhead_ms") is not None:
        lines.append("{s:{c}^50}".format(s="Scheduler (x-block-* headers)", c="-"))
        row("Mean decision time (ms):", s.get("mean_scheduler_overhead_ms"), ".3f")
        row("P99 decision time (ms):", s.get("p99_scheduler_overhead_ms"), ".3f")
    if s.get("errors"):
        lines.append("Errors: " + ", ".join(f"{k}: {v}" for k, v in s["errors"].items()))
    lines.append("=" * 50)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        ap.error(str(err))
    from block.benchmark.client import benchmark

    try:
        result = asyncio.run(benchmark(cfg))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    print(format_summary(result.summary))
    if result.run_dir is not None:
        print(f"run records: {result.run_dir}")
    if args.result_json:
        from vidur.records import write_text

        write_text(args.result_json, json.dumps(result.summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
