"""Where one ``benchmarks/vs_vidur.py`` process goes, phase by phase, and what is left with the routing at no cost.

    python -m benchmarks.phases [--case vllm-r4-100k] [--repeat 3] [--requests CSV] [--num-requests N] [--vidur-s S]

Runs the command ``vs_vidur`` times (``experiments.run`` with the case's overrides, on a synthetic request file of the
case's size and rate as ``benchmarks.startup`` writes, or on ``--requests``) ``--repeat`` times, each in a fresh
process that marks its phases: interpreter start, imports, Hydra (command line, composition, run directory),
validation and execution model, workload, the event loop, the request records, summary and files. After its run the
same process replays the run's own decisions into fresh engines with nothing else (no routing harness, no sampler:
``engines alone``), checks that the replay finishes every request at the same time as the run, and so splits the
event loop into the engines and everything around them (the routing harness shared with the live scheduler, the
loop, the samples). ``with routing free`` is the process minus that part: no change of the harness alone can take a
process below it. With ``--vidur-s`` (Vidur's wall time for the case) each total is also a speed-up. Every
process's marks go to ``<out>/<case>.json``.

Why a benchmark: every account of where a run's time goes (docs/simulator.md) used to be marks added by hand for
the occasion; this one is repeatable. The child runs the module as ``__main__`` under ``runpy``, so it keeps the
interpreter's teardown that ``python -m experiments.run`` skips; the phases stop before it. Like the command, it
takes Hydra's composition from ``experiments/compose_cache.py`` when an earlier process of the same command line
stored it (the printout says in how many processes it did); ``BLOCK_REPRO_COMPOSE_CACHE=0`` composes every time.
"""

from __future__ import annotations

import time

_T0 = time.time()  # the child's first instant (its interpreter start is the launch to here)

import json
import os
import runpy
import sys
import warnings

CHILD = "--child"
LAUNCH_ENV = "BLOCK_PHASES_LAUNCH"  # the parent's time.time() at launch
PHASES = [  # (name, from mark, to mark)
    ("interpreter", "launch", "start"),
    ("imports", "start", "imports"),
    ("Hydra", "imports", "validate<"),
    ("validation, model, policy", "validate<", "workload<"),
    ("workload", "workload<", "workload>"),
    ("event loop", "run<", "rows<"),
    ("records", "rows<", "run>"),
    ("summary and files", "run>", "write_run>"),
    ("after the files", "write_run>", "end"),
]


def _child(overrides: list[str]) -> None:
    """Run ``experiments.run`` here with marks; print ``PHASES <json>`` on stdout; exit without teardown."""
    marks = {"launch": float(os.environ.get(LAUNCH_ENV, _T0)), "start": _T0}
    # the module's imports (it runs again as __main__ below, importing nothing); the simulation's modules, which a
    # run imports after Hydra, are counted here too. First what the command's own first lines do: imports collect
    # no garbage (its __main__ block collects again) and numpy comes with one BLAS thread (experiments.blas_threads)
    import gc

    gc.disable()
    from experiments.blas_threads import import_numpy_single_threaded

    import_numpy_single_threaded()
    import experiments.run  # noqa: F401
    from experiments import sim, wiring
    from vidur import cluster as cluster_mod

    marks["imports"] = time.time()

    seen: dict[str, object] = {}

    def wrap(owner, name: str, key: str, enter: bool = True, leave: bool = True, keep: bool = False) -> None:
        fn = getattr(owner, name)

        def marked(*a, **k):
            if enter:
                marks.setdefault(key + "<", time.time())
            out = fn(*a, **k)
            if leave:
                marks[key + ">"] = time.time()
            if keep:
                seen[key] = (a, out)
            return out

        setattr(owner, name, marked)

    wrap(wiring, "validate", "validate", leave=False)
    wrap(wiring, "workload", "workload")
    wrap(cluster_mod.Cluster, "run", "run", keep=True)
    wrap(cluster_mod.Cluster, "_request_rows", "rows", leave=False)
    wrap(sim, "write_run", "write_run", enter=False)
    # one run ended by os._exit, as ``python -m experiments.run`` is: its objects are kept for the exit there too
    # (``experiments.run.keep_run_to_exit`` sets this only when started by -m; freeing them here read as ~20 ms)
    sim.KEEP_RUN_TO_EXIT = True
    sys.argv = [sys.argv[0], *overrides]
    try:
        with warnings.catch_warnings():  # runpy's note that the module was imported before: on purpose, see above
            warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
            runpy.run_module("experiments.run", run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    marks["end"] = time.time()
    from experiments import compose_cache

    out = {"marks": marks, "compose_cache": {"hits": compose_cache.STATS.hits, "misses": compose_cache.STATS.misses,
                                             "on": compose_cache.enabled()},
           "kept_for_exit": len(sim._KEPT) == 3}  # the run's objects were left for the exit, as above
    if "run" in seen:
        out.update(_engines_alone(*seen["run"]))
    print("PHASES " + json.dumps(out), flush=True)
    sys.stdout.flush()
    os._exit(0)


def _engines_alone(args: tuple, result) -> dict:
    """Replay the run's decisions (its ``instance`` column) into fresh engines: seconds, and whether every request
    finished when it did in the run, to 1e-9 s (else the replay is not the run's simulation and says so)."""
    import gc

    import numpy as np

    from vidur.engine import Engine, make_seqs

    cluster, requests = args[0], args[1]
    cols = result.request_columns
    where = dict(zip(cols["id"].tolist(), cols["instance"].tolist()))
    engines = [Engine(e.cfg, e.model, e.instance_id) for e in cluster.engines]
    gc.collect()
    gc.freeze()  # the run's objects out of the collector's way, as the imports were for the run (settle_imports)
    t0 = time.perf_counter()
    for s in make_seqs(requests):  # (built inside the timing, as the run builds each request's Seq in its loop)
        t = s.arrival
        eng = engines[where[s.id]]
        eng.sync(t)
        eng.add(s, t)
    for eng in engines:
        eng.run_until_idle()
    seconds = time.perf_counter() - t0
    finish = {s.id: s.finish for e in engines for s in e.finished}
    replayed = np.array([finish.get(i, np.nan) for i in cols["id"].tolist()], dtype=float)
    # the same up to rounding: the run's samples sync the engines at more instants, which sums a time in more parts
    same = bool(np.allclose(replayed, cols["finish_s"], rtol=0.0, atol=1e-9, equal_nan=True))
    return {"engines_alone_s": seconds, "replay_same": same}


def main(argv=None) -> int:
    import argparse
    import statistics
    import subprocess
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from benchmarks.bytecode import compile_tree
    from benchmarks.startup import write_requests
    from benchmarks.vs_vidur import CASES, ours_argv
    from experiments.compose_cache import ENV_SWITCH
    from vidur.records import write_atomic

    ap = argparse.ArgumentParser(prog="python -m benchmarks.phases", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="vllm-r4-100k", choices=sorted(CASES))
    ap.add_argument("--repeat", type=int, default=3, help="processes (medians are printed; default 3)")
    ap.add_argument("--requests", type=Path, help="the request CSV to replay (default: a synthetic one, as startup)")
    ap.add_argument("--num-requests", type=int, help="requests per run (default: the case's)")
    ap.add_argument("--vidur-s", type=float, help="Vidur's wall time for the case: print speed-ups too")
    ap.add_argument("--out", type=Path, default=root / "outputs" / "phases")
    ap.add_argument("--no-compile", action="store_true", help="do not compile the bytecode first")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.requests is not None and not args.requests.is_file():
        ap.error(f"--requests {args.requests}: no such file")
    if args.num_requests is not None and args.num_requests < 1:
        ap.error("--num-requests must be at least 1")
    if args.vidur_s is not None and not args.vidur_s > 0:
        ap.error("--vidur-s must be a positive number of seconds")
    args.out = args.out.resolve()  # the child runs in the project's root
    case = dict(CASES[args.case])
    if args.num_requests is not None:
        case["n"] = args.num_requests
    csv = args.requests or write_requests(args.out / f"{args.case}.csv", case["n"], case["qps"])
    if not args.no_compile:
        compile_tree(root)  # cached bytecode, as an installed package has it (benchmarks/bytecode.py)
    overrides = ours_argv(case, csv.resolve(), args.out / "run")[2:]  # after "-m experiments.run"
    runs = []
    for _ in range(args.repeat):
        env = dict(os.environ, PYTHONPATH=str(root), **{LAUNCH_ENV: repr(time.time())})
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.phases", CHILD, *overrides], cwd=root, env=env,
                                  stdout=subprocess.PIPE, stderr=err, text=True, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("PHASES ")), None)
            if proc.returncode != 0 or line is None:
                err.seek(0)
                raise SystemExit(f"the run failed (exit {proc.returncode}):\n{err.read()[-3000:]}")
        runs.append(json.loads(line[len("PHASES "):]))
    # every process's marks (time.time()), to look again or compare
    dump = {"case": args.case, "requests": case["n"], "csv": str(csv), "runs": runs}
    write_atomic(args.out / f"{args.case}.json", json.dumps(dump, indent=1).encode())

    print(f"case {args.case}: {case['n']} requests, {case['replicas']} replica(s), {case['scheduler']}; "
          f"{args.repeat} processes, medians; load average {os.getloadavg()[0]:.1f}; "
          f"compiled build {'on' if os.environ.get('BLOCK_REPRO_SPEEDUPS') == '1' else 'off'}")
    for name, a, b in PHASES:
        print(f"  {name:28s} {statistics.median([r['marks'][b] - r['marks'][a] for r in runs]):7.3f} s")
    total = statistics.median([r["marks"]["end"] - r["marks"]["launch"] for r in runs])
    print(f"  {'total (to the end of main)':28s} {total:7.3f} s")
    hits = sum(r["compose_cache"]["hits"] for r in runs)
    print(f"  Hydra's composition came from its cache (experiments/compose_cache.py) in {hits} of {len(runs)} "
          f"process(es)" + ("" if all(r["compose_cache"]["on"] for r in runs) else f" (off: {ENV_SWITCH}=0)"))
    if all("engines_alone_s" in r for r in runs):
        loop = statistics.median([r["marks"]["rows<"] - r["marks"]["run<"] for r in runs])
        alone = statistics.median([r["engines_alone_s"] for r in runs])
        same = all(r["replay_same"] for r in runs)
        print(f"  of the event loop: engines alone {alone:.3f} s, the rest (routing harness, loop, samples) "
              f"{loop - alone:.3f} s" + ("" if same else "  [the replay differs from the run: not a split]"))
        free = statistics.median([(r["marks"]["end"] - r["marks"]["launch"])
                                  - (r["marks"]["rows<"] - r["marks"]["run<"] - r["engines_alone_s"]) for r in runs])
        print(f"  {'with routing free':28s} {free:7.3f} s")
        if args.vidur_s:
            print(f"  speed-up against Vidur's {args.vidur_s:.1f} s: {args.vidur_s / total:.0f}x as run, "
                  f"{args.vidur_s / free:.0f}x with routing free")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        _child(sys.argv[2:])
    raise SystemExit(main())
