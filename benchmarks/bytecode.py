"""Compile a source tree's bytecode before timing whole processes of it, as installing a package does.

Why: a process that imports a module without cached bytecode compiles it from source first; where the environment
sets ``PYTHONDONTWRITEBYTECODE`` (this project's development VM does) nothing is ever cached, so every timed run
of ``python -m experiments.run`` compiled the project's ~55 modules again (about 40-60 ms of a 0.7 s run, measured
6 December 2026). A user's Python caches bytecode on the first import, and ``pip install`` of a package writes it
at install time; the whole-process benchmarks (``vs_vidur``, ``startup``) therefore compile both sides' sources
first (ours and, in ``vidur_peer``, Vidur's) and time the runs after it. ``compileall`` writes ``__pycache__``
whatever ``PYTHONDONTWRITEBYTECODE`` says; the folders are git-ignored.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterable

# this project's importable packages (the folders a run imports from; tests and outputs are not among them)
PACKAGES = ("block", "vidur", "data", "experiments", "hydra_plugins", "benchmarks")


def compile_tree(root: Path, packages: Iterable[str] = PACKAGES, python: str = sys.executable) -> list[Path]:
    """Write the bytecode of ``packages`` under ``root`` with ``python`` (its version's cache tag); returns the
    folders compiled. Raises ``RuntimeError`` with compileall's output when a file does not compile."""
    folders = [Path(root) / p for p in packages if (Path(root) / p).is_dir()]
    if not folders:
        return []
    proc = subprocess.run([python, "-m", "compileall", "-q", *map(str, folders)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"compileall failed under {root}:\n{(proc.stdout + proc.stderr)[-2000:]}")
    return folders
