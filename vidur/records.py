"""Run records: the one home of their format, their writer and their reader.

The format (DESIGN.md, Outputs) lets sim, emulate and deploy runs all feed the same analysis code. A run directory
holds ``config.yaml``, ``requests.parquet`` (one row per request, :data:`REQUEST_RECORD_COLUMNS` first),
``instances.parquet`` (one row per instance per sample time, :data:`INSTANCE_RECORD_COLUMNS`), any further tables
(``<name>.parquet``) and ``summary.json`` (``vllm bench serve``'s key names), the summary written last so that a sweep
can take its presence as "this run is complete"; a directory of runs (a sweep) holds several.

Writers (the simulator's runs, the benchmark client, the experiments) call :func:`write_run`; analysis reads through
:func:`find_runs` / :func:`load_run` (re-exported by ``analysis.records``), so it never imports the simulator or the
services. Every file of ours that must appear whole is written by :func:`write_atomic`.

pandas, numpy and yaml are imported by the functions that need them: many modules (the services, the launchers, the
execution model's cache) import this one only for :func:`write_atomic`, and pandas alone adds a few hundred
milliseconds to their start-up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Optional

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
REQUESTS_FILE = "requests.parquet"
INSTANCES_FILE = "instances.parquet"
SUMMARY_FILE = "summary.json"  # written last: its presence means the run is complete

# Columns of requests.parquet, in order. Times are seconds since the run's start.
REQUEST_RECORD_COLUMNS = [
    "id", "instance", "arrival_s", "dispatch_s", "first_token_s", "finish_s",
    "prompt_tokens", "output_tokens", "predicted_tokens",
    "ttft_s", "tpot_s", "e2e_s", "predicted_e2e_s", "num_preemptions", "status",
]

# Columns of instances.parquet (one row per instance per sample time).
INSTANCE_RECORD_COLUMNS = ["time_s", "instance", "num_running", "num_waiting", "free_blocks", "num_preemptions"]

PERCENTILES = (50, 90, 99)


def requests_frame(rows: "Iterable[Mapping[str, Any]] | pd.DataFrame") -> pd.DataFrame:
    """One row per request, DESIGN's columns first (extra columns, e.g. ``queue_s``, follow)."""
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if df.empty:
        df = pd.DataFrame(columns=REQUEST_RECORD_COLUMNS)
    missing = [c for c in REQUEST_RECORD_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"request records lack columns {missing}")
    extra = [c for c in df.columns if c not in REQUEST_RECORD_COLUMNS]
    return df[REQUEST_RECORD_COLUMNS + extra].reset_index(drop=True)


def instances_frame(samples: Iterable[tuple]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(list(samples), columns=INSTANCE_RECORD_COLUMNS)


def _stats_ms(values: np.ndarray, name: str) -> dict[str, Optional[float]]:
    import numpy as np

    v = values[np.isfinite(values)] * 1e3
    if v.size == 0:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, **{f"p{p}_{name}_ms": None for p in (90, 99)}}
    out = {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v))}
    for p in (90, 99):
        out[f"p{p}_{name}_ms"] = float(np.percentile(v, p))
    return out


def summarize(requests: pd.DataFrame, duration_s: Optional[float] = None, **extra: Any) -> dict[str, Any]:
    """The run's summary with ``vllm bench serve``'s key names where they exist.

    ``duration`` is from the first arrival to the last finish. TTFT/TPOT/E2E come from the request rows; ITL is only
    known where per-token times were measured (emulate/deploy): a simulated run leaves it None.
    """
    import numpy as np

    ok = requests[requests["status"] == "ok"] if len(requests) else requests
    if duration_s is None:
        duration_s = float(ok["finish_s"].max() - requests["arrival_s"].min()) if len(ok) else 0.0
    dur = max(duration_s, 1e-9)
    in_tok = int(ok["prompt_tokens"].sum()) if len(ok) else 0
    out_tok = int(ok["output_tokens"].sum()) if len(ok) else 0
    s: dict[str, Any] = {
        "completed": int(len(ok)),
        "failed": int(len(requests) - len(ok)),
        "duration": float(duration_s),
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "request_throughput": len(ok) / dur,
        "output_throughput": out_tok / dur,
        "total_token_throughput": (in_tok + out_tok) / dur,
    }
    s.update(_stats_ms(ok["ttft_s"].to_numpy(float), "ttft"))
    s.update(_stats_ms(ok["tpot_s"].to_numpy(float), "tpot"))
    if "itl_s" in ok.columns:
        s.update(_stats_ms(ok["itl_s"].to_numpy(float), "itl"))
    else:
        s.update({k: None for k in ("mean_itl_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms")})
    s.update(_stats_ms(ok["e2e_s"].to_numpy(float), "e2el"))
    if len(requests) > 1:
        span = float(requests["arrival_s"].max() - requests["arrival_s"].min())
        s["achieved_qps"] = (len(requests) - 1) / span if span > 0 else None
    else:
        s["achieved_qps"] = None
    pre = requests["num_preemptions"].to_numpy() if len(requests) else np.array([0])
    known = pre[pre >= 0]  # -1: unknown (measured against a live engine)
    s["num_preemptions"] = int(known.sum()) if known.size else None
    if "decision_ms" in requests.columns and len(requests):
        d = requests["decision_ms"].to_numpy(float)
        d = d[np.isfinite(d)]
        s["mean_scheduler_overhead_ms"] = float(d.mean()) if d.size else None
        s["p99_scheduler_overhead_ms"] = float(np.percentile(d, 99)) if d.size else None
    s.update(extra)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in s.items()}


# ---------------------------------------------------------------------- atomic writing
TMP_SUFFIX = ".tmp"


def write_atomic(path: Path | str, data: "bytes | Callable[[Path], None]") -> Path:
    """Write ``path`` so that a reader (or a rerun after a kill) sees the old file or the whole new one, never half.

    ``data`` is the content, or a function that writes a given path (``df.to_parquet``, ``fig.savefig``). The bytes
    go to a hidden temp file ``.<name>.<random>.tmp`` beside ``path`` (same file system), are fsynced, then renamed
    over it. A failure removes the temp file; a kill leaves it, and ``remove_stale_tmp`` clears it on the next run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        if callable(data):
            os.close(fd)
            data(Path(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def remove_stale_tmp(directory: Path | str) -> list[Path]:
    """Remove the temp files a killed ``write_atomic`` left in ``directory`` (not below); returns them.

    Only call it where no other process is writing: a run start owns its run directory.
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    stale = [p for p in d.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_text(path: Path | str, text: str) -> None:
    write_atomic(path, text.encode())


def write_yaml(path: Path | str, node: Any) -> str:
    """An OmegaConf node as resolved YAML, written atomically; the path as a string (the services read such files
    from their command lines)."""
    from omegaconf import OmegaConf

    write_text(path, OmegaConf.to_yaml(node, resolve=True))
    return str(path)


def write_parquet(path: Path | str, df: pd.DataFrame) -> None:
    write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_run(run_dir: Path | str, config_yaml: str, requests: pd.DataFrame, instances: pd.DataFrame,
              summary: Mapping[str, Any], extra: Optional[Mapping[str, pd.DataFrame]] = None) -> Path:
    """Write a run directory; ``summary.json`` goes last, so its presence means the run is complete.

    ``extra`` adds further tables by name (``accuracy`` for Fig 5 samples, ``provisioning`` for pool events).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.exists():
        summary_path.unlink()  # a rerun invalidates the old summary first
    write_text(run_dir / CONFIG_FILE, config_yaml)
    write_parquet(run_dir / REQUESTS_FILE, requests)
    write_parquet(run_dir / INSTANCES_FILE, instances)
    for name, df in (extra or {}).items():
        write_parquet(run_dir / f"{name}.parquet", df)
    write_text(summary_path, json.dumps(dict(summary), indent=2, sort_keys=True) + "\n")
    return run_dir


def is_complete(run_dir: Path | str) -> bool:
    return (Path(run_dir) / SUMMARY_FILE).is_file()


# ---------------------------------------------------------------------- reading
@dataclass
class Run:
    """One complete run directory: its summary and config read at once, its tables on demand."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    def requests(self) -> pd.DataFrame:
        import pandas as pd

        return pd.read_parquet(self.path / REQUESTS_FILE)

    def instances(self) -> pd.DataFrame:
        import pandas as pd

        return pd.read_parquet(self.path / INSTANCES_FILE)

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key, e.g. ``workload.qps``."""
        cur: Any = self.config
        for part in dotted.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return default
            cur = cur[part]
        return cur


def load_run(path: str | Path) -> Run:
    """The run at ``path``; FileNotFoundError unless it is complete (has its summary)."""
    import yaml

    path = Path(path)
    summary_file = path / SUMMARY_FILE
    if not summary_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete run: no summary.json")
    cfg_file = path / CONFIG_FILE
    config = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {}
    return Run(path, json.loads(summary_file.read_text()), config or {})


def find_runs(root: str | Path) -> list[Run]:
    """Every complete run at or under ``root`` (sorted by path)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such run directory: {root}")
    runs = []
    for summary in sorted(root.rglob(SUMMARY_FILE)):
        if "figures" in summary.parts:
            continue
        try:
            runs.append(load_run(summary.parent))
        except Exception as err:  # a corrupt run should not hide the others
            log.warning("skipping %s: %s", summary.parent, err)
    incomplete = [p.parent for p in root.rglob(CONFIG_FILE) if not (p.parent / SUMMARY_FILE).exists()
                  and ".hydra" not in p.parts]
    for p in incomplete:
        log.warning("skipping incomplete run %s (no summary.json)", p)
    if not runs:
        raise FileNotFoundError(f"no complete runs (summary.json) under {root}")
    return runs


def summaries_frame(runs: list[Run], keys: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per run: its summary plus selected config keys (dotted)."""
    import pandas as pd

    rows = []
    for r in runs:
        row = {"run": str(r.path)}
        row.update(r.summary)
        for k in keys:
            row[k] = r.get(k)
        rows.append(row)
    return pd.DataFrame(rows)


def iter_requests(runs: list[Run]) -> Iterator[tuple[Run, pd.DataFrame]]:
    for r in runs:
        yield r, r.requests()
