"""Simulated requests per wall second of Fig 6 runs (12 A30s, Llama-2-7B, chunk 512, batch cap 48, ShareGPT).

    python -m benchmarks.fig6_speed [--policies block_oracle block_star] [--qps 20 24 28 32 36] [--requests 10000]

Each point is one ``python -m experiments.run experiment=fig6 policy=P workload.qps=Q`` in a fresh process (as the
preset runs it), written under ``--out`` (default outputs/bench_fig6_speed) with ``force=true``. Prints the event
loop's simulated requests per wall second (``sim_requests_per_wall_s`` of the run's summary) and the process's
whole wall time (start-up, workload, loop, records). Goal (issue 17): block with k = 12 at >= 5,000 simulated
requests per wall second at every Fig 6 QPS. The machine's load average is printed with each row: ratios from one
run, on a quiet machine.

``--compiled`` runs every point twice, plain Python then the compiled build (``BLOCK_REPRO_SPEEDUPS=1``; build it
first: ``python -m vidur.speedups build``), and prints both rates and their ratio; the two runs' records must be the
same (checked, request by request, timing columns aside).

``--baseline DIR`` compares this checkout with another one (e.g. ``git worktree add /tmp/base <commit>``; it runs
from its own folder, first on ``PYTHONPATH``), each point ``--repeat`` times per checkout, the two alternating so that
a busy machine slows both alike; prints the best and median rate of each and their ratios, and checks that the two
wrote the same records ("yes"; "~1e-09": the same but for floating-point columns within 1e-9, relative, as when one
checkout sums the same step times in another order). With ``BLOCK_REPRO_SPEEDUPS=1`` in this command's environment
both use their compiled build (each checkout's own: build it in each first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(policy: str, qps: float, n: int, out: Path, extra: list[str], compiled: bool = False,
        tree: Path = ROOT, name: str = "") -> tuple[float, dict]:
    """Run one Fig 6 point in a fresh process (with the compiled build: ``compiled``) of the checkout ``tree``;
    return (process wall s, summary)."""
    name = name or f"{policy}-q{qps:g}" + ("-compiled" if compiled else "")
    args = [sys.executable, "-m", "experiments.run", "experiment=fig6", f"policy={policy}", f"workload.qps={qps:g}",
            f"workload.num_requests={n}", f"output_root={out}", f"experiment_name={name}", "progress=false",
            "force=true", f"hydra.run.dir={out / name}", *extra]
    env = {k: v for k, v in os.environ.items() if k != "BLOCK_REPRO_SPEEDUPS"}
    if compiled:
        env["BLOCK_REPRO_SPEEDUPS"] = "1"
    if tree != ROOT:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=tree, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    if summary.get("compiled_sim", False) != compiled:
        raise RuntimeError(f"{name}: the compiled build was {'not ' if compiled else ''}in use "
                           f"({proc.stderr[-1000:]}); build it: python -m vidur.speedups build")
    return wall, summary


def same_records(a: Path, b: Path, rtol: float = 0.0) -> str:
    """Whether two runs wrote the same per-request records (the decision's own wall time aside): "yes" when equal,
    "~<rtol>" when every column is equal but floating-point ones that differ within ``rtol`` (relative: two checkouts
    that sum the same times in another order, e.g. the overlaid future's predictions, 1e-13 apart), "" otherwise."""
    import numpy as np
    import pandas as pd

    x, y = (pd.read_parquet(p / "requests.parquet").drop(columns=["decision_ms"]) for p in (a, b))
    if x.equals(y):
        return "yes"
    if not rtol or list(x.columns) != list(y.columns) or len(x) != len(y):
        return ""
    for col in x.columns:
        u, v = x[col], y[col]
        if u.equals(v):
            continue
        if not (pd.api.types.is_float_dtype(u) and pd.api.types.is_float_dtype(v)
                and np.allclose(u.to_numpy(), v.to_numpy(), rtol=rtol, atol=0.0, equal_nan=True)):
            return ""
    return f"~{rtol:g}"


def compare(policy: str, qps: float, n: int, out: Path, extra: list[str], baseline: Path, repeat: int,
            compiled: bool) -> tuple[list[float], list[float], str]:
    """``policy`` at ``qps`` in ``baseline`` and in this checkout, alternating, ``repeat`` times each: (baseline's
    loop rates, ours, whether the last two runs wrote the same records: ``same_records`` to 1e-9)."""
    rates: dict[str, list[float]] = {"base": [], "this": []}
    for _ in range(repeat):
        for side, tree in (("base", baseline), ("this", ROOT)):
            _, s = one(policy, qps, n, out, extra, compiled, tree, name=f"{policy}-q{qps:g}-{side}")
            rates[side].append(s["sim_requests_per_wall_s"])
    same = same_records(out / f"{policy}-q{qps:g}-base", out / f"{policy}-q{qps:g}-this", rtol=1e-9)
    return rates["base"], rates["this"], same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="*", default=["block_oracle", "block_star"])
    ap.add_argument("--qps", type=float, nargs="*", default=[20, 24, 28, 32, 36])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench_fig6_speed"))
    ap.add_argument("--compiled", action="store_true",
                    help="also run each point with the compiled build and print the ratio (python -m vidur.speedups)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="another checkout of this project to compare with (alternating runs; see above)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per point and checkout with --baseline (default 2)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. block_k=2)")
    args = ap.parse_args(argv)
    if args.requests < 1:
        ap.error("--requests must be >= 1")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    out = Path(args.out)
    if args.baseline:
        base = Path(args.baseline).resolve()
        if not (base / "experiments" / "run.py").is_file():
            ap.error(f"--baseline {base}: not a checkout of this project (no experiments/run.py)")
        if args.compiled:
            ap.error("--baseline compares two checkouts in one mode: set BLOCK_REPRO_SPEEDUPS=1 for the compiled one")
        from vidur.compiled import enabled

        compiled = enabled()  # this command's BLOCK_REPRO_SPEEDUPS, read as every command of the project reads it
        print(f"{'policy':>13} {'qps':>5} {'base best':>9} {'median':>7} {'this best':>9} {'median':>7} "
              f"{'best x':>6} {'med x':>6} {'same':>5} {'load avg':>9}   ({'compiled' if compiled else 'plain'})")
        for policy in args.policies:
            for qps in args.qps:
                b, t, same = compare(policy, qps, args.requests, out, args.overrides, base, args.repeat, compiled)
                mb, mt = statistics.median(b), statistics.median(t)
                print(f"{policy:>13} {qps:>5g} {max(b):>9.0f} {mb:>7.0f} {max(t):>9.0f} {mt:>7.0f} "
                      f"{max(t) / max(b):>6.2f} {mt / mb:>6.2f} {same or 'NO':>5} "
                      f"{os.getloadavg()[0]:>9.2f}", flush=True)
                if not same:
                    print(f"error: {policy} at QPS {qps:g}: the two checkouts' records differ", file=sys.stderr)
                    return 1
        return 0
    if args.compiled:
        print(f"{'policy':>13} {'qps':>5} {'loop req/s':>10} {'compiled':>10} {'ratio':>6} {'process s':>9} "
              f"{'compiled':>9} {'same':>5} {'load avg':>9}")
    else:
        print(f"{'policy':>13} {'qps':>5} {'loop req/s':>10} {'process s':>9} {'p99 ttft s':>10} {'load avg':>9}")
    for policy in args.policies:
        for qps in args.qps:
            wall, s = one(policy, qps, args.requests, out, args.overrides)
            if not args.compiled:
                print(f"{policy:>13} {qps:>5g} {s['sim_requests_per_wall_s']:>10.0f} {wall:>9.1f} "
                      f"{s['p99_ttft_ms'] / 1e3:>10.2f} {os.getloadavg()[0]:>9.2f}", flush=True)
                continue
            wall_c, c = one(policy, qps, args.requests, out, args.overrides, compiled=True)
            same = same_records(out / f"{policy}-q{qps:g}", out / f"{policy}-q{qps:g}-compiled")
            rate, rate_c = s["sim_requests_per_wall_s"], c["sim_requests_per_wall_s"]
            print(f"{policy:>13} {qps:>5g} {rate:>10.0f} {rate_c:>10.0f} {rate_c / rate:>6.2f} {wall:>9.1f} "
                  f"{wall_c:>9.1f} {same or 'NO':>5} {os.getloadavg()[0]:>9.2f}", flush=True)
            if not same:
                print(f"error: {policy} at QPS {qps:g}: the compiled build's records differ", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
