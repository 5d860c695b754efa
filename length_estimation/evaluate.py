"""Evaluate a trained length estimator: ``python -m length_estimation.evaluate [overrides]`` (Hydra).

Uses the same overrides as the training command (they name the run and recompute the split), e.g.::

    python -m length_estimation.evaluate                                   # ${run_dir}/model on the test split
    python -m length_estimation.evaluate evaluate.checkpoint=outputs/length/minilm-llama2-log/checkpoints/step-0000200

On the held-out split it computes MAE, MAPE, Acc-10/50/100 (``length_estimation.metrics``) for:

- the transformer estimator;
- constant baselines: the training split's mean output length, and its median (the best constant for MAE);
- the authors' predictions, ``data/traces/sharegpt-val-10k-predicted-len.csv`` (``num_predicted_decode_tokens``
  vs ``num_decode_tokens``): their RoBERTa-base on *their* data (Llama-2-7B's own greedy responses), so the row is a
  reference point, not a comparison on the same requests.

Writes into ``${run_dir}/eval_<split>/`` (or ``evaluate.out_dir``): ``metrics.json``, ``metrics.csv``,
``metrics.md``, ``predictions.csv`` (row, prompt_tokens, output_tokens, predicted_length) and
``figures/pred_vs_actual.{png,pdf}`` (predicted vs true lengths, ours and the authors'; CDF of the absolute error).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vidur.records import write_atomic, write_text

from .dataset import DataConfig, load_splits, split_frame
from .metrics import METRIC_COLUMNS, constant_baseline, error_cdf, format_table, length_metrics
from .train import _plain
from .transformer import TransformerEstimator, set_threads

log = logging.getLogger("length_estimation.evaluate")

AUTHORS_FILE = "traces/sharegpt-val-10k-predicted-len.csv"
AUTHORS_LABEL = "authors' RoBERTa-base (their file, their data)"


def authors_file(spec: str | None) -> Path | None:
    """The authors' prediction file: ``bundled`` (default), a path, or ``none``."""
    if spec is None or str(spec).lower() in ("none", "null", "false", ""):
        return None
    if str(spec) == "bundled":
        from data import DATA_DIR

        return DATA_DIR / AUTHORS_FILE
    return Path(spec).expanduser()


def authors_metrics(path: str | Path) -> tuple[dict, pd.DataFrame]:
    """Metrics of the authors' predictions: ``num_predicted_decode_tokens`` vs ``num_decode_tokens`` (all rows)."""
    df = pd.read_csv(path)
    need = {"num_decode_tokens", "num_predicted_decode_tokens"}
    if not need <= set(df.columns):
        raise ValueError(f"{path}: needs columns {sorted(need)}, has {list(df.columns)}")
    a, p = df["num_decode_tokens"].to_numpy(), df["num_predicted_decode_tokens"].to_numpy()
    return length_metrics(a, p), pd.DataFrame({"actual": a, "predicted": p})


def plot(out_dir: Path, ours: tuple[np.ndarray, np.ndarray], label: str, others: dict[str, tuple[np.ndarray, np.ndarray]],
         authors: tuple[np.ndarray, np.ndarray] | None, what: str = "") -> list[Path]:
    """Predicted vs true (ours, and the authors' when given) and the CDF of |error|; PNG and PDF. ``what`` is the
    line under the figure that says what it shows (the data, the rows, the device)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if authors is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.2))
    scatters = [(axes[0], ours, label)]
    if authors is not None:
        scatters.append((axes[1], authors, AUTHORS_LABEL))
    for ax, (a, p), title in scatters:
        a, p = np.maximum(a, 1), np.maximum(p, 1)
        ax.scatter(a, p, s=4, alpha=0.25, lw=0, rasterized=True)
        hi = max(a.max(), p.max()) * 1.2
        ax.plot([1, hi], [1, hi], "k--", lw=0.8, label="y = x")
        ax.set(xscale="log", yscale="log", xlim=(1, hi), ylim=(1, hi), xlabel="true output tokens",
               ylabel="predicted output tokens")
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
    ax = axes[-1]
    grid = np.arange(0, 1001)
    for name, (a, p) in {label: ours, **others, **({AUTHORS_LABEL: authors} if authors is not None else {})}.items():
        x, f = error_cdf(a, p, grid)
        ax.plot(x, f, label=name, lw=1.4 if name == label else 1.0, ls="-" if name == label else "--")
    for k in (10, 50, 100):
        ax.axvline(k, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="|predicted - true| (tokens)", ylabel="fraction of requests", xlim=(0, 1000), ylim=(0, 1))
    ax.set_title("CDF of the absolute error", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    if what:
        fig.text(0.005, -0.005, what, ha="left", va="top", fontsize=7.5, color="0.3", transform=fig.transFigure)
    fig.tight_layout()
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = fig_dir / f"pred_vs_actual.{ext}"
        write_atomic(path, lambda tmp, ext=ext: fig.savefig(tmp, dpi=150, format=ext, bbox_inches="tight"))
        paths.append(path)
    plt.close(fig)
    return paths


def run_evaluation(cfg) -> dict[str, Any]:
    """Evaluate per ``cfg`` (the composed ``conf/length`` config); returns ``{"rows": {...}, "info": {...}}``."""
    c = _plain(cfg)
    e = c.get("evaluate", {})
    run_dir = Path(c["run_dir"])
    ckpt = Path(e.get("checkpoint") or run_dir / "model")
    split = str(e.get("split", "test"))
    out_dir = Path(e.get("out_dir") or run_dir / f"eval_{split}")
    data_cfg = DataConfig.from_mapping(c["data"])

    set_threads(c.get("num_threads"))
    est = TransformerEstimator.load(ckpt, device=c.get("device", "auto"), batch_size=int(e.get("batch_size", 64)))
    warnings = []
    if est.meta.data and est.meta.data != data_cfg.to_dict():
        warnings.append(f"the estimator was trained on data {est.meta.data}, evaluated on {data_cfg.to_dict()}: "
                        "the held-out split may overlap its training rows")
        log.warning(warnings[-1])
    frame = load_splits(data_cfg)
    test = split_frame(frame, split)
    train = split_frame(frame, "train")
    actual = test["output_tokens"].to_numpy()

    t0 = time.perf_counter()
    pred = est.predict(test["prompt"].tolist(), progress=bool(c.get("progress", True)))
    infer_s = time.perf_counter() - t0

    label = f"{c['model']['name']} (step {est.meta.trained_steps})"
    mean_c, median_c = constant_baseline(train["output_tokens"], "mean"), constant_baseline(train["output_tokens"], "median")
    baselines = {
        f"constant: train mean ({mean_c:.0f})": np.full(actual.shape, max(1, round(mean_c))),
        f"constant: train median ({median_c:.0f})": np.full(actual.shape, max(1, round(median_c))),
    }
    rows: dict[str, dict] = {label: length_metrics(actual, pred)}
    for name, p in baselines.items():
        rows[name] = length_metrics(actual, p)
    authors = None
    apath = authors_file(e.get("authors_file", "bundled"))
    if apath is not None:
        if apath.exists():
            rows[AUTHORS_LABEL], adf = authors_metrics(apath)
            authors = (adf["actual"].to_numpy(), adf["predicted"].to_numpy())
        else:
            warnings.append(f"authors' file {apath} not found; row skipped")
            log.warning(warnings[-1])

    data_label = f"{data_cfg.source} {split} split ({data_cfg.tokenizer} tokens)"
    scope = {label: data_label, **{k: data_label for k in baselines}}
    if authors is not None:
        scope[AUTHORS_LABEL] = f"{apath.name} (Llama-2-7B greedy responses; not our requests)"
    info = {
        "checkpoint": str(ckpt), "split": split, "rows": len(test), "data": data_cfg.to_dict(),
        "estimator": {k: v for k, v in est.info().items() if k != "data"}, "inference_s": round(infer_s, 2),
        "inference_ms_per_prompt": round(1000 * infer_s / max(1, len(test)), 3), "device": est.device,
        "data_of_row": scope, "warnings": warnings,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "metrics.json", json.dumps({"rows": rows, "info": info}, indent=2, default=str) + "\n")
    table = pd.DataFrame([{"estimator": k, "data": scope.get(k, ""), **{m: v.get(m) for m in METRIC_COLUMNS}}
                          for k, v in rows.items()])
    write_atomic(out_dir / "metrics.csv", lambda tmp: table.to_csv(tmp, index=False))
    md = format_table(rows) + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in scope.items()) + "\n"
    write_text(out_dir / "metrics.md", md)
    preds = pd.DataFrame({"row": test["row"].to_numpy(), "prompt_tokens": test["prompt_tokens"].to_numpy(),
                          "output_tokens": actual, "predicted_length": pred})
    write_atomic(out_dir / "predictions.csv", lambda tmp: preds.to_csv(tmp, index=False))
    what = (f"MEASURED: {label}'s predictions on {len(test):,} rows of {data_label} ({est.device}); "
            "baselines on the same rows" + (f"; {AUTHORS_LABEL}: {scope[AUTHORS_LABEL]}" if authors is not None else ""))
    figs = plot(out_dir, (actual, pred), label, {k: (actual, v) for k, v in baselines.items()}, authors, what)
    info["figures"] = [str(p) for p in figs]
    info["out_dir"] = str(out_dir)
    return {"rows": rows, "info": info, "table": md}


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path="../conf/length", config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        res = run_evaluation(cfg)
        print(res["table"])
        print(f"written to {res['info']['out_dir']} ({res['info']['rows']} prompts, "
              f"{res['info']['inference_ms_per_prompt']:.1f} ms/prompt on {res['info']['device']})")

    _main()


if __name__ == "__main__":
    main()
