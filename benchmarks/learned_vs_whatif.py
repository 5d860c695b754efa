"""Simulation-based prediction (Block's what-if) against learned prediction, and the residual correction.

    python -m benchmarks.learned_vs_whatif                  # all three tables (a few minutes on one core)
    python -m benchmarks.learned_vs_whatif --quick          # fewer requests and QPS points
    python -m benchmarks.learned_vs_whatif --only accuracy  # or: capacity, residual

Setting: A30 Llama-2-7B instances (``--instances``, default 4), ShareGPT with oracle lengths, Poisson arrivals,
vLLM V0 chunked prefill, seed 0; every number comes from the simulator, in this process, one run after another.

1. **accuracy** -- on one Block run (k = all, ``--accuracy-qps``) three predictors of the chosen instance's E2E are
   made at every decision and compared with the request's actual E2E: the what-if (``vidur.whatif``), the what-if
   corrected by the learned residual (``vidur.residual``) and a learned model (``vidur.learned.OnlineGBDT``, the
   RouteBalance-style pooled E2E model on llm-d's features, trained online from the run's own finished requests).
   Median and p90 relative error over the requests decided after the learned model's warm-up (the same requests
   for all three), and the decision cost per candidate (µs: one what-if vs one row of the learned model's batched
   call, measured at the same decisions).
2. **capacity** -- every policy, old and new, on the same workloads at a grid of QPS: P99 TTFT and the capacity at
   the SLO (``--slo``; linear interpolation between the last QPS within it and the first above it, the paper's
   rule), median decision time per request from the run records.
3. **residual** -- Block with the what-if deliberately wrong (predicted times x 0.8, 1.0, 1.25: a profile 20 %
   too fast, right, 25 % too slow) with the residual correction on and off: median/p90 error of the E2E it acted
   on (after 200 outcomes) and capacity.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from block.policies import make_policy  # noqa: E402
from block.policies.residual import STATE_KEY  # noqa: E402
from data import WorkloadConfig, build_workload  # noqa: E402
from experiments.wiring import REPO_ROOT, profile_root  # noqa: E402
from vidur.cluster import Cluster  # noqa: E402
from vidur.engine import Engine  # noqa: E402
from vidur.execution_model import ExecutionModel  # noqa: E402
from vidur.learned import OnlineGBDT, error_summary, features  # noqa: E402
from vidur.memory import kv_capacity_blocks  # noqa: E402
from vidur.outcomes import drain, open_outcomes  # noqa: E402
from vidur.policy_contract import RoutingPolicy  # noqa: E402
from vidur.records import requests_frame, summarize  # noqa: E402
from vidur.residual import ResidualCorrector  # noqa: E402
from vidur.specs import GpuSpec, ModelSpec  # noqa: E402
from vidur.types import EngineConfig  # noqa: E402

# (label, policy, k, parameters): every policy, old and new, on the same workloads
POLICIES = [("round_robin", "round_robin", None, {}), ("llumnix", "llumnix", None, {}),
            ("block_nosim k=2", "block_nosim", 2, {}), ("block k=2", "block", 2, {}),
            ("block k=all", "block", None, {}), ("lmetric", "lmetric", None, {}), ("llmd", "llmd", None, {}),
            ("llmd_latency", "llmd_latency", None, {}),
            ("llmd_latency most", "llmd_latency", None, {"selection": "most"}),
            ("llmd_latency best", "llmd_latency", None, {"selection": "best"}),
            ("routebalance", "routebalance", None, {})]


def setup() -> tuple[Any, EngineConfig]:
    model = ModelSpec.from_dict(OmegaConf.load(REPO_ROOT / "conf/model/llama2_7b.yaml"))
    gpu = GpuSpec.from_dict(OmegaConf.load(REPO_ROOT / "conf/gpu/a30.yaml"))
    em = ExecutionModel.fit(model, gpu, profile_root=profile_root())
    return em, EngineConfig(num_blocks=kv_capacity_blocks(model, gpu))


def workload(n: int, qps: float, seed: int = 0) -> list:
    return build_workload(WorkloadConfig(dataset="sharegpt", num_requests=n, qps=qps, wrap=True,
                                         predicted_length="oracle", seed=seed))


def run(policy: RoutingPolicy, n_inst: int, reqs: list, em, ecfg) -> tuple[Cluster, Any]:
    cl = Cluster([Engine(ecfg, em, i) for i in range(n_inst)], policy, seed=0, sample_interval_s=0)
    return cl, requests_frame(cl.run(reqs).requests)


# ------------------------------------------------------------------------------------------------ 1. accuracy
def accuracy(n_inst: int, n_req: int, qps: float, em, ecfg, warmup: int = 300) -> None:
    """One Block run (k = all); three predictors of the chosen instance's E2E at every decision (module doc)."""
    block = make_policy("block", k=None)
    gbdt = OnlineGBDT(min_samples=warmup, refit_every=200)
    corr = ResidualCorrector(total_blocks=ecfg.num_blocks)
    rec: dict[int, dict[str, float]] = {}
    pending: dict[int, tuple] = {}
    cost = {"whatif_us": [], "learned_us": []}
    holder: dict[str, Cluster] = {}

    def choose(req, cands, ctx):
        open_outcomes(ctx.state)
        for o in drain(ctx.state, ctx.now_s):
            hit = pending.pop(o.request_id, None)
            if hit is not None:
                row, raw, told = hit
                gbdt.add(row, o.e2e_s)
                corr.observe(raw, o.prompt_tokens, told, o.e2e_s, o.ttft_s)
        pick = block.choose(req, cands, ctx)
        engines = holder["cl"].engines
        told = req.expected_output_tokens()
        t0 = time.perf_counter()
        rows = {c.instance_id: features(engines[c.instance_id].stats(), req.prompt_tokens, told) for c in cands}
        learned = gbdt.predict(list(rows.values())) if gbdt.ready else None
        dt = time.perf_counter() - t0
        raw = next(c.prediction for c in cands if c.instance_id == pick)
        if learned is not None:
            cost["learned_us"].append(dt / len(cands) * 1e6)
            cost["whatif_us"].append(float(np.mean([c.prediction.predict_ms for c in cands])) * 1e3)
            rec[req.id] = {"whatif": raw.e2e_s, "learned": float(learned[list(rows).index(pick)]),
                           "residual": corr.correct(raw, req.prompt_tokens, told).e2e_s}
        pending[req.id] = (rows[pick], raw, told)
        return pick

    pol = RoutingPolicy("block+shadow", choose, signal="prediction", k=None)
    reqs = workload(n_req, qps)
    cl = Cluster([Engine(ecfg, em, i) for i in range(n_inst)], pol, seed=0, sample_interval_s=0)
    holder["cl"] = cl
    df = requests_frame(cl.run(reqs).requests).set_index("id")
    ids = [i for i in rec if i in df.index and df.loc[i, "status"] == "ok"]
    actual = [float(df.loc[i, "e2e_s"]) for i in ids]
    print(f"\n## 1. Accuracy of the predicted E2E of the chosen instance ({n_inst} instances, block k=all, "
          f"{qps} QPS, {n_req} requests; {len(ids)} requests after the learned model's {warmup}-outcome warm-up)")
    print(f"{'predictor':<34} {'median err':>10} {'p90 err':>8} {'µs / candidate':>15}")
    for key, label, us in (("whatif", "what-if (simulation)", np.median(cost["whatif_us"])),
                           ("residual", "what-if + learned residual", np.median(cost["whatif_us"])),
                           ("learned", "learned E2E (LightGBM, online)", np.median(cost["learned_us"]))):
        s = error_summary([rec[i][key] for i in ids], actual)
        print(f"{label:<34} {s['median_error']:>10.3f} {s['p90_error']:>8.3f} {us:>15.1f}")
    print(f"(learned model: {gbdt.fits} refits, {gbdt.fit_s:.2f} s of refitting in total, not in the µs column)")


# ------------------------------------------------------------------------------------------------ 2. capacity
def capacity_of(points: list[tuple[float, float]], slo: float) -> str:
    """The paper's rule: interpolate between the last QPS within the SLO and the first above it."""
    pts = sorted(points)
    prev: Optional[tuple[float, float]] = None
    for q, p99 in pts:
        if not (p99 <= slo):
            if prev is None:
                return f"<{q:g}"
            q0, y0 = prev
            return f"{q0 + (slo - y0) * (q - q0) / (p99 - y0):.2f}" if math.isfinite(p99) else f"{q0:.2f}"
        prev = (q, p99)
    return f">={pts[-1][0]:g}"


def capacity(n_inst: int, n_req: int, grid: list[float], slo: float, em, ecfg, policies=POLICIES) -> None:
    print(f"\n## 2. Capacity at P99 TTFT <= {slo:g} s ({n_inst} instances, {n_req} requests per point, "
          f"QPS grid {grid}; P99 TTFT in s per point)")
    print(f"{'policy':<20} " + " ".join(f"{q:>7g}" for q in grid) + f" {'capacity':>9} {'decision µs':>11}")
    loads = {q: workload(n_req, q) for q in grid}
    for label, name, k, params in policies:
        pts, dec = [], []
        for q in grid:
            _, df = run(make_policy(name, k=k, **params), n_inst, loads[q], em, ecfg)
            s = summarize(df)
            pts.append((q, s["p99_ttft_ms"] / 1e3))
            dec.append(float(np.nanmedian(df["decision_ms"])) * 1e3)
        print(f"{label:<20} " + " ".join(f"{p:>7.2f}" for _, p in pts) + f" {capacity_of(pts, slo):>9} "
              f"{np.median(dec):>11.0f}", flush=True)


# ------------------------------------------------------------------------------------------------ 3. residual
def residual(n_inst: int, n_req: int, grid: list[float], slo: float, em, ecfg, skip: int = 200) -> None:
    print(f"\n## 3. Residual correction with a wrong what-if ({n_inst} instances, block_residual k=2, {n_req} "
          f"requests; error after the first {skip} outcomes at {grid[len(grid) // 2]:g} QPS)")
    print(f"{'what-if x':>9} {'residual':>8} {'median err':>10} {'p90 err':>8} {'capacity':>9}")
    loads = {q: workload(n_req, q) for q in grid}
    mid = grid[len(grid) // 2]
    for scale in (0.8, 1.0, 1.25):
        for on in (False, True):
            pts = []
            err = None
            for q in grid:
                cl, df = run(make_policy("block_residual", k=2, whatif_scale=scale, residual=on), n_inst,
                             loads[q], em, ecfg)
                pts.append((q, summarize(df)["p99_ttft_ms"] / 1e3))
                if q == mid:
                    log = [(u, a) for _, _, u, a in cl.policy_state[STATE_KEY].log[skip:] if math.isfinite(a)]
                    err = error_summary([u for u, _ in log], [a for _, a in log])
            print(f"{scale:>9g} {'on' if on else 'off':>8} {err['median_error']:>10.3f} {err['p90_error']:>8.3f} "
                  f"{capacity_of(pts, slo):>9}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 requests, three QPS points")
    ap.add_argument("--only", choices=("accuracy", "capacity", "residual"), default=None)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--requests", type=int, default=None, help="per run (default 3000; --quick 1000)")
    ap.add_argument("--grid", type=float, nargs="*", default=None, help="QPS points (default 8 9 10 11 12)")
    ap.add_argument("--accuracy-qps", type=float, default=None, help="default: the grid's second point")
    ap.add_argument("--slo", type=float, default=3.0, help="P99 TTFT SLO in seconds")
    ap.add_argument("--policies", nargs="*", default=None, help="capacity table: only these labels (see POLICIES)")
    args = ap.parse_args(argv)
    n_req = args.requests or (1000 if args.quick else 3000)
    grid = args.grid or ([8.0, 10.0, 12.0] if args.quick else [8.0, 9.0, 10.0, 11.0, 12.0])
    t0 = time.perf_counter()
    em, ecfg = setup()
    print(f"# learned vs what-if: A30 Llama-2-7B, ShareGPT (oracle lengths), seed 0, {ecfg.num_blocks} KV blocks")
    if args.only in (None, "accuracy"):
        accuracy(args.instances, n_req, args.accuracy_qps or grid[min(1, len(grid) - 1)], em, ecfg)
    if args.only in (None, "capacity"):
        chosen = [p for p in POLICIES if args.policies is None or p[0] in args.policies]
        capacity(args.instances, n_req, grid, args.slo, em, ecfg, chosen)
    if args.only in (None, "residual"):
        residual(args.instances, n_req, grid, args.slo, em, ecfg)
    print(f"\n(wall {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
