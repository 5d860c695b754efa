"""The summary's medians and percentiles (``vidur.records.order_stats``) are numpy's to the last bit, and a
simulated run's summary computes them without importing ``numpy.ma`` (what ``np.median`` / ``np.percentile``
import: about 10 ms of a short run's process)."""

from __future__ import annotations

import numpy as np
import pytest
from subprocess_run import run_python

from vidur.records import order_stats, summarize


def _arrays(rng: np.random.Generator):
    for trial in range(3000):
        n = int(rng.integers(1, 40)) if trial % 20 else int(rng.integers(40, 5000))
        kind = trial % 5
        if kind == 0:
            yield rng.random(n) * 1e3
        elif kind == 1:  # many ties
            yield rng.integers(0, 4, n).astype(float)
        elif kind == 2:  # latencies spanning decades
            yield np.exp(rng.normal(0, 5, n))
        elif kind == 3:  # signs and scales
            yield rng.normal(0, 1, n) * 10.0 ** int(rng.integers(-6, 9))
        else:
            yield np.sort(rng.random(n))[::-1].copy()


def test_order_stats_are_numpys_to_the_last_bit():
    rng = np.random.default_rng(7)
    checked = 0
    for v in _arrays(rng):
        ps = [90, 99, 50, 0, 100, int(rng.integers(0, 101)), float(rng.random() * 100)]
        before = v.copy()
        median, got = order_stats(v, ps)
        assert np.array_equal(v, before)  # the caller's array is not reordered
        assert median == float(np.median(v)), (len(v), median, np.median(v))
        for p, g in zip(ps, got):
            assert g == float(np.percentile(v, p)), (len(v), p, g, np.percentile(v, p))
        checked += 1
    assert checked == 3000


def test_the_median_is_not_the_interpolated_50th_percentile():
    """Found by the test above: numpy's median of an even count is the mean of the two middle values, which can
    differ in the last bit from the 50th percentile's interpolation; each keeps its own."""
    rng = np.random.default_rng(3)
    differ = 0
    for _ in range(3000):
        v = rng.normal(0, 1, 2) * 1e3
        median, (p50,) = order_stats(v, (50,))
        assert median == float(np.median(v)) and p50 == float(np.percentile(v, 50))
        differ += median != p50
    assert differ > 0


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_samples(n):
    v = np.arange(1.0, n + 1)
    median, (p0, p99, p100) = order_stats(v, (0, 99, 100))
    assert (median, p0, p99, p100) == (float(np.median(v)), 1.0, float(np.percentile(v, 99)), float(n))


def test_a_summary_imports_no_masked_arrays():
    code = ("import sys, numpy as np; from vidur.records import summarize;"
            "n = 1001; a = np.linspace(0, 9, n);"
            "s = summarize({'status': np.array(['ok'] * n, dtype=object), 'arrival_s': a, 'finish_s': a + 2,"
            " 'ttft_s': np.full(n, 0.5), 'tpot_s': np.full(n, 0.01), 'e2e_s': np.linspace(1, 3, n),"
            " 'prompt_tokens': np.ones(n, dtype=np.int64), 'output_tokens': np.ones(n, dtype=np.int64),"
            " 'num_preemptions': np.zeros(n, dtype=np.int64), 'decision_ms': np.linspace(0, 1, n)});"
            "print('numpy.ma' in sys.modules, s['median_e2el_ms'], s['p99_e2el_ms'], s['p99_scheduler_overhead_ms'])")
    ma, median, p99, p99_overhead = run_python("-c", code).stdout.split()
    assert ma == "False"
    e2e_ms = np.linspace(1, 3, 1001) * 1e3
    assert float(median) == float(np.median(e2e_ms)) and float(p99) == float(np.percentile(e2e_ms, 99))
    assert float(p99_overhead) == float(np.percentile(np.linspace(0, 1, 1001), 99))


def test_a_summary_of_no_finished_request_has_no_percentiles():
    s = summarize({"status": np.array(["rejected"], dtype=object), "arrival_s": np.zeros(1),
                   "finish_s": np.array([np.nan]), "ttft_s": np.array([np.nan]), "tpot_s": np.array([np.nan]),
                   "e2e_s": np.array([np.nan]), "prompt_tokens": np.ones(1, dtype=np.int64),
                   "output_tokens": np.ones(1, dtype=np.int64), "num_preemptions": np.zeros(1, dtype=np.int64)})
    assert s["completed"] == 0 and s["median_e2el_ms"] is None and s["p99_ttft_ms"] is None
