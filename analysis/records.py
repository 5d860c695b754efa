"""Loading logged runs: the only way analysis modules see results (they never import the simulator or services).

A run directory holds ``config.yaml``, ``requests.parquet``, ``instances.parquet`` and ``summary.json``; a directory
of runs (a sweep) holds several. Incomplete runs (no summary.json) are skipped with a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml

from vidur.records import write_atomic  # the run-record format's writer (no simulator behind it)

log = logging.getLogger(__name__)


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    def requests(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "requests.parquet")

    def instances(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "instances.parquet")

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key, e.g. ``workload.qps``."""
        cur: Any = self.config
        for part in dotted.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return default
            cur = cur[part]
        return cur


def load_run(path: str | Path) -> Run:
    path = Path(path)
    summary_file = path / "summary.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete run: no summary.json")
    cfg_file = path / "config.yaml"
    config = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {}
    return Run(path, json.loads(summary_file.read_text()), config or {})


def find_runs(root: str | Path) -> list[Run]:
    """Every complete run at or under ``root`` (sorted by path)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such run directory: {root}")
    runs = []
    for summary in sorted(root.rglob("summary.json")):
        if "figures" in summary.parts:
            continue
        try:
            runs.append(load_run(summary.parent))
        except Exception as err:  # a corrupt run should not hide the others
            log.warning("skipping %s: %s", summary.parent, err)
    incomplete = [p.parent for p in root.rglob("config.yaml") if not (p.parent / "summary.json").exists()
                  and ".hydra" not in p.parts]
    for p in incomplete:
        log.warning("skipping incomplete run %s (no summary.json)", p)
    if not runs:
        raise FileNotFoundError(f"no complete runs (summary.json) under {root}")
    return runs


def summaries_frame(runs: list[Run], keys: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per run: its summary plus selected config keys (dotted)."""
    rows = []
    for r in runs:
        row = {"run": str(r.path)}
        row.update(r.summary)
        for k in keys:
            row[k] = r.get(k)
        rows.append(row)
    return pd.DataFrame(rows)


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


def iter_requests(runs: list[Run]) -> Iterator[tuple[Run, pd.DataFrame]]:
    for r in runs:
        yield r, r.requests()
