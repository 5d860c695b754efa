"""Reading Vidur-format profiles (``mlp.csv``, ``attention.csv`` under ``<profile_root>/compute/<gpu>/<org>/<model>``)
into plain frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vidur.execution_model.numerics import TOKEN_OPS, PathLike

if TYPE_CHECKING:  # imported where used: a cached model (every run but a profile's first) needs no pandas
    import pandas as pd


def _median_col(df: pd.DataFrame, op: str) -> pd.Series:
    import pandas as pd

    col = f"time_stats.{op}.median"
    return df[col] if col in df.columns else pd.Series(np.nan, index=df.index)


def read_mlp(path: PathLike) -> pd.DataFrame:
    """mlp.csv as columns num_tokens, tp, <op> (median ms) for every token op (NaN where absent)."""
    import pandas as pd

    raw = pd.read_csv(path)
    out = pd.DataFrame({"num_tokens": raw["num_tokens"].astype(int),
                        "tp": raw.get("num_tensor_parallel_workers", pd.Series(1, index=raw.index)).astype(int)})
    for op in TOKEN_OPS:
        out[op] = _median_col(raw, op).astype(float)
    for k in ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size"):
        if k in raw.columns:
            out[k] = raw[k]
    return out


def read_attention(path: PathLike) -> pd.DataFrame:
    import pandas as pd

    raw = pd.read_csv(path)
    out = pd.DataFrame({
        "batch": raw["batch_size"].astype(int),
        "chunk": raw["prefill_chunk_size"].astype(int),
        "kv": raw["kv_cache_size"].astype(int),
        "is_prefill": raw["is_prefill"].astype(str).str.lower().isin(["true", "1"]),
        "tp": raw.get("num_tensor_parallel_workers", pd.Series(1, index=raw.index)).astype(int),
        "prefill": _median_col(raw, "attn_prefill").astype(float),
        "decode": _median_col(raw, "attn_decode").astype(float),
        "kv_save": _median_col(raw, "attn_kv_cache_save").astype(float),
    })
    for k in ("n_q_head", "n_kv_head", "n_embd", "block_size"):
        if k in raw.columns:
            out[k] = raw[k]
    return out


def _attention_dims(att: pd.DataFrame) -> dict[str, int]:
    q = int(att["n_q_head"].iloc[0])
    kvh = int(att["n_kv_head"].iloc[0])
    emb = int(att["n_embd"].iloc[0])
    hd = emb // q
    return {"q_heads": q, "kv_heads": kvh, "hidden": emb, "head_dim": hd}


def _profile_models(compute_dir: Path) -> list[tuple[str, Path]]:
    """(model folder, folder path) for every <org>/<model> folder under one GPU's compute dir."""
    out = []
    if compute_dir.is_dir():
        for org in sorted(p for p in compute_dir.iterdir() if p.is_dir()):
            for m in sorted(p for p in org.iterdir() if p.is_dir()):
                out.append((f"{org.name}/{m.name}", m))
    return out
