"""Tag prompts with predicted lengths offline: ``python -m length_estimation.tag [overrides]`` (Hydra).

As the paper's ``eval_roberta.py --tag-data True``: every prompt gets a ``predicted_length`` column (integer >= 1),
written next to the dataset's own columns, so that experiments replay the workload with Block*'s estimates::

    python -m length_estimation.tag                          # the held-out test split -> ${run_dir}/tagged/...parquet
    python -m experiments.run dataset=sharegpt_text dataset.path=outputs/length/minilm-llama2-log/tagged/sharegpt_text-llama2-test.parquet \
        dataset.predicted_length=column policy=block_star

The file keeps ``prompt_tokens``, ``output_tokens`` (served-model tokens, as the loader counted them) and the prompt
text, plus ``row`` (position in the source file) and ``split``; ``data.load_dataset`` reads it in the ``lengths``
format and maps ``predicted_length`` to ``predicted_output_tokens``. Tag the test split (default) for honest
experiments: predictions on training rows are optimistic. ``tag.input`` tags another text file (all its rows).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vidur.records import write_atomic

from .dataset import FILTERED, DataConfig, load_splits, load_text_frame
from .train import _plain
from .transformer import TransformerEstimator, set_threads

log = logging.getLogger("length_estimation.tag")

FRONT = ("row", "split", "prompt_tokens", "output_tokens", "predicted_length")


def write_table(df: pd.DataFrame, path: Path) -> None:
    """Write CSV (optionally .gz) or parquet by extension, atomically."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".parquet"):
        write_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))
    elif name.endswith((".csv", ".csv.gz")):
        gz = "gzip" if name.endswith(".gz") else None
        write_atomic(path, lambda tmp: df.to_csv(tmp, index=False, compression=gz))
    else:
        raise ValueError(f"{path}: use a .parquet or .csv[.gz] output file")


def tag_frame(est: TransformerEstimator, df: pd.DataFrame, progress: bool = False) -> pd.DataFrame:
    """``df`` with a ``predicted_length`` column (int64 >= 1) from ``est`` over ``df["prompt"]``; columns ordered
    row, split, prompt_tokens, output_tokens, predicted_length, ..., prompt. An existing prediction column is
    replaced (the loader would otherwise prefer it)."""
    out = df.drop(columns=[c for c in ("predicted_output_tokens", "predicted_length") if c in df.columns])
    out = out.reset_index(drop=True)
    out["predicted_length"] = est.predict(out["prompt"].fillna("").astype(str).tolist(), progress=progress)
    front = [c for c in FRONT if c in out.columns]
    rest = [c for c in out.columns if c not in front and c != "prompt"]
    return out[front + rest + (["prompt"] if "prompt" in out.columns else [])]


def run_tagging(cfg) -> dict[str, Any]:
    """Tag per ``cfg`` (the composed ``conf/length`` config); returns where and what was written."""
    c = _plain(cfg)
    t = c.get("tag", {})
    run_dir = Path(c["run_dir"])
    ckpt = Path(t.get("checkpoint") or run_dir / "model")
    split = str(t.get("split", "test"))
    data_cfg = DataConfig.from_mapping(c["data"])

    if t.get("input"):
        from data import list_datasets

        src = str(t["input"])
        other = DataConfig(dataset=src, path=None, tokenizer=data_cfg.tokenizer) if src in list_datasets() else \
            DataConfig(path=src, tokenizer=data_cfg.tokenizer)
        if split != "all":
            raise ValueError(f"tag.split={split}: splits exist only for the training data (tag.input=null); "
                             "use tag.split=all to tag every row of another file")
        df = load_text_frame(other)
        df.insert(1, "split", "all")
        name = Path(src).name.split(".")[0] if other.path else src
    else:
        df = load_splits(data_cfg)
        if split != "all":
            df = df[df["split"] == split]
        name = Path(data_cfg.path).name.split(".")[0] if data_cfg.path else data_cfg.dataset
    if df.empty:
        raise ValueError(f"nothing to tag: split {split!r} is empty")
    output = Path(t.get("output") or run_dir / "tagged" / f"{name}-{data_cfg.tokenizer}-{split}.parquet")

    set_threads(c.get("num_threads"))
    est = TransformerEstimator.load(ckpt, device=c.get("device", "auto"), batch_size=int(t.get("batch_size", 64)))
    t0 = time.perf_counter()
    out = tag_frame(est, df, progress=bool(c.get("progress", True)))
    elapsed = time.perf_counter() - t0
    write_table(out, output)

    # self-check: the workload loader reads the column back as predicted_output_tokens
    from data import load_dataset

    back = load_dataset(output)
    ok = "predicted_output_tokens" in back.columns and np.array_equal(
        back["predicted_output_tokens"].to_numpy(), out["predicted_length"].to_numpy())
    if not ok:
        raise RuntimeError(f"{output}: data.load_dataset does not read predicted_length back")
    return {"output": str(output), "rows": len(out), "split": split, "checkpoint": str(ckpt),
            "seconds": round(elapsed, 1), "filtered_rows": int((out["split"] == FILTERED).sum()),
            "mean_predicted": float(out["predicted_length"].mean())}


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path="../conf/length", config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        r = run_tagging(cfg)
        print(f"tagged {r['rows']} prompts ({r['split']}) in {r['seconds']:.0f} s -> {r['output']}\n"
              f"use: python -m experiments.run dataset=sharegpt_text dataset.path={r['output']} "
              "dataset.predicted_length=column policy=block_star")

    _main()


if __name__ == "__main__":
    main()
