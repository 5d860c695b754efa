"""The simulating commands import numpy with one OpenBLAS thread (``experiments.blas_threads``) and leave the
environment of the processes they start as it was; a user's own thread count wins.

The thread count is asked of the OpenBLAS library numpy loaded (its ``*openblas_get_num_threads*`` function, found
through ``/proc/self/maps``): Linux with numpy's bundled OpenBLAS, else the tests skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from subprocess_run import run_python

# Prints "BLAS=<threads> ENV=<OPENBLAS_NUM_THREADS or None>" for the numpy this process imported.
BLAS_REPORT = """
def blas_report():
    import ctypes, os, sys
    if "numpy" not in sys.modules:
        return "BLAS=unimported"
    lib = next((line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()), None)
    if lib is None:
        return "BLAS=none"
    so = ctypes.CDLL(lib)
    for name in ("openblas_get_num_threads", "scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_"):
        if hasattr(so, name):
            return f"BLAS={getattr(so, name)()} ENV={os.environ.get('OPENBLAS_NUM_THREADS')}"
    return "BLAS=none"
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")


def _python(code: str, env_extra: dict[str, str] | None = None, *args: str) -> str:
    """The output of ``code`` (after ``BLAS_REPORT``) in a fresh interpreter with no BLAS thread count set but
    ``env_extra``'s."""
    env = {v: None for v in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_extra or {})
    return run_python("-c", BLAS_REPORT + code, *args, env=env, timeout=300).stdout


def _blas(out: str) -> str:
    line = [ln for ln in out.splitlines() if ln.startswith("BLAS=")][-1]
    if line in ("BLAS=none", "BLAS=unimported"):
        pytest.skip(f"numpy's BLAS is not a bundled OpenBLAS here ({line})")
    return line


def test_numpy_gets_one_blas_thread_and_the_environment_is_restored():
    out = _python("from experiments.blas_threads import import_numpy_single_threaded\n"
                  "print('SET', import_numpy_single_threaded()); print(blas_report())")
    assert "SET True" in out
    assert _blas(out) == "BLAS=1 ENV=None"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS starts one thread per core: needs two")
def test_without_it_numpy_would_start_a_thread_per_core():
    """The control: what the helper saves is real here (otherwise the test above proves nothing)."""
    threads, env = _blas(_python("import numpy\nprint(blas_report())")).split()
    assert int(threads.removeprefix("BLAS=")) >= 2 and env == "ENV=None"


def test_a_users_thread_count_is_kept():
    out = _python("from experiments.blas_threads import import_numpy_single_threaded\n"
                  "print('SET', import_numpy_single_threaded()); print(blas_report())", {"OPENBLAS_NUM_THREADS": "2"})
    assert "SET False" in out
    assert _blas(out) == "BLAS=2 ENV=2"


def test_numpy_already_imported_is_left_alone():
    out = _python("import numpy\nfrom experiments.blas_threads import import_numpy_single_threaded\n"
                  "print('SET', import_numpy_single_threaded()); print(blas_report())")
    assert "SET False" in out and _blas(out).endswith("ENV=None")


def test_the_run_command_imports_numpy_that_way(tmp_path):
    """``python -m experiments.run`` (as run by ``runpy``, the way ``-m`` does): one BLAS thread in the run, and the
    variable gone again by its end (a launcher's workers and the services a run starts inherit the user's)."""
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print(blas_report(), flush=True))\n"
            "sys.argv = ['experiments/run.py', *sys.argv[1:]]\n"
            "runpy.run_module('experiments.run', run_name='__main__', alter_sys=True)\n")
    out = _python(code, None, f"output_root={tmp_path}", "workload.num_requests=5", "workload.qps=8",
                  "progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert (tmp_path / "run" / "summary.json").is_file()
    assert _blas(out) == "BLAS=1 ENV=None"
