"""Our whole process for one ``benchmarks/vs_vidur.py`` case, against another checkout: wall, CPU and import time.

    python -m benchmarks.startup [--case vllm-r1-10k] [--repeat 5] [--baseline DIR] [--out outputs/startup]

Runs exactly the command ``vs_vidur`` times (``python -m experiments.run`` with the case's overrides) on a synthetic
request file of the case's size and rate (Poisson arrivals, fixed 1024/200 tokens), ``--repeat`` times per checkout,
the checkouts alternating so that a busy machine slows both alike; prints the median and best wall and CPU time
(user + system, steadier than wall time under load) and the import time ``python -X importtime`` reports (the sum
over top-level imports, one run). ``--baseline`` is another checkout of this project, e.g. made by ``git worktree
add /tmp/base <commit>``; it runs with its own folder first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bytecode import compile_tree  # noqa: E402
from benchmarks.vs_vidur import CASES, ours_argv  # noqa: E402


def write_requests(path: Path, n: int, qps: float, seed: int = 0) -> Path:
    """n requests of 1024 prompt and 200 output tokens, Poisson arrivals at ``qps`` (vs_vidur's CSV columns)."""
    t = np.cumsum(np.random.default_rng(seed).exponential(1.0 / qps, n))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("arrival_s,prompt_tokens,output_tokens\n")
        f.writelines(f"{a!r},1024,200\n" for a in t.tolist())
    return path


def timed(tree: Path, argv: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one run, CPU from ``os.wait4`` (the process and the children it waited for)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *argv], cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, tell Popen
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{tree}: exit {proc.returncode}\n{err.read()[-3000:]}")
    return wall, ru.ru_utime + ru.ru_stime


def import_ms(tree: Path, argv: list[str]) -> float:
    """Milliseconds of imports in one run: the sum of ``-X importtime``'s cumulative time of top-level imports."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=tree, env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    top = re.findall(r"^import time:\s+\d+ \|\s+(\d+) \| \S", proc.stderr, flags=re.M)  # nested names are indented
    return sum(int(us) for us in top) / 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="vllm-r1-10k", choices=sorted(CASES))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline", type=Path, help="another checkout of this project to compare with")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "startup")
    ap.add_argument("--no-compile", action="store_true",
                    help="time the checkouts as they are, without compiling their bytecode first")
    args = ap.parse_args(argv)
    case = CASES[args.case]
    csv = write_requests(args.out / f"{args.case}.csv", case["n"], case["qps"])
    trees = {"this checkout": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    cmds = {name: ours_argv(case, csv, args.out / name.replace(" ", "_")) for name in trees}
    if not args.no_compile:
        for tree in trees.values():
            compile_tree(tree)  # cached bytecode on both sides, as an installed package has it (benchmarks/bytecode.py)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    for _ in range(args.repeat):
        for name, tree in trees.items():
            times[name].append(timed(tree, cmds[name]))
    bare = [timed(ROOT, ["-c", "pass"]) for _ in range(args.repeat)]
    print(f"case {args.case}: {case['n']} requests, {case['replicas']} replica(s), {case['scheduler']}; "
          f"{args.repeat} runs each; load average {os.getloadavg()[0]:.1f}")
    print(f"{'':15s} {'wall med':>9s} {'wall min':>9s} {'CPU med':>9s} {'CPU min':>9s} {'imports':>9s}")
    for name, v in times.items():
        w, c = [x[0] for x in v], [x[1] for x in v]
        print(f"{name:15s} {statistics.median(w):8.3f}s {min(w):8.3f}s {statistics.median(c):8.3f}s {min(c):8.3f}s "
              f"{import_ms(trees[name], cmds[name]):7.0f}ms")
    print(f"{'python -c pass':15s} {statistics.median(x[0] for x in bare):8.3f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
