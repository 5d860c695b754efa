"""Run a stock vLLM (current release, V1 engine) in place of the emulated engine.

Three pieces, none of which needs a GPU except actually serving:

- :func:`vllm_command` turns a model config (``conf/model``) and an engine config (``conf/engine``) into the
  ``vllm serve`` argv for the current vLLM release (>= 0.11): random weights (``--load-format dummy``) and a local
  tokenizer, so nothing is downloaded; the API key travels in ``VLLM_API_KEY`` (read by ``vllm serve``), never on
  the command line. Request logging is off by default since vLLM 0.11 (``--disable-log-requests`` was removed);
  ``legacy_log_flag=True`` adds it back for older releases.
- :func:`prepare_model_dir` writes a Hugging Face ``config.json`` (Llama-2 / Qwen2 architecture from
  ``conf/model/*.yaml``) plus the bundled tokenizer files into a directory that ``vllm serve`` loads.
- ``python -m block.engine.vllm --port 0 --model llama2_7b --engine vllm_chunked ...`` prepares that directory,
  picks a port, prints ``listening on http://127.0.0.1:<port>`` (the line ``experiments.local_stack.LocalStack``
  waits for) and execs ``vllm serve``; ``LocalStack.wait_healthy`` then polls vLLM's own ``/health``. Use
  :func:`start_vllm` for that in one call.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO_ROOT / "data" / "tokenizers"
TOKENIZER_DIRS = {"llama2": TOKENIZER_DIR / "llama2", "qwen2": TOKENIZER_DIR / "qwen2_compatible_qwen3"}
INSTALL_HINT = "vLLM is not installed: run `pip install -e .[vllm]` on a GPU host (CUDA) to serve with a real vLLM"
API_KEY_ENVS = ("VLLM_API_KEY", "BLOCK_API_TOKEN", "BLOCK_ENGINE_TOKEN")


class VllmNotInstalled(RuntimeError):
    pass


def _as_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if is_dataclass(cfg):
        return asdict(cfg)
    if type(cfg).__module__.split(".")[0] == "omegaconf":
        from omegaconf import OmegaConf

        return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    return dict(cfg)


def vllm_executable() -> list[str]:
    """The command that runs ``vllm`` (``vllm`` on PATH, else ``python -m vllm.entrypoints.cli.main``); raises
    :class:`VllmNotInstalled` with the install hint when vLLM is absent."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise VllmNotInstalled(INSTALL_HINT)
    exe = shutil.which("vllm")
    return [exe] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def vllm_command(model_cfg: Any, engine_cfg: Any, port: int, model_dir: Optional[os.PathLike | str] = None,
                 tokenizer_dir: Optional[os.PathLike | str] = None, *, host: str = "127.0.0.1",
                 served_model_name: Optional[str] = None, load_format: str = "dummy",
                 legacy_log_flag: bool = False, extra_args: Sequence[str] = (),
                 executable: Optional[Sequence[str]] = None) -> list[str]:
    """The ``vllm serve`` argv for ``model_cfg`` (conf/model dict or ModelSpec) and ``engine_cfg`` (conf/engine
    dict -- ``num_blocks: null`` means vLLM sizes the KV cache itself -- or an EngineConfig).

    ``model_dir`` is what vLLM loads (a local directory from :func:`prepare_model_dir`, or None for the model's
    HF id); ``tokenizer_dir`` defaults to ``model_dir``. Under chunked prefill the per-step token budget is the
    engine's ``chunk_size`` (vLLM's ``--max-num-batched-tokens``), without it ``max_num_batched_tokens``.
    ``executable`` defaults to ``["vllm"]`` (not resolved here, so the argv can be built without vLLM).
    """
    m, e = _as_dict(model_cfg), _as_dict(engine_cfg)
    chunked = bool(e.get("chunked_prefill", True))
    budget = int(e["chunk_size"] if chunked and e.get("chunk_size") else e["max_num_batched_tokens"])
    max_len = int(e.get("max_model_len") or m.get("max_model_len", 4096))
    if not chunked and budget < max_len:
        raise ValueError(f"without chunked prefill vLLM needs max_num_batched_tokens ({budget}) >= max_model_len "
                         f"({max_len})")
    model = str(model_dir) if model_dir is not None else str(m["name"])
    argv = [*(executable or ["vllm"]), "serve", model,
            "--served-model-name", served_model_name or str(m["name"]),
            "--host", host, "--port", str(int(port)),
            "--max-num-seqs", str(int(e["max_num_seqs"])),
            "--max-num-batched-tokens", str(budget),
            "--enable-chunked-prefill" if chunked else "--no-enable-chunked-prefill",
            "--block-size", str(int(e.get("block_size", 16))),
            "--gpu-memory-utilization", repr(float(e.get("gpu_memory_utilization", 0.9))),
            "--max-model-len", str(max_len),
            "--tensor-parallel-size", str(int(e.get("tensor_parallel", e.get("tensor_parallel_size", 1)) or 1)),
            "--load-format", load_format,
            "--dtype", "float16" if int(m.get("dtype_bytes", 2)) == 2 else "auto"]
    tok = tokenizer_dir if tokenizer_dir is not None else model_dir
    if tok is not None:
        argv += ["--tokenizer", str(tok)]
    if e.get("num_blocks") is not None:
        argv += ["--num-gpu-blocks-override", str(int(e["num_blocks"]))]
    if legacy_log_flag:
        argv.append("--disable-log-requests")  # vLLM < 0.11; request logging is off by default since 0.11
    argv += list(extra_args)
    return argv


def vllm_env(base: Optional[Mapping[str, str]] = None, api_key: Optional[str] = None) -> dict[str, str]:
    """The environment for ``vllm serve``: ``VLLM_API_KEY`` from ``api_key`` or, if unset, from our services'
    token variables (``BLOCK_API_TOKEN`` / ``BLOCK_ENGINE_TOKEN``) -- the key never goes on the command line."""
    env = dict(os.environ if base is None else base)
    key = api_key or next((env[k] for k in API_KEY_ENVS if env.get(k)), None)
    if key:
        env["VLLM_API_KEY"] = key
    return env


# ---------------------------------------------------------------------------------------------------------------
# model directory (config.json + tokenizer), no download
# ---------------------------------------------------------------------------------------------------------------

# per-family settings the conf/model files do not carry (values of the released HF configs)
_FAMILIES = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0,
              "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "rope_scaling": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6, "bos_token_id": 151643, "eos_token_id": 151643, "tie_word_embeddings": False,
              "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28, "rope_scaling": None},
}


def model_family(model_cfg: Any) -> str:
    m = _as_dict(model_cfg)
    name = str(m.get("name", "")).lower()
    if "qwen" in name:
        return "qwen2"
    if "llama" in name:
        return "llama"
    raise ValueError(f"no HF architecture known for {m.get('name')!r} (Llama and Qwen2 families only)")


def hf_config(model_cfg: Any) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for a conf/model entry (Llama-2 / Llama-3 / Qwen2 families)."""
    m = _as_dict(model_cfg)
    fam = dict(_FAMILIES[model_family(m)])
    if model_family(m) == "llama" and int(m["vocab_size"]) > 100000:  # Llama-3
        fam.update(rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
    if fam.get("max_window_layers") is not None:
        fam["max_window_layers"] = int(m["num_layers"])
    cfg = {
        **fam,
        "hidden_act": "silu",
        "hidden_size": int(m["hidden_size"]),
        "intermediate_size": int(m["intermediate_size"]),
        "num_hidden_layers": int(m["num_layers"]),
        "num_attention_heads": int(m["num_q_heads"]),
        "num_key_value_heads": int(m["num_kv_heads"]),
        "head_dim": int(m["head_dim"]),
        "vocab_size": int(m["vocab_size"]),
        "max_position_embeddings": int(m.get("max_model_len", 4096)),
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": "float16" if int(m.get("dtype_bytes", 2)) == 2 else "float32",
        "transformers_version": "4.40.0",
        "_name_or_path": str(m["name"]),
    }
    if cfg["hidden_size"] != cfg["num_attention_heads"] * cfg["head_dim"]:
        raise ValueError(f"{m['name']}: hidden_size != num_q_heads * head_dim")
    return cfg


def prepare_model_dir(model_cfg: Any, out_dir: os.PathLike | str) -> Path:
    """Write ``config.json``, ``generation_config.json`` and the bundled tokenizer (``tokenizer.json``,
    ``tokenizer_config.json``; the gzipped Qwen2 tokenizer decompressed) into ``out_dir``; return it.
    Weights are not written: serve with ``--load-format dummy``."""
    m = _as_dict(model_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(m)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}, indent=2)
        + "\n")
    tname = str(m.get("tokenizer", "llama2"))
    src = TOKENIZER_DIRS.get(tname, TOKENIZER_DIR / tname)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer {tname!r}: no directory {src}")
    for f in sorted(src.iterdir()):
        if f.name.endswith(".gz"):
            with gzip.open(f, "rb") as fi, open(out / f.name[:-3], "wb") as fo:
                shutil.copyfileobj(fi, fo)
        elif f.is_file():
            shutil.copyfile(f, out / f.name)
    if not (out / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer {tname!r}: no tokenizer.json in {src}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# start / stop through LocalStack
# ---------------------------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_vllm(stack: Any, name: str, args: Sequence[str] = ()) -> Any:
    """Start ``python -m block.engine.vllm`` in ``stack`` (an ``experiments.local_stack.LocalStack``; build it
    with ``startup_timeout_s`` of several minutes: vLLM compiles and captures CUDA graphs) and wait for vLLM's
    ``/health``. The stack stops it (process group SIGTERM, then SIGKILL) like every other service. Raises
    :class:`VllmNotInstalled` before starting anything when vLLM is absent."""
    vllm_executable()
    svc = stack.start(name, "block.engine.vllm", list(args))
    stack.wait_healthy([svc])
    return svc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m block.engine.vllm",
                                 description="Serve a conf/model + conf/engine pair with stock vLLM (random "
                                             "weights, bundled tokenizer). API key: VLLM_API_KEY or BLOCK_API_TOKEN "
                                             "in the environment.")
    ap.add_argument("--port", type=int, default=8000, help="0: pick a free port")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model", "--model-config", dest="model", default="llama2_7b",
                    help="conf/model name or YAML path (--model-config: as python -m block.engine says it)")
    ap.add_argument("--gpu", default=None, help="ignored: vLLM serves on the GPU it finds (accepted so that the "
                                                 "emulated engine's command line works here unchanged)")
    ap.add_argument("--engine", default="vllm_chunked", help="conf/engine name or YAML path")
    ap.add_argument("--model-dir", default=None, help="where to write config.json + tokenizer (default: a cache dir)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--num-blocks", type=int, default=None)
    ap.add_argument("--chunked-prefill", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--tensor-parallel", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--legacy-log-flag", action="store_true", help="add --disable-log-requests (vLLM < 0.11)")
    ap.add_argument("--print-command", action="store_true", help="print the vllm argv and exit")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> None:
    from block.engine.config import load_conf

    a = build_parser().parse_args(argv)
    m, e = load_conf("model", a.model), load_conf("engine", a.engine)
    for key, val in (("max_num_seqs", a.max_num_seqs), ("chunk_size", a.chunk_size),
                     ("max_num_batched_tokens", a.max_num_batched_tokens), ("num_blocks", a.num_blocks),
                     ("chunked_prefill", a.chunked_prefill), ("max_model_len", a.max_model_len),
                     ("tensor_parallel", a.tensor_parallel), ("gpu_memory_utilization", a.gpu_memory_utilization)):
        if val is not None:
            e[key] = val
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "block-repro" / "vllm-models"
    mdir = prepare_model_dir(m, a.model_dir or base / str(m["name"]).replace("/", "__"))
    port = a.port or free_port(a.host)
    exe = ["vllm"] if a.print_command else vllm_executable()
    cmd = vllm_command(m, e, port, mdir, mdir, host=a.host, served_model_name=a.served_model_name,
                       load_format=a.load_format, legacy_log_flag=a.legacy_log_flag, executable=exe)
    if a.print_command:
        print(" ".join(cmd))
        return
    print(f"listening on http://{a.host}:{port} (vllm starting; poll /health)", flush=True)
    os.execvpe(cmd[0], cmd, vllm_env())


if __name__ == "__main__":
    try:
        main()
    except VllmNotInstalled as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
