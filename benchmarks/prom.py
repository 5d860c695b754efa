"""block.prom on prometheus_client against the hand-written text format it replaced: parse and render, one run.

    python -m benchmarks.prom [--repeat 200] [--baseline REV]

The baseline is ``block/prom.py`` as of ``REV`` (default: the newest commit whose block/prom.py does not use
prometheus_client), loaded from git into a module of its own; the current one is imported as usual. Both expose the
same API, so each case runs the same code against each:

- parse of the real vLLM /metrics captures in tests/data (V1: 614 lines, V0: 137 lines), all of it;
- the predictor's poll (its hot path in proxy mode, every ``--metrics-interval-s``, 0.5 s by default): the V1 capture
  cut to the lines it needs (``block.predictor.sources.metrics_subset``) and read into a ``VllmLoad``;
- render of the predictor's own /metrics (``block.predictor.metrics.PredictorMetrics`` after 1,000 predictions and
  1,000 proxied requests) and of a vLLM-style engine registry (the emulated engine's families).

Prints the best-of-``--repeat`` time per call of each and the ratio current / baseline.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import subprocess
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import block.predictor.metrics as predictor_metrics  # noqa: E402
from block import prom as current  # noqa: E402
from block.predictor.sources import metrics_subset  # noqa: E402
from vidur.types import EngineConfig, InstanceState, SeqState  # noqa: E402

DATA = ROOT / "tests" / "data"


def baseline_rev() -> str:
    """The newest commit whose block/prom.py is the hand-written one (no prometheus_client)."""
    revs = subprocess.run(["git", "log", "--format=%H", "--", "block/prom.py"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.split()
    for rev in revs:
        src = subprocess.run(["git", "show", f"{rev}:block/prom.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        if "from prometheus_client" not in src and "import prometheus_client" not in src:
            return rev
    raise SystemExit("no hand-written block/prom.py in the history")


def load_baseline(rev: str) -> types.ModuleType:
    src = subprocess.run(["git", "show", f"{rev}:block/prom.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    spec = importlib.util.spec_from_loader("prom_baseline", loader=None)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["prom_baseline"] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev[:10]}:block/prom.py", "exec"), mod.__dict__)
    return mod


def best(fn: Callable[[], object], repeat: int) -> float:
    """Best time per call in seconds (inner loop sized to ~2 ms so the clock's resolution does not matter)."""
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(0.002 / once))
    out = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out = min(out, (time.perf_counter() - t0) / inner)
    return out


def predictor_registry(prom: types.ModuleType):
    """PredictorMetrics built on ``prom``, after 1,000 predictions and proxied requests."""
    saved = predictor_metrics.prom
    predictor_metrics.prom = prom
    try:
        m = predictor_metrics.PredictorMetrics()
    finally:
        predictor_metrics.prom = saved
    for i in range(1000):
        m.predicted(0.0002 * (1 + i % 7))
        m.proxied(predictor_metrics.OUTCOMES[i % 3])
    return m


def engine_registry(prom: types.ModuleType):
    """The emulated engine's families (vLLM names, V1 buckets), after 1,000 finished requests."""
    r = prom.Registry()
    ln = ("model_name", "engine")
    lab = {"model_name": "meta-llama/Llama-2-7b-hf", "engine": "0"}
    gauges = [r.gauge(n, "x", ln) for n in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                            "vllm:kv_cache_usage_perc")]
    counters = [r.counter(n, "x", ln) for n in ("vllm:num_preemptions", "vllm:prompt_tokens",
                                                "vllm:generation_tokens")]
    tok = prom.build_1_2_5_buckets(4096)
    hists = [r.histogram("vllm:request_prompt_tokens", "x", tok, ln),
             r.histogram("vllm:request_generation_tokens", "x", tok, ln),
             r.histogram("vllm:time_to_first_token_seconds", "x", prom.TTFT_BUCKETS, ln),
             r.histogram("vllm:e2e_request_latency_seconds", "x", prom.REQUEST_LATENCY_BUCKETS, ln)]
    for i in range(1000):
        for g in gauges:
            g.set(i % 13, **lab)
        for c in counters:
            c.inc(1 + i % 5, **lab)
        for h, v in zip(hists, (100 + i, 1 + i % 500, 0.01 * (1 + i % 30), 0.5 * (1 + i % 20))):
            h.observe(v, **lab)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--baseline", default=None, help="git revision of the hand-written block/prom.py")
    args = ap.parse_args()
    rev = args.baseline or baseline_rev()
    base = load_baseline(rev)
    v1 = (DATA / "vllm_metrics_v1.txt").read_text()
    v0 = (DATA / "vllm_metrics_v0.txt").read_text()
    for name, text in (("v1", v1), ("v0", v0)):  # same readings from both parsers
        assert current.parse_prometheus(text) == base.parse_prometheus(text), name
        assert asdict(current.VllmLoad.from_metrics(text)) == asdict(base.VllmLoad.from_metrics(text)), name
    pm = {m.__name__: predictor_registry(m) for m in (base, current)}
    em = {m.__name__: engine_registry(m) for m in (base, current)}
    state = InstanceState(running=[SeqState(i, 100, 50, 120, 20, 0.0) for i in range(3)], waiting=[],
                          free_blocks=900, total_blocks=1000, num_preemptions=0, config=EngineConfig())
    got = [current.parse_prometheus(pm[m.__name__].render(state, 0.0, 3, True)) for m in (current, base)]
    for g in got:
        g.pop("process_resident_memory_bytes", None)  # the process's RSS changes between the two
    assert got[0] == got[1], "the two renderers disagree"
    cases: list[tuple[str, Callable]] = [
        ("parse vLLM V1 capture (614 lines)", lambda p: (lambda: p.parse_prometheus(v1))),
        ("parse vLLM V0 capture (137 lines)", lambda p: (lambda: p.parse_prometheus(v0))),
        ("predictor poll: subset + VllmLoad", lambda p: (lambda: p.VllmLoad.from_metrics(metrics_subset(v1)))),
        ("render predictor /metrics", lambda p: (lambda: pm[p.__name__].render(state, 0.0, 3, True))),
        ("render engine /metrics (vLLM families)", lambda p: em[p.__name__].render),
    ]
    print(f"baseline: hand-written block/prom.py at {rev[:10]}; current: prometheus_client "
          f"{importlib.metadata.version('prometheus_client')}; Python {sys.version.split()[0]}; best of {args.repeat}")
    print(f"{'case':42s} {'hand-written':>14s} {'prometheus_client':>18s} {'ratio':>7s}")
    for label, make in cases:
        tb = best(make(base), args.repeat)
        tc = best(make(current), args.repeat)
        print(f"{label:42s} {tb * 1e6:11.1f} us {tc * 1e6:15.1f} us {tc / tb:6.2f}x")


if __name__ == "__main__":
    main()
