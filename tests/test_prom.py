"""block.prom: our /metrics as Prometheus (and vLLM) write them, read back by Prometheus's own parser and ours."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from block.prom import PromParseError, Registry, get_histogram, get_value, parse_prometheus


def _registry() -> Registry:
    reg = Registry()
    reg.gauge("vllm:num_requests_running", "Running.", ("model_name",)).set(2, model_name="m")
    reg.counter("vllm:num_preemptions", "Preemptions.", ("model_name",)).inc(3, model_name="m")
    h = reg.histogram("vllm:e2e_request_latency_seconds", "E2E.", [0.5, 1.0], ("model_name",))
    for v in (0.1, 0.7, 3.0):
        h.observe(v, model_name="m")
    return reg


def test_every_family_keeps_its_type_for_a_prometheus_parser():
    """A counter is typed under its ``_total`` sample name, as prometheus_client (and so vLLM) writes it: a scraper
    reads one counter family holding the sample, not an empty counter plus an untyped ``..._total`` stray."""
    fams = {f.name: f for f in text_string_to_metric_families(_registry().render())}
    assert {n: f.type for n, f in fams.items()} == {"vllm:num_requests_running": "gauge",
                                                    "vllm:num_preemptions": "counter",
                                                    "vllm:e2e_request_latency_seconds": "histogram"}
    assert [(s.name, s.value) for s in fams["vllm:num_preemptions"].samples] == [("vllm:num_preemptions_total", 3.0)]
    assert len(fams["vllm:e2e_request_latency_seconds"].samples) == 5  # 3 buckets (+Inf last), _count, _sum


def test_no_created_series_and_our_parser_reads_what_we_render():
    text = _registry().render()
    assert "_created" not in text
    p = parse_prometheus(text)
    assert get_value(p, "vllm:num_preemptions_total", {"model_name": "m"}) == 3.0
    h = get_histogram(p, "vllm:e2e_request_latency_seconds")
    assert h is not None and h.buckets == [(0.5, 1.0), (1.0, 2.0), (float("inf"), 3.0)] and h.count == 3


def test_set_total_shows_a_total_kept_elsewhere_and_never_goes_down():
    reg = Registry()
    c = reg.counter("vllm:num_preemptions", "Preemptions.", ("engine",))
    c.set_total(4, engine="0")
    c.set_total(2, engine="0")  # a counter never goes down
    c.set_total(0, engine="1")  # shown at 0
    p = parse_prometheus(reg.render())
    assert get_value(p, "vllm:num_preemptions_total", {"engine": "0"}) == 4.0
    assert p["vllm:num_preemptions_total"][1] == ({"engine": "1"}, 0.0)


def test_a_malformed_scrape_names_its_line():
    with pytest.raises(PromParseError, match="line 2"):
        parse_prometheus('ok 1\nx{a="1} 2\n')
