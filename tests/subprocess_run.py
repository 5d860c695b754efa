"""Running the project's command-line modules as real subprocesses (``python -m ...``), as a user runs them.

One helper so that every test starts them alike: from the repository root, with the checkout first on
``PYTHONPATH`` (the tests must exercise this tree, not another installed copy), output captured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m <args>`` at the repository root; with ``check``, assert exit code 0 and show the output's end."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout, check=False)
    if check:
        assert p.returncode == 0, f"{args}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p
