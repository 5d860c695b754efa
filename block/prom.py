"""The Prometheus text exposition format on ``prometheus_client``: render our services' ``/metrics``, parse anyone's.

``prometheus_client`` is what vLLM itself uses, so the services' ``/metrics`` are byte-for-byte in vLLM's style
(text format 0.0.4: counters typed and sampled as ``<base>_total``, histograms as cumulative ``_bucket{le=...}``
samples ending with ``le="+Inf"``, then ``_sum`` and ``_count``; values as Go floats: ``1.0``, ``+Inf``, ``NaN``),
without the ``_created`` series (``disable_created_metrics``: nothing of ours reads them). What stays ours is the
vLLM-specific part and a small API the services share: :class:`Registry` with labelled :class:`Gauge` /
:class:`Counter` / :class:`Histogram` whose label values are keyword arguments and whose series can be created at 0
(``touch``, as vLLM pre-creates them), vLLM's bucket edges, and the reading side below.

Parsing (:func:`parse_prometheus`, ``text_string_to_metric_families`` underneath) returns ``{sample name: [(labels,
value), ...]}`` -- the sample name, so a counter is found under ``vllm:prompt_tokens_total`` and a histogram under
``..._bucket`` / ``_sum`` / ``_count``. :class:`VllmLoad` pulls the load figures a router needs out of a vLLM (or
emulated-engine) scrape and accepts both the current ``vllm:kv_cache_usage_perc`` and the older (V0)
``vllm:gpu_cache_usage_perc``.

Why prometheus_client although it is slower (``python -m benchmarks.prom``, one run, Python 3.11, 2 busy cores;
times per call, hand-written -> prometheus_client 0.26): the predictor's hot path -- its /metrics poll in proxy
mode, the lines it needs cut out of the V1 capture and read into a ``VllmLoad`` -- 195 -> 376 us (1.9x), once per
``--metrics-interval-s`` (0.5 s): under 0.1% of one core, and a /predict arriving meanwhile waits at most that long
on the shared event loop, once per interval; rendering the predictor's
/metrics 69 -> 172 us (2.5x) and the engine's vLLM families 176 -> 587 us (3.3x), once per scrape; parsing a whole
vLLM V1 scrape (614 lines) 2.6 -> 10.9 ms (4.1x), which only tests and benchmarks do. None of these is on a
request's path, so the library wins: the exposition code vLLM itself runs, and ~110 fewer lines here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

prometheus_client.disable_created_metrics()  # as the hand-written renderer before: no ``*_created`` series

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = dict[str, str]
Parsed = dict[str, list[tuple[Labels, float]]]


# ---------------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------------


class _Metric:
    """One metric family: a ``prometheus_client`` metric and the label names its keyword arguments must match."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str], metric: Any) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.metric = metric

    def _series(self, labels: Mapping[str, Any]) -> Any:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != declared {sorted(self.labelnames)}")
        return self.metric.labels(**labels) if self.labelnames else self.metric

    def touch(self, **labels: str) -> None:
        """Create the labelled series at 0 (so it shows before its first event, as vLLM pre-creates them)."""
        self._series(labels)


class Gauge(_Metric):
    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames, prometheus_client.Gauge(name, help, labelnames, registry=None))

    def set(self, value: float, **labels: str) -> None:
        self._series(labels).set(float(value))


class Counter(_Metric):
    """A monotonic counter; ``name`` is the base name (``vllm:prompt_tokens``), samples end in ``_total``."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if name.endswith("_total"):
            name = name[: -len("_total")]
        super().__init__(name, help, labelnames, prometheus_client.Counter(name, help, labelnames, registry=None))

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up (inc by {amount})")
        self._series(labels).inc(amount)

    def get(self, **labels: str) -> float:
        want = {k: str(v) for k, v in labels.items()}
        for family in self.metric.collect():
            for s in family.samples:
                if s.name == self.name + "_total" and s.labels == want:
                    return s.value
        return 0.0

    def set_total(self, value: float, **labels: str) -> None:
        """Raise the series to ``value``: a total kept elsewhere (the engine's preemption count) shown as a counter."""
        gap = float(value) - self.get(**labels)
        if gap > 0:
            self.inc(gap, **labels)
        else:
            self.touch(**labels)


class Histogram(_Metric):
    def __init__(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        b = sorted(float(x) for x in buckets)
        if not b or b[-1] != math.inf:
            b.append(math.inf)
        super().__init__(name, help, labelnames,
                         prometheus_client.Histogram(name, help, labelnames, registry=None, buckets=b))
        self.buckets = b

    def observe(self, value: float, **labels: str) -> None:
        self._series(labels).observe(float(value))


class Registry:
    """An ordered set of metric families rendered together (one per service: nothing global)."""

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []
        self.collectors = CollectorRegistry()

    def register(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self.metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self.collectors.register(metric.metric)
        self.metrics.append(metric)
        return metric

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self.register(Gauge(name, help, labelnames))  # type: ignore[return-value]

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self.register(Counter(name, help, labelnames))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> Histogram:
        return self.register(Histogram(name, help, buckets, labelnames))  # type: ignore[return-value]

    def render(self) -> str:
        return generate_latest(self.collectors).decode()


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """vLLM's buckets for token-count histograms: 1, 2, 5, 10, 20, 50, ... up to ``max_value``."""
    out = []
    exp = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_value:
                return out
            out.append(v)
        exp += 1


# vLLM's bucket edges (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0]
INTER_TOKEN_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0]


# ---------------------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------------------


class PromParseError(ValueError):
    pass


def parse_prometheus(text: str) -> Parsed:
    """Parse the text format into ``{sample name: [(labels, value), ...]}`` (comments and ``# EOF`` skipped).

    Raises :class:`PromParseError` (a ValueError) naming the offending line on malformed input.
    """
    out: Parsed = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, []).append((s.labels, float(s.value)))
    except (ValueError, IndexError, KeyError, TypeError) as err:
        raise PromParseError(f"not the Prometheus text format: {_bad_line(text)} ({type(err).__name__}: {err})") \
            from None
    return out


def _bad_line(text: str) -> str:
    """The first line the parser refuses (for the error message), found by parsing line by line."""
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            list(text_string_to_metric_families(line + "\n"))
        except Exception:  # noqa: BLE001 - any refusal marks the line
            return f"line {lineno}: {line[:200]!r}"
    return "the input"


def _matches(labels: Labels, want: Optional[Mapping[str, str]]) -> bool:
    return not want or all(labels.get(k) == str(v) for k, v in want.items())


def samples(parsed: Parsed, name: str, labels: Optional[Mapping[str, str]] = None) -> list[tuple[Labels, float]]:
    return [(lab, v) for lab, v in parsed.get(name, []) if _matches(lab, labels)]


def get_value(parsed: Parsed, names: Union[str, Iterable[str]], labels: Optional[Mapping[str, str]] = None,
              default: Optional[float] = None, agg: str = "sum") -> Optional[float]:
    """The value of the first of ``names`` present (summed -- or ``agg="first"`` -- over samples matching
    ``labels``); ``default`` when none is present."""
    for name in ([names] if isinstance(names, str) else names):
        got = samples(parsed, name, labels)
        if got:
            return got[0][1] if agg == "first" else float(sum(v for _, v in got))
    return default


@dataclass
class HistogramData:
    buckets: list[tuple[float, float]]  # (upper edge, cumulative count), +Inf last
    sum: float
    count: float

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan


def get_histogram(parsed: Parsed, name: str, labels: Optional[Mapping[str, str]] = None) -> Optional[HistogramData]:
    """The histogram ``name`` (base name, without ``_bucket``) for series matching ``labels`` (summed)."""
    bk: dict[float, float] = {}
    for lab, v in samples(parsed, name + "_bucket", labels):
        le = float(lab.get("le", "+Inf"))  # Python reads "+Inf" and "NaN" as Go writes them
        bk[le] = bk.get(le, 0.0) + v
    if not bk:
        return None
    return HistogramData(sorted(bk.items()), get_value(parsed, name + "_sum", labels, 0.0),  # type: ignore[arg-type]
                         get_value(parsed, name + "_count", labels, 0.0))  # type: ignore[arg-type]


KV_USAGE_NAMES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


@dataclass
class VllmLoad:
    """The load figures of one vLLM engine as read from its /metrics (None where the scrape lacks them)."""

    num_running: Optional[float] = None
    num_waiting: Optional[float] = None
    kv_cache_usage: Optional[float] = None  # fraction 0..1 (vLLM's "_perc" gauges are fractions)
    num_preemptions: Optional[float] = None
    num_gpu_blocks: Optional[int] = None
    block_size: Optional[int] = None
    prompt_tokens: Optional[float] = None
    generation_tokens: Optional[float] = None
    usage_metric: Optional[str] = None  # which of KV_USAGE_NAMES the usage came from

    @property
    def free_blocks(self) -> Optional[int]:
        """Free KV blocks implied by the usage fraction (rounded), when the block count is known. V1
        (``kv_cache_usage_perc``) keeps one null block out of the fraction: usage = 1 - free / (blocks - 1)
        (vllm/v1/core/block_pool.py ``get_usage``); V0's ``gpu_cache_usage_perc`` is 1 - free / blocks."""
        if self.num_gpu_blocks is None or self.kv_cache_usage is None:
            return None
        usable = self.num_gpu_blocks - (1 if self.usage_metric == KV_USAGE_NAMES[0] else 0)
        return int(round(max(0, usable) * (1.0 - self.kv_cache_usage)))

    @classmethod
    def from_metrics(cls, metrics: Union[str, Parsed], model_name: Optional[str] = None) -> "VllmLoad":
        parsed = parse_prometheus(metrics) if isinstance(metrics, str) else metrics
        want = {"model_name": model_name} if model_name else None
        info = samples(parsed, "vllm:cache_config_info", want) or samples(parsed, "vllm:cache_config_info")
        blocks = bsz = None
        if info:
            lab = info[0][0]
            try:
                blocks = int(float(lab["num_gpu_blocks"])) if lab.get("num_gpu_blocks") not in (None, "", "None") \
                    else None
                bsz = int(float(lab["block_size"])) if lab.get("block_size") not in (None, "", "None") else None
            except ValueError:
                pass
        usage = usage_name = None
        for nm in KV_USAGE_NAMES:
            got = samples(parsed, nm, want)
            if got:  # one engine per server here; average over engines of a data-parallel server
                usage, usage_name = sum(v for _, v in got) / len(got), nm
                break
        return cls(
            num_running=get_value(parsed, "vllm:num_requests_running", want),
            num_waiting=get_value(parsed, "vllm:num_requests_waiting", want),
            kv_cache_usage=usage,
            num_preemptions=get_value(parsed, "vllm:num_preemptions_total", want),
            num_gpu_blocks=blocks, block_size=bsz,
            prompt_tokens=get_value(parsed, "vllm:prompt_tokens_total", want),
            generation_tokens=get_value(parsed, "vllm:generation_tokens_total", want),
            usage_metric=usage_name,
        )
