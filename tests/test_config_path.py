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
