"""The Prometheus text exposition format: render our services' ``/metrics`` and parse anyone's (stock vLLM too).

Why here and not ``prometheus_client``: the services need a handful of metrics with vLLM's exact names, and the
predictor (and the adapter for a real vLLM) must *read* /metrics; one small module does both without a dependency.

Rendering follows ``prometheus_client`` (text format 0.0.4): ``# HELP`` / ``# TYPE`` per family, counters typed under
their base name with samples named ``<base>_total``, histograms as cumulative ``_bucket{le=...}`` samples ending with
``le="+Inf"``, then ``_sum`` and ``_count``; values printed as floats (``1.0``, ``+Inf``, ``NaN``).

Parsing (:func:`parse_prometheus`) returns ``{sample name: [(labels, value), ...]}`` -- the sample name, so a
counter is found under ``vllm:prompt_tokens_total`` and a histogram under ``..._bucket`` / ``_sum`` / ``_count``.
:class:`VllmLoad` pulls the load figures a router needs out of a vLLM (or emulated-engine) scrape and accepts both
the current ``vllm:kv_cache_usage_perc`` and the older (V0) ``vllm:gpu_cache_usage_perc``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = dict[str, str]
Parsed = dict[str, list[tuple[Labels, float]]]


# ---------------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------------


def format_value(v: float) -> str:
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def escape_label_value(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items()) + "}"


def _escape_help(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n")


class _Metric:
    type = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)

    def _key(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != declared {sorted(self.labelnames)}")
        return tuple(str(labels[k]) for k in self.labelnames)

    def _labels(self, key: tuple[str, ...], extra: Optional[dict[str, str]] = None) -> dict[str, str]:
        d = dict(zip(self.labelnames, key))
        if extra:
            d.update(extra)
        return d

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.type}"]

    def lines(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError


class Gauge(_Metric):
    type = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self.values: dict[tuple[str, ...], float] = {}

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = float(value)

    def clear(self) -> None:
        self.values.clear()

    def lines(self) -> list[str]:
        return [f"{self.name}{format_labels(self._labels(k))} {format_value(v)}" for k, v in self.values.items()]


class Counter(_Metric):
    """A monotonic counter; ``name`` is the base name (``vllm:prompt_tokens``), samples end in ``_total``."""

    type = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if name.endswith("_total"):
            name = name[: -len("_total")]
        super().__init__(name, help, labelnames)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up (inc by {amount})")
        k = self._key(labels)
        self.values[k] = self.values.get(k, 0.0) + amount

    def touch(self, **labels: str) -> None:
        """Create the labelled series at 0 (so it shows before the first increment, as vLLM pre-creates them)."""
        self.values.setdefault(self._key(labels), 0.0)

    def get(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}_total{format_labels(self._labels(k))} {format_value(v)}" for k, v in self.values.items()]


class Histogram(_Metric):
    type = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        b = sorted(float(x) for x in buckets)
        if not b or b[-1] != math.inf:
            b.append(math.inf)
        self.buckets = b
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: dict[tuple[str, ...], float] = {}

    def touch(self, **labels: str) -> None:
        k = self._key(labels)
        self.counts.setdefault(k, [0] * len(self.buckets))
        self.sums.setdefault(k, 0.0)

    def observe(self, value: float, **labels: str) -> None:
        k = self._key(labels)
        c = self.counts.setdefault(k, [0] * len(self.buckets))
        self.sums[k] = self.sums.get(k, 0.0) + float(value)
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                c[i] += 1
                break

    def lines(self) -> list[str]:
        out = []
        for k, counts in self.counts.items():
            acc = 0
            for edge, n in zip(self.buckets, counts):
                acc += n
                out.append(f"{self.name}_bucket{format_labels(self._labels(k, {'le': format_value(edge)}))} "
                           f"{format_value(acc)}")
            lab = format_labels(self._labels(k))
            out.append(f"{self.name}_sum{lab} {format_value(self.sums.get(k, 0.0))}")
            out.append(f"{self.name}_count{lab} {format_value(acc)}")
        return out


class Registry:
    """An ordered set of metric families rendered together."""

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self.metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics.append(metric)
        return metric

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self.register(Gauge(name, help, labelnames))  # type: ignore[return-value]

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self.register(Counter(name, help, labelnames))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> Histogram:
        return self.register(Histogram(name, help, buckets, labelnames))  # type: ignore[return-value]

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            lines.extend(m.header())
            lines.extend(m.lines())
        return "\n".join(lines) + "\n"


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


def _parse_float(s: str) -> float:
    t = s.strip()
    low = t.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    if low == "nan":
        return math.nan
    return float(t)


def _parse_labels(s: str, i: int, lineno: int) -> tuple[Labels, int]:
    """Parse ``{a="x",b="y"}`` starting at s[i] == '{'; return (labels, index after '}')."""
    labels: Labels = {}
    n = len(s)
    i += 1
    while True:
        while i < n and s[i] in " \t,":
            i += 1
        if i >= n:
            raise PromParseError(f"line {lineno}: unterminated label set")
        if s[i] == "}":
            return labels, i + 1
        j = i
        while j < n and s[j] not in "=} \t":
            j += 1
        key = s[i:j]
        while j < n and s[j] in " \t":
            j += 1
        if j >= n or s[j] != "=":
            raise PromParseError(f"line {lineno}: expected '=' after label {key!r}")
        j += 1
        while j < n and s[j] in " \t":
            j += 1
        if j >= n or s[j] != '"':
            raise PromParseError(f"line {lineno}: label {key!r} value must be quoted")
        j += 1
        buf = []
        while True:
            if j >= n:
                raise PromParseError(f"line {lineno}: unterminated value of label {key!r}")
            c = s[j]
            if c == "\\" and j + 1 < n:
                nxt = s[j + 1]
                buf.append("\n" if nxt == "n" else nxt)
                j += 2
                continue
            if c == '"':
                j += 1
                break
            buf.append(c)
            j += 1
        labels[key] = "".join(buf)
        i = j


def parse_prometheus(text: str) -> Parsed:
    """Parse the text format into ``{sample name: [(labels, value), ...]}`` (comments and ``# EOF`` skipped).

    Raises :class:`PromParseError` (a ValueError) naming the line on malformed input.
    """
    out: Parsed = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        i = 0
        n = len(line)
        while i < n and line[i] not in "{ \t":
            i += 1
        name = line[:i]
        if not name:
            raise PromParseError(f"line {lineno}: no metric name in {raw!r}")
        labels: Labels = {}
        if i < n and line[i] == "{":
            labels, i = _parse_labels(line, i, lineno)
        rest = line[i:].split()
        if not rest:
            raise PromParseError(f"line {lineno}: no value for {name}")
        try:
            value = _parse_float(rest[0])
        except ValueError as err:
            raise PromParseError(f"line {lineno}: bad value {rest[0]!r} for {name}") from err
        out.setdefault(name, []).append((labels, value))
    return out


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
        le = _parse_float(lab.get("le", "+Inf"))
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
