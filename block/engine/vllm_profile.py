"""Profile a real vLLM engine step by step and fit the simulator's execution model from it.

Two halves, because vLLM lives in its own environment (its pins clash with the main one):

- ``measure`` runs *inside the vLLM environment* and imports nothing of ours beyond this file's standard-library
  top level: it builds vLLM's offline ``LLMEngine`` in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the
  ``EngineCore`` and its scheduler are plain objects here), adds requests whose lengths make the batch shapes of
  :func:`plan` (prefill chunks without and with cached context, decode batches at several KV lengths, and a mixed
  serving-like phase), and times every ``EngineCore`` step (schedule + forward + sampling + scheduler update, the
  span ``ExecutionModel.step_time`` models; detokenisation is left out, it runs in vLLM's API process when
  serving). The batch shape of a step is read from the scheduler's own output, not from what we meant to send, so
  each row is what vLLM really ran. Rows go to a CSV in ``vidur.profile_fit``'s format (plus ``scenario``).
- What a step costs depends on how vLLM runs the model: ``vllm serve`` on CPU always puts it in a worker process
  beside the engine core (vLLM's CPU platform forces the ``mp`` executor) and the two hand every step over through
  busy-polled shared memory -- on one pinned core that is several times the model's own compute. So by default
  (CPU) the profiler builds the same structure (``--executor mp``) and fits wall time (``--clock wall``): the
  step as the served engine takes it. ``--executor uni --clock cpu`` measures the compute alone (this thread's CPU
  time: free of a shared machine's load). On a GPU host the default is ``uni`` and wall time, as served at TP 1.
- ``fit`` runs in the main environment: a seeded hold-out split, ``vidur.profile_fit.fit_steps`` on the rest,
  the held-out error of *that* fit (the saved model is the one the error describes), written as
  ``data/profiling/fitted/<device>/<model profile_name>/tp<N>.json`` -- the path ``ExecutionModel.fit`` loads for
  that device and model, so sim runs, emulated engines and predictors all use it.

``python -m block.engine.vllm_profile --model <conf/model> --engine <conf/engine>`` does both (it starts the vLLM
environment's Python on this file for the first half). The device is named from the hardware
(:func:`device_name`: ``cpu-<CPU model>`` slugified on a CPU host, the GPU's name on a GPU host), never a GPU
name for CPU numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
FITTED_ROOT = REPO_ROOT / "data" / "profiling" / "fitted"
CSV_COLUMNS = ("prefill_chunks", "num_decode", "decode_kv_sum", "step_s", "wall_s", "cpu_s", "scenario")
CLOCKS = ("cpu", "wall")
VLLM_PYTHON_ENV = "BLOCK_VLLM_PYTHON"


# ---------------------------------------------------------------------------------------------------------------
# what to run (pure: no vLLM needed)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    """One request of a scenario: added before engine step ``at`` (0 = before the first step)."""

    at: int
    prompt: int
    output: int


@dataclass
class ProfileConfig:
    """The engine as vLLM is built for profiling, and how much to measure. The engine settings should match the
    served engine (``conf/engine``): the step time depends on the batch, not on these, but the scheduler's budget
    decides which batches occur."""

    model_dir: str
    max_num_seqs: int = 32
    budget: int = 512  # max_num_batched_tokens (= chunk size under chunked prefill)
    block_size: int = 32
    max_model_len: int = 2048
    dtype: str = "bfloat16"
    vocab_size: int = 32000
    enforce_eager: bool = True
    repeats: int = 2
    mixed_steps: int = 150
    seed: int = 0
    quick: bool = False  # a handful of steps (tests)
    clock: str = "cpu"  # what step_s holds: "cpu" (this thread's CPU time) or "wall"; both are kept
    extra_engine_args: dict = field(default_factory=dict)


def plan(cfg: ProfileConfig) -> list[tuple[str, list[Req]]]:
    """The scenarios, each a list of requests run to completion on an empty engine:

    ``prefill``: one prompt of ``c <= budget`` tokens, one output token -> one prefill step of ``c`` tokens, no
    context; ``context``: a prompt longer than the budget -> chunks after ``k * budget`` cached tokens;
    ``decode-b<b>-L<L>``: ``b`` prompts of ``L`` tokens decoding together (KV ``L+1 ...``); ``mixed``: random
    arrivals with random lengths (the mix of steps a served engine runs)."""
    rng = random.Random(cfg.seed)
    B, M = cfg.budget, cfg.max_model_len
    out: list[tuple[str, list[Req]]] = []
    if cfg.quick:
        return [("prefill", [Req(0, min(64, B), 1)]), ("context", [Req(0, min(B + 32, M - 8), 1)]),
                ("decode-b2-L32", [Req(0, 32, 12), Req(0, 32, 12)])]
    chunks = sorted({c for c in (8, 16, 32, 64, 128, 192, 256, 384, 512, 768, 1024) if c <= B} | {B})
    lens = [L for L in (16, 128, 512, 1024, 1536) if L + 16 < M]
    batches = sorted({b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64) if b <= cfg.max_num_seqs} | {cfg.max_num_seqs})
    for _ in range(cfg.repeats):
        for c in chunks:
            out.append((f"prefill-c{c}", [Req(0, c, 1)]))
        for k in (1, 2, 3):
            for tail in (32, B // 4, B // 2, B):
                p = k * B + tail
                if p + 1 < M:
                    out.append((f"context-k{k}", [Req(0, p, 1)]))
        for b in batches:
            for L in lens:
                n_out = 6 if b * L <= 8 * B else 4
                out.append((f"decode-b{b}-L{L}", [Req(0, L, n_out) for _ in range(b)]))
    mixed: list[Req] = []
    step = 0
    while step < cfg.mixed_steps:
        step += rng.choice((1, 1, 2, 3, 5))
        p = min(int(rng.lognormvariate(5.0, 1.0)) + 4, M // 2)
        o = min(int(rng.lognormvariate(3.5, 0.8)) + 2, M - p - 1)
        mixed.append(Req(step, p, max(o, 1)))
    out.append(("mixed", mixed))
    return out


def step_shape(num_scheduled: dict[str, int], requests: dict[str, Any]) -> tuple[list[tuple[int, int]], int, int]:
    """(prefill chunks [(tokens, cached)], decode sequences, their KV sum incl. the new token) of one scheduled
    step, from vLLM's ``SchedulerOutput.num_scheduled_tokens`` and the scheduler's request table. Called after
    ``schedule()``, which has already advanced ``num_computed_tokens`` by the scheduled count."""
    chunks: list[tuple[int, int]] = []
    b = kv = 0
    for rid, n in num_scheduled.items():
        r = requests[rid]
        before = int(r.num_computed_tokens) - int(n)
        if n == 1 and before >= int(r.num_prompt_tokens):
            b += 1
            kv += before + 1
        else:
            chunks.append((int(n), before))
    return chunks, b, kv


def format_chunks(chunks: Sequence[tuple[int, int]]) -> str:
    """``vidur.profile_fit``'s ``prefill_chunks`` cell (kept here so the vLLM side imports nothing of ours)."""
    return ";".join(f"{int(c)}:{int(k)}" for c, k in chunks)


# ---------------------------------------------------------------------------------------------------------------
# the vLLM side (runs in the vLLM environment)
# ---------------------------------------------------------------------------------------------------------------


def _build_engine(cfg: ProfileConfig):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # EngineCore in this process: steps are ours
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine
    except ImportError as err:
        raise SystemExit(f"vLLM is not importable by {sys.executable} ({err}): run python -m "
                         "block.engine.vllm_install, or name vLLM's Python with --python / $BLOCK_VLLM_PYTHON") from err

    ea = EngineArgs(model=cfg.model_dir, load_format="dummy", dtype=cfg.dtype, block_size=cfg.block_size,
                    max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.budget, enable_chunked_prefill=True,
                    max_model_len=cfg.max_model_len, enforce_eager=cfg.enforce_eager, enable_prefix_caching=False,
                    disable_log_stats=True, seed=cfg.seed, **cfg.extra_engine_args)
    eng = LLMEngine.from_engine_args(ea)
    core = getattr(eng.engine_core, "engine_core", None)
    if core is None or not hasattr(core, "scheduler"):
        raise RuntimeError("vLLM's engine core is not in this process (set VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    return eng, core


class _StepRecorder:
    """Wraps the in-process ``EngineCore``: the scheduler's ``schedule`` reports each step's batch, ``step_fn`` is
    timed around schedule + execute + update, by the wall clock (``perf_counter``; on a GPU the sampled tokens are
    copied to the host inside the step, which synchronises) and by this thread's CPU time (``thread_time``). On a
    CPU engine with one compute thread (``VLLM_CPU_OMP_THREADS_BIND`` = one core) the CPU time is the step's own
    work without the time the OS gave the core to other processes -- on a shared machine the wall clock is mostly
    a measure of the neighbours; on a GPU only the wall clock means anything."""

    def __init__(self, core: Any) -> None:
        self.core, self.sched = core, core.scheduler
        self.rows: list[tuple[str, int, int, float, float, str]] = []
        self.scenario = ""
        self._shape: Optional[tuple[list[tuple[int, int]], int, int]] = None
        orig_schedule, orig_step = self.sched.schedule, core.step_fn

        def schedule(*a: Any, **k: Any) -> Any:
            so = orig_schedule(*a, **k)
            self._shape = step_shape(dict(so.num_scheduled_tokens), self.sched.requests)
            return so

        def step_fn(*a: Any, **k: Any) -> Any:
            self._shape = None
            t0, c0 = time.perf_counter(), time.thread_time()
            res = orig_step(*a, **k)
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            sh = self._shape
            if sh is not None and (sh[0] or sh[1]):
                self.rows.append((format_chunks(sh[0]), sh[1], sh[2], dt, dc, self.scenario))
            return res

        self.sched.schedule = schedule
        core.step_fn = step_fn


def run_scenario(eng: Any, reqs: Sequence[Req], vocab: int, rng: random.Random, prefix: str) -> int:
    """Add ``reqs`` at their steps, step until all finished; returns the number of engine steps."""
    from vllm import SamplingParams

    pending = sorted(reqs, key=lambda r: r.at)
    i = steps = 0
    while i < len(pending) or eng.has_unfinished_requests():
        while i < len(pending) and pending[i].at <= steps:
            r = pending[i]
            ids = [rng.randrange(100, vocab - 1) for _ in range(r.prompt)]
            eng.add_request(f"{prefix}-{i}", {"prompt_token_ids": ids},
                            SamplingParams(max_tokens=r.output, ignore_eos=True, temperature=0.0))
            i += 1
        eng.step()
        steps += 1
    return steps


def measure(cfg: ProfileConfig, out_csv: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run :func:`plan` on a fresh in-process vLLM engine; write one CSV row per step. Returns timings."""
    t0 = time.perf_counter()
    eng, core = _build_engine(cfg)
    t_start = time.perf_counter() - t0
    rng = random.Random(cfg.seed)
    run_scenario(eng, [Req(0, min(cfg.budget, 256), 4), Req(0, 32, 4)], cfg.vocab_size, rng, "warmup")
    rec = _StepRecorder(core)
    scenarios = plan(cfg)
    t1 = time.perf_counter()
    for j, (name, reqs) in enumerate(scenarios):
        rec.scenario = name
        run_scenario(eng, reqs, cfg.vocab_size, rng, f"s{j}")
    t_measure = time.perf_counter() - t1
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for chunks, b, kv, wall, cpu, name in rec.rows:
            step = cpu if cfg.clock == "cpu" else wall
            w.writerow([chunks, b, kv, f"{step:.7f}", f"{wall:.7f}", f"{cpu:.7f}", name])
    info = {"steps": len(rec.rows), "scenarios": len(scenarios), "startup_s": round(t_start, 2),
            "measure_s": round(t_measure, 2), "loadavg": list(os.getloadavg()), "vllm": _vllm_version()}
    log(json.dumps(info))
    return info


def _vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # noqa: BLE001 - only a label
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# device name, the vLLM interpreter
# ---------------------------------------------------------------------------------------------------------------


def slug(text: str) -> str:
    """``AMD EPYC 7763 64-Core Processor`` -> ``amd-epyc-7763-64-core-processor``."""
    s = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")


def cpu_model_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def device_name(cpu: bool = True, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The device label used for the fitted profile folder and ``gpu=``: ``cpu-<slug of the CPU model>`` for a
    CPU engine (so CPU numbers can never pass for a GPU's); on a GPU host, the slug of the CUDA device's name."""
    if cpu:
        return "cpu-" + slug(cpu_model_name(cpuinfo))
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    return slug(out[0].replace("NVIDIA", ""))


def vllm_python() -> str:
    """The Python that has vLLM: ``$BLOCK_VLLM_PYTHON``, else the venv of ``python -m block.engine.vllm_install``
    (``$BLOCK_VLLM_VENV`` or its default), else this interpreter (which then must import vLLM itself)."""
    env = os.environ.get(VLLM_PYTHON_ENV)
    if env:
        return env
    from block.engine.vllm_install import default_venv, venv_bin

    py = venv_bin(default_venv(), "python")
    return str(py) if py.is_file() else sys.executable


# ---------------------------------------------------------------------------------------------------------------
# the fit (main environment)
# ---------------------------------------------------------------------------------------------------------------


def fit_and_save(steps_csv: Path, model_cfg: Any, gpu_cfg: Any, out_json: Path, tp: int = 1,
                 holdout: float = 0.2, seed: int = 0, meta: Optional[dict] = None,
                 serving: Any = None) -> dict[str, Any]:
    """Fit on a seeded ``1 - holdout`` share of the measured steps and save that fit; its error on the held-out
    steps (mean and p90 absolute relative error, per phase) goes into the JSON's ``holdout``.

    With ``serving`` (a :class:`block.engine.vllm_serve_calibration.ServeCalibration` of the served engine), the
    first fit is the engine's own step; what serving adds per step is fitted against it
    (:func:`~block.engine.vllm_serve_calibration.overhead`), added to every row and the model refitted, so the
    saved model is the step as ``vllm serve`` takes it (held-out error then against the served rows)."""
    import numpy as np

    from vidur.profile_fit import fit_steps, read_steps, to_params
    from vidur.specs import GpuSpec, ModelSpec

    steps, times = read_steps(steps_csv)
    if len(steps) < 10:
        raise ValueError(f"{steps_csv}: {len(steps)} steps are too few to fit and hold some out")
    rng = np.random.default_rng(seed)
    test = rng.random(len(steps)) < holdout
    if not test.any():
        test[int(rng.integers(len(steps)))] = True
    train_idx, test_idx = np.nonzero(~test)[0], np.nonzero(test)[0]
    fit = fit_steps([steps[i] for i in train_idx], times[train_idx])
    model, gpu = ModelSpec.from_dict(model_cfg), GpuSpec.from_dict(gpu_cfg)
    params = to_params(fit, model, gpu, tp, source=f"vLLM steps measured by block.engine.vllm_profile "
                                                   f"({len(train_idx)} of {len(steps)} steps)")
    from vidur.execution_model import ExecutionModel

    em = ExecutionModel(params)
    served = None
    if serving is not None:
        from block.engine.vllm_serve_calibration import overhead, served_steps

        ov = overhead(serving, em)
        times = served_steps(steps, times, ov)
        fit = fit_steps([steps[i] for i in train_idx], times[train_idx])
        params = to_params(fit, model, gpu, tp, source=f"vLLM steps measured by block.engine.vllm_profile "
                                                       f"({len(train_idx)} of {len(steps)} steps) plus what "
                                                       "vllm serve adds per step (block.engine.vllm_serve_calibration)")
        em = ExecutionModel(params)
        served = {"calibration": serving.to_json(), "per_step_ms": ov.per_step_s * 1e3,
                  "per_seq_ms": ov.per_seq_s * 1e3, "first_token_ms": ov.first_s * 1e3,
                  "residual_ms": {str(k): v for k, v in ov.residual_ms.items()},
                  "served_itl_vs_model_ms": {str(b): [cal * 1e3, em.step_time([], b, b * serving.steady_kv_each) * 1e3]
                                             for b, cal in serving.itl_s.items()}}
    pred = np.array([em.step_time(*steps[i]) for i in test_idx])
    err = np.abs(pred - times[test_idx]) / times[test_idx]
    kinds = np.array(["decode" if not steps[i][0] else ("mixed" if steps[i][1] else "prefill") for i in test_idx])
    held = {"n": int(len(test_idx)), "mape": float(err.mean()), "p50": float(np.median(err)),
            "p90": float(np.quantile(err, 0.9)), "seed": seed, "fraction": holdout}
    for k in ("prefill", "decode", "mixed"):
        m = kinds == k
        if m.any():
            held[k] = {"n": int(m.sum()), "mape": float(err[m].mean()), "p90": float(np.quantile(err[m], 0.9))}
    params["holdout"] = {"train_steps": fit["train"], "test_steps": held}
    params["notes"] = [f"measured on {gpu.name} with vLLM in-process; step = EngineCore schedule + forward + "
                       "update, detokenisation excluded" + (
                           "; plus what vllm serve adds (see serving)" if served else ""),
                       *(f"{k}: {v}" for k, v in (meta or {}).items())]
    if served:
        params["serving"] = served
    from vidur.records import write_atomic

    write_atomic(out_json, json.dumps(params).encode())
    return params


def engine_budget(e: dict) -> int:
    """vLLM's ``--max-num-batched-tokens`` for a conf/engine dict (the rule in ``block.engine.vllm.vllm_command``:
    the V1 rule's budget is ``max_num_batched_tokens``; V0 chunked prefill used ``chunk_size``)."""
    if str(e.get("scheduler", "v0")) == "v1" or not e.get("chunked_prefill", True):
        return int(e["max_num_batched_tokens"])
    return int(e.get("chunk_size") or e["max_num_batched_tokens"])


def fitted_path(device: str, model_profile_name: str, tp: int = 1, root: Path = FITTED_ROOT) -> Path:
    return root / device / model_profile_name / f"tp{tp}.json"


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def _measure_main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="vllm_profile.py measure")
    ap.add_argument("config_json")
    ap.add_argument("out_csv")
    a = ap.parse_args(argv)
    measure(ProfileConfig(**json.loads(Path(a.config_json).read_text())), Path(a.out_csv))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m block.engine.vllm_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama2_7b", help="conf/model name or YAML path")
    ap.add_argument("--engine", default="vllm_chunked", help="conf/engine name or YAML path (batch cap, budget, "
                                                              "block size, max_model_len)")
    ap.add_argument("--gpu", default=None, help="conf/gpu entry whose spec goes into the JSON (default: the "
                                                 "detected device's, which must exist)")
    ap.add_argument("--device", default=None, help="device folder name (default: detected, e.g. cpu-amd-epyc)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", default=None, help="fitted JSON (default data/profiling/fitted/<device>/<model>/tp<N>"
                                                ".json, where ExecutionModel.fit finds it)")
    ap.add_argument("--steps-csv", default=None, help="where to keep the measured steps (default beside --out "
                                                      "as tp<N>.steps.csv); with --fit-only, the CSV to fit")
    ap.add_argument("--fit-only", action="store_true", help="fit an existing --steps-csv, measure nothing")
    ap.add_argument("--python", default=None, help=f"vLLM's Python (default ${VLLM_PYTHON_ENV}, the launcher's "
                                                    "venv, or this one)")
    ap.add_argument("--cpus", default=None, help="pin the measuring process to these cores (taskset -c)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CPU, float16 on a GPU")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mixed-steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=CLOCKS, default="wall", help="what the fit uses as step time: wall time "
                    "(default: what a client sees) or the measuring thread's CPU time (with --executor uni on CPU: "
                    "the step's own compute, free of a shared machine's load; meaningless on a GPU)")
    ap.add_argument("--executor", choices=("uni", "mp"), default=None, help="mp (default on CPU): the model in a "
                    "worker process beside the engine core, as `vllm serve` always runs it on CPU (each step is "
                    "handed over through busy-polled shared memory); uni (default on a GPU host, as vllm serve runs "
                    "TP 1 there): in the engine core's process")
    ap.add_argument("--quick", action="store_true", help="a few steps only (a smoke test, not a profile)")
    ap.add_argument("--gpu-host", action="store_true", help="profile on the GPU (device named from nvidia-smi)")
    ap.add_argument("--serve-calibration", choices=("auto", "on", "off"), default="auto", help="also measure "
                    "`vllm serve` itself (inter-token latency at 1-32 streams, a lone TTFT; pinned to --cpus) and "
                    "fit what serving adds to each step into the model (block.engine.vllm_serve_calibration); "
                    "auto: on for a CPU host (there the API server shares the model's core), off on a GPU host. "
                    "Kept as tp<N>.serve.json beside the steps, reused by --fit-only")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["measure"]:
        _measure_main(argv[1:])
        return 0
    from block.engine.config import load_conf
    from block.engine.vllm import prepare_model_dir

    a = build_parser().parse_args(argv)
    m, e = load_conf("model", a.model), load_conf("engine", a.engine)
    device = a.device or device_name(cpu=not a.gpu_host)
    executor = a.executor or ("uni" if a.gpu_host else "mp")
    g = load_conf("gpu", a.gpu or device)
    out = Path(a.out) if a.out else fitted_path(device, str(m["profile_name"]), a.tp)
    steps_csv = Path(a.steps_csv) if a.steps_csv else out.with_name(f"tp{a.tp}.steps.csv")
    t0 = time.perf_counter()
    meta: dict[str, Any] = {"device": device, "engine": str(e.get("name")), "loadavg_before": os.getloadavg(),
                            "clock": a.clock, "executor": executor,
                            "cpus": a.cpus, "nice": os.nice(0)}
    if not a.fit_only:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "block-repro" / "vllm-models"
        mdir = prepare_model_dir(m, cache / str(m["name"]).replace("/", "__"))
        budget = engine_budget(e)
        pc = ProfileConfig(model_dir=str(mdir), max_num_seqs=int(e["max_num_seqs"]), budget=budget,
                           block_size=int(e.get("block_size", 32)),
                           max_model_len=int(e.get("max_model_len") or m.get("max_model_len", 2048)),
                           dtype=a.dtype or str(e.get("dtype") or ("float16" if a.gpu_host else "bfloat16")),
                           enforce_eager=bool(e.get("enforce_eager", not a.gpu_host)),
                           vocab_size=int(m["vocab_size"]), repeats=a.repeats, mixed_steps=a.mixed_steps,
                           seed=a.seed, quick=a.quick, clock=a.clock, extra_engine_args=(
                               {"distributed_executor_backend": "mp"} if executor == "mp" else {}))
        steps_csv.parent.mkdir(parents=True, exist_ok=True)
        cfg_file = steps_csv.with_suffix(".config.json")
        cfg_file.write_text(json.dumps(asdict(pc)))
        cmd = [a.python or vllm_python(), str(Path(__file__).resolve()), "measure", str(cfg_file), str(steps_csv)]
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
        if a.cpus:
            cmd = ["taskset", "-c", a.cpus, *cmd]
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", a.cpus)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        cfg_file.unlink(missing_ok=True)
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-4000:])
            print(f"error: the measuring process failed (exit {r.returncode})", file=sys.stderr)
            return 1
        last = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if last:
            meta.update(json.loads(last[-1]))
    serving = None
    serve_json = steps_csv.with_name(f"tp{a.tp}.serve.json")
    if a.serve_calibration == "on" or (a.serve_calibration == "auto" and not a.gpu_host):
        from block.engine import vllm_serve_calibration as cal

        if a.fit_only and serve_json.is_file():
            serving = cal.load(serve_json)
        elif a.fit_only and a.serve_calibration == "auto":
            print(f"note: no {serve_json.name} beside the steps: fitting the engine steps alone", file=sys.stderr)
        else:
            print("measuring what vllm serve adds per step ...", file=sys.stderr, flush=True)
            serving = cal.calibrate(a.model, a.engine, a.cpus, batches=(1, 2) if a.quick else cal.BATCHES,
                                    out_tokens=48 if a.quick else cal.OUT_TOKENS,
                                    log=lambda s: print(s, file=sys.stderr, flush=True))
            cal.save(serving, serve_json)
    params = fit_and_save(steps_csv, m, g, out, a.tp, seed=a.seed, meta=meta, serving=serving)
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"out": str(out), "steps_csv": str(steps_csv), **meta, "holdout": params["holdout"],
                      "serving": {k: v for k, v in params.get("serving", {}).items() if k != "calibration"}},
                     default=str))
    return 0


if __name__ == "__main__":
    # run as a file in the vLLM environment: this folder (block/engine, with our vllm.py) must not shadow vLLM
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(_here)]
    sys.exit(main())
