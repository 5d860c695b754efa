"""Do mode=emulate (real services on loopback) and mode=sim agree on the same workload and policy?

    python -m benchmarks.emulate_vs_sim [--scales 0.5 1] [--policy block_oracle] [--qps 4] [-n 200]

Runs ``python -m experiments.run`` once in sim and once per time scale in emulate (4 emulated A30 Llama-2-7B engines,
4 predictors, 1 scheduler, the benchmark client), then prints p50/p99 TTFT and E2E of each and the differences.
Emulate's records are in model time; its extra latency is the real HTTP path (client -> scheduler -> k predictor
probes -> predictor proxy -> engine, and the tokens back through two proxies), which sim does not model and which
weighs more, in model time, the faster the stack runs (larger scale). On 2 cores a scale above ~3 also makes the
CPU the bottleneck (every token crosses three processes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("median_ttft_ms", "p99_ttft_ms", "median_e2el_ms", "p99_e2el_ms")


def run(out: Path, mode: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "experiments.run", f"mode={mode}", f"output_root={out}", "progress=false",
           "force=true", f"hydra.run.dir={out}/{mode}-{'-'.join(extra).replace('=', '_')}", *extra]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stdout[-3000:] + p.stderr[-3000:])
    d = Path(f"{out}/{mode}-{'-'.join(extra).replace('=', '_')}")
    return json.loads((d / "summary.json").read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--policy", default="block_oracle")
    ap.add_argument("--qps", type=float, default=4.0)
    ap.add_argument("-n", "--num-requests", type=int, default=200)
    args = ap.parse_args(argv)
    common = [f"policy={args.policy}", f"workload.qps={args.qps}", f"workload.num_requests={args.num_requests}",
              "cluster=local4"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sim = run(out, "sim", common)
        print(f"{'mode':>14} " + " ".join(f"{k:>16}" for k in KEYS))
        print(f"{'sim':>14} " + " ".join(f"{sim[k]:>16.1f}" for k in KEYS))
        for sc in args.scales:
            emu = run(out, "emulate", common + [f"mode.time_scale={sc}"])
            print(f"{'emulate x' + str(sc):>14} " + " ".join(f"{emu[k]:>16.1f}" for k in KEYS))
            print(f"{'  diff %':>14} " + " ".join(f"{100 * (emu[k] - sim[k]) / sim[k]:>+16.1f}" for k in KEYS),
                  flush=True)


if __name__ == "__main__":
    main()
