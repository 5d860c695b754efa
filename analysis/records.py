"""Loading logged runs: the only way analysis modules see results (they never import the simulator or services).

The run-record format, its writer and its reader live in one module, ``vidur.records`` (the lowest layer, which
both the writers and analysis may import); this module re-exports the reader and adds what only figures need:
where they go and how they are saved (atomically, as every file of a run).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vidur.records import Run, find_runs, iter_requests, load_run, summaries_frame, write_atomic

__all__ = ["Run", "figures_dir", "find_runs", "iter_requests", "load_run", "save_csv", "save_figure",
           "summaries_frame"]


def figures_dir(root: str | Path) -> Path:
    d = Path(root) / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_figure(fig, out_dir: Path, stem: str) -> list[Path]:
    """Save a matplotlib figure as PNG and PDF (atomically) and return the paths."""
    return [write_atomic(out_dir / f"{stem}.{ext}",
                         lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight"))
            for ext in ("png", "pdf")]


def save_csv(df: pd.DataFrame, out_dir: Path, stem: str) -> Path:
    return write_atomic(out_dir / f"{stem}.csv", lambda tmp: df.to_csv(tmp, index=False))
