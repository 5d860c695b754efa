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
milliseconds to their start-up. A table is a pandas DataFrame or, pandas-free, a mapping of column name to numpy
array (:data:`Table`): a simulated run writes its records and computes its summary from columns, through pyarrow,
and never imports pandas (about 0.2 s of a short run's process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Optional, Union

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

# A table: a DataFrame, or its columns as numpy arrays of one length (the simulator's records, without pandas)
Table = Union["pd.DataFrame", Mapping[str, "np.ndarray"]]

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

# Columns of instances.parquet (one row per instance per sample time), and their types.
INSTANCE_RECORD_COLUMNS = ["time_s", "instance", "num_running", "num_waiting", "free_blocks", "num_preemptions"]
_INSTANCE_DTYPES = ("float64", "int64", "int64", "int64", "int64", "int64")

PERCENTILES = (50, 90, 99)


def _request_order(columns: Iterable[str]) -> list[str]:
    """DESIGN's request columns first, then the others (e.g. ``queue_s``) in their order; a missing one raises."""
    columns = list(columns)
    missing = [c for c in REQUEST_RECORD_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"request records lack columns {missing}")
    return REQUEST_RECORD_COLUMNS + [c for c in columns if c not in REQUEST_RECORD_COLUMNS]


def requests_frame(rows: "Iterable[Mapping[str, Any]] | pd.DataFrame") -> pd.DataFrame:
    """One row per request, DESIGN's columns first (extra columns, e.g. ``queue_s``, follow)."""
    import pandas as pd

    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if df.empty:
        df = pd.DataFrame(columns=REQUEST_RECORD_COLUMNS)
    return df[_request_order(df.columns)].reset_index(drop=True)


def request_columns(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``requests_frame`` for a table given as columns (numpy arrays; no pandas): the same order and check."""
    return {c: columns[c] for c in _request_order(columns)}


def instances_frame(samples: Iterable[tuple]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(list(samples), columns=INSTANCE_RECORD_COLUMNS)


def instance_columns(samples: Iterable[tuple]) -> dict[str, np.ndarray]:
    """``instances_frame`` as columns (numpy arrays of the columns' types; no pandas)."""
    import numpy as np

    samples = samples if isinstance(samples, list) else list(samples)
    width = len(INSTANCE_RECORD_COLUMNS)
    # flattened: numpy reads 50,000 six-tuples a third faster as one stream than as rows (counts stay exact)
    rows = np.fromiter(chain.from_iterable(samples), dtype=np.float64, count=width * len(samples)).reshape(-1, width)
    return {name: rows[:, j].astype(dt) for j, (name, dt) in enumerate(zip(INSTANCE_RECORD_COLUMNS, _INSTANCE_DTYPES))}


def _column(table: Table, name: str, dtype: Any = None) -> np.ndarray:
    import numpy as np

    return np.asarray(table[name], dtype=dtype)


def _num_rows(table: Table) -> int:
    """A table's rows (a DataFrame's ``len``; the length of a mapping's first column)."""
    if hasattr(table, "index"):
        return len(table)
    return len(next(iter(table.values()))) if len(table) else 0


def order_stats(values: np.ndarray, ps: Iterable[float]) -> tuple[float, list[float]]:
    """``(np.median(values), [np.percentile(values, p) for p in ps])`` (numpy's default "linear" method), to the last
    bit, for a non-empty array of finite numbers.

    Why not numpy's: ``np.median`` and ``np.percentile`` import ``numpy.ma`` (their NaN checks ask whether the array
    is masked), about 10 ms of a short simulated run's process, for a summary's few numbers. The arithmetic is
    numpy's, in its order: a percentile's virtual index ``(n - 1) * (p / 100)``, its neighbours ``lo`` and ``lo + 1``
    (the last value at or past the end), the interpolation ``a + (b - a) * g``, or ``b - (b - a) * (1 - g)`` when
    ``g >= 0.5``; the median is the middle value, or the mean ``(a + b) / 2`` of the two middle ones (not the
    50th percentile's interpolation, which may differ in the last bit). One partition serves them all.
    ``tests/test_summary_stats.py`` compares them with numpy's on thousands of arrays.
    """
    import numpy as np

    n = len(values)
    h = n // 2
    wanted = [((n - 1) * (p / 100), min(math.floor((n - 1) * (p / 100)), n - 1)) for p in ps]
    kth = {h, h - 1 if n % 2 == 0 else h}
    for _, lo in wanted:
        kth.update((lo, min(lo + 1, n - 1)))
    part = np.partition(values, sorted(kth))
    median = float(part[h]) if n % 2 else (float(part[h - 1]) + float(part[h])) / 2
    out = []
    for v, lo in wanted:
        if v >= n - 1:
            out.append(float(part[n - 1]))
            continue
        a, b = float(part[lo]), float(part[lo + 1])
        g = v - lo
        d = b - a
        out.append(b - d * (1 - g) if g >= 0.5 else a + d * g)
    return median, out


def _stats_ms(values: np.ndarray, name: str) -> dict[str, Optional[float]]:
    import numpy as np

    v = values[np.isfinite(values)] * 1e3
    if v.size == 0:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, **{f"p{p}_{name}_ms": None for p in (90, 99)}}
    median, (p90, p99) = order_stats(v, (90, 99))
    return {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": median, f"p90_{name}_ms": p90,
            f"p99_{name}_ms": p99}


def summarize(requests: Table, duration_s: Optional[float] = None, **extra: Any) -> dict[str, Any]:
    """The run's summary with ``vllm bench serve``'s key names where they exist.

    ``requests``: the request rows, a DataFrame or columns (:data:`Table`). ``duration`` is from the first arrival to
    the last finish. TTFT/TPOT/E2E come from the request rows; ITL is only known where per-token times were measured
    (emulate/deploy): a simulated run leaves it None.
    """
    import numpy as np

    n = _num_rows(requests)
    ok = _column(requests, "status") == "ok" if n else np.zeros(0, dtype=bool)
    n_ok = int(ok.sum())

    def okcol(name: str, dtype: Any = None) -> np.ndarray:
        return _column(requests, name, dtype)[ok]

    arrival = _column(requests, "arrival_s", float)
    if duration_s is None:
        duration_s = float(np.nanmax(okcol("finish_s", float)) - np.nanmin(arrival)) if n_ok else 0.0
    dur = max(duration_s, 1e-9)
    in_tok = int(np.nansum(okcol("prompt_tokens"))) if n_ok else 0  # nansum: a DataFrame's sum skips NaN
    out_tok = int(np.nansum(okcol("output_tokens"))) if n_ok else 0
    s: dict[str, Any] = {
        "completed": n_ok,
        "failed": int(n - n_ok),
        "duration": float(duration_s),
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "request_throughput": n_ok / dur,
        "output_throughput": out_tok / dur,
        "total_token_throughput": (in_tok + out_tok) / dur,
    }
    s.update(_stats_ms(okcol("ttft_s", float), "ttft"))
    s.update(_stats_ms(okcol("tpot_s", float), "tpot"))
    if "itl_s" in requests:
        s.update(_stats_ms(okcol("itl_s", float), "itl"))
    else:
        s.update({k: None for k in ("mean_itl_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms")})
    s.update(_stats_ms(okcol("e2e_s", float), "e2el"))
    if n > 1:
        span = float(np.nanmax(arrival) - np.nanmin(arrival))
        s["achieved_qps"] = (n - 1) / span if span > 0 else None
    else:
        s["achieved_qps"] = None
    pre = _column(requests, "num_preemptions") if n else np.array([0])
    known = pre[pre >= 0]  # -1: unknown (measured against a live engine)
    s["num_preemptions"] = int(known.sum()) if known.size else None
    if "decision_ms" in requests and n:
        d = _column(requests, "decision_ms", float)
        d = d[np.isfinite(d)]
        s["mean_scheduler_overhead_ms"] = float(d.mean()) if d.size else None
        s["p99_scheduler_overhead_ms"] = order_stats(d, (99,))[1][0] if d.size else None
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


def _arrow_array(col: np.ndarray) -> Any:
    """A numpy column as a pyarrow array, as pandas' ``to_parquet`` stores it (NaN as null).

    Integer, float and boolean columns and columns of strings are built from their buffers: ``pyarrow.array``
    imports pandas to look for pandas objects, which is what a simulated run's writer avoids. Anything else goes
    through ``pyarrow.array``.
    """
    import numpy as np
    import pyarrow as pa

    col = np.asarray(col)
    n = len(col)
    kind = col.dtype.kind
    if kind in "iuf" and col.dtype.itemsize == 8:
        data = pa.py_buffer(np.ascontiguousarray(col))
        typ = {"i": pa.int64(), "u": pa.uint64(), "f": pa.float64()}[kind]
        if kind == "f" and np.isnan(col).any():
            valid = ~np.isnan(col)
            bits = pa.py_buffer(np.packbits(valid, bitorder="little"))
            return pa.Array.from_buffers(typ, n, [bits, data], null_count=int(n - valid.sum()))
        return pa.Array.from_buffers(typ, n, [None, data])
    if kind == "b":
        return pa.Array.from_buffers(pa.bool_(), n, [None, pa.py_buffer(np.packbits(col, bitorder="little"))])
    if kind == "O":
        values = col.tolist()
        try:
            text = "".join(values)  # a TypeError unless every entry is a string
        except TypeError:
            return pa.array(col, from_pandas=True)
        data = text.encode()
        if len(data) == len(text):  # ASCII: a string's bytes are its characters
            lengths = np.fromiter(map(len, values), dtype=np.int64, count=n)
        else:
            lengths = np.fromiter((len(v.encode()) for v in values), dtype=np.int64, count=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return pa.Array.from_buffers(pa.large_string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return pa.array(col, from_pandas=True)


def write_parquet(path: Path | str, df: Table) -> None:
    """A table (a DataFrame, or columns) as parquet, atomically. Columns are stored as pandas' ``to_parquet`` stores
    a DataFrame of them (NaN as null, strings as large strings), without importing pandas: both read back alike.
    Only the string columns are dictionary-encoded (times and counts are nearly all distinct: a dictionary would be
    built and dropped, half the writing time of a 100,000-request table)."""
    if hasattr(df, "to_parquet"):
        write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: _arrow_array(col) for name, col in df.items()})
    strings = [f.name for f in table.schema if pa.types.is_large_string(f.type) or pa.types.is_string(f.type)]
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, use_dictionary=strings))


def write_run(run_dir: Path | str, config_yaml: str, requests: Table, instances: Table,
              summary: Mapping[str, Any], extra: Optional[Mapping[str, Table]] = None) -> Path:
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
