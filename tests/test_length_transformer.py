"""The transformer length estimator: metrics, split, train/resume/evaluate/tag on a tiny RoBERTa (seconds on a CPU).

The torch tests build a 2-layer RoBERTa (hidden 32) over the bundled Llama-2 tokenizer, so nothing is downloaded;
they are skipped when torch or transformers is missing (the ``ml`` extra)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from length_estimation import metrics
from length_estimation.dataset import DataConfig, assign_splits, keep_mask, load_splits, split_frame

ROOT = Path(__file__).resolve().parents[1]
HAVE_ML = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "tokenizers"))
needs_ml = pytest.mark.skipif(not HAVE_ML, reason="torch/transformers not installed (pip install 'block-repro[ml]')")
needs_tokenizers = pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                                      reason="tokenizers not installed (pip install 'block-repro[text]')")
MAX_LEN = 32


# ----------------------------------------------------------------------------------------------- metrics (numpy)

def test_metrics_on_hand_made_numbers():
    a = [100, 200, 300, 400]
    p = [105, 260, 300, 250]           # errors 5, 60, 0, 150
    m = metrics.length_metrics(a, p)
    assert m["n"] == 4
    assert m["mae"] == pytest.approx((5 + 60 + 0 + 150) / 4)
    assert m["mape"] == pytest.approx(100 * (5 / 100 + 60 / 200 + 0 + 150 / 400) / 4)
    assert m["acc_10"] == pytest.approx(0.5)       # 5 and 0
    assert m["acc_50"] == pytest.approx(0.5)
    assert m["acc_100"] == pytest.approx(0.75)     # 60 too
    assert m["rmse"] == pytest.approx(np.sqrt((25 + 3600 + 0 + 22500) / 4))
    assert m["median_ae"] == pytest.approx(32.5)
    assert m["mean_actual"] == 250 and m["mean_predicted"] == pytest.approx(228.75)
    assert metrics.mae(a, p) == m["mae"] and metrics.mape(a, p) == m["mape"]
    assert metrics.acc_within([10], [20], 10) == 1.0 and metrics.acc_within([10], [21], 10) == 0.0  # <= counts
    assert metrics.mape([0], [3]) == pytest.approx(300.0)       # actual 0 counts as 1
    assert metrics.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(metrics.spearman([1, 2, 3], [5, 5, 5]))
    _x, f = metrics.error_cdf(a, p, grid=[0, 10, 100, 1000])
    assert f.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert metrics.constant_baseline([1, 2, 10], "mean") == pytest.approx(13 / 3)
    assert metrics.constant_baseline([1, 2, 10], "median") == 2
    table = metrics.format_table({"x": m})
    assert "| x | 4 | 53.8 |" in table and "Acc-100 (%)" in table
    with pytest.raises(ValueError):
        metrics.mae([1, 2], [1])
    with pytest.raises(ValueError):
        metrics.mae([1, np.nan], [1, 2])


def test_split_is_seeded_and_proportional():
    s = assign_splits(1000, seed=42, test_fraction=0.2, val_fraction=0.05)
    assert (s == "test").sum() == 200 and (s == "val").sum() == 40 and (s == "train").sum() == 760
    assert (assign_splits(1000, seed=42) == s).all()
    assert not (assign_splits(1000, seed=43) == s).all()
    df = pd.DataFrame({"prompt": ["hi", "  ", "q", "long"], "prompt_tokens": [2, 1, 2, 4000],
                       "output_tokens": [5, 5, 0, 200]})
    assert keep_mask(df, 4096, 1).tolist() == [True, False, False, False]
    assert keep_mask(df, None, 0).tolist() == [True, False, True, True]


@needs_tokenizers
def test_load_splits_on_the_bundled_text():
    df = load_splits(DataConfig(limit=200))
    assert {"row", "prompt", "prompt_tokens", "output_tokens", "split"} <= set(df.columns)
    assert set(df["split"]) <= {"train", "val", "test", "filtered"}
    kept = df[df["split"] != "filtered"]
    assert abs((kept["split"] == "test").mean() - 0.2) < 0.01
    assert (kept["prompt"].str.strip() != "").all() and (kept["output_tokens"] > 0).all()
    assert split_frame(df, "all")["row"].tolist() == kept["row"].tolist()
    with pytest.raises(ValueError):
        DataConfig.from_mapping({"datset": "x"})


def test_target_transform_round_trip():
    pytest.importorskip("numpy")
    from length_estimation.transformer import TargetTransform

    y = np.array([1, 10, 100, 1000])
    for kind in ("log", "tokens"):
        t = TargetTransform.fit(y, kind)
        z = t.forward(y)
        assert abs(z.mean()) < 1e-9 and z.std() == pytest.approx(1.0)
        assert np.allclose(t.inverse(z), y)
    with pytest.raises(ValueError):
        TargetTransform("bins")


# ----------------------------------------------------------------------------------------------- tiny RoBERTa

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    if not HAVE_ML:
        pytest.skip("torch/transformers not installed (pip install 'block-repro[ml]')")
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    transformers.logging.disable_progress_bar()

    d = tmp_path_factory.mktemp("tiny") / "model"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "data/tokenizers/llama2/tokenizer.json"),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    tok.model_max_length = MAX_LEN
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=MAX_LEN + 2, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, num_labels=1,
                        problem_type="regression", type_vocab_size=1)
    RobertaForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _cfg(model_dir: Path, out: Path, run: str, **over):
    from hydra import compose, initialize_config_dir

    overrides = [
        f"model.name_or_path={model_dir}", "model.name=tiny", f"model.max_length={MAX_LEN}",
        "data.limit=300", f"output_root={out}", f"run_name={run}", "progress=false", "num_threads=1",
        "training.batch_size=16", "training.lr=1e-3", "training.scheduler=constant", "training.warmup_ratio=0",
        "training.eval_every=2", "training.save_every=3", "training.log_every=1", "training.keep_last=2",
        "training.max_steps=6",
    ] + [f"{k}={v}" for k, v in over.items()]
    with initialize_config_dir(config_dir=str(ROOT / "conf/length"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _weights(model_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One uninterrupted 6-step run, and one stopped at 3 steps then resumed to 6."""
    from length_estimation.train import run_training

    out = tmp_path_factory.mktemp("runs")
    full = run_training(_cfg(tiny_model_dir, out, "full"))
    first = run_training(_cfg(tiny_model_dir, out, "resumed", **{"training.max_steps": 3}))
    second = run_training(_cfg(tiny_model_dir, out, "resumed"))
    return {"out": out, "model_dir": tiny_model_dir, "full": full, "first": first, "second": second}


@needs_ml
def test_train_writes_checkpoints_and_model(trained):
    run = Path(trained["full"]["run_dir"])
    assert trained["full"]["step"] == 6 and trained["full"]["resumed_from"] is None
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000003", "step-0000006"]                 # every 3 steps; keep_last=2
    assert (run / "checkpoints/latest").read_text().strip() == "step-0000006"
    for d in (run / "model", run / "best", run / "checkpoints/step-0000006"):
        assert (d / "estimator.json").exists() and (d / "model.safetensors").exists()
    assert (run / "checkpoints/step-0000006/trainer_state.pt").exists()
    log = pd.read_csv(run / "train_log.csv")
    assert log["step"].tolist() == [1, 2, 3, 4, 5, 6] and log["val_mae"].notna().sum() == 3
    assert not list(run.glob("*.tmp-*")) and not list((run / "checkpoints").glob("*.tmp-*"))
    meta = json.loads((run / "model/estimator.json").read_text())
    assert meta["max_length"] <= MAX_LEN and meta["target"]["kind"] == "log" and meta["count_tokenizer"] == "llama2"


@needs_ml
def test_resume_continues_from_the_saved_step(trained):
    import torch

    first, second, full = trained["first"], trained["second"], trained["full"]
    assert first["step"] == 3 and first["resumed_from"] is None
    assert second["step"] == 6 and second["resumed_from"].endswith("step-0000003")
    run = Path(second["run_dir"])
    state = torch.load(run / "checkpoints/step-0000006/trainer_state.pt", weights_only=True)
    assert state["step"] == 6 and state["pos"] == 6 and state["epoch"] == 0
    assert len(state["optimizer"]["state"]) > 0 and state["scheduler"]["last_epoch"] == 6
    # the loss history continued (steps 1-3 from the first session, 4-6 from the second) and equals the
    # uninterrupted run's: same data order, optimizer moments, RNG (dropout)
    hist = pd.read_csv(run / "train_log.csv")
    ref = pd.read_csv(Path(full["run_dir"]) / "train_log.csv")
    assert hist["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert np.allclose(hist["loss"], ref["loss"], rtol=1e-4, atol=1e-6)
    assert state["elapsed_s"] >= first["elapsed_s"]
    a = _weights(Path(full["run_dir"]) / "checkpoints/step-0000006")
    b = _weights(run / "checkpoints/step-0000006")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    # rerunning a finished run does nothing new
    from length_estimation.train import run_training

    again = run_training(_cfg(trained["model_dir"], trained["out"], "resumed"))
    assert again["step"] == 6
    # a different target in the same run directory is refused
    with pytest.raises(ValueError, match="cannot resume"):
        run_training(_cfg(trained["model_dir"], trained["out"], "resumed", **{"training.target": "tokens",
                                                                              "training.max_steps": 7}))


@needs_ml
def test_estimator_predict_save_load(trained, tmp_path):
    from length_estimation.base import LengthEstimator
    from length_estimation.transformer import TransformerEstimator

    est = TransformerEstimator.load(Path(trained["full"]["run_dir"]) / "model", device="cpu", batch_size=3)
    assert isinstance(est, LengthEstimator)
    prompts = ["hi", "Write a long essay about the history of the Roman empire. " * 20, "", "What is 2+2?",
               "Translate to French: good morning", "x " * 200, "List ten fruits"]
    p = est.predict(prompts)
    assert p.dtype == np.int64 and p.shape == (7,) and (p >= 1).all()
    # length-sorted batching gives each prompt its own prediction, in input order
    single = np.array([est.predict([q])[0] for q in prompts])
    assert np.array_equal(single, p)
    assert est.predict([]).shape == (0,)
    with pytest.raises(TypeError):
        est.predict("one string")
    est.save(tmp_path / "copy")
    again = TransformerEstimator.load(tmp_path / "copy", device="cpu")
    assert np.array_equal(again.predict(prompts), p)
    assert not list(tmp_path.glob("copy.*"))


@needs_ml
def test_evaluate_writes_metrics_figures_and_authors_row(trained):
    from length_estimation.evaluate import AUTHORS_LABEL, run_evaluation

    res = run_evaluation(_cfg(trained["model_dir"], trained["out"], "full"))
    rows = res["rows"]
    ours = next(k for k in rows if k.startswith("tiny"))
    n_test = (load_splits(DataConfig(limit=300))["split"] == "test").sum()
    assert rows[ours]["n"] == n_test
    for r in rows.values():
        assert {"mae", "mape", "acc_10", "acc_50", "acc_100"} <= set(r)
        assert 0 <= r["acc_10"] <= r["acc_50"] <= r["acc_100"] <= 1
    assert rows[AUTHORS_LABEL]["n"] == 40_000 and rows[AUTHORS_LABEL]["mae"] == pytest.approx(28.16, abs=0.01)
    out = Path(res["info"]["out_dir"])
    for f in ("metrics.json", "metrics.csv", "metrics.md", "predictions.csv", "figures/pred_vs_actual.png",
              "figures/pred_vs_actual.pdf"):
        assert (out / f).stat().st_size > 0, f
    table = pd.read_csv(out / "metrics.csv")
    assert len(table) == 4 and {"estimator", "data", "mae", "mape", "acc_100"} <= set(table.columns)
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == n_test and (preds["predicted_length"] >= 1).all()


@needs_ml
def test_tag_writes_a_column_the_workload_reads(trained, tmp_path):
    from data import WorkloadConfig, build_workload, load_dataset
    from length_estimation.tag import run_tagging

    out = tmp_path / "tagged.csv"
    r = run_tagging(_cfg(trained["model_dir"], trained["out"], "full", **{"tag.output": str(out)}))
    tagged = pd.read_csv(out)
    assert list(tagged.columns[:5]) == ["row", "split", "prompt_tokens", "output_tokens", "predicted_length"]
    assert (tagged["split"] == "test").all() and len(tagged) == r["rows"]
    back = load_dataset(out)
    assert back["predicted_output_tokens"].tolist() == tagged["predicted_length"].tolist()
    assert back["output_tokens"].tolist() == tagged["output_tokens"].tolist()
    reqs = build_workload(WorkloadConfig(path=str(out), predicted_length="column", num_requests=20, qps=5.0))
    by_row = dict(zip(zip(tagged["prompt_tokens"], tagged["output_tokens"]), tagged["predicted_length"]))
    assert all(q.predicted_output_tokens == by_row[(q.prompt_tokens, q.output_tokens)] for q in reqs)
    assert all(q.prompt for q in reqs)
    # the default output is parquet under the run directory; another file is tagged whole
    r2 = run_tagging(_cfg(trained["model_dir"], trained["out"], "full", **{"tag.split": "all"}))
    assert r2["output"].endswith("tagged/sharegpt_text-llama2-all.parquet")
    assert len(pd.read_parquet(r2["output"])) == 300
    with pytest.raises(ValueError, match="tag.split"):
        run_tagging(_cfg(trained["model_dir"], trained["out"], "full", **{"tag.input": str(out)}))
