"""Request-length datasets: the bundled traces by name, and a user's own file in the same formats by path.

Every loader returns a pandas DataFrame with one row per request, in file order:

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

import gzip
import hashlib
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
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


def _read_table(path: Path) -> pd.DataFrame:
    """Read one CSV / parquet / JSON-lines file as it is (strings kept as strings, no type guessing for JSON)."""
    name = path.name.lower().removesuffix(".gz")
    try:
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
        if name.endswith((".jsonl", ".json", ".ndjson")):
            with gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8") as f:
                return pd.DataFrame.from_records([json.loads(line) for line in f if line.strip()])
        return pd.read_csv(path)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise ValueError(f"{path}: cannot be read as {name.rsplit('.', 1)[-1]}: {e}") from e


def _to_numeric(df: pd.DataFrame, col: str, source: str, integral: bool) -> np.ndarray:
    """A numeric column as a numpy array; a ValueError names the file, column and first offending row."""
    raw = df[col]
    vals = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(vals)
    if integral:
        bad |= np.isfinite(vals) & (vals != np.floor(vals))
    if bad.any():
        i = int(np.argmax(bad))
        kind = "integer" if integral else "numeric"
        raise ValueError(f"{source}: column {col!r} has {int(bad.sum())} non-{kind} value(s), first at data row {i}: "
                         f"{raw.iloc[i]!r}")
    return vals.astype(np.int64) if integral else vals


def _normalise(df: pd.DataFrame, fmt: str | None, source: str) -> tuple[pd.DataFrame, str]:
    """Rename a raw table to our columns and check types. Returns (frame, format)."""
    if fmt is None:
        fmt = detect_format(df.columns)
        if fmt is None:
            raise ValueError(
                f"{source}: columns {list(df.columns)} match no known format; expected one of "
                f"{[list(_REQUIRED[f]) for f in FORMATS]} (optional: num_predicted_decode_tokens / arrived_at, "
                "predicted_output_tokens or predicted_length / arrival_s)")
    elif fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {FORMATS} or None (auto-detect)")
    missing = [c for c in _REQUIRED[fmt] if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: format {fmt!r} needs columns {missing}, the file has {list(df.columns)}")
    out = pd.DataFrame(index=pd.RangeIndex(len(df)))
    for src, dst in {**_REQUIRED[fmt], **_OPTIONAL[fmt]}.items():
        if src not in df.columns or dst in out.columns:
            continue
        if dst in ("prompt", "response"):
            out[dst] = df[src].fillna("").astype(str).to_numpy()
        else:
            out[dst] = _to_numeric(df, src, source, integral=dst in _INT_COLUMNS)
    return out, fmt


def _file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _count_text(df: pd.DataFrame, paths: Sequence[Path], tokenizer: str, limit: int | None) -> pd.DataFrame:
    """Add prompt_tokens/output_tokens to a text frame; full-file counts are cached as parquet by hash+tokenizer."""
    from .tokenizer import count_tokens, tokenizer_file

    tok_id = tokenizer if tokenizer in ("llama2", "qwen2") else _file_digest([tokenizer_file(tokenizer)])[:16]
    key = hashlib.sha256(f"{_file_digest(paths)}|{tok_id}|{COUNTING_VERSION}".encode()).hexdigest()[:24]
    cache = cache_dir() / "token_counts" / f"{key}.parquet"
    counts = None
    if cache.exists():
        try:
            counts = pd.read_parquet(cache)
        except (OSError, ValueError):  # a corrupt cache file is recounted, not fatal
            counts = None
        if counts is not None and len(counts) < len(df):
            counts = None
    if counts is None:
        p, o = count_tokens(df["prompt"].tolist(), df["response"].tolist(), tokenizer)
        counts = pd.DataFrame({"prompt_tokens": p, "output_tokens": o})
        if limit is None:  # only full-file counts are cached; a partial load is cheap to recount
            from vidur.records import write_atomic

            try:  # atomic: concurrent loaders never see half a file
                write_atomic(cache, lambda tmp: counts.to_parquet(tmp, index=False))
            except OSError:
                pass  # a read-only cache only costs time
    df = df.copy()
    df.insert(0, "prompt_tokens", counts["prompt_tokens"].to_numpy()[: len(df)].astype(np.int64))
    df.insert(1, "output_tokens", counts["output_tokens"].to_numpy()[: len(df)].astype(np.int64))
    return df.drop(columns=["response"])


@lru_cache(maxsize=8)
def _load_cached(paths: tuple[Path, ...], stamps: tuple, fmt: str | None, tokenizer: str,
                 limit: int | None) -> pd.DataFrame:
    source = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/{{{', '.join(p.name for p in paths)}}}"
    raw = pd.concat([_read_table(p) for p in paths], ignore_index=True) if len(paths) > 1 else _read_table(paths[0])
    if limit is not None:
        raw = raw.iloc[:limit].reset_index(drop=True)
    df, fmt = _normalise(raw, fmt, source)
    if fmt == "text":
        df = _count_text(df, paths, tokenizer, limit)
    df.attrs["source"] = source
    return df


def load_dataset(name_or_path: PathLike, *, format: str | None = None, tokenizer: str = "llama2",
                 limit: int | None = None) -> pd.DataFrame:
    """Load a bundled dataset by name (see ``list_datasets()``) or a user's file by path, unfiltered, in file order.

    ``format``: None auto-detects from the columns (see the module doc). ``tokenizer``: "llama2" (default) or "qwen2"
    for text files. ``limit``: read only the first rows (useful for quick looks at the text dataset).
    ``df.attrs["source"]`` names the file(s), for error messages further down.
    """
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
    df = _load_cached(tuple(paths), stamps, format, tokenizer, limit)
    out = df.copy()
    out.attrs = dict(df.attrs)
    return out


def filter_requests(df: pd.DataFrame, min_prompt_tokens: int = 4, max_model_len: int = 4096,
                    source: str | None = None) -> pd.DataFrame:
    """Keep the rows Block's benchmark client keeps: prompt >= min_prompt_tokens, output > 0,
    prompt + output < max_model_len (a request must fit in the model's context). File order is kept.

    Raises ValueError naming the file when nothing is left.
    """
    p = df["prompt_tokens"].to_numpy()
    o = df["output_tokens"].to_numpy()
    keep = (p >= min_prompt_tokens) & (o > 0) & (p + o < max_model_len)
    if not keep.any():
        src = source or df.attrs.get("source", "<dataset>")
        raise ValueError(f"{src}: no request left after filtering ({len(df)} rows; need prompt >= {min_prompt_tokens} "
                         f"tokens, output > 0, prompt + output < max_model_len={max_model_len})")
    out = df.loc[keep].reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out
