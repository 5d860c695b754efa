"""The stock-vLLM adapter without a GPU: command line, model directory, /metrics captures, profile fitting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from block.engine import vllm as V
from block.engine.config import build_setup, load_conf
from block.prom import VllmLoad, get_histogram, parse_prometheus
from vidur import profile_fit as PF

DATA = Path(__file__).parent / "data"


def _flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("model", ["llama2_7b", "qwen2_7b"])
def test_command_chunked(model, tmp_path):
    m, e = load_conf("model", model), load_conf("engine", "vllm_chunked")
    argv = V.vllm_command(m, e, 8123, tmp_path, tmp_path / "tok")
    assert argv[:3] == ["vllm", "serve", str(tmp_path)]
    assert _flag(argv, "--served-model-name") == m["name"]
    assert _flag(argv, "--max-num-seqs") == "48"
    assert _flag(argv, "--max-num-batched-tokens") == "512"  # the chunk is the per-step budget
    assert "--enable-chunked-prefill" in argv and "--no-enable-chunked-prefill" not in argv
    assert _flag(argv, "--block-size") == "16" and _flag(argv, "--gpu-memory-utilization") == "0.9"
    assert _flag(argv, "--max-model-len") == "4096" and _flag(argv, "--tensor-parallel-size") == "1"
    assert _flag(argv, "--port") == "8123" and _flag(argv, "--host") == "127.0.0.1"
    assert _flag(argv, "--load-format") == "dummy" and _flag(argv, "--tokenizer") == str(tmp_path / "tok")
    assert "--num-gpu-blocks-override" not in argv  # num_blocks: null -> vLLM sizes the cache
    assert "--disable-log-requests" not in argv  # removed in vLLM 0.11 (off by default)
    assert not any("key" in a.lower() for a in argv)


def test_command_unchunked_blocks_tp():
    m, e = load_conf("model", "llama2_7b"), load_conf("engine", "vllm")
    e.update(num_blocks=1234, tensor_parallel=2)
    argv = V.vllm_command(m, e, 9000, legacy_log_flag=True)
    assert argv[2] == "meta-llama/Llama-2-7b-hf" and "--tokenizer" not in argv
    assert "--no-enable-chunked-prefill" in argv and _flag(argv, "--max-num-batched-tokens") == "4096"
    assert _flag(argv, "--num-gpu-blocks-override") == "1234" and _flag(argv, "--tensor-parallel-size") == "2"
    assert "--disable-log-requests" in argv
    e["max_num_batched_tokens"] = 2048
    with pytest.raises(ValueError, match="max_model_len"):
        V.vllm_command(m, e, 9000)


def test_command_from_engine_config():
    s = build_setup("qwen2_7b", "a30", "vllm_chunked", num_blocks=999)
    argv = V.vllm_command(s.model, s.engine, 1)
    assert _flag(argv, "--num-gpu-blocks-override") == "999" and _flag(argv, "--max-num-batched-tokens") == "512"


def test_api_key_env(monkeypatch):
    env = V.vllm_env({"BLOCK_API_TOKEN": "s3cret"})
    assert env["VLLM_API_KEY"] == "s3cret"
    assert V.vllm_env({}, api_key="k")["VLLM_API_KEY"] == "k"


@pytest.mark.parametrize("model,arch,kv", [("llama2_7b", "LlamaForCausalLM", 32), ("qwen2_7b", "Qwen2ForCausalLM", 4)])
def test_model_dir(model, arch, kv, tmp_path):
    m = load_conf("model", model)
    d = V.prepare_model_dir(m, tmp_path / model)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == [arch] and cfg["num_key_value_heads"] == kv
    assert cfg["hidden_size"] == m["hidden_size"] and cfg["num_hidden_layers"] == m["num_layers"]
    assert cfg["intermediate_size"] == m["intermediate_size"] and cfg["vocab_size"] == m["vocab_size"]
    assert cfg["torch_dtype"] == "float16"
    tok = json.loads((d / "tokenizer.json").read_text())  # decompressed for Qwen
    assert "model" in tok and (d / "tokenizer_config.json").is_file()
    transformers = pytest.importorskip("transformers")
    hc = transformers.AutoConfig.from_pretrained(str(d))
    assert hc.num_attention_heads == m["num_q_heads"] and hc.num_key_value_heads == kv


def test_print_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "block.engine.vllm", "--model", "qwen2_7b", "--num-blocks", "100",
                        "--model-dir", str(tmp_path / "m"), "--port", "0", "--print-command"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--num-gpu-blocks-override 100" in r.stdout and (tmp_path / "m" / "config.json").is_file()


def test_clear_error_without_vllm(tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    with pytest.raises(V.VllmNotInstalled, match=r"pip install -e \.\[vllm\]"):
        V.vllm_executable()
    r = subprocess.run([sys.executable, "-m", "block.engine.vllm", "--model-dir", str(tmp_path / "m"), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "pip install -e .[vllm]" in r.stderr and "listening" not in r.stdout


@pytest.mark.parametrize("name", ["vllm_metrics_v1.txt", "vllm_metrics_v0.txt"])
def test_metrics_capture(name):
    text = (DATA / name).read_text()
    load = VllmLoad.from_metrics(text)
    assert (load.num_running, load.num_waiting, load.kv_cache_usage) == (37.0, 5.0, 0.8125)
    assert (load.num_preemptions, load.prompt_tokens, load.generation_tokens) == (3.0, 61234.0, 48021.0)
    assert (load.num_gpu_blocks, load.block_size, load.free_blocks) == (2760, 16, 518)
    assert VllmLoad.from_metrics(text, model_name="Qwen/Qwen2-7B").num_running == 37.0
    assert VllmLoad.from_metrics(text, model_name="other").num_running is None
    h = get_histogram(parse_prometheus(text), "vllm:time_to_first_token_seconds", {"model_name": "Qwen/Qwen2-7B"})
    assert h is not None and h.count == 140 and h.buckets[-1] == (float("inf"), 140.0)
    assert abs(h.mean - 61.82 / 140) < 1e-12 and len(h.buckets) == 23


@pytest.fixture(scope="module")
def qwen_a30(tmp_path_factory):
    s = build_setup("qwen2_7b", "a30")
    return s, s.execution_model(cache_dir=str(tmp_path_factory.mktemp("emcache")))


def test_profile_fit_synthetic(qwen_a30, tmp_path):
    s, em = qwen_a30
    rng = np.random.default_rng(0)
    train, test = PF.synthetic_steps(1200, seed=1), PF.synthetic_steps(300, seed=2)
    y = np.array([em.step_time(*t) for t in train]) * (1 + 0.03 * rng.standard_normal(len(train)))
    csv = PF.write_steps(tmp_path / "steps.csv", train, y)
    steps, times = PF.read_steps(csv)
    assert steps[:5] == [(list(p), b, k) for p, b, k in train[:5]] and np.allclose(times, y)
    PF.fit_profile(csv, s.model, s.gpu, tmp_path / "fit.json")
    fm = PF.load_fitted(tmp_path / "fit.json")
    truth = np.array([em.step_time(*t) for t in test])
    pred = np.array([fm.step_time(*t) for t in test])
    ape = np.abs(pred - truth) / truth
    assert ape.mean() < 0.03 and np.quantile(ape, 0.9) < 0.06, (ape.mean(), np.quantile(ape, 0.9))
    for b in (1, 16, 48):  # the decode_coeffs contract holds on the fitted model
        c, k = fm.decode_coeffs(b)
        assert abs(fm.step_time([], b, 1000 * b) - (c + k * 1000 * b)) < 1e-12


def test_steps_schema_error(tmp_path):
    (tmp_path / "bad.csv").write_text("num_decode,step_s\n1,0.1\n")
    with pytest.raises(ValueError, match="missing columns"):
        PF.read_steps(tmp_path / "bad.csv")
