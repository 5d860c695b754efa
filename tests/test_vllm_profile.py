"""The profiler of a real vLLM engine (block.engine.vllm_profile): batch shapes read from vLLM's scheduler, the
device name, the hold-out fit saved where the simulator loads it, and -- where vLLM is installed -- a few real
engine steps on the tiny Llama, measured and fitted end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from block.engine import vllm_profile as vp
from block.engine import vllm_serve_calibration as sc
from vidur.execution_model import ExecutionModel
from vidur.profile_fit import read_steps, synthetic_steps
from vidur.specs import GpuSpec, ModelSpec
from block.engine.config import load_conf

REPO = Path(__file__).resolve().parents[1]


def _req(prompt: int, computed_after: int) -> SimpleNamespace:
    return SimpleNamespace(num_prompt_tokens=prompt, num_computed_tokens=computed_after)


def test_step_shape_reads_chunks_context_and_decodes_after_schedule():
    # schedule() has already advanced num_computed_tokens by what it scheduled
    reqs = {"first": _req(300, 256),          # first chunk of 256: no context
            "cont": _req(1200, 1024 + 100),   # a 100-token chunk after 1024 cached tokens
            "last": _req(40, 40),             # a 1-token final prefill chunk is still prefill (39 < 40 before)
            "d1": _req(50, 50 + 7 + 1),       # decoding: 57 tokens before, one new
            "d2": _req(10, 10 + 1)}
    sched = {"first": 256, "cont": 100, "last": 1, "d1": 1, "d2": 1}
    chunks, b, kv = vp.step_shape(sched, reqs)
    assert sorted(chunks) == [(1, 39), (100, 1024), (256, 0)]
    assert b == 2 and kv == (57 + 1) + (10 + 1)
    assert vp.format_chunks(chunks) in ("256:0;100:1024;1:39",)


def test_plan_covers_the_shapes_within_the_engine_limits():
    cfg = vp.ProfileConfig(model_dir="unused", max_num_seqs=48, budget=512, max_model_len=4096, repeats=1)
    scen = vp.plan(cfg)
    names = {n.split("-")[0] for n, _ in scen}
    assert names == {"prefill", "context", "decode", "mixed"}
    for name, reqs in scen:
        assert reqs and all(r.prompt + r.output <= cfg.max_model_len for r in reqs), name
        if name.startswith("prefill"):
            assert reqs[0].prompt <= cfg.budget and reqs[0].output == 1
        if name.startswith("context"):
            assert reqs[0].prompt > cfg.budget
        if name.startswith("decode"):
            assert len(reqs) <= cfg.max_num_seqs
    assert max(len(r) for n, r in scen if n.startswith("decode")) == 48
    assert vp.plan(cfg) == scen  # seeded


def test_device_name_is_the_cpu_model_slug(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7763 64-Core Processor\nflags\t: avx\n")
    assert vp.device_name(cpu=True, cpuinfo=str(info)) == "cpu-amd-epyc-7763-64-core-processor"
    info.write_text("model name\t: Intel(R) Xeon(R) Platinum 8480+\n")
    assert vp.device_name(cpu=True, cpuinfo=str(info)) == "cpu-intel-xeon-platinum-8480"
    assert vp.engine_budget({"scheduler": "v1", "chunk_size": 256, "max_num_batched_tokens": 512}) == 512
    assert vp.engine_budget({"chunked_prefill": True, "chunk_size": 256, "max_num_batched_tokens": 4096}) == 256


def test_fit_and_save_holds_out_and_is_what_the_simulator_loads(tmp_path):
    """Steps timed by a known execution model (3 % noise): the saved fit's held-out error is measured on steps it
    never saw, is small, and ExecutionModel.fit loads the JSON from the fitted-profile location."""
    model = ModelSpec.from_dict(load_conf("model", "llama_tiny"))
    gpu = GpuSpec.from_dict(load_conf("gpu", "cpu-amd-epyc"))
    truth = ExecutionModel.fit(ModelSpec.from_dict(load_conf("model", "qwen2_7b")),
                               GpuSpec.from_dict(load_conf("gpu", "a30")), profile_root=REPO / "data" / "profiling")
    steps = synthetic_steps(600, seed=3, max_batch=32, chunk=512, max_len=2048)
    rng = np.random.default_rng(0)
    times = np.array([truth.step_time(*s) for s in steps]) * rng.normal(1.0, 0.03, len(steps))
    csv = tmp_path / "steps.csv"
    pd.DataFrame({"prefill_chunks": [vp.format_chunks(c) for c, _, _ in steps],
                  "num_decode": [b for _, b, _ in steps], "decode_kv_sum": [k for _, _, k in steps],
                  "step_s": times, "scenario": "synthetic"}).to_csv(csv, index=False)
    out = vp.fitted_path("cpu-amd-epyc", model.profile_name, 1, root=tmp_path / "fitted")
    params = vp.fit_and_save(csv, model.to_dict(), gpu.to_dict(), out, seed=1)
    held = params["holdout"]["test_steps"]
    assert held["n"] + params["holdout"]["train_steps"]["n"] == 600 and 60 < held["n"] < 200
    assert held["mape"] < 0.05 and held["p90"] < 0.10
    em = ExecutionModel.fit(model, gpu, profile_root=tmp_path)
    assert em.cache_path == out and em.gpu.name == "cpu-amd-epyc"
    s = steps[0]
    assert em.step_time(*s) == pytest.approx(ExecutionModel(params).step_time(*s))
    with pytest.raises(ValueError, match="too few"):
        pd.read_csv(csv).head(5).to_csv(tmp_path / "few.csv", index=False)
        vp.fit_and_save(tmp_path / "few.csv", model.to_dict(), gpu.to_dict(), tmp_path / "x.json")


def _tiny_truth() -> ExecutionModel:
    return ExecutionModel.fit(ModelSpec.from_dict(load_conf("model", "qwen2_7b")),
                              GpuSpec.from_dict(load_conf("gpu", "a30")), profile_root=REPO / "data" / "profiling")


def test_steady_itl_counts_tokens_from_usage_not_chunks():
    """A chunk can carry several tokens (vLLM packs them under load): the latency is per token of the usage."""
    marks = [(0.1, 1), (0.2, 2), (0.5, 5), (0.6, 6), (1.0, 10), (1.3, 13), (1.6, 16)]
    lo, hi = sc.steady_window(16)
    assert (lo, hi) == (4, 14) and sc.steady_window(160) == (40, 140)
    assert sc.steady_itl(marks, lo, hi) == pytest.approx((1.6 - 0.5) / (16 - 5))
    with pytest.raises(ValueError, match="ended before token 20"):
        sc.steady_itl(marks, 4, 20)
    assert sc._parse_cpus("1") == {1} and sc._parse_cpus("0,2-3") == {0, 2, 3} and sc._parse_cpus(None) == set()


def test_serving_overhead_is_recovered_and_added_to_every_step():
    """Inter-token latencies made from a known model plus 2 ms a step and 0.1 ms a stream, a lone TTFT 4 ms above
    the prefill step: the fit gets those three back, and the served rows carry them per step, per emitting
    sequence and per new prompt."""
    em = _tiny_truth()
    kv = 32 + sum(sc.steady_window(160)) // 2
    itl = {b: em.step_time([], b, b * kv) + 0.002 + 0.0001 * b for b in sc.BATCHES}
    ttft = em.step_time([(32, 0)], 0, 0) + 0.002 + 0.0001 + 0.004
    ov = sc.overhead(sc.ServeCalibration(itl_s=itl, ttft_lone_s=ttft), em)
    assert ov.per_step_s == pytest.approx(0.002, abs=1e-6) and ov.per_seq_s == pytest.approx(1e-4, abs=1e-7)
    assert ov.first_s == pytest.approx(0.004, abs=1e-6) and max(map(abs, ov.residual_ms.values())) < 1e-3
    steps = [([], 4, 400), ([(128, 0)], 0, 0), ([(64, 512), (32, 0)], 3, 900)]
    out = sc.served_steps(steps, [0.01, 0.02, 0.03], ov)
    assert out == pytest.approx([0.01 + 0.002 + 4e-4, 0.02 + 0.002 + 1e-4 + 0.004, 0.03 + 0.002 + 5e-4 + 0.004])
    cal = sc.ServeCalibration(itl_s=itl, ttft_lone_s=ttft, cpus="1")
    assert sc.ServeCalibration.from_json(json.loads(json.dumps(cal.to_json()))) == cal


def test_fit_with_serving_calibration_describes_the_served_engine(tmp_path):
    """Engine steps from a known model, and a served engine 3 ms a step slower: the saved model predicts the
    served decode, not the engine's, and keeps the calibration it was made from."""
    model = ModelSpec.from_dict(load_conf("model", "llama_tiny"))
    gpu = GpuSpec.from_dict(load_conf("gpu", "cpu-amd-epyc"))
    truth = _tiny_truth()
    steps = synthetic_steps(600, seed=4, max_batch=32, chunk=512, max_len=2048)
    csv = tmp_path / "steps.csv"
    pd.DataFrame({"prefill_chunks": [vp.format_chunks(c) for c, _, _ in steps],
                  "num_decode": [b for _, b, _ in steps], "decode_kv_sum": [k for _, _, k in steps],
                  "step_s": [truth.step_time(*s) for s in steps], "scenario": "synthetic"}).to_csv(csv, index=False)
    kv = 32 + sum(sc.steady_window(160)) // 2
    cal = sc.ServeCalibration(itl_s={b: truth.step_time([], b, b * kv) + 0.003 for b in sc.BATCHES},
                              ttft_lone_s=truth.step_time([(32, 0)], 0, 0) + 0.003)
    params = vp.fit_and_save(csv, model.to_dict(), gpu.to_dict(), tmp_path / "tp1.json", seed=1, serving=cal)
    served = ExecutionModel(params)
    for b in (2, 8, 16):
        want = truth.step_time([], b, b * 400) + 0.003
        assert served.step_time([], b, b * 400) == pytest.approx(want, rel=0.08)
    assert params["serving"]["per_step_ms"] == pytest.approx(3.0, abs=0.05)
    assert params["serving"]["calibration"]["itl_s"]["2"] == pytest.approx(cal.itl_s[2])
    plain = vp.fit_and_save(csv, model.to_dict(), gpu.to_dict(), tmp_path / "plain.json", seed=1)
    assert "serving" not in plain and ExecutionModel(plain).step_time([], 8, 3200) < served.step_time([], 8, 3200)


def _vllm_python_or_skip() -> str:
    py = vp.vllm_python()
    r = subprocess.run([py, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
                       cwd=REPO, capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"vLLM is not installed for {py} (python -m block.engine.vllm_install installs it)")
    return py


def test_profiles_a_few_real_vllm_steps_and_fits_them(tmp_path):
    """The real tiny Llama on vLLM (CPU): the quick plan's steps are what vLLM's scheduler ran, one row each, with
    positive times, and they fit into a loadable execution model; the served engine's calibration (``vllm serve``
    started, streamed at 1 and 2 streams) is kept beside the steps and in the model."""
    py = _vllm_python_or_skip()
    out = tmp_path / "fitted" / "cpu-test" / "tp1.json"
    r = subprocess.run([sys.executable, "-m", "block.engine.vllm_profile", "--model", "llama_tiny", "--engine",
                        "vllm_cpu", "--gpu", "cpu-amd-epyc", "--device", "cpu-test", "--quick", "--python", py,
                        "--executor", "uni", "--clock", "cpu",
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert (report["device"], report["clock"], report["executor"]) == ("cpu-test", "cpu", "uni")
    assert report["vllm"].startswith("0.") and report["steps"] > 0
    df = pd.read_csv(out.with_name("tp1.steps.csv"), keep_default_na=False)
    assert list(df.columns) == list(vp.CSV_COLUMNS)
    by = {n: g for n, g in df.groupby("scenario")}
    assert list(by["prefill"]["prefill_chunks"]) == ["64:0"]
    assert list(by["context"]["prefill_chunks"]) == ["512:0", "32:512"]  # budget 512, then 32 after 512 cached
    dec = by["decode-b2-L32"]
    assert dec["prefill_chunks"].iloc[0] == "32:0;32:0"
    d = dec[dec["prefill_chunks"] == ""]
    assert len(d) == 11 and (d["num_decode"] == 2).all()
    assert list(d["decode_kv_sum"]) == [2 * (33 + i) for i in range(11)]  # 32 prompt + 1 sampled, then +1 a step
    assert (df["step_s"] > 0).all() and (df["wall_s"] >= 0).all() and (df["step_s"] == df["cpu_s"]).all()
    steps, _ = read_steps(out.with_name("tp1.steps.csv"))
    assert len(steps) == len(df) == report["steps"]
    params = json.loads(out.read_text())
    assert params["holdout"]["test_steps"]["n"] >= 1 and params["gpu"]["name"] == "cpu-amd-epyc"
    em = ExecutionModel(params)
    assert 0 < em.step_time([(64, 0)], 0, 0) < 1.0 and em.step_time([], 2, 70) > 0
    cal = sc.load(out.with_name("tp1.serve.json"))
    assert sorted(cal.itl_s) == [1, 2] and all(v > 0 for v in cal.itl_s.values()) and cal.ttft_lone_s > 0
    assert params["serving"]["per_step_ms"] >= 0 and params["serving"]["first_token_ms"] >= 0
    assert report["serving"]["per_seq_ms"] == pytest.approx(params["serving"]["per_seq_ms"])
