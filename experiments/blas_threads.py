"""numpy imported with one BLAS thread by the commands that only simulate (``experiments.run``,
``experiments.capacity``).

Why: numpy's wheels bundle OpenBLAS, which starts one worker thread per core when numpy is imported. A simulated run
makes no BLAS call worth a second thread (the execution model's fit, on a cache miss, solves small least-squares
problems), yet on this project's 2-core VM the worker thread's start cost a fresh process about 0.11 s of CPU time and
10-15 ms of wall time (``python -c "import numpy"``: 242 ms of CPU against 130 ms with ``OPENBLAS_NUM_THREADS=1``,
medians of 20) -- CPU taken from the other core, which a parallel sweep's other run or CI's other work is using.

OpenBLAS reads its thread count once, when the library loads, so the variable is set only around numpy's import
and removed again: the processes a run starts (a launcher's workers, emulate's engines and predictors, vLLM) get the
environment they would have had. A user's own ``OPENBLAS_NUM_THREADS``, ``GOTO_NUM_THREADS`` or ``OMP_NUM_THREADS``
is left alone (OpenBLAS reads them in that order).
"""

from __future__ import annotations

import os
import sys

VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")  # what OpenBLAS reads, in order


def import_numpy_single_threaded() -> bool:
    """Import numpy with OpenBLAS limited to one thread; True if this set the limit (numpy not imported yet and no
    thread count set by the user), False if it only imported numpy (or nothing)."""
    if "numpy" in sys.modules:
        return False
    if any(v in os.environ for v in VARIABLES):
        import numpy  # noqa: F401  (the user's thread count)

        return False
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401
    finally:
        os.environ.pop("OPENBLAS_NUM_THREADS", None)
    return True
