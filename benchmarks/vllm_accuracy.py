"""Fig 5 on a real vLLM, and the simulator against the same run (docs/vllm.md, "Profiles and accuracy on real vLLM").

One command (a benchmark, not a test: it runs real engines for minutes and prints numbers)::

    python benchmarks/vllm_accuracy.py [hydra overrides]       # experiment=vllm_cpu_accuracy
    python benchmarks/vllm_accuracy.py --report outputs/vllm_cpu_accuracy/<run>   # print an existing run again
    python benchmarks/vllm_accuracy.py --resim outputs/vllm_cpu_accuracy/<run>    # its sim part again (new profile)

1. A live cluster on loopback: N real vLLM servers (``python -m block.engine.vllm``), server i pinned to core
   ``i mod ncpu`` (``sched_setaffinity`` before the exec: vLLM's compute thread inherits it), one predictor per
   server in proxy mode (stock vLLM has no ``/state``), one scheduler with the configured policy, and the benchmark
   client replaying the workload through the scheduler: the usual run records (``requests.parquet`` with the
   scheduler's predicted e2e at dispatch, ``instances.parquet`` from the predictors' ``/state``, ``summary.json``)
   in ``<run>/emulate``.
2. Fig 5 samples: the requests that the simulator's accuracy draw picks (same seed, same rule as
   ``vidur.cluster.Cluster``) do not go through the scheduler: at their arrival the driver asks every predictor for
   its what-if (e2e and TTFT) and sends a copy to every instance, so each copy's prediction meets its measurement
   (``accuracy.parquet``: sample, id, instance, predicted/actual e2e and TTFT, ``block_pick`` = argmin predicted
   e2e). The copies really run, as in Block's profiling mode.
3. The same config through ``mode=sim`` (the fitted profile, the V1 rule, the same samples): ``<run>/sim``.
4. Prints the errors |predicted - measured| / measured (median, p90), how often the pick is the truly fastest
   instance, sim against real p50/p99 TTFT and E2E, and the load average (1/5/15 min) before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from omegaconf import DictConfig, OmegaConf  # noqa: E402

PRESET = "experiment=vllm_cpu_accuracy"


def compose(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=[PRESET, *overrides])


def sampled_ids(requests: Sequence[Any], rate: float, seed: int) -> set[int]:
    """The requests ``vidur.cluster.Cluster`` duplicates for Fig 5 with this seed and rate (its own random stream,
    one draw per request in arrival order); the run checks the simulator picked the same ones."""
    rng = random.Random(seed * 7919 + 17)
    return {int(r.id) for r in requests if rate > 0 and rng.random() < rate}


# ---------------------------------------------------------------------------------------------------------------
# the live run
# ---------------------------------------------------------------------------------------------------------------


async def _duplicates(cfg: DictConfig, samples: list, predictor_urls: list[str], token: Optional[str],
                      t0: float) -> list[dict[str, Any]]:
    """Fig 5 copies: at each sample's arrival, predict on every instance, then run a copy on every instance."""
    from block.benchmark.client import BenchmarkConfig, Outcome, request_body, send_one
    from block.http import Origin, Pool

    hdr = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    bc = BenchmarkConfig(timeout_s=float(cfg.mode.timeout_s))
    rows: list[dict[str, Any]] = []
    pool = Pool(connect_timeout_s=30.0)
    try:
        origins = [Origin(u) for u in predictor_urls]
        model = str(cfg.model.name)

        async def predict(o: Origin, r: Any) -> dict[str, Any]:
            body = json.dumps({"prompt_tokens": int(r.prompt_tokens),
                               "expected_output_tokens": int(r.output_tokens)}).encode()
            resp = await pool.request("POST", o, "/predict", body, hdr, 30.0)
            data = await resp.read()
            if resp.status_code != 200:
                raise RuntimeError(f"/predict answered {resp.status_code}: {data[:200]!r}")
            return json.loads(data)

        async def one(k: int, r: Any) -> None:
            delay = t0 + float(r.arrival_s) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            arrive = time.perf_counter() - t0
            preds = await asyncio.gather(*(predict(o, r) for o in origins))
            best = min(range(len(preds)), key=lambda i: preds[i]["e2e_s"])
            body = json.dumps(request_body(r, bc, model)).encode()
            outs = [Outcome(int(r.id)) for _ in origins]
            h = {**hdr, "x-request-id": f"dup-{r.id}"}
            await asyncio.gather(*(send_one(pool, o, bc, body, {**h, "x-request-id": f"dup-{r.id}-{i}"}, outs[i], t0)
                                   for i, o in enumerate(origins)))
            for i, (p, o) in enumerate(zip(preds, outs)):
                ok = o.status == "ok"
                rows.append({"sample": k, "id": int(r.id), "instance": i, "arrival_s": arrive,
                             "predicted_e2e_s": float(p["e2e_s"]), "predicted_ttft_s": float(p["ttft_s"]),
                             "actual_e2e_s": (o.last - arrive) if ok else math.nan,
                             "actual_ttft_s": (o.first - arrive) if ok else math.nan,
                             "block_pick": i == best, "dispatched": i == best, "status": o.status,
                             "output_tokens": int(o.usage_out or 0), "expected_output_tokens": int(r.output_tokens),
                             "prompt_tokens": int(r.prompt_tokens), "predict_ms": float(p.get("predict_ms", 0.0))})

        await asyncio.gather(*(one(k, r) for k, r in enumerate(samples)))
    finally:
        await pool.aclose()
    return rows


async def warm_up(engine_urls: Sequence[str], model: str, vocab: int, token: Optional[str], rounds: int = 2) -> float:
    """Send each engine the kinds of steps the run will make before anything is measured: prefills of 16..512
    tokens one by one, then 48 streams of mixed lengths at once (mixed and decode batches up to the cap), as
    benchmarks usually warm a server up: first-time work (CPU kernels built per shape, allocations) stays out of
    the measurement, as it stays out of the profile's rows. (Measured: it did not change the sim/real ratio of the
    run's first half, 0.75 cold vs 0.73 warm, so that difference is not warm-up.) Returns the seconds it took."""
    import httpx

    t0 = time.perf_counter()
    hdr = {"authorization": f"Bearer {token}"} if token else {}
    rng = random.Random(12345)

    async def one(client: httpx.AsyncClient, url: str, n_in: int, n_out: int) -> None:
        body = {"model": model, "prompt": [rng.randrange(100, vocab - 1) for _ in range(n_in)], "max_tokens": n_out,
                "ignore_eos": True, "temperature": 0}
        r = await client.post(url + "/v1/completions", json=body, headers=hdr)
        if r.status_code != 200:
            raise RuntimeError(f"warm-up request to {url} failed: HTTP {r.status_code} {r.text[:200]}")

    async def engine(url: str) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            for _ in range(rounds):
                for n in range(16, 513, 16):
                    await one(client, url, n, 1)
                await asyncio.gather(*(one(client, url, rng.randrange(8, 512), rng.randrange(1, 96))
                                       for _ in range(48)))

    await asyncio.gather(*(engine(u) for u in engine_urls))
    return time.perf_counter() - t0


def run_live(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Part 1 and 2: the vLLM cluster (started as ``mode=emulate mode.engine=vllm`` starts it), the replay through
    the scheduler, the duplicated samples; the records. The stack inherits this process's niceness (``--nice``).

    On CPU ``vllm serve`` always runs the model in a worker process beside the engine core (vLLM's CPU platform
    turns ``--distributed-executor-backend uni`` into ``mp``); pinned to one core they hand each step over through
    busy-polled shared memory, which is why the fitted profile is measured that way (docs/vllm.md)."""
    from block.benchmark.client import BenchmarkConfig, benchmark
    from block.engine.vllm import vllm_executable
    from experiments import wiring
    from experiments.emulate import (DriveResult, _Sampler, _start_vllm, engine_args, scheduler_args, vllm_sized,
                                     write_records)
    from experiments.local_stack import LocalStack

    vllm_executable()  # the install hint before anything starts
    requests = wiring.workload(cfg)
    rate = float(OmegaConf.select(cfg, "accuracy.sampling_rate", default=0.0))
    dup = sampled_ids(requests, rate, int(cfg.seed))
    main_reqs = [r for r in requests if int(r.id) not in dup]
    samples = [r for r in requests if int(r.id) in dup]
    n = int(cfg.cluster.num_instances)
    token = os.environ.get("BLOCK_API_TOKEN")
    run_dir.mkdir(parents=True, exist_ok=True)
    conf_dir = run_dir / "services"
    conf_dir.mkdir(exist_ok=True)
    shared = vllm_sized(cfg, engine_args(cfg, conf_dir))
    load_before = os.getloadavg()
    with LocalStack(run_dir / "logs", token=token, startup_timeout_s=float(cfg.mode.startup_timeout_s)) as stack:
        t_start = time.perf_counter()
        engines = [_start_vllm(stack, cfg, shared, i) for i in range(n)]
        stack.wait_healthy(engines)
        startup_s = time.perf_counter() - t_start
        warm_rounds = int(OmegaConf.select(cfg, "accuracy.warmup_rounds", default=2))
        warm_s = asyncio.run(warm_up([e.url for e in engines], str(cfg.model.name), int(cfg.model.vocab_size), token,
                                     warm_rounds)) if warm_rounds > 0 else 0.0
        predictors = [stack.start(f"predictor{i}", "block.predictor",
                                  [*shared, "--engine-url", e.url, "--instance-id", str(i), "--state-source", "proxy"])
                      for i, e in enumerate(engines)]
        sched = stack.start("scheduler0", "block.scheduler",
                            scheduler_args(cfg, [p.url for p in predictors], conf_dir / "scheduler0.jsonl"))
        stack.wait_healthy()
        bc = BenchmarkConfig(base_url=sched.url, num_requests=len(main_reqs), request_rate=float(cfg.workload.qps),
                             seed=int(cfg.seed), hint=str(cfg.mode.hint), token=token, disable_tqdm=True,
                             max_model_len=int(cfg.engine.max_model_len), timeout_s=float(cfg.mode.timeout_s))

        async def both():
            t0 = time.perf_counter()
            return await asyncio.gather(benchmark(bc, main_reqs),
                                        _duplicates(cfg, samples, [p.url for p in predictors], token, t0))

        with _Sampler([p.url for p in predictors], float(cfg.mode.sample_interval_s), 1.0, token) as sampler:
            res, acc_rows = asyncio.run(both())
        stack.check_alive()
    load_after = os.getloadavg()
    from vidur.records import instances_frame

    drive = DriveResult(res.requests, res.itls_s, instances_frame(sampler.rows))
    acc = pd.DataFrame(acc_rows)
    summary = write_records(cfg, run_dir, main_reqs, drive, mode="emulate", engine="vllm",
                            vllm_startup_s=round(startup_s, 1), warmup_s=round(warm_s, 1),
                            warmup_rounds=warm_rounds, loadavg_before=list(load_before),
                            loadavg_after=list(load_after), accuracy_samples=int(len(samples)), nice=os.nice(0))
    if len(acc):
        acc.to_parquet(run_dir / "accuracy.parquet")
    return summary


def run_sim_same(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Part 3: the same config and workload through the simulator (fitted profile, the engine's rule)."""
    from experiments import wiring
    from experiments.sim import run_sim

    scfg = OmegaConf.merge(cfg, {"mode": {"name": "sim"}})
    ecfg = wiring.validate(scfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_sim(scfg, run_dir, ecfg)


# ---------------------------------------------------------------------------------------------------------------
# the figures
# ---------------------------------------------------------------------------------------------------------------


def _err(pred: pd.Series, actual: pd.Series) -> np.ndarray:
    p, a = pred.to_numpy(float), actual.to_numpy(float)
    ok = np.isfinite(p) & np.isfinite(a) & (a > 0)
    return np.abs(p[ok] - a[ok]) / a[ok]


def _q(v: np.ndarray) -> str:
    if not len(v):
        return "n=0"
    return f"median {100 * np.median(v):.1f} %  p90 {100 * np.quantile(v, 0.9):.1f} %  (n={len(v)})"


def report(run: Path, out=print) -> dict[str, Any]:
    """Print (and return) the accuracy figures of one run directory (``<run>/emulate``, ``<run>/sim``)."""
    live, sim = run / "emulate", run / "sim"
    req = pd.read_parquet(live / "requests.parquet")
    summ = json.loads((live / "summary.json").read_text())
    ok = req[req["status"] == "ok"]
    fig: dict[str, Any] = {"completed": int(len(ok)), "failed": int(len(req) - len(ok))}
    e_disp = _err(ok["predicted_e2e_s"], ok["e2e_s"])
    out(f"run {run}  load average before {summ.get('loadavg_before')}  after {summ.get('loadavg_after')}  "
        f"nice {summ.get('nice', 0)}")
    out(f"requests through the scheduler: {len(ok)} ok, {len(req) - len(ok)} failed; vLLM start-up "
        f"{summ.get('vllm_startup_s')} s, warm-up {summ.get('warmup_s', 0)} s ({summ.get('warmup_rounds', 0)} rounds)")
    out(f"E2E error, dispatched requests (scheduler's prediction at dispatch): {_q(e_disp)}")
    fig["e2e_err_dispatched"] = e_disp.tolist()
    accp = live / "accuracy.parquet"
    if accp.is_file():
        acc = pd.read_parquet(accp)
        good = acc[acc["status"] == "ok"]
        e2e, ttft = _err(good["predicted_e2e_s"], good["actual_e2e_s"]), _err(good["predicted_ttft_s"],
                                                                              good["actual_ttft_s"])
        ttft_abs = (good["predicted_ttft_s"] - good["actual_ttft_s"]).abs().to_numpy() * 1e3
        out(f"Fig 5 samples ({acc['sample'].nunique()} requests x {acc['instance'].nunique()} instances):")
        out(f"  E2E error  {_q(e2e)}")
        out(f"  TTFT error {_q(ttft)}; absolute median {np.median(ttft_abs):.0f} ms p90 "
            f"{np.quantile(ttft_abs, 0.9):.0f} ms" if len(ttft_abs) else "  TTFT: n=0")
        bias = (good["predicted_e2e_s"] / good["actual_e2e_s"]).median() if len(good) else math.nan
        out(f"  median predicted/measured E2E: {bias:.2f}")
        picks = []
        for _, g in good.groupby("sample"):
            if len(g) == acc["instance"].nunique():
                picks.append(bool(g.loc[g["actual_e2e_s"].idxmin(), "block_pick"]))
        if picks:
            out(f"  pick is the truly fastest instance: {np.mean(picks) * 100:.0f} % of {len(picks)} samples")
        fig.update(e2e_err_samples=e2e.tolist(), ttft_err_samples=ttft.tolist(),
                   pick_fastest=float(np.mean(picks)) if picks else None, e2e_bias=float(bias))
    if (sim / "requests.parquet").is_file():
        sreq = pd.read_parquet(sim / "requests.parquet")
        sreq = sreq[sreq["id"].isin(ok["id"])]
        out(f"sim vs real, the {len(sreq)} requests sent through the scheduler (ms; sim/real - 1):")
        for col in ("ttft_s", "tpot_s", "e2e_s"):
            for q in (50, 99):
                r = float(np.percentile(ok[col].dropna(), q)) * 1e3
                s = float(np.percentile(sreq[col].dropna(), q)) * 1e3
                out(f"  p{q} {col[:-2].upper():4s} real {r:8.1f}  sim {s:8.1f}  ({100 * (s / r - 1):+.1f} %)")
                fig[f"p{q}_{col}_real_ms"], fig[f"p{q}_{col}_sim_ms"] = r, s
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/vllm_accuracy.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", default=None, help="print the figures of an existing run directory only")
    ap.add_argument("--out", default=None, help="run directory (default outputs/vllm_cpu_accuracy/<overrides>)")
    ap.add_argument("--no-sim", action="store_true", help="skip the mode=sim comparison")
    ap.add_argument("--resim", default=None, help="run the mode=sim comparison again for an existing run directory "
                    "(its emulate/config.yaml, the profile now fitted: e.g. after re-profiling) and print it")
    ap.add_argument("--nice", type=int, default=0, help="add this to the niceness of this process and so of the "
                    "whole stack (e.g. -10 on a machine busy with other work, so the numbers describe the engines "
                    "more than the neighbours; negative values need root)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (workload.num_requests=40 workload.qps=2 ...)")
    a = ap.parse_args(argv)
    if a.report:
        report(Path(a.report))
        return 0
    if a.resim:
        run = Path(a.resim)
        run_sim_same(OmegaConf.load(run / "emulate" / "config.yaml"), run / "sim")
        report(run)
        return 0
    cfg = compose(a.overrides)
    name = "_".join(o.replace("/", "-").replace("=", "-") for o in a.overrides) or "default"
    run = Path(a.out) if a.out else ROOT / "outputs" / str(cfg.experiment_name) / name
    t0 = time.perf_counter()
    print(f"live run into {run / 'emulate'} (load average {os.getloadavg()})", flush=True)
    if a.nice:
        os.nice(a.nice)
    run_live(cfg, run / "emulate")
    print(f"live run done in {time.perf_counter() - t0:.0f} s", flush=True)
    if not a.no_sim:
        run_sim_same(cfg, run / "sim")
        acc = run / "sim" / "accuracy.parquet"
        if acc.is_file():
            picked = set(pd.read_parquet(acc)["id"].astype(int))
            real = set(pd.read_parquet(run / "emulate" / "accuracy.parquet")["id"].astype(int))
            if picked != real:
                print(f"warning: the simulator duplicated other requests ({sorted(picked ^ real)[:10]}...)")
    report(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
