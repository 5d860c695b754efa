"""Training data of the length estimator: (prompt text, true response length in the served model's tokens), split.

The paper (Block ``sample.py``) draws 50,000 ShareGPT records at random with seed 42 and takes the first 40,000 as
train and the last 10,000 as validation ("val-10k", on which it reports MAE and Acc-10/50/100). The bundled
``sharegpt_text`` dataset has 11,135 first-turn pairs, so we keep the *proportions*: after filtering, a seeded
permutation puts the first ``1 - test_fraction`` (80 %) in train and the rest (20 %) in ``test`` (the paper's
val-10k role: held out, used only by ``length_estimation.evaluate``); the last ``val_fraction`` of the train part
becomes ``val``, the early-stopping slice the trainer evaluates on. Splits are a pure function of the filtered rows
and the seed, so every command (train, evaluate, tag) recomputes the same split from the same config.

Filtering drops rows that cannot serve as examples: an empty (or whitespace-only) prompt, a response of fewer than
``min_output_tokens`` tokens, and (as ``data.filter_requests``) ``prompt + output >= max_model_len`` (the request
could never be served; ``null`` keeps them). Dropped rows keep ``split == "filtered"``.

Token counts come from ``data.load_dataset`` (``tokenizer="llama2"`` or ``"qwen2"``): the targets are the served
model's token counts of the response, as in the paper. This module needs numpy and pandas only (no torch), so the
CPU estimator can share the split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
FILTERED = "filtered"


@dataclass
class DataConfig:
    """Which rows train and evaluate the estimator (``conf/length/data/*.yaml``)."""

    dataset: str = "sharegpt_text"     # a bundled name (data.list_datasets()) with prompt text
    path: str | None = None            # or a user's JSONL/CSV/parquet file with prompt + response (or + output_tokens)
    tokenizer: str = "llama2"          # the served model's tokenizer that counts the target: llama2 | qwen2 | a path
    seed: int = 42                     # the paper's split seed
    test_fraction: float = 0.2         # held out for evaluation (the paper's 10k of 50k)
    val_fraction: float = 0.05         # of the train part, for early stopping
    max_model_len: int | None = 4096   # drop prompt + output >= this (as the workload filter); null keeps all
    min_output_tokens: int = 1
    limit: int | None = None           # read only the first rows of the file (quick runs and tests)

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> DataConfig:
        m = dict(m or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(m) - known)
        if unknown:
            raise ValueError(f"data config: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**m)

    @property
    def source(self) -> str:
        return str(self.path) if self.path else self.dataset

    def to_dict(self) -> dict:
        return asdict(self)


def load_text_frame(cfg: DataConfig) -> pd.DataFrame:
    """The dataset as ``data.load_dataset`` reads it, plus ``row`` (position in the file). Needs a prompt column."""
    from data import load_dataset

    df = load_dataset(cfg.source, tokenizer=cfg.tokenizer, limit=cfg.limit)
    if "prompt" not in df.columns:
        raise ValueError(f"{df.attrs.get('source', cfg.source)}: has no prompt text (columns {list(df.columns)}); "
                         "the transformer estimator needs a text dataset such as sharegpt_text")
    df.insert(0, "row", np.arange(len(df), dtype=np.int64))
    return df


def keep_mask(df: pd.DataFrame, max_model_len: int | None = 4096, min_output_tokens: int = 1) -> np.ndarray:
    """Rows usable as examples: non-blank prompt, output >= min_output_tokens, prompt + output < max_model_len."""
    prompt = df["prompt"].fillna("").astype(str)
    keep = prompt.str.strip().str.len().to_numpy() > 0
    out = df["output_tokens"].to_numpy()
    keep &= out >= min_output_tokens
    if max_model_len is not None:
        keep &= (df["prompt_tokens"].to_numpy() + out) < max_model_len
    return keep


def assign_splits(n: int, seed: int = 42, test_fraction: float = 0.2, val_fraction: float = 0.05) -> np.ndarray:
    """Split labels for n rows: a permutation with ``numpy.random.default_rng(seed)``; its first
    ``n - round(test_fraction * n)`` positions are train (the last ``round(val_fraction * n_train)`` of them val),
    the rest test. Deterministic in (n, seed, fractions)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in [0, 1)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(test_fraction * n)
    n_train_all = n - n_test
    n_val = round(val_fraction * n_train_all)
    labels = np.empty(n, dtype=object)
    labels[perm[: n_train_all - n_val]] = "train"
    labels[perm[n_train_all - n_val: n_train_all]] = "val"
    labels[perm[n_train_all:]] = "test"
    return labels


def load_splits(cfg: DataConfig | Mapping[str, Any]) -> pd.DataFrame:
    """Every row of the dataset with a ``split`` column: train | val | test | filtered.

    Columns: row, prompt_tokens, output_tokens, prompt, [predicted_output_tokens, arrival_s,] split."""
    if not isinstance(cfg, DataConfig):
        cfg = DataConfig.from_mapping(cfg)
    df = load_text_frame(cfg)
    keep = keep_mask(df, cfg.max_model_len, cfg.min_output_tokens)
    split = np.full(len(df), FILTERED, dtype=object)
    split[keep] = assign_splits(int(keep.sum()), cfg.seed, cfg.test_fraction, cfg.val_fraction)
    df["split"] = split
    if not (split == "train").any():
        raise ValueError(f"{df.attrs.get('source', cfg.source)}: no training row left after filtering "
                         f"({len(df)} rows, {int(keep.sum())} kept)")
    return df


def split_frame(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of one split (``all`` = every non-filtered row), index reset; ``attrs`` kept."""
    if name == "all":
        out = df[df["split"] != FILTERED]
    elif name in SPLITS:
        out = df[df["split"] == name]
    else:
        raise ValueError(f"unknown split {name!r}: use one of {SPLITS} or 'all'")
    out = out.reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out


def split_summary(df: pd.DataFrame) -> dict[str, dict]:
    """Rows and output-length statistics per split (for logs and the docs)."""
    out = {}
    for name, g in df.groupby("split", sort=False):
        o = g["output_tokens"].to_numpy()
        out[str(name)] = {"rows": len(g), "mean_output": float(o.mean()), "median_output": float(np.median(o))}
    return out
