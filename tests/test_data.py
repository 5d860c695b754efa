"""Tests of the workload layer (data/): bundled datasets, user files, filters, arrivals, the workload builder."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pandas as pd
import pytest

from data import (
    WorkloadConfig,
    arrival_times,
    build_workload,
    filter_requests,
    interarrival_gaps,
    list_datasets,
    load_dataset,
    tile_timestamps,
    trace_arrivals,
    workload_to_frame,
)
from data.datasets import DATA_DIR

# name -> (rows, output mean before filtering, extra columns)
EXPECTED = {
    "sharegpt": (10_000, 326, set()),
    "sharegpt_58k": (58_000, 325, set()),
    "sharegpt_predicted": (40_000, 323, {"predicted_output_tokens"}),
    "arxiv": (28_257, 291, set()),
    "azure_conv": (19_366, 211, {"arrival_s"}),
    "azure_code": (8_819, 28, {"arrival_s"}),
}


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    """Keep token-count caches of the tests out of the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_named_datasets(name):
    rows, out_mean, extra = EXPECTED[name]
    df = load_dataset(name)
    assert len(df) == rows
    assert set(df.columns) == {"prompt_tokens", "output_tokens"} | extra
    assert df["prompt_tokens"].dtype == np.int64 and df["output_tokens"].dtype == np.int64
    assert abs(df["output_tokens"].mean() - out_mean) < 1
    if "arrival_s" in extra:
        assert df["arrival_s"].is_monotonic_increasing and df["arrival_s"].iloc[0] == 0


def test_sharegpt_val10k_stats():
    df = load_dataset("sharegpt")
    assert round(df["prompt_tokens"].mean()) == 246 and df["prompt_tokens"].max() == 3973
    assert round(df["output_tokens"].mean()) == 326 and df["output_tokens"].max() == 1734
    assert "sharegpt_text" in list_datasets()


def test_azure_conv_rate():
    t = load_dataset("azure_conv")["arrival_s"].to_numpy()
    assert abs((len(t) - 1) / t[-1] - 5.53) < 0.01


def test_filters():
    df = pd.DataFrame({"prompt_tokens": [3, 4, 4, 100, 100, 10], "output_tokens": [10, 0, 1, 3995, 3996, 20]})
    # dropped: prompt < 4; output 0; prompt + output == max_model_len
    assert filter_requests(df)["prompt_tokens"].tolist() == [4, 100, 10]
    assert filter_requests(df, min_prompt_tokens=1, max_model_len=100_000)["prompt_tokens"].tolist() == [3, 4, 100, 100, 10]
    arxiv = filter_requests(load_dataset("arxiv"), max_model_len=2048)
    assert ((arxiv.prompt_tokens + arxiv.output_tokens) < 2048).all() and (arxiv.prompt_tokens >= 4).all()
    assert len(filter_requests(load_dataset("sharegpt"))) == 9777


def _cv(x: np.ndarray) -> float:
    return float(np.std(x) / np.mean(x))


@pytest.mark.parametrize("kind,b", [("poisson", 1.0), ("gamma", 0.25), ("gamma", 4.0)])
def test_arrival_statistics(kind, b):
    rate = 20.0
    gaps = interarrival_gaps(20_000, rate, kind, b, seed=1)
    assert abs(1 / gaps.mean() / rate - 1) < 0.03
    assert abs(_cv(gaps) * math.sqrt(b) - 1) < 0.05
    t = arrival_times(20_000, rate, kind, b, seed=1)
    assert t[0] == pytest.approx(gaps[0]) and np.all(np.diff(t) >= 0)  # the first gap is drawn too


def test_constant_and_normalize():
    gaps = interarrival_gaps(1000, 4.0, "constant")
    assert np.allclose(gaps, 0.25) and _cv(gaps) < 1e-12
    t = arrival_times(1000, 4.0, "gamma", 0.5, seed=3, normalize=True)
    assert t[-1] == pytest.approx(250.0)
    assert np.all(arrival_times(5, math.inf) == 0)
    with pytest.raises(ValueError, match="burstiness"):
        interarrival_gaps(10, 1.0, "poisson", burstiness=0.5)


def test_trace_rescale():
    ts = np.cumsum(np.random.default_rng(0).exponential(0.5, 1000)) + 100.0
    t = trace_arrivals(ts, 7.5)
    assert t[0] == 0 and (len(t) - 1) / t[-1] == pytest.approx(7.5)
    assert np.allclose(trace_arrivals(ts, None), ts - ts[0])
    tiled = tile_timestamps(np.array([0.0, 1.0, 2.0]), 7)
    assert tiled.tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_trace_workload_keeps_rows_and_hits_rate():
    cfg = WorkloadConfig(dataset="azure_conv", num_requests=5000, arrival="trace", qps=12.0)
    reqs = build_workload(cfg)
    t = np.array([r.arrival_s for r in reqs])
    assert t[0] == 0 and (len(t) - 1) / t[-1] == pytest.approx(12.0)
    raw = filter_requests(load_dataset("azure_conv"))  # in time order, unshuffled
    assert [r.prompt_tokens for r in reqs[:50]] == raw["prompt_tokens"].head(50).tolist()
    # the gaps are the trace's own gaps, scaled
    ratio = np.diff(t[:50]) / np.diff(raw["arrival_s"].to_numpy()[:50])
    assert np.allclose(ratio, ratio[0])


def test_same_seed_same_workload():
    cfg = WorkloadConfig(dataset="sharegpt", num_requests=500, qps=10, arrival="gamma", burstiness=0.5, seed=7)
    a, b = build_workload(cfg), build_workload(cfg)
    assert a == b
    c = build_workload(WorkloadConfig(**{**cfg.to_dict(), "seed": 8}))
    assert [r.arrival_s for r in a] != [r.arrival_s for r in c]
    assert [r.prompt_tokens for r in a] != [r.prompt_tokens for r in c]
    assert [r.id for r in a] == list(range(500))
    assert np.all(np.diff([r.arrival_s for r in a]) >= 0)


def test_the_two_streams_are_the_seed_sequences_children():
    """The module docstring's promise, checked against its own recipe: the shuffle draws from the first child of
    ``SeedSequence(seed)``, the arrival gaps from the second (drawn lazily: a trace replay imports no numpy.random)."""
    cfg = WorkloadConfig(dataset="sharegpt", num_requests=300, qps=6, arrival="gamma", burstiness=2.0, seed=11)
    reqs = build_workload(cfg)
    shuffle_ss, arrival_ss = np.random.SeedSequence(11).spawn(2)
    rows = filter_requests(load_dataset("sharegpt"))
    order = np.random.default_rng(shuffle_ss).permutation(len(rows))[:300]
    assert [r.prompt_tokens for r in reqs] == rows["prompt_tokens"].to_numpy()[order].tolist()
    expected = arrival_times(300, 6, "gamma", 2.0, np.random.default_rng(arrival_ss))
    assert np.array_equal([r.arrival_s for r in reqs], expected)


def test_a_trace_replayed_in_order_imports_no_numpy_random(tmp_path):
    """Nothing is drawn when a trace is replayed in its own order, so numpy.random (about 15 ms of a short run's
    process) stays unimported; a shuffled or Poisson workload imports it as before."""
    from subprocess_run import run_python

    csv = tmp_path / "trace.csv"
    csv.write_text("num_prefill_tokens,num_decode_tokens,arrived_at\n" + "".join(
        f"{10 + i},{5 + i % 7},{0.25 * i}\n" for i in range(50)))
    code = ("import sys; from data import WorkloadConfig, build_workload;"
            f"r = build_workload(WorkloadConfig(path={str(csv)!r}, num_requests=40, arrival=sys.argv[1], qps=4.0));"
            "print(len(r), 'numpy.random' in sys.modules)")
    for arrival, imported in (("trace", "False"), ("poisson", "True")):
        out = run_python("-c", code, arrival).stdout
        assert out.split() == ["40", imported], (arrival, out)


def test_start_index_and_no_shuffle():
    reqs = build_workload(WorkloadConfig(dataset="sharegpt", num_requests=10, start_index=100, shuffle=False))
    want = filter_requests(load_dataset("sharegpt").iloc[100:])
    assert [r.output_tokens for r in reqs] == want["output_tokens"].head(10).tolist()


def test_predicted_length_modes():
    col = build_workload(WorkloadConfig(dataset="sharegpt_predicted", num_requests=100, predicted_length="column"))
    assert all(r.predicted_output_tokens is not None for r in col)
    assert any(r.predicted_output_tokens != r.output_tokens for r in col)
    ora = build_workload(WorkloadConfig(dataset="sharegpt", num_requests=100, predicted_length="oracle"))
    assert all(r.predicted_output_tokens == r.output_tokens for r in ora)
    none = build_workload(WorkloadConfig(dataset="sharegpt_predicted", num_requests=10))
    assert all(r.predicted_output_tokens is None for r in none)
    with pytest.raises(ValueError, match="sharegpt_val_10k_llama2.csv.*prediction"):
        build_workload(WorkloadConfig(dataset="sharegpt", num_requests=10, predicted_length="column"))


def test_wrap():
    cfg = WorkloadConfig(dataset="azure_code", num_requests=20_000)
    with pytest.raises(ValueError, match="splitwise_code.csv.*wrap=True"):
        build_workload(cfg)
    reqs = build_workload(WorkloadConfig(**{**cfg.to_dict(), "wrap": True}))
    m = len(filter_requests(load_dataset("azure_code")))
    assert len(reqs) == 20_000 and reqs[m].prompt_tokens == reqs[0].prompt_tokens
    trace = build_workload(WorkloadConfig(**{**cfg.to_dict(), "wrap": True, "arrival": "trace", "qps": 0}))
    t = np.array([r.arrival_s for r in trace])
    assert np.all(np.diff(t) >= 0) and t[-1] > 2 * 3400


def test_workload_to_frame():
    reqs = build_workload(WorkloadConfig(dataset="sharegpt_predicted", num_requests=50, predicted_length="column"))
    f = workload_to_frame(reqs)
    assert list(f.columns) == ["id", "arrival_s", "prompt_tokens", "output_tokens", "predicted_output_tokens", "prompt"]
    assert f["id"].tolist() == list(range(50)) and f["predicted_output_tokens"].notna().all()


def test_user_files(tmp_path):
    p = tmp_path / "mine.csv"
    pd.DataFrame({"prompt_tokens": [10, 20, 30], "output_tokens": [5, 6, 7], "predicted_length": [4, 6, 9],
                  "arrival_s": [0.0, 0.5, 2.0]}).to_csv(p, index=False)
    df = load_dataset(p)
    assert df["predicted_output_tokens"].tolist() == [4, 6, 9] and df["arrival_s"].tolist() == [0.0, 0.5, 2.0]
    reqs = build_workload(WorkloadConfig(path=str(p), num_requests=3, arrival="trace", qps=None,
                                         predicted_length="column"))
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 2.0] and [r.predicted_output_tokens for r in reqs] == [4, 6, 9]
    v = tmp_path / "vidur.csv"
    pd.DataFrame({"arrived_at": [1.0, 2.0], "num_prefill_tokens": [8, 9], "num_decode_tokens": [3, 4],
                  "num_predicted_decode_tokens": [2, 5]}).to_csv(v, index=False)
    assert set(load_dataset(v).columns) == {"prompt_tokens", "output_tokens", "predicted_output_tokens", "arrival_s"}


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_dataset(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="not a dataset name"):
        build_workload(WorkloadConfig(dataset="sharegpt_typo", num_requests=1))
    bad = tmp_path / "wrong_cols.csv"
    pd.DataFrame({"a": [1], "b": [2]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="wrong_cols.csv.*match no known format"):
        load_dataset(bad)
    nonnum = tmp_path / "nonnum.csv"
    nonnum.write_text("prompt_tokens,output_tokens\n10,5\n12,abc\n")
    with pytest.raises(ValueError, match="nonnum.csv.*'output_tokens'.*'abc'"):
        load_dataset(nonnum)
    tiny = tmp_path / "all_filtered.csv"
    pd.DataFrame({"prompt_tokens": [1, 2], "output_tokens": [5, 5]}).to_csv(tiny, index=False)
    with pytest.raises(ValueError, match="all_filtered.csv.*no request left"):
        build_workload(WorkloadConfig(path=str(tiny), num_requests=1))


def test_user_jsonl_text(tmp_path):
    p = tmp_path / "chat.jsonl.gz"
    with gzip.open(p, "wt") as f:
        for prompt, resp in [("Hello world!", "Hi there."), ("Tell me a story please", "Once upon a time")]:
            f.write(json.dumps({"prompt": prompt, "response": resp}) + "\n")
    df = load_dataset(p)
    assert df["prompt_tokens"].tolist()[0] == 4 and df["prompt"].tolist()[0] == "Hello world!"
    reqs = build_workload(WorkloadConfig(path=str(p), num_requests=2, shuffle=False))
    assert reqs[0].prompt == "Hello world!" and reqs[0].prompt_tokens == 4


def test_sharegpt_text_counting():
    pytest.importorskip("tokenizers")
    from data.tokenizer import load_tokenizer

    assert load_tokenizer("llama2").encode("Hello world!").ids == [1, 15043, 3186, 29991]
    df = load_dataset("sharegpt_text", limit=200)
    assert len(df) == 200 and set(df.columns) == {"prompt_tokens", "output_tokens", "prompt"}
    nonempty = df["prompt"].str.len() > 0
    assert (df.loc[nonempty, "prompt_tokens"] > 1).all() and (df["output_tokens"] > 0).all()
    assert 100 < df["output_tokens"].mean() < 600


def test_bundle_sizes_and_no_shared_reads():
    """Every bundled file stays under the repository's 5 MB limit; the code never mentions ../shared."""
    for f in DATA_DIR.rglob("*"):
        if f.is_file():
            assert f.stat().st_size < 5_000_000, f
    for py in DATA_DIR.glob("*.py"):
        assert "../shared" not in py.read_text() and "/work/shared" not in py.read_text(), py


def test_csv_files_read_without_pandas_as_pandas_reads_them(tmp_path):
    """``load_columns`` reads CSV with pyarrow (numbers only) or the csv module (anything else), never pandas; what
    it reads equals pandas' ``read_csv`` for the columns a workload uses: numbers to the last bit, text, quoting,
    blank lines, a byte-order mark, gzip, a repeated column name."""
    from data.datasets import _read_csv_arrow, _read_csv_rows, load_columns

    rng = np.random.default_rng(3)
    t = np.cumsum(rng.exponential(0.37, 500))
    numbers = tmp_path / "numbers.csv"
    pd.DataFrame({"arrival_s": t, "prompt_tokens": rng.integers(1, 3000, 500),
                  "output_tokens": rng.integers(1, 900, 500)}).to_csv(numbers, index=False)
    text = tmp_path / "text.csv.gz"
    with gzip.open(text, "wt", encoding="utf-8-sig", newline="") as f:  # BOM, a quoted comma and newline, blank line
        f.write('prompt_tokens,output_tokens,prompt,prompt\n12,5,"hi, there",x\n\n7,"3","two\nlines",y\n9,4,,z\n')
    for path, fast in ((numbers, True), (text, False)):
        assert (_read_csv_arrow(path) is not None) == fast
        ref = pd.read_csv(path)
        cols = load_columns(path)
        for c in ("prompt_tokens", "output_tokens"):
            assert cols[c].dtype == np.int64 and cols[c].tolist() == ref[c].tolist()
        if fast:
            assert np.array_equal(cols["arrival_s"], ref["arrival_s"].to_numpy())  # bit for bit
            assert load_dataset(path).equals(cols.frame())
        else:
            assert cols["prompt"].tolist() == ["hi, there", "two\nlines", ""]
            assert list(_read_csv_rows(path)) == list(ref.columns) == ["prompt_tokens", "output_tokens", "prompt",
                                                                        "prompt.1"]
    for name, text, refused in (
        # a missing field is empty, as in pandas, and an empty length is refused
        ("short.csv", "prompt_tokens,output_tokens\n10,5\n12\n", "short.csv.*'output_tokens'.*1 non-integer"),
        ("wide.csv", "prompt_tokens,output_tokens\n10,5,7\n", "wide.csv: cannot be read as csv"),
        ("empty.csv", "", "empty.csv: cannot be read as csv"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=refused):
            load_dataset(tmp_path / name)
