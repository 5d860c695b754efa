"""Run Microsoft's Vidur (upstream source, pure Python) as a peer simulator and summarise one run.

This module never imports Vidur: it starts Vidur's ``vidur.main`` in a separate process with Vidur's own
Python, measures the whole process (wall time, peak RSS), then reads Vidur's ``request_metrics.csv`` with pandas.
Dependencies: the standard library and pandas.

Preparing a Vidur checkout (once, outside this project)
------------------------------------------------------
The PyPI package ``vidur`` is a later rewrite that downloads its profiles from a model hub at run time and cannot
run offline, so use the upstream source instead. Setting it up takes about a minute, in a scratch folder outside
this project (never copy Vidur's code into this project: run it beside it):

1. Export the upstream source, github.com/microsoft/vidur (tested at commit 7d47513, 2024-11-19): the ``vidur/``
   package (a namespace package, no ``__init__.py``), ``data/processed_traces`` (the Azure conversation trace
   ``splitwise_conv.csv``, 19,366 rows), ``data/profiling`` and ``requirements.txt``::

       git clone https://github.com/microsoft/vidur vidur-git && git -C vidur-git checkout 7d47513
       mkdir vidur_src && git -C vidur-git archive HEAD vidur docs setup.py requirements.txt \
           data/processed_traces data/profiling | tar -x -C vidur_src

2. Add the A30 / Qwen2-7B profile from the Block authors' fork, github.com/AKafakA/vidur_opt_scheduler (the same
   paths in both trees)::

       git clone https://github.com/AKafakA/vidur_opt_scheduler vos-git
       for f in compute/a30/Qwen/Qwen-2-7B/attention.csv compute/a30/Qwen/Qwen-2-7B/mlp.csv \
                network/a30_single_gpu/all_reduce.csv network/a30_single_gpu/send_recv.csv; do
           p=data/profiling/$f; mkdir -p "vidur_src/$(dirname "$p")" && git -C vos-git show "HEAD:$p" > "vidur_src/$p"
       done

3. Edit the upstream source in ``vidur_src/vidur`` (six small changes; upstream knows no A30 and no Qwen2-7B):

   - ``types/device_sku_type.py``: add ``A30 = 4`` to ``DeviceSKUType``; ``types/node_sku_type.py``: add
     ``A30_SINGLE_GPU = 6`` to ``NodeSKUType``.
   - ``config/device_sku_config.py``: a dataclass ``A30DeviceSKUConfig(BaseDeviceSKUConfig)`` with
     ``fp16_tflops: int = 165``, ``total_memory_gb: int = 24`` and a static ``get_type()`` returning
     ``DeviceSKUType.A30`` (copy ``A40DeviceSKUConfig`` beside it).
   - ``config/node_sku_config.py``: a dataclass ``A30SingleGPUConfig(BaseNodeSKUConfig)`` with
     ``device_sku_type: DeviceSKUType = DeviceSKUType.A30``, ``num_devices_per_node: int = 1`` and a static
     ``get_type()`` returning ``NodeSKUType.A30_SINGLE_GPU``.
   - ``config/model_config.py``: in ``QwenModelConfig`` set ``vocab_size: int = 151936`` (was 152064, Qwen-72B's),
     and add a dataclass ``Qwen2_7BModelConfig(QwenModelConfig)`` with ``num_layers = 28``, ``num_q_heads = 28``,
     ``num_kv_heads = 4``, ``embedding_dim = 3584``, ``mlp_hidden_dim = 18944``, ``rope_theta = 1000000`` and a
     static ``get_name()`` returning ``"Qwen/Qwen-2-7B"``.
   - ``execution_time_predictor/sklearn_execution_time_predictor.py``, in the training step right after the
     ``Training data for model ... is empty`` check: the A30 profiles have NaN gaps in some op columns, which
     crash the fit, so fill them as the Block fork does::

         if df[target_col].isnull().any():
             df = df.copy()
             df[target_col] = df[target_col].interpolate(method="linear").bfill().ffill()

4. Create a virtual environment for it: ``python3 -m venv vidur_venv && vidur_venv/bin/pip install -r
   vidur_src/requirements.txt``. Pass that venv's python as ``python`` below, never this project's interpreter
   (``vidur`` is a namespace package and this project also has a ``vidur/`` folder; the run uses cwd = the Vidur
   source and PYTHONPATH = the Vidur source only). The requirements are unpinned; Python 3.11 with numpy 2.4.6,
   pandas 3.1.1 and scikit-learn 1.9.1 (2026-12) runs it unchanged.
5. The first simulation for a (model, device, TP, predictor config) trains the random-forest execution-time
   predictor: about 14.5 minutes on 2 cores (20.7 on a busy 2-core box); it is cached under ``<vidur_src>/cache``
   (about 190 MB), later runs start in about 1.5 s.

Flags passed (names verified against vidur/config/config.py of upstream 7d47513; the CLI is a flattened dataclass,
nested poly-configs are prefixed by the snake-cased class name, booleans use ``--x`` / ``--no-x``)::

    --replica_config_device a30 --replica_config_network_device a30_single_gpu
    --replica_config_model_name Qwen/Qwen-2-7B
    --replica_config_tensor_parallel_size 1 --replica_config_num_pipeline_stages 1
    --cluster_config_num_replicas R --global_scheduler_config_type round_robin
    --replica_scheduler_config_type {vllm|sarathi}
    --{vllm|sarathi}_scheduler_config_batch_size_cap 128
    --{vllm|sarathi}_scheduler_config_block_size 16
    --{vllm|sarathi}_scheduler_config_watermark_blocks_fraction 0.01
    --vllm_scheduler_config_max_tokens_in_batch 4096        (vllm only)
    --sarathi_scheduler_config_chunk_size 512               (sarathi only)
    --request_generator_config_type synthetic --synthetic_request_generator_config_num_requests N
    --synthetic_request_generator_config_seed S              (seeds Python `random`: Poisson gaps)
    --length_generator_config_type trace
      --trace_request_length_generator_config_trace_file ./data/processed_traces/splitwise_conv.csv
      --trace_request_length_generator_config_seed S         (pandas shuffle of the trace rows)
    or --length_generator_config_type fixed
      --fixed_request_length_generator_config_prefill_tokens P
      --fixed_request_length_generator_config_decode_tokens D
    --interval_generator_config_type poisson --poisson_request_interval_generator_config_qps QPS
    --seed S --metrics_config_output_dir OUT
    --no-metrics_config_enable_chrome_trace --no-metrics_config_store_plots

Vidur's default for every seed is 42, so ``seed=42`` (the default here) reproduces a run made with Vidur's
defaults (``python -m vidur.main`` without seed flags). The trace length generator does not wrap: ``num_requests``
must not exceed the trace's rows (19,366 for splitwise_conv.csv); use ``lengths="fixed"`` beyond that.

Example::

    from benchmarks.vidur_peer import run_vidur
    r = run_vidur("/work/scratch/vidur_src", "/work/scratch/vidur_venv/bin/python", 10000, 1, "vllm", 2.0,
                  out_dir="/tmp/vidur_out")
    print(r["wall_s"], r["e2e_p50_s"], r["ttft_p99_s"])

or ``python benchmarks/vidur_peer.py --vidur-src ... --python ... -n 10000 -r 1 --scheduler vllm --qps 2 --out ...``
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script too (see the docstring)

from benchmarks.bytecode import compile_tree  # noqa: E402

AZURE_CONV_TRACE = "./data/processed_traces/splitwise_conv.csv"
AZURE_CONV_TRACE_ROWS = 19366

# request_metrics.csv column -> short name in the returned dict
METRIC_COLUMNS = {
    "request_e2e_time": "e2e",
    "prefill_e2e_time": "ttft",
    "decode_time_execution_plus_preemption_normalized": "tpot",
    "request_scheduling_delay": "sched_delay",
}
QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


def build_vidur_args(
    num_requests: int,
    num_replicas: int,
    scheduler: str,
    qps: float,
    lengths: str = "trace",
    trace_file: Optional[str] = None,
    prefill: int = 1024,
    decode: int = 200,
    out_dir: str = "vidur_out",
    seed: int = 42,
    batch_size_cap: int = 128,
    block_size: int = 16,
    watermark_blocks_fraction: float = 0.01,
    max_tokens_in_batch: int = 4096,
    chunk_size: int = 512,
    global_scheduler: str = "round_robin",
    extra_args: Sequence[str] = (),
) -> list:
    """The argument list for ``python -m vidur.main`` (without the interpreter and ``-m vidur.main``)."""
    if scheduler not in ("vllm", "sarathi", "orca", "lightllm", "faster_transformer"):
        raise ValueError(f"unknown Vidur replica scheduler {scheduler!r}")
    p = f"--{scheduler}_scheduler_config_"
    args = [
        "--seed", str(seed),
        "--replica_config_device", "a30",
        "--replica_config_network_device", "a30_single_gpu",
        "--replica_config_model_name", "Qwen/Qwen-2-7B",
        "--cluster_config_num_replicas", str(num_replicas),
        "--replica_config_tensor_parallel_size", "1",
        "--replica_config_num_pipeline_stages", "1",
        "--global_scheduler_config_type", global_scheduler,
        "--replica_scheduler_config_type", scheduler,
        p + "batch_size_cap", str(batch_size_cap),
        p + "block_size", str(block_size),
        p + "watermark_blocks_fraction", str(watermark_blocks_fraction),
    ]
    if scheduler in ("vllm", "lightllm"):
        args += [p + "max_tokens_in_batch", str(max_tokens_in_batch)]
    if scheduler == "sarathi":
        args += [p + "chunk_size", str(chunk_size)]
    args += [
        "--request_generator_config_type", "synthetic",
        "--synthetic_request_generator_config_num_requests", str(num_requests),
        "--synthetic_request_generator_config_seed", str(seed),
    ]
    if lengths == "trace":
        args += [
            "--length_generator_config_type", "trace",
            "--trace_request_length_generator_config_trace_file", trace_file or AZURE_CONV_TRACE,
            "--trace_request_length_generator_config_seed", str(seed),
        ]
    elif lengths == "fixed":
        args += [
            "--length_generator_config_type", "fixed",
            "--fixed_request_length_generator_config_prefill_tokens", str(prefill),
            "--fixed_request_length_generator_config_decode_tokens", str(decode),
            "--fixed_request_length_generator_config_seed", str(seed),
        ]
    else:
        raise ValueError("lengths must be 'trace' or 'fixed'")
    args += [
        "--interval_generator_config_type", "poisson",
        "--poisson_request_interval_generator_config_qps", str(qps),
        "--poisson_request_interval_generator_config_seed", str(seed),
        "--metrics_config_output_dir", out_dir,
        "--no-metrics_config_enable_chrome_trace",
        "--no-metrics_config_store_plots",
    ]
    return args + list(extra_args)


def _check_vidur_resolves(vidur_src: str, python: str, env: dict) -> None:
    """Make sure ``vidur.main`` and ``vidur.types`` resolve inside vidur_src for that interpreter (cheap: no import)."""
    code = (
        "import importlib.util as u;"
        "print(u.find_spec('vidur.main').origin);print(u.find_spec('vidur.types').origin)"
    )
    out = subprocess.run([python, "-c", code], cwd=vidur_src, env=env, capture_output=True, text=True)
    src = os.path.realpath(vidur_src)
    paths = [os.path.realpath(x) for x in out.stdout.split()]
    if out.returncode != 0 or len(paths) != 2 or not all(x.startswith(src + os.sep) for x in paths):
        raise RuntimeError(
            f"`vidur` does not resolve to {vidur_src} with {python}: {out.stdout.strip()} {out.stderr.strip()[-500:]}"
        )


def summarise_request_metrics(csv_path: str) -> dict:
    """p50/p90/p99 (seconds) of e2e, TTFT, TPOT and scheduling delay from a Vidur request_metrics.csv."""
    df = pd.read_csv(csv_path)
    res = {"num_requests_in_csv": int(len(df))}
    for col, name in METRIC_COLUMNS.items():
        for qn, q in QUANTILES.items():
            res[f"{name}_{qn}_s"] = float(df[col].quantile(q)) if col in df else None
    if "request_num_restarts" in df:
        res["num_restarted_requests"] = int((df["request_num_restarts"] > 0).sum())
    return res


def run_vidur(
    vidur_src: str,
    python: str,
    num_requests: int,
    num_replicas: int,
    scheduler: str,
    qps: float,
    lengths: str = "trace",
    trace_file: Optional[str] = None,
    prefill: int = 1024,
    decode: int = 200,
    out_dir: str = "vidur_out",
    seed: int = 42,
    extra_args: Sequence[str] = (),
    *,
    batch_size_cap: int = 128,
    block_size: int = 16,
    watermark_blocks_fraction: float = 0.01,
    max_tokens_in_batch: int = 4096,
    chunk_size: int = 512,
    global_scheduler: str = "round_robin",
    timeout_s: Optional[float] = None,
    check_import: bool = True,
) -> dict:
    """Run one Vidur simulation (``python -m vidur.main`` with the flags above, in the Vidur source) and summarise it.

    Returns a dict: wall_s (whole process, from spawn to exit: import, config, request generation, predictor load,
    event loop, writing outputs), requests_per_wall_s, max_rss_mb (peak RSS of the Vidur process, from os.wait4),
    cpu_s (its user + system CPU time, from os.wait4: steadier than wall time on a busy machine),
    e2e/ttft/tpot/sched_delay _p50/_p90/_p99_s (seconds; TPOT = Vidur's
    decode_time_execution_plus_preemption_normalized), simulated_time_s (Vidur's "Simulation ended at" log line,
    None if absent), metrics_csv, log, argv.
    """
    if lengths == "trace" and num_requests > AZURE_CONV_TRACE_ROWS and trace_file in (None, AZURE_CONV_TRACE):
        raise ValueError(f"the trace length generator does not wrap: at most {AZURE_CONV_TRACE_ROWS} requests")
    vidur_src = os.path.abspath(vidur_src)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    args = build_vidur_args(
        num_requests, num_replicas, scheduler, qps, lengths, trace_file, prefill, decode, out_dir, seed,
        batch_size_cap, block_size, watermark_blocks_fraction, max_tokens_in_batch, chunk_size,
        global_scheduler, extra_args,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = vidur_src
    env["WANDB_MODE"] = "disabled"
    if check_import:
        _check_vidur_resolves(vidur_src, python, env)
    compile_tree(Path(vidur_src), ("vidur",), python)  # its bytecode cached, as ours is (benchmarks/bytecode.py)

    before = set(glob.glob(os.path.join(out_dir, "*", "request_metrics.csv")))
    log_path = os.path.join(out_dir, f"vidur_{scheduler}_r{num_replicas}_n{num_requests}_{int(time.time())}.log")
    argv = [python, "-m", "vidur.main"] + args
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=vidur_src, env=env, stdout=log, stderr=subprocess.STDOUT)
        if timeout_s is None:
            _, status, ru = os.wait4(proc.pid, 0)
        else:
            deadline = t0 + timeout_s
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    proc.kill()
                    _, status, ru = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.05)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, tell Popen
    log_text = open(log_path).read()
    if proc.returncode != 0:
        raise RuntimeError(f"Vidur exited with {proc.returncode}; log {log_path}:\n{log_text[-3000:]}")

    new = sorted(set(glob.glob(os.path.join(out_dir, "*", "request_metrics.csv"))) - before, key=os.path.getmtime)
    if not new:
        raise RuntimeError(f"no new request_metrics.csv under {out_dir}; log {log_path}:\n{log_text[-3000:]}")
    csv_path = new[-1]
    m = re.search(r"Simulation ended at: ([0-9.eE+-]+)s", log_text)
    res = {
        "scheduler": scheduler,
        "num_replicas": num_replicas,
        "num_requests": num_requests,
        "qps": qps,
        "lengths": lengths if lengths == "trace" else f"fixed {prefill}/{decode}",
        "wall_s": wall,
        "requests_per_wall_s": num_requests / wall,
        "max_rss_mb": ru.ru_maxrss / 1024.0,  # Linux: kilobytes
        "cpu_s": ru.ru_utime + ru.ru_stime,  # user + system CPU of the process and the children it waited for
        "simulated_time_s": float(m.group(1)) if m else None,
        "metrics_csv": csv_path,
        "log": log_path,
        "argv": argv,
    }
    res.update(summarise_request_metrics(csv_path))
    return res


def format_summary(r: dict) -> str:
    lines = [
        f"{r['scheduler']} r={r['num_replicas']} n={r['num_requests']} qps={r['qps']} lengths={r['lengths']}",
        f"wall_s={r['wall_s']:.1f} requests_per_wall_s={r['requests_per_wall_s']:.0f} max_rss_MB={r['max_rss_mb']:.0f}"
        + (f" simulated_time_s={r['simulated_time_s']:.1f}" if r.get("simulated_time_s") is not None else ""),
    ]
    for name in ("e2e", "ttft", "sched_delay", "tpot"):
        lines.append(
            f"{name:12s} " + " ".join(f"{qn}={r[f'{name}_{qn}_s']:.3f}s" for qn in QUANTILES if r[f"{name}_{qn}_s"] is not None)
        )
    lines.append(f"metrics csv: {r['metrics_csv']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vidur-src", required=True, help="prepared Vidur source folder (see module docstring)")
    ap.add_argument("--python", required=True, help="python of Vidur's own virtual environment")
    ap.add_argument("-n", "--num-requests", type=int, default=10000)
    ap.add_argument("-r", "--num-replicas", type=int, default=1)
    ap.add_argument("--scheduler", default="vllm", choices=["vllm", "sarathi", "orca", "lightllm", "faster_transformer"])
    ap.add_argument("--qps", type=float, default=None, help="total Poisson rate (default 2 per replica)")
    ap.add_argument("--lengths", default="trace", choices=["trace", "fixed"])
    ap.add_argument("--trace-file", default=None, help=f"length trace, relative to --vidur-src (default {AZURE_CONV_TRACE})")
    ap.add_argument("--prefill", type=int, default=1024, help="prompt tokens with --lengths fixed")
    ap.add_argument("--decode", type=int, default=200, help="output tokens with --lengths fixed")
    ap.add_argument("--seed", type=int, default=42, help="all of Vidur's request seeds (Vidur default 42)")
    ap.add_argument("--out", required=True, help="output folder (Vidur adds a timestamped subfolder)")
    ap.add_argument("--json", action="store_true", help="print the result dict as JSON")
    ap.add_argument("extra", nargs="*", help="extra Vidur CLI flags, after --")
    a = ap.parse_args(argv)
    qps = a.qps if a.qps is not None else 2.0 * a.num_replicas
    r = run_vidur(a.vidur_src, a.python, a.num_requests, a.num_replicas, a.scheduler, qps, a.lengths, a.trace_file,
                  a.prefill, a.decode, a.out, a.seed, a.extra)
    print(json.dumps(r, indent=1) if a.json else format_summary(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
