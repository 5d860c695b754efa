"""Where the simulator keeps what it can rebuild (fitted execution models, the compiled build): the user's cache dir.

A module of its own so that ``vidur.speedups``, which runs when the package is imported, finds it without importing
the execution model (numpy and the rest).
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/block-repro`` (``~/.cache/block-repro`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "block-repro"


__all__ = ["default_cache_dir"]
