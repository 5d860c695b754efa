"""The proxy-mode predictor's state against vLLM's own counts under a Poisson load (docs/vllm.md, "The proxy-mode
state against vLLM's own counts"). A benchmark, not a test: it runs a real vLLM (CPU) for minutes and prints numbers.

    python benchmarks/vllm_proxy_state.py [--seats 48] [--requests 100] [--qps 4] [--seed 0]

One ``python -m block.engine.vllm --model llama_tiny --engine vllm_cpu`` and one predictor in proxy mode in front of
it; streaming requests (random token-id prompts of 20-600 tokens, 10-150 output tokens, ``ignore_eos``) arrive as a
Poisson process. A sampler reads vLLM's /metrics, the predictor's /metrics and /state, then vLLM's /metrics again,
and keeps the samples whose two vLLM readings agree (no transition inside the sample). It prints the error
``|running_proxy - running_vllm| + |waiting_proxy - waiting_vllm|``, then the same with the requests that were
forwarded to vLLM but are not in its scheduler yet counted as vLLM's waiting: forwarded = the predictor's proxied +
tracked requests, in vLLM's scheduler = its ``request_success_total`` + running + waiting.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from block.prom import VllmLoad, get_value, parse_prometheus  # noqa: E402
from experiments.local_stack import TOKEN_VARS, LocalStack  # noqa: E402

MODEL = "block-repro/llama-tiny"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seats", type=int, default=48, help="--max-num-seqs of the engine and the predictor")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--qps", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    common = ["--model", "llama_tiny", "--engine", "vllm_cpu", "--max-num-seqs", str(a.seats)]
    with LocalStack(startup_timeout_s=600, env=dict.fromkeys((*TOKEN_VARS, "VLLM_API_KEY"))) as st:
        eng = st.start("vllm", "block.engine.vllm", common)
        eng.wait_healthy()
        pred = st.start("predictor", "block.predictor", [*common, "--tokenizer", "llama2", "--metrics-interval-s",
                                                         "0.1", "--engine-url", eng.url])
        pred.wait_healthy()
        ce, cp = eng.client(), pred.client()
        statuses: list[int] = []
        samples: list[tuple] = []
        stop = threading.Event()

        def one(plen: int, olen: int, prompt: list[int]) -> None:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": olen, "ignore_eos": True, "stream": True}
            with httpx.Client(base_url=pred.url, timeout=600) as c, c.stream("POST", "/v1/completions", json=body) as r:
                for _ in r.iter_lines():
                    pass
                statuses.append(r.status_code)

        def in_scheduler(text: str) -> tuple[VllmLoad, float]:
            m = VllmLoad.from_metrics(text)
            done = get_value(parse_prometheus(text), "vllm:request_success_total") or 0.0
            return m, done + (m.num_running or 0) + (m.num_waiting or 0)

        def sampler() -> None:
            while not stop.is_set():
                m1, a1 = in_scheduler(ce.get("/metrics").text)
                pm = parse_prometheus(cp.get("/metrics").text)
                s = cp.get("/state").json()
                m2, a2 = in_scheduler(ce.get("/metrics").text)
                fwd = (get_value(pm, "block_predictor_proxied_requests_total") or 0.0) + \
                    (get_value(pm, "block_predictor_tracked_requests") or 0.0)
                if (m1.num_running, m1.num_waiting, a1) == (m2.num_running, m2.num_waiting, a2):
                    samples.append((m1.num_running, m1.num_waiting, len(s["running"]), len(s["waiting"]), fwd - a1))
                time.sleep(0.1)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        t0 = time.monotonic()
        clients = []
        for _ in range(a.requests):
            plen, olen = rng.randint(20, 600), rng.randint(10, 150)
            t = threading.Thread(target=one, args=(plen, olen, [rng.randrange(3, 32000) for _ in range(plen)]))
            t.start()
            clients.append(t)
            time.sleep(rng.expovariate(a.qps))
        for t in clients:
            t.join()
        stop.set()
        th.join()
        duration = time.monotonic() - t0
    busy = [s for s in samples if s[0] + s[1] + s[2] + s[3] > 0]
    if not busy:
        print("no busy samples")
        return
    raw = [abs(s[2] - s[0]) + abs(s[3] - s[1]) for s in busy]
    adj = [abs(s[2] - s[0]) + abs(s[3] - s[4] - s[1]) for s in busy]
    print(f"{statuses.count(200)}/{a.requests} ok in {duration:.0f} s; vLLM mean running "
          f"{statistics.mean(s[0] for s in busy):.1f}, waiting {statistics.mean(s[1] for s in busy):.1f}; "
          f"{len(busy)} steady samples")
    for name, errs in (("proxy vs vLLM's gauges", raw), ("counting forwarded-not-yet-scheduled as waiting", adj)):
        print(f"{name}: mean {statistics.mean(errs):.3f}, exact {sum(e == 0 for e in errs) / len(errs):.1%}, "
              f"max {max(errs):.0f}")
    print(f"running: mean proxy - vLLM {statistics.mean(s[2] - s[0] for s in busy):+.3f}; forwarded but not in "
          f"vLLM's scheduler: mean {statistics.mean(s[4] for s in busy):.2f}, max {max(s[4] for s in busy):.0f}")


if __name__ == "__main__":
    main()
