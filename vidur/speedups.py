"""The simulator's hot modules compiled with Cython from their own sources: optional, same results, faster.

    python -m vidur.speedups build                 # compile (Cython >= 3 and a C compiler; about 20 s on 2 cores)
    python -m vidur.speedups status                # built for these sources? in use in this process?
    BLOCK_REPRO_SPEEDUPS=1 python -m experiments.run ...        # use them (any command of the project)

Why: a Block run is Python attribute traffic -- a request's fields, the engine's counters, the recorded future's
lists -- read and written millions of times per run. Compiling ``MODULES`` with the ``.pxd`` declarations beside them
(``Seq``, ``Engine``, ``Future``, ``Trajectory``, the V0 rule and the execution model become native classes with typed
fields; the hot methods and functions become ``cpdef`` with their integer and time locals typed by ``cython.locals``,
so they call each other in C and do their arithmetic on C integers and doubles) makes that traffic C struct access; the
arithmetic and the order of every operation stay those of the ``.py`` source, so runs give the same records bit for
bit (``tests/test_speedups.py`` compares them). Measured numbers: docs/simulator.md ("The compiled build").

The ``.py`` files stay the one source. A build compiles copies of them into the user's cache dir, in a folder named by
a hash of the sources (``source_key``), and a process loads the compiled modules only when its sources hash to a
built folder: after any edit of those files the modules load as plain Python (with a warning when they were asked for)
until ``build`` runs again, so a stale build is never used (``vidur.compiled`` loads it). Opt-in by the environment
variable, checked when ``vidur`` is imported: the test suite and anyone who did not ask run plain Python.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from vidur.compiled import (ENV, MANIFEST, MODULES, ROOT, active, build_dir, built, cache_root, enabled, source_files,
                            source_key)

_BUILD_SCRIPT = """
import sys
from Cython.Build import cythonize
from setuptools import Distribution
from setuptools.command.build_ext import build_ext
files, jobs = sys.argv[1:-1], int(sys.argv[-1])
exts = cythonize(files, nthreads=jobs, quiet=True, language_level=3,
                 compiler_directives={"embedsignature": True})
dist = Distribution({"ext_modules": exts, "script_name": "setup.py"})
cmd = build_ext(dist)
cmd.inplace = True
cmd.parallel = jobs
cmd.ensure_finalized()
cmd.run()
"""


class SpeedupsError(RuntimeError):
    """The compiled build cannot be made here (no Cython, no compiler, a compile error): the message says which."""


def missing() -> str:
    """What this machine lacks to build (Cython >= 3, a C compiler), as the sentence ``build`` raises; "" if nothing."""
    try:
        import Cython
    except ImportError:
        return "the compiled build needs Cython >= 3: pip install 'cython>=3'"
    if int(Cython.__version__.split(".")[0]) < 3:
        return f"the compiled build needs Cython >= 3 (found {Cython.__version__}): pip install -U 'cython>=3'"
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")[0]
    if shutil.which(cc) is None:
        return f"the compiled build needs a C compiler ({cc}, the one this Python was built with): none found"
    return ""


def build(*, force: bool = False, jobs: Optional[int] = None, log=print, src_root: Path = ROOT) -> Path:
    """Compile ``MODULES`` from copies of their sources (under ``src_root``, the folder that holds ``vidur``) into
    ``build_dir()``; return it (a no-op when built).

    Raises SpeedupsError when Cython or a C compiler is missing (``missing``) or the compile fails (its output
    included). The folder appears complete or not at all: the build happens in a temporary folder beside it, renamed
    into place at the end.
    """
    key = source_key(src_root)
    dest = build_dir(key)
    if built(key) is not None and not force:
        log(f"already built for these sources: {dest}")
        return dest
    lack = missing()
    if lack:
        raise SpeedupsError(lack)
    import Cython
    jobs = jobs or os.cpu_count() or 1
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp:
        src = Path(tmp) / "src"
        for path in source_files(src_root):
            rel = path.relative_to(src_root)
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, src / rel)
        for mod in MODULES:  # the packages' __init__ files (empty): Cython names a module by its package folders
            parts = mod.split(".")[:-1]
            for i in range(1, len(parts) + 1):
                (src.joinpath(*parts[:i]) / "__init__.py").touch()
        pys = [str(Path(*m.split(".")).with_suffix(".py")) for m in MODULES]
        log(f"compiling {len(MODULES)} modules with Cython {Cython.__version__} ({jobs} jobs) ...")
        proc = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, *pys, str(jobs)], cwd=src,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            text = proc.stdout + proc.stderr
            at = text.find("Error compiling Cython file")  # Cython's own message first, not its warnings' tail
            text = text[at:at + 4000] if at >= 0 else text[-4000:]
            raise SpeedupsError(f"the compile failed (exit {proc.returncode}):\n{text}")
        out = Path(tmp) / key
        out.mkdir()
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        modules = {}
        for mod in MODULES:
            so = src.joinpath(*mod.split(".")).with_suffix(suffix)
            if not so.is_file():
                raise SpeedupsError(f"the compile made no {so.name} for {mod}")
            name = f"{mod}{suffix}"
            shutil.copyfile(so, out / name)
            modules[mod] = name
        manifest = {"key": key, "modules": modules, "cython": Cython.__version__, "python": sys.version.split()[0],
                    "sources": [p.relative_to(src_root).as_posix() for p in source_files(src_root)],
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if dest.exists():  # (--force, or a build another process finished meanwhile)
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(out, dest)  # the whole folder at once: a build is complete or absent
        except OSError:
            if built(key) is None:  # not another process's complete build of the same sources
                raise
    log(f"built in {time.perf_counter() - t0:.0f} s: {dest}")
    return dest


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vidur.speedups",
        description="Compile the simulator's hot modules with Cython (optional; same results, faster). Use the build "
                    f"with {ENV}=1 in the environment of any command; an edit of the sources makes it stale and it is "
                    "then not used until built again.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the modules for the current sources (a no-op when built)")
    b.add_argument("--force", action="store_true", help="compile even when a build for these sources exists")
    b.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: the CPU count)")
    sub.add_parser("status", help="say whether a build exists for these sources and whether it is in use")
    sub.add_parser("clean", help="remove every build (folders with a manifest, and interrupted builds)")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        if args.jobs is not None and args.jobs < 1:
            ap.error("--jobs must be >= 1")
        try:
            build(force=args.force, jobs=args.jobs)
        except SpeedupsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"use it: {ENV}=1 python -m experiments.run ...")
        return 0
    if args.cmd == "status":
        if enabled():
            import vidur.engine  # noqa: F401  (loads the build if there is one for these sources)
        files = built()
        print(f"sources:  {source_key()} ({', '.join(MODULES)})")
        print(f"build:    {build_dir() if files else 'none for these sources (python -m vidur.speedups build)'}")
        print(f"{ENV}: {os.environ.get(ENV, '(unset)')}; in use in this process: {active()}")
        return 0
    root = cache_root()
    removed = 0
    for d in sorted(root.iterdir()) if root.is_dir() else []:  # builds and interrupted builds only, nothing else
        if d.is_dir() and ((d / MANIFEST).is_file() or d.name.startswith(".build-")):
            shutil.rmtree(d)
            removed += 1
    print(f"removed {removed} build(s) from {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
