"""Benchmark client with ``vllm bench serve`` semantics; writes the project's run records.

``python -m block.benchmark --help`` for the command line; ``await run_benchmark(config)`` (config: a
:class:`BenchmarkConfig` or a mapping of its fields, optional ``requests``) for experiments. docs/services.md
("Benchmark client") describes the measurements.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BenchmarkConfig", "BenchmarkResult", "benchmark", "run_benchmark"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from block.benchmark import client

        return getattr(client, name)
    raise AttributeError(name)
