"""Running the project's command-line modules as real subprocesses (``python -m ...``), as a user runs them.

One helper so that every test starts them alike: from the repository root, with the checkout first on
``PYTHONPATH`` (the tests must exercise this tree, not another installed copy), output captured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional

ROOT = Path(__file__).resolve().parents[1]


def run_python(*args: str, timeout: float = 120, check: bool = True,
               env: Optional[Mapping[str, Optional[str]]] = None) -> subprocess.CompletedProcess:
    """``python <args>`` at the repository root; ``env`` sets variables (None: unsets one) on top of this process's
    environment; with ``check``, assert exit code 0 and show the output's end."""
    full = dict(os.environ)
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout,
                       check=False)
    if check:
        assert p.returncode == 0, f"{args}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def run_module(*args: str, timeout: float = 120, check: bool = True,
               env: Optional[Mapping[str, Optional[str]]] = None) -> subprocess.CompletedProcess:
    """``python -m <args>`` at the repository root (``run_python``)."""
    return run_python("-m", *args, timeout=timeout, check=check, env=env)
