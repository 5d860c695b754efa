"""One config path: every launcher builds an engine with ``vidur.config.engine_setup``, the engine and predictor
command lines share one flag set, and a run's config is validated once, with a one-line error for a wrong type."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from block.engine.config import ENGINE_OVERRIDES, build_setup, engine_flags, setup_from_args
from vidur.config import conf_names

ROOT = Path(__file__).resolve().parents[1]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("engine", conf_names("engine"))
def test_a_run_and_the_command_lines_build_the_same_engine(engine):
    """The Hydra run, ``python -m block.engine`` and ``python -m block.predictor`` given the flags a launcher writes
    (``engine_flags``) end with the same EngineConfig for every engine config of the repository."""
    from block.engine.cli import build_parser as engine_parser
    from block.predictor.cli import build_parser as predictor_parser
    from experiments import wiring

    model = "llama_tiny" if engine == "vllm_cpu" else "llama2_7b"
    gpu = "cpu-amd-epyc" if engine == "vllm_cpu" else "a30"
    run = wiring.validate(_compose(f"engine={engine}", f"model={model}", f"gpu={gpu}"))
    assert build_setup(model, gpu, engine).engine == run
    for parser in (engine_parser(), predictor_parser()):
        args = parser.parse_args(["--model", model, "--gpu", gpu, "--engine", engine, *engine_flags(run)])
        assert setup_from_args(args).engine == run


def test_the_flag_set_is_declared_once():
    from block.engine.cli import build_parser as engine_parser
    from block.predictor.cli import build_parser as predictor_parser

    flags = {"--" + k.replace("_", "-") for k, _, _ in ENGINE_OVERRIDES} | {"--model", "--model-config", "--gpu",
                                                                             "--engine", "--tokenizer", "--cache-dir"}
    for parser in (engine_parser(), predictor_parser()):
        assert flags <= set(parser._option_string_actions)
    for path in ("block/engine/cli.py", "block/predictor/cli.py", "experiments/emulate.py"):
        text = (ROOT / path).read_text()
        assert "--chunk-size" not in text and "--max-num-seqs" not in text, path  # only block/engine/config.py


def test_overrides_reach_the_engine():
    s = build_setup("llama2_7b", "a30", "vllm_chunked", max_num_seqs=8, chunk_size=8192, num_blocks=777,
                    chunked_prefill=True)
    assert (s.engine.max_num_seqs, s.engine.chunk_size, s.engine.num_blocks) == (8, 8192, 777)
    assert s.engine.max_num_batched_tokens == 8192  # --chunk-size alone raises the batched-token cap with it
    with pytest.raises(TypeError, match="max_num_seq"):
        build_setup(max_num_seq=8)  # a misspelt override is an error, not ignored


# ---------------------------------------------------------------------- validation
def _config_error(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("configuration error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("overrides,key,says", [
    (["engine.chunked_prefill=maybe"], "engine.chunked_prefill='maybe'", "boolean"),  # bool('maybe') was True
    (["provisioning=reactive", "provisioning.initial_instances=abc"], "provisioning.initial_instances='abc'",
     "integer"),  # was a TypeError traceback
    (["engine.max_num_seqs=abc"], "engine.max_num_seqs='abc'", "integer"),  # was blamed on engine.tensor_parallel
    (["policy=block", "+policy.foo=1"], "policy.*", "foo"),
])
def test_a_wrong_type_or_choice_is_one_line_naming_the_key(tmp_path, overrides, key, says):
    line = _config_error(f"output_root={tmp_path}", "workload.num_requests=10", *overrides)
    assert key in line and says in line, line
    assert not list(tmp_path.rglob("summary.json"))


def test_schema_names_every_bad_engine_and_model_key():
    from experiments import schema
    from experiments.wiring import ConfigError

    with pytest.raises(ConfigError) as err:
        schema.check(_compose("engine.tensor_parallel=0", "engine.watermark=2", "model.num_layers=1.5",
                              "gpu.hbm_gbps=fast"))
    for key in ("engine.tensor_parallel=0", "engine.watermark=2", "model.num_layers=1.5", "gpu.hbm_gbps='fast'"):
        assert key in str(err.value)


def test_an_emulate_run_checks_its_engine_config_once(tmp_path, monkeypatch):
    """run_one validates; the emulate mode writes the services' flags and the summary from that result instead of
    building and checking the engine config again (the services check their own in their own processes)."""
    from experiments.run import run_one
    from vidur.types import EngineConfig

    calls = []
    check = EngineConfig.validate
    monkeypatch.setattr(EngineConfig, "validate", lambda self: (calls.append(self), check(self))[1])
    cfg = _compose("mode=emulate", "cluster.num_instances=1", "workload.num_requests=3", "workload.qps=5",
                   "mode.time_scale=8", "progress=false", f"output_root={tmp_path}")
    summary = run_one(cfg, tmp_path / "run")
    assert summary["completed"] == 3
    assert len(calls) == 1


def test_the_holdout_report_takes_its_model_spec_from_conf(monkeypatch):
    """``python -m vidur.execution_model`` derives Llama-2-7B's attention from conf/model (no spec of its own):
    a changed conf (8 KV heads instead of 32) changes the KV-width ratio to the Qwen2-7B donor (4 KV heads)."""
    from vidur.config import PROFILE_ROOT, load_conf
    from vidur.execution_model import report

    if not (PROFILE_ROOT / "compute" / "a30" / "Qwen" / "Qwen-2-7B" / "attention.csv").exists():
        pytest.skip("A30 profiles not bundled")

    def gqa(group: str, name: str) -> dict:
        d = load_conf(group, name)
        return {**d, "num_kv_heads": 8} if group == "model" else d

    assert report.evaluate_holdout(PROFILE_ROOT)["derived_llama2_7b_attention"]["r_kv"] == pytest.approx(8.0)
    monkeypatch.setattr(report, "load_conf", gqa)
    assert report.evaluate_holdout(PROFILE_ROOT)["derived_llama2_7b_attention"]["r_kv"] == pytest.approx(2.0)
