"""The benchmark client against a real emulated engine on loopback: vLLM's summary keys, run records that the
analysis reads, time scaling, failures recorded, and agreement of the measured latencies with the engine's model."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from block.benchmark.client import (
    BenchmarkConfig,
    benchmark,
    build_requests,
    chat_text,
    parse_goodput,
    request_body,
    run_benchmark,
)
from experiments.local_stack import TOKEN_VARS, LocalStack
from vidur.records import REQUEST_RECORD_COLUMNS
from vidur.types import Request

ROOT = Path(__file__).resolve().parents[1]
SCALE = 5.0  # slow enough that the HTTP path (~1-2 ms real) stays small next to the modelled times
VLLM_KEYS = ["completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
             "request_goodput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
             "max_concurrent_requests"] + [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
                                           for s in ("mean", "median", "std", "p90", "p99")]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with LocalStack(tmp_path_factory.mktemp("engine"), env=dict.fromkeys(TOKEN_VARS), startup_timeout_s=90) as stack:
        yield stack.start("engine", "block.engine", ["--time-scale", str(SCALE), "--tokenizer", "none",
                                                     "--num-blocks", "200", "--max-model-len", "3200"]).wait_healthy()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Long prompts, short answers (light load: the TTFT is the prefill), one request the engine must refuse
    (a 3500-token prompt; the engine's max_model_len is 3200)."""
    rng = np.random.default_rng(3)
    n = 16
    df = pd.DataFrame({"prompt_tokens": rng.integers(1200, 2000, n), "output_tokens": rng.integers(20, 40, n)})
    df.loc[len(df)] = (3500, 100)
    df["predicted_output_tokens"] = df["output_tokens"] + 3
    path = tmp_path_factory.mktemp("data") / "lengths.csv"
    df.to_csv(path, index=False)
    return path


def _cfg(engine, dataset, **kw) -> BenchmarkConfig:
    base = dict(base_url=engine.url, dataset_path=str(dataset), num_requests=16, request_rate=1.0, seed=1,
                time_scale=SCALE, disable_tqdm=True)
    base.update(kw)
    return BenchmarkConfig(**base)


def test_requests_are_shaped_as_vllm_bench_serve_sends_them():
    req = Request(3, 0.0, prompt_tokens=12, output_tokens=9)
    b = request_body(req, BenchmarkConfig(), "m")
    assert b["prompt"] == [(3 * 7 + j) % 30000 + 100 for j in range(12)]
    assert (b["max_tokens"], b["min_tokens"], b["ignore_eos"], b["stream"]) == (9, 9, True, True)
    assert b["stream_options"] == {"include_usage": True} and b["model"] == "m"
    b = request_body(Request(0, 0.0, 5, 2, prompt="hello"), BenchmarkConfig(), None)
    assert b["prompt"] == "hello" and "model" not in b
    b = request_body(req, BenchmarkConfig(endpoint="/v1/chat/completions"), None)
    assert b["messages"][0]["content"] == chat_text(12 - 7)
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:2000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    for bad in (["ttft"], ["foo:1"], ["ttft:-1"], ["tpot:x"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    for bad in (dict(endpoint="/v1/x"), dict(hint="maybe"), dict(request_rate=0), dict(time_scale=0),
                dict(max_concurrency=0), dict(goodput={"ttft": -1})):
        with pytest.raises(ValueError):
            BenchmarkConfig(**bad).validate()


def test_summary_and_records_against_an_engine(engine, dataset, tmp_path):
    from analysis.records import load_run
    from vidur.records import requests_frame

    out = tmp_path / "run"
    cfg = _cfg(engine, dataset, num_requests=17, request_rate=4.0, hint="oracle", output_dir=str(out),
               goodput={"ttft": 5000, "e2el": 60000}, metadata={"policy.name": "direct", "k": 1})
    summary = asyncio.run(run_benchmark(cfg))
    for k in VLLM_KEYS:
        assert k in summary, k
    assert summary["completed"] == 16 and summary["failed"] == 1
    assert summary["errors"] == {"http_400": 1}
    assert summary["request_goodput"] is not None and summary["request_goodput"] > 0
    assert summary["policy.name"] == "direct" and summary["qps"] == 4.0 and summary["time_scale"] == SCALE

    run = load_run(out)
    assert run.get("policy.name") == "direct" and run.get("workload.qps") == 4.0
    assert run.summary["completed"] == 16
    df = run.requests()
    requests_frame(df)  # the DESIGN columns are all there
    assert list(df.columns[:len(REQUEST_RECORD_COLUMNS)]) == REQUEST_RECORD_COLUMNS
    for col in ("itl_s", "decision_ms", "http_status", "error"):
        assert col in df.columns
    assert run.instances().empty
    ok = df[df["status"] == "ok"]
    bad = df[df["status"] != "ok"].iloc[0]
    assert bad["status"] == "http_400" and "maximum context length" in bad["error"] and bad["prompt_tokens"] == 3500
    assert (ok["instance"] == -1).all() and (ok["num_preemptions"] == -1).all()
    assert (ok["output_tokens"] == ok["expected_output_tokens"]).all()  # ignore_eos + max_tokens: exact lengths
    assert (ok["predicted_tokens"] == ok["output_tokens"]).all()  # the oracle hint that was sent
    assert (ok["ttft_s"] > 0).all() and (ok["e2e_s"] > ok["ttft_s"]).all()
    assert np.allclose(ok["tpot_s"], (ok["e2e_s"] - ok["ttft_s"]) / (ok["output_tokens"] - 1))
    assert np.allclose(ok["first_token_s"] - ok["dispatch_s"], ok["ttft_s"])
    assert (ok["dispatch_s"] >= ok["arrival_s"] - 1e-3).all()
    # the engine saw the hint: its /state expected lengths come from x-expected-output-tokens (nothing in flight now)
    assert summary["total_output_tokens"] == int(ok["output_tokens"].sum())
    assert summary["max_concurrent_requests"] >= 1


def _model_times(engine, reqs, alone: bool) -> pd.DataFrame:
    """The engine's model (the simulator on the engine's own config) for ``reqs``: run together at their arrival
    times, or (``alone``) each on an idle engine -- the least model time a request can take, since sharing steps
    only adds work to them."""
    from block.engine.config import build_setup
    from vidur.cluster import Cluster
    from vidur.policy_contract import RoutingPolicy
    from vidur.engine import Engine as SimEngine
    from vidur.types import EngineConfig

    ecfg = EngineConfig.from_dict(httpx.get(engine.url + "/state").json()["config"])
    em = build_setup().execution_model()

    def sim(batch):
        return Cluster([SimEngine(ecfg, em, instance_id=0)], RoutingPolicy("one", lambda r, c, ctx: 0),
                       sample_interval_s=0).run(batch).requests

    if not alone:
        return sim(reqs).set_index("id")
    return pd.concat([sim([Request(r.id, 0.0, r.prompt_tokens, r.output_tokens)]) for r in reqs]).set_index("id")


def test_time_scale_rescales_every_time(engine, dataset):
    """The same real schedule run as (rate r, scale S) and (rate r*S, scale 1): arrivals differ by exactly S, and
    each run's latencies are at least the model's in its own unit -- model time for (r, S), real time (model / S)
    for (r*S, 1). The lower bounds are deterministic: the engine paces in model time and emits a step's tokens only
    once real time reached its end, so it never beats the model; a client that forgot to multiply by S would report
    (r, S) latencies S times below it. How close the two runs come (a wall-clock ratio) is for benchmarks/."""
    base = dict(num_requests=8, seed=4)
    ca, cb = (_cfg(engine, dataset, request_rate=2.0, time_scale=SCALE, **base),
              _cfg(engine, dataset, request_rate=2.0 * SCALE, time_scale=1.0, **base))
    a, b = asyncio.run(benchmark(ca)), asyncio.run(benchmark(cb))
    ra, rb = a.requests.set_index("id"), b.requests.set_index("id")
    assert np.allclose(ra["arrival_s"], SCALE * rb["arrival_s"])
    ok = (ra["status"] == "ok") & (rb["status"] == "ok")
    assert ok.sum() >= 7
    lo = _model_times(engine, [r for r in build_requests(ca) if ok.get(r.id, False)], alone=True)
    for col in ("ttft_s", "e2e_s"):
        assert (ra.loc[ok, col] >= lo[col] - 1e-6).all(), (col, ra.loc[ok, col], lo[col])
        assert (rb.loc[ok, col] * SCALE >= lo[col] - 1e-6).all(), (col, rb.loc[ok, col], lo[col])
    last = (ra.loc[ok, "arrival_s"] + lo["e2e_s"]).max() - 0.01  # asyncio.sleep may wake a timer tick early
    assert a.summary["duration"] >= last and b.summary["duration"] * SCALE >= last
    print(f"median e2e ratio {(ra.loc[ok, 'e2e_s'] / rb.loc[ok, 'e2e_s']).median():.2f} (S = {SCALE})")


def test_light_load_latencies_agree_with_the_engine_model(engine, dataset):
    """Every request's measured TTFT and E2E (model time) is at least its model time on an idle engine: the
    emulated engine can never be faster than its model. The p50s next to the light-load model are printed; the
    agreement within a tolerance is a wall-clock comparison, measured by benchmarks/emulate_vs_sim.py."""
    cfg = _cfg(engine, dataset, request_rate=1.0, seed=2)
    reqs = [r for r in build_requests(cfg) if r.prompt_tokens < 3500]
    res = asyncio.run(benchmark(cfg, requests=reqs))
    got = res.requests[res.requests["status"] == "ok"].set_index("id")
    assert len(got) == len(reqs)

    sim = _model_times(engine, reqs, alone=False)
    lo = _model_times(engine, reqs, alone=True)
    assert (sim[["ttft_s", "e2e_s"]] >= lo.loc[sim.index, ["ttft_s", "e2e_s"]] - 1e-9).all().all()  # the bound's premise
    for col in ("ttft_s", "e2e_s"):
        assert (got[col] >= lo.loc[got.index, col] - 1e-6).all(), (col, got[col], lo[col])
        print(f"p50 {col}: measured {got[col].median() * 1e3:.1f} ms, model {sim[col].median() * 1e3:.1f} ms, "
              f"idle-engine floor {lo[col].median() * 1e3:.1f} ms (model time, scale {SCALE})")


def test_cli_writes_the_run_and_prints_the_vllm_summary(engine, dataset, tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "block.benchmark", "--base-url", engine.url, "--dataset-path",
                        str(dataset), "--num-requests", "4", "--request-rate", "inf", "--max-concurrency", "2",
                        "--time-scale", str(SCALE), "--hint", "predicted", "--endpoint", "/v1/chat/completions",
                        "--output-dir", str(out), "--disable-tqdm", "--goodput", "ttft:10000", "--seed", "5",
                        "--token", "secret-xyz", "--result-json", str(tmp_path / "result.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Serving Benchmark Result" in r.stdout and "Median TTFT (ms):" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["completed"] + s["failed"] == 4 and s["max_concurrent_requests"] <= 2
    assert s["request_rate"] == "inf" and s["endpoint"] == "/v1/chat/completions"
    assert json.loads((tmp_path / "result.json").read_text()) == s  # --result-json: the same summary
    df = pd.read_parquet(out / "requests.parquet")
    ok = df[df["status"] == "ok"]
    assert (ok["predicted_tokens"] == ok["expected_output_tokens"] + 3).all()  # the dataset's prediction column
    assert (df["arrival_s"] == 0).all()  # inf: everything at once
    assert "secret-xyz" not in (out / "config.yaml").read_text()  # the engine ignores it; the records never keep it
    r = subprocess.run([sys.executable, "-m", "block.benchmark", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0 and "--time-scale" in r.stdout and "--goodput" in r.stdout


def test_unreachable_server_requests_fail_clearly(dataset):
    cfg = BenchmarkConfig(base_url="http://127.0.0.1:1", dataset_path=str(dataset), num_requests=3, model="m",
                          request_rate=math.inf, disable_tqdm=True)
    res = asyncio.run(benchmark(cfg))
    assert res.summary["completed"] == 0 and res.summary["failed"] == 3
    assert (res.requests["status"] == "transport_error").all()
    assert res.requests["error"].str.contains("connect").all()
