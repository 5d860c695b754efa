"""Request-length datasets: the bundled traces by name, and a user's own file in the same formats by path.

``load_dataset`` returns a pandas DataFrame with one row per request, in file order; ``load_columns`` returns the same
columns as numpy arrays (:class:`Columns`), which is what a simulated run reads its workload through: for CSV it
imports no pandas (pyarrow's parser, or the standard library's for text), and pandas alone costs a run's process about
0.2 s of start-up, a fifth of a 10,000-request run. The columns:

- ``prompt_tokens``, ``output_tokens`` (int64): prompt length and true response length;
- ``predicted_output_tokens`` (int64) when the file carries a length prediction;
- ``arrival_s`` (float64) when the file carries arrival timestamps (seconds, as in the file);
- ``prompt`` (str) for text files, whose lengths are counted with a bundled tokenizer.

Accepted formats (detected from the columns, or forced with ``format=``):

- ``"vidur"``: ``num_prefill_tokens, num_decode_tokens[, num_predicted_decode_tokens][, arrived_at]`` (Vidur / Block
  trace CSVs; extra columns such as ``num_total_tokens``, ``pd_ratio`` are ignored);
- ``"lengths"``: ``prompt_tokens, output_tokens[, predicted_output_tokens | predicted_length][, arrival_s][, prompt]``
  (``predicted_length`` is what the length tagger writes);
- ``"text"``: records with ``prompt`` and ``response`` strings (JSONL, optionally gzipped); token counts are computed
  (see ``data.tokenizer``) and cached as parquet in the user cache dir, keyed by the file hashes and tokenizer.

Files may be CSV, parquet or JSON lines (``.csv``, ``.parquet``, ``.jsonl``/``.json``, each optionally ``.gz``).
Nothing here reads outside this package directory except the user's own file and the cache dir.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

DATA_DIR = Path(__file__).resolve().parent
COUNTING_VERSION = "1"  # bump when the token-counting convention changes, to invalidate cached counts

# name -> files (relative to DATA_DIR, read in order and concatenated)
DATASETS: dict[str, tuple[str, ...]] = {
    "sharegpt": ("traces/sharegpt_val_10k_llama2.csv",),
    "sharegpt_58k": ("traces/sharegpt_V3_format_lens.csv",),
    "sharegpt_predicted": ("traces/sharegpt-val-10k-predicted-len.csv",),
    "arxiv": ("traces/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",),
    "azure_conv": ("traces/splitwise_conv.csv",),
    "azure_code": ("traces/splitwise_code.csv",),
    "sharegpt_text": (
        "sharegpt_text/sharegpt_v3_first_turn_pairs.part1.jsonl.gz",
        "sharegpt_text/sharegpt_v3_first_turn_pairs.part2.jsonl.gz",
    ),
}

FORMATS = ("vidur", "lengths", "text")
# source column -> our column, per format (required first; the optional ones are renamed when present)
_REQUIRED = {
    "vidur": {"num_prefill_tokens": "prompt_tokens", "num_decode_tokens": "output_tokens"},
    "lengths": {"prompt_tokens": "prompt_tokens", "output_tokens": "output_tokens"},
    "text": {"prompt": "prompt", "response": "response"},
}
_OPTIONAL = {
    "vidur": {"num_predicted_decode_tokens": "predicted_output_tokens", "arrived_at": "arrival_s"},
    "lengths": {"predicted_output_tokens": "predicted_output_tokens", "predicted_length": "predicted_output_tokens",
                "arrival_s": "arrival_s", "prompt": "prompt"},
    "text": {"predicted_output_tokens": "predicted_output_tokens", "predicted_length": "predicted_output_tokens",
             "arrival_s": "arrival_s"},
}
_INT_COLUMNS = ("prompt_tokens", "output_tokens", "predicted_output_tokens")

PathLike = str | os.PathLike


def list_datasets() -> list[str]:
    """The names accepted by ``load_dataset``."""
    return list(DATASETS)


def dataset_files(name: str) -> list[Path]:
    """The bundled files behind a dataset name."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: known datasets are {list(DATASETS)}, or pass a path to a file")
    return [DATA_DIR / rel for rel in DATASETS[name]]


def cache_dir() -> Path:
    """Per-user cache dir: ``$XDG_CACHE_HOME/block-repro`` or ``~/.cache/block-repro`` (no platformdirs needed)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "block-repro"


def detect_format(columns: Sequence[str]) -> str | None:
    """The first format whose required columns are all present, else None."""
    cols = set(columns)
    for fmt in FORMATS:
        if set(_REQUIRED[fmt]) <= cols:
            return fmt
    return None


class Columns:
    """A table as named numpy arrays of one length (in order) and the file(s) it came from (``source``, for error
    messages further down): what ``load_columns`` returns and the workload builder works on, without pandas.

    The arrays of a loaded dataset are shared with the loader's cache and read-only; ``take`` makes new ones.
    """

    __slots__ = ("data", "source")

    def __init__(self, data: dict[str, np.ndarray], source: str) -> None:
        self.data = data
        self.source = source

    def __len__(self) -> int:
        return len(next(iter(self.data.values()))) if self.data else 0

    def __contains__(self, name: object) -> bool:
        return name in self.data

    def __getitem__(self, name: str) -> np.ndarray:
        return self.data[name]

    @property
    def columns(self) -> list[str]:
        return list(self.data)

    def take(self, rows: Union[np.ndarray, slice]) -> "Columns":
        """The rows ``rows`` selects (indices, a boolean mask or a slice), in that order."""
        return Columns({k: v[rows] for k, v in self.data.items()}, self.source)

    def frame(self) -> "pd.DataFrame":
        """As a pandas DataFrame (pandas imported here), ``attrs["source"]`` set."""
        import pandas as pd

        df = pd.DataFrame(dict(self.data), index=pd.RangeIndex(len(self)))
        df.attrs["source"] = self.source
        return df


def _read_csv_arrow(path: Path) -> dict[str, np.ndarray] | None:
    """A CSV file of numbers only (int64 / float64 columns, no empty field, distinct names) read by pyarrow's parser
    (C++, a few ms for 100,000 rows; numbers rounded as Python's ``float`` rounds them), its columns taken from the
    arrow buffers as numpy arrays; None for any other file (``_read_csv_rows`` reads it).

    On one thread: a fresh process's first threaded read starts arrow's thread pool, which made a 100,000-row trace
    take 38 ms against 13 ms on one thread (10,000 rows: 8 ms either way).

    Not ``Array.to_numpy``: it imports pandas, which is what this path avoids.
    """
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(use_threads=False),
                              parse_options=pcsv.ParseOptions(newlines_in_values=True),
                              convert_options=pcsv.ConvertOptions(timestamp_parsers=[]))
    except (pa.ArrowException, ValueError, OSError):
        return None
    if len(set(table.column_names)) < table.num_columns:
        return None
    out: dict[str, np.ndarray] = {}
    for name, col in zip(table.column_names, table.columns):
        if col.type not in (pa.int64(), pa.float64()) or col.null_count:
            return None
        dtype = np.int64 if col.type == pa.int64() else np.float64
        parts = [np.frombuffer(ch.buffers()[1], dtype=dtype, count=len(ch), offset=ch.offset * 8)
                 for ch in col.chunks]
        out[name] = np.concatenate(parts) if len(parts) != 1 else parts[0]
    return out


def _read_csv_rows(path: Path) -> dict[str, np.ndarray]:
    """A CSV file's columns as arrays of strings, with the standard library's reader (no pandas).

    As pandas reads one: blank lines skipped, a short row's missing fields empty, a UTF-8 byte-order mark dropped,
    quoted fields may hold commas and newlines, a repeated column name gets ``.1``, ``.2``...; a row with more fields
    than the header is an error.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows:
        raise ValueError("no columns to parse from the file (it is empty)")
    header, body = rows[0], rows[1:]
    seen: dict[str, int] = {}
    for j, name in enumerate(header):
        if name in seen:
            seen[name] += 1
            header[j] = f"{name}.{seen[name]}"
        else:
            seen[name] = 0
    width = len(header)
    for i, r in enumerate(body):
        if len(r) > width:
            raise ValueError(f"data row {i} has {len(r)} fields, the header {width}")
        if len(r) < width:
            body[i] = r + [""] * (width - len(r))
    cols = list(zip(*body)) if body else [()] * width
    return {name: np.array(col, dtype=object) for name, col in zip(header, cols)}


def _read_table(path: Path) -> dict[str, np.ndarray]:
    """Read one CSV / parquet / JSON-lines file as it is (strings kept as strings, no type guessing for JSON).

    CSV (``.csv``, ``.csv.gz``) is read without pandas: by pyarrow when it holds numbers only, else as strings
    (``_to_numeric`` parses them); parquet, JSON lines and other compressions through pandas (imported then).
    """
    name = path.name.lower().removesuffix(".gz")
    try:
        if name.endswith(".csv"):  # .csv or .csv.gz
            return _read_csv_arrow(path) or _read_csv_rows(path)
        import pandas as pd

        if name.endswith(".parquet"):
            df = pd.read_parquet(path)
        elif name.endswith((".jsonl", ".json", ".ndjson")):
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                df = pd.DataFrame.from_records([json.loads(line) for line in f if line.strip()])
        else:
            df = pd.read_csv(path)
        return {str(c): df[c].to_numpy() for c in df.columns}
    except (ValueError, OSError, UnicodeDecodeError, csv.Error) as e:  # pandas' ParserError is a ValueError
        raise ValueError(f"{path}: cannot be read as {name.rsplit('.', 1)[-1]}: {e}") from e


def _to_numeric(raw: np.ndarray, col: str, source: str, integral: bool) -> np.ndarray:
    """A numeric column as a numpy array; a ValueError names the file, column and first offending row.

    Numbers stay numbers; strings (a CSV's fields) are parsed by Python's ``float``, and where one does not parse
    as pandas' ``to_numeric`` does (pandas imported only then: a file with a non-numeric entry).
    """
    try:
        vals = raw.astype(np.float64)
    except (ValueError, TypeError):
        import pandas as pd

        vals = pd.to_numeric(pd.Series(raw, dtype=object), errors="coerce").to_numpy(dtype=np.float64,
                                                                                      na_value=np.nan)
    bad = ~np.isfinite(vals)
    if integral:
        bad |= np.isfinite(vals) & (vals != np.floor(vals))
    if bad.any():
        i = int(np.argmax(bad))
        kind_name = "integer" if integral else "numeric"
        raise ValueError(f"{source}: column {col!r} has {int(bad.sum())} non-{kind_name} value(s), first at data row "
                         f"{i}: {raw[i]!r}")
    return vals.astype(np.int64) if integral else vals


def _text(raw: np.ndarray) -> np.ndarray:
    """A text column as strings (a missing entry: "")."""
    return np.array(["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in raw.tolist()],
                    dtype=object)


def _normalise(raw: dict[str, np.ndarray], fmt: str | None, source: str) -> tuple[dict[str, np.ndarray], str]:
    """Rename a raw table to our columns and check types. Returns (columns, format)."""
    if fmt is None:
        fmt = detect_format(list(raw))
        if fmt is None:
            raise ValueError(
                f"{source}: columns {list(raw)} match no known format; expected one of "
                f"{[list(_REQUIRED[f]) for f in FORMATS]} (optional: num_predicted_decode_tokens / arrived_at, "
                "predicted_output_tokens or predicted_length / arrival_s)")
    elif fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {FORMATS} or None (auto-detect)")
    missing = [c for c in _REQUIRED[fmt] if c not in raw]
    if missing:
        raise ValueError(f"{source}: format {fmt!r} needs columns {missing}, the file has {list(raw)}")
    out: dict[str, np.ndarray] = {}
    for src, dst in {**_REQUIRED[fmt], **_OPTIONAL[fmt]}.items():
        if src not in raw or dst in out:
            continue
        if dst in ("prompt", "response"):
            out[dst] = _text(raw[src])
        else:
            out[dst] = _to_numeric(raw[src], src, source, integral=dst in _INT_COLUMNS)
    return out, fmt


def _file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _count_text(cols: dict[str, np.ndarray], paths: Sequence[Path], tokenizer: str,
                limit: int | None) -> dict[str, np.ndarray]:
    """Add prompt_tokens/output_tokens (first) to text columns and drop the response; full-file counts are cached as
    parquet by hash+tokenizer."""
    import pandas as pd

    from .tokenizer import count_tokens, tokenizer_file

    n = len(cols["prompt"])
    tok_id = tokenizer if tokenizer in ("llama2", "qwen2") else _file_digest([tokenizer_file(tokenizer)])[:16]
    key = hashlib.sha256(f"{_file_digest(paths)}|{tok_id}|{COUNTING_VERSION}".encode()).hexdigest()[:24]
    cache = cache_dir() / "token_counts" / f"{key}.parquet"
    counts = None
    if cache.exists():
        try:
            counts = pd.read_parquet(cache)
        except (OSError, ValueError):  # a corrupt cache file is recounted, not fatal
            counts = None
        if counts is not None and len(counts) < n:
            counts = None
    if counts is None:
        p, o = count_tokens(cols["prompt"].tolist(), cols["response"].tolist(), tokenizer)
        counts = pd.DataFrame({"prompt_tokens": p, "output_tokens": o})
        if limit is None:  # only full-file counts are cached; a partial load is cheap to recount
            from vidur.records import write_atomic

            try:  # atomic: concurrent loaders never see half a file
                write_atomic(cache, lambda tmp: counts.to_parquet(tmp, index=False))
            except OSError:
                pass  # a read-only cache only costs time
    return {"prompt_tokens": counts["prompt_tokens"].to_numpy()[:n].astype(np.int64),
            "output_tokens": counts["output_tokens"].to_numpy()[:n].astype(np.int64),
            **{k: v for k, v in cols.items() if k != "response"}}


@lru_cache(maxsize=8)
def _load_cached(paths: tuple[Path, ...], stamps: tuple, fmt: str | None, tokenizer: str,
                 limit: int | None) -> Columns:
    source = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/{{{', '.join(p.name for p in paths)}}}"
    tables = [_read_table(p) for p in paths]
    raw = tables[0]
    if len(tables) > 1:  # concatenated as pandas.concat does: the union of the columns, in first-seen order
        names = list(dict.fromkeys(c for t in tables for c in t))
        raw = {c: np.concatenate([t[c] if c in t else np.full(len(next(iter(t.values()))), None, dtype=object)
                                  for t in tables]) for c in names}
    if limit is not None:
        raw = {k: v[:limit] for k, v in raw.items()}
    cols, fmt = _normalise(raw, fmt, source)
    if fmt == "text":
        cols = _count_text(cols, paths, tokenizer, limit)
    for v in cols.values():
        v.flags.writeable = False  # shared by every caller of the cache
    return Columns(cols, source)


def load_columns(name_or_path: PathLike, *, format: str | None = None, tokenizer: str = "llama2",
                 limit: int | None = None) -> Columns:
    """``load_dataset``'s columns as numpy arrays (read-only, shared with the loader's cache), without pandas."""
    key = os.fspath(name_or_path)
    if key in DATASETS:
        paths = dataset_files(key)
    else:
        p = Path(key).expanduser()
        if not p.exists():
            hint = f" (and it is not a dataset name: {list(DATASETS)})" if os.sep not in key else ""
            raise FileNotFoundError(f"{p}: no such file{hint}")
        if p.is_dir():
            raise ValueError(f"{p}: is a directory, expected a CSV / parquet / JSONL file")
        paths = [p.resolve()]
    for p in paths:
        if not p.exists():  # a bundled file that went missing from the checkout
            raise FileNotFoundError(f"{p}: no such file (bundled data missing from this installation)")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit} must be positive")
    stamps = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    cached = _load_cached(tuple(paths), stamps, format, tokenizer, limit)
    return Columns(dict(cached.data), cached.source)  # the cache's arrays (read-only) in a mapping of the caller's own


def load_dataset(name_or_path: PathLike, *, format: str | None = None, tokenizer: str = "llama2",
                 limit: int | None = None) -> "pd.DataFrame":
    """Load a bundled dataset by name (see ``list_datasets()``) or a user's file by path, unfiltered, in file order.

    ``format``: None auto-detects from the columns (see the module doc). ``tokenizer``: "llama2" (default) or "qwen2"
    for text files. ``limit``: read only the first rows (useful for quick looks at the text dataset).
    ``df.attrs["source"]`` names the file(s), for error messages further down.
    """
    return load_columns(name_or_path, format=format, tokenizer=tokenizer, limit=limit).frame()


def filter_requests(df: "pd.DataFrame | Columns", min_prompt_tokens: int = 4, max_model_len: int = 4096,
                    source: str | None = None) -> "pd.DataFrame | Columns":
    """Keep the rows Block's benchmark client keeps: prompt >= min_prompt_tokens, output > 0,
    prompt + output < max_model_len (a request must fit in the model's context). File order is kept; a DataFrame
    gives a DataFrame, :class:`Columns` give Columns.

    Raises ValueError naming the file when nothing is left.
    """
    p, o = np.asarray(df["prompt_tokens"]), np.asarray(df["output_tokens"])
    keep = (p >= min_prompt_tokens) & (o > 0) & (p + o < max_model_len)
    if not keep.any():
        src = source or (df.source if isinstance(df, Columns) else df.attrs.get("source", "<dataset>"))
        raise ValueError(f"{src}: no request left after filtering ({len(df)} rows; need prompt >= {min_prompt_tokens} "
                         f"tokens, output > 0, prompt + output < max_model_len={max_model_len})")
    if isinstance(df, Columns):
        return df.take(keep)
    out = df.loc[keep].reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out
