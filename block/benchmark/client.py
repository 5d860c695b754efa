"""Load generator with ``vllm bench serve`` semantics, writing the project's run records.

``await run_benchmark(config)`` replays a workload (``data.build_workload_frame``: a bundled dataset or a user's
file, Gamma arrivals at ``request_rate`` with ``burstiness``) against any OpenAI-compatible endpoint -- the Block
scheduler, a predictor, an emulated engine or a plain vLLM server -- and returns the summary.

Per request (as ``vllm bench serve`` sends them): ``stream: true`` with ``stream_options.include_usage``,
``ignore_eos: true``, ``max_tokens = min_tokens =`` the request's true output length, the prompt as text when the
dataset has text, else a list of token ids of the right length (``(i*7 + j) % 30000 + 100``); with ``hint`` the
header ``x-expected-output-tokens`` carries the oracle or predicted length.

Measured per request, on the client's clock (``time.perf_counter``), from the moment it is sent:

- TTFT: the first SSE chunk whose choice has non-empty text (``delta.content`` for chat);
- ITL: the gaps between such chunks (per chunk, as vLLM), E2E: the last such chunk;
- output tokens: the final ``usage.completion_tokens`` (else the number of token chunks);
- TPOT: ``(E2E - TTFT) / (output tokens - 1)`` (undefined for one-token answers).

A request fails on a non-200 answer, a transport error, an SSE error event, a stream without any token or without
``[DONE]``; it is recorded with its status and error. ``time_scale`` S sends at ``request_rate * S`` and multiplies
every measured time by S, so a stack that runs S times faster than real time (emulated engines with
``--time-scale S``) yields records in model time. Scheduler-side figures read from the response headers
(``x-block-decision-ms``, ``x-block-probe-ms``) are wall-clock costs and are not scaled; ``x-block-predicted-e2e-s``
is the predictor's model-time estimate and is not scaled either.

Summary keys follow ``vllm bench serve`` (``completed``, ``failed``, ``duration``, ``total_input_tokens``,
``total_output_tokens``, ``request_throughput``, ``request_goodput``, ``output_throughput``,
``total_token_throughput``, ``max_output_tokens_per_s``, ``max_concurrent_requests``, and mean/median/std/p90/p99
of ``ttft``, ``tpot``, ``itl``, ``e2el`` in ms). ITL statistics are over all gaps of all requests, as vLLM computes
them (the records' ``itl_s`` is each request's mean gap).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from block.http import Origin, Pool, UpstreamError
from block.sse import DONE, SSEScanner, error_message, error_of, has_output, parse_payload
from vidur.types import Request

log = logging.getLogger("block.benchmark")

try:
    import orjson as _orjson

    _loads = _orjson.loads

    def _dumps(obj: Any) -> bytes:
        return _orjson.dumps(obj)
except ImportError:  # pragma: no cover
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
HINTS = ("none", "oracle", "predicted")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
HINT_HEADER = "x-expected-output-tokens"
CHAT_OVERHEAD_TOKENS = 7  # block/engine/tokens.py: 4 per message + 3 (one user message)


@dataclass
class BenchmarkConfig:
    """What to replay against which endpoint (the CLI's options; ``python -m block.benchmark --help``)."""

    base_url: str = "http://127.0.0.1:8200"
    endpoint: str = "/v1/completions"
    model: Optional[str] = None  # None: ask GET /v1/models
    dataset: str = "sharegpt"
    dataset_path: Optional[str] = None
    num_requests: int = 1000
    request_rate: float = math.inf
    burstiness: float = 1.0
    seed: int = 0
    max_concurrency: Optional[int] = None
    hint: str = "none"
    time_scale: float = 1.0
    goodput: dict[str, float] = field(default_factory=dict)  # metric -> SLO in ms (model time)
    output_dir: Optional[str] = None
    token: Optional[str] = None
    tokenizer: str = "llama2"  # counts text datasets (data.load_dataset)
    max_model_len: int = 4096
    start_index: int = 0
    timeout_s: float = 1800.0  # longest wait for the next piece of an answer (real seconds)
    disable_tqdm: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)  # added to the summary and config.yaml

    def validate(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint={self.endpoint!r}: use one of {ENDPOINTS}")
        if self.hint not in HINTS:
            raise ValueError(f"hint={self.hint!r}: use one of {HINTS}")
        if self.num_requests <= 0:
            raise ValueError(f"num_requests={self.num_requests} must be > 0")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate={self.request_rate} must be > 0 (inf = all at once)")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness={self.burstiness} must be > 0")
        if not (self.time_scale > 0 and math.isfinite(self.time_scale)):
            raise ValueError(f"time_scale={self.time_scale} must be a positive number")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency={self.max_concurrency} must be >= 1")
        for k, v in self.goodput.items():
            if k not in GOODPUT_METRICS:
                raise ValueError(f"goodput metric {k!r}: use {GOODPUT_METRICS}")
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"goodput SLO {k}={v} must be a positive number of ms")
        Origin(self.base_url.rstrip("/"))  # raises ValueError for a bad URL

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("token", None)  # never write a secret into the run records
        if math.isinf(d["request_rate"]):
            d["request_rate"] = "inf"
        return d

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "BenchmarkConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(m) - names)
        if unknown:
            raise ValueError(f"unknown benchmark option(s) {unknown}; known: {sorted(names)}")
        d = dict(m)
        if isinstance(d.get("request_rate"), str):
            d["request_rate"] = float(d["request_rate"])
        return cls(**d)


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (ms), as ``vllm bench serve --goodput``."""
    out: dict[str, float] = {}
    for it in items:
        for part in str(it).replace(",", " ").split():
            k, sep, v = part.partition(":")
            if not sep:
                raise ValueError(f"--goodput expects METRIC:MS pairs (ttft, tpot, e2el), got {part!r}")
            k = k.strip().lower()
            if k not in GOODPUT_METRICS:
                raise ValueError(f"--goodput metric {k!r}: use {GOODPUT_METRICS}")
            try:
                out[k] = float(v)
            except ValueError:
                raise ValueError(f"--goodput {k}: {v!r} is not a number of ms") from None
            if not out[k] > 0:
                raise ValueError(f"--goodput {k}: {v} must be > 0 ms")
    return out


# ------------------------------------------------------------------------------------------------ workload
def build_requests(cfg: BenchmarkConfig) -> list[Request]:
    """The workload: ``data`` rows with Gamma arrivals at ``request_rate`` (model time; inf -> all at 0)."""
    from data import WorkloadConfig, build_workload

    wc = WorkloadConfig(dataset=cfg.dataset, path=cfg.dataset_path, num_requests=cfg.num_requests,
                        qps=cfg.request_rate, arrival="gamma", burstiness=cfg.burstiness, seed=cfg.seed,
                        start_index=cfg.start_index, max_model_len=cfg.max_model_len, tokenizer=cfg.tokenizer,
                        predicted_length="column" if cfg.hint == "predicted" else "none")
    return build_workload(wc)


def token_prompt(i: int, n: int) -> list[int]:
    """A prompt of ``n`` token ids for request ``i`` (used when the dataset has lengths only)."""
    return [(i * 7 + j) % 30000 + 100 for j in range(n)]


def chat_text(n: int) -> str:
    """A message whose content the emulated engine (and Llama-2) counts as ``n`` tokens."""
    return " ".join(["the"] * max(1, n))


def request_body(req: Request, cfg: BenchmarkConfig, model: Optional[str]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if model:
        body["model"] = model
    if cfg.endpoint == "/v1/chat/completions":
        text = req.prompt if req.prompt else chat_text(req.prompt_tokens - CHAT_OVERHEAD_TOKENS)
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = req.prompt if req.prompt else token_prompt(req.id, req.prompt_tokens)
    body.update(max_tokens=int(req.output_tokens), min_tokens=int(req.output_tokens), ignore_eos=True,
                stream=True, stream_options={"include_usage": True}, temperature=0.0)
    return body


def hint_of(req: Request, hint: str) -> Optional[int]:
    if hint == "oracle":
        return int(req.output_tokens)
    if hint == "predicted":
        if req.predicted_output_tokens is None:
            raise ValueError(f"request {req.id} has no predicted length: --hint predicted needs a dataset with a "
                             "prediction column (e.g. --dataset sharegpt_predicted)")
        return int(req.predicted_output_tokens)
    return None


# ------------------------------------------------------------------------------------------------ one request
@dataclass
class Outcome:
    id: int
    dispatch: float = math.nan  # real seconds since the start
    first: float = math.nan
    last: float = math.nan
    end: float = math.nan  # when the answer was over (success or failure)
    itls: list[float] = field(default_factory=list)
    chunks: int = 0
    usage_out: Optional[int] = None
    usage_in: Optional[int] = None
    status: str = "ok"
    http_status: int = 0
    error: str = ""
    headers: dict[str, str] = field(default_factory=dict)


async def send_one(pool: Pool, origin: Origin, cfg: BenchmarkConfig, body: bytes, headers: dict[str, str],
                   out: Outcome, t0: float) -> None:
    """Send one streaming request and fill ``out`` (times relative to ``t0``, real seconds)."""
    now = time.perf_counter
    st = now()
    out.dispatch = st - t0
    last = math.nan
    try:
        resp = await pool.request("POST", origin, cfg.endpoint, body, headers, cfg.timeout_s)
        out.http_status = resp.status_code
        out.headers = {k: v for k, v in resp.headers.items() if k.startswith("x-block-")}
        if resp.status_code != 200:
            data = await resp.read()
            out.status = f"http_{resp.status_code}"
            out.error = _error_message(data) or f"HTTP {resp.status_code}"
            out.end = now() - t0
            return
        scanner = SSEScanner()  # the stream read as the scheduler and the predictor read it (block/sse.py)
        done = False
        async for piece in resp.aiter_raw():
            ts = now()
            for payload in scanner.feed(piece):
                ev = parse_payload(payload)
                if ev == DONE:
                    done = True
                    continue
                if ev is None:
                    out.status, out.error = "bad_event", f"undecodable event {payload[:100]!r}"
                    continue
                if not isinstance(ev, dict):
                    continue
                err = error_of(ev)
                if err is not None:
                    out.status = "stream_error"
                    out.error = error_message(err)
                    continue
                if has_output(ev):
                    if out.chunks == 0:
                        out.first = ts - t0
                    else:
                        out.itls.append(ts - last)
                    last = ts
                    out.chunks += 1
                u = ev.get("usage")
                if isinstance(u, dict):
                    if u.get("completion_tokens") is not None:
                        out.usage_out = int(u["completion_tokens"])
                    if u.get("prompt_tokens") is not None:
                        out.usage_in = int(u["prompt_tokens"])
        out.end = now() - t0
        if out.status == "ok":
            if out.chunks == 0:
                out.status, out.error = "no_token", "the stream ended without any token"
            elif not done:
                out.status, out.error = "incomplete", "the stream ended without [DONE]"
    except UpstreamError as err:
        out.status = "transport_error" if err.kind != "timeout" else "timeout"
        out.error = str(err)
        out.end = now() - t0
    if not math.isnan(last):
        out.last = last - t0


def _error_message(data: bytes) -> str:
    try:
        d = _loads(data)
        if isinstance(d, dict):
            e = d.get("error", d.get("detail", d))
            if isinstance(e, dict):
                return str(e.get("message", e))
            return str(e)
    except ValueError:
        pass
    return data[:300].decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class BenchmarkResult:
    summary: dict[str, Any]
    requests: pd.DataFrame
    itls_s: np.ndarray  # every gap of every successful request (model seconds)
    run_dir: Optional[Path] = None


async def fetch_model(pool: Pool, origin: Origin, headers: dict[str, str], timeout: float) -> Optional[str]:
    try:
        r = await pool.request("GET", origin, "/v1/models", b"", headers, timeout)
        data = await r.read()
        if r.status_code == 200:
            d = _loads(data)
            items = d.get("data") if isinstance(d, dict) else None
            if items and isinstance(items[0], dict) and items[0].get("id"):
                return str(items[0]["id"])
        log.warning("GET /v1/models answered %s: sending requests without a model name", r.status_code)
    except (UpstreamError, ValueError) as err:
        log.warning("GET /v1/models failed (%s): sending requests without a model name", err)
    return None


def _f(v: Optional[str]) -> float:
    if v is None:
        return math.nan
    try:
        return float(v)
    except ValueError:
        return math.nan


def _rows(reqs: Sequence[Request], outs: Sequence[Outcome], cfg: BenchmarkConfig) -> list[dict[str, Any]]:
    S = cfg.time_scale
    nan = math.nan
    rows = []
    for r, o in zip(reqs, outs):
        ok = o.status == "ok"
        n_out = (o.usage_out if o.usage_out is not None else o.chunks) if ok else 0
        ttft = (o.first - o.dispatch) * S if ok else nan
        e2e = (o.last - o.dispatch) * S if ok else nan
        tpot = (e2e - ttft) / (n_out - 1) if ok and n_out > 1 else nan
        h = o.headers
        inst = h.get("x-block-instance")
        hint = hint_of(r, cfg.hint)
        rows.append({
            "id": int(r.id),
            "instance": int(inst) if inst is not None and inst.lstrip("-").isdigit() else -1,
            "arrival_s": float(r.arrival_s),
            "dispatch_s": o.dispatch * S,
            "first_token_s": o.first * S if ok else nan,
            "finish_s": (o.last if ok else o.end) * S,
            "prompt_tokens": int(o.usage_in if (ok and o.usage_in is not None) else r.prompt_tokens),
            "output_tokens": int(n_out),
            "predicted_tokens": int(hint) if hint is not None else -1,
            "ttft_s": ttft,
            "tpot_s": tpot,
            "e2e_s": e2e,
            "predicted_e2e_s": _f(h.get("x-block-predicted-e2e-s")),
            "num_preemptions": -1,
            "status": o.status,
            "itl_s": float(np.mean(o.itls)) * S if ok and o.itls else nan,
            "decision_ms": _f(h.get("x-block-decision-ms")),
            "probe_ms": _f(h.get("x-block-probe-ms")),
            "retries": int(_f(h.get("x-block-retries"))) if h.get("x-block-retries") is not None else -1,
            "expected_output_tokens": int(r.output_tokens),
            "http_status": int(o.http_status),
            "error": o.error,
        })
    return rows


def _stats(name: str, v: np.ndarray) -> dict[str, Optional[float]]:
    v = v[np.isfinite(v)] * 1e3
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms", f"p90_{name}_ms", f"p99_{name}_ms"]
    if v.size == 0:
        return dict.fromkeys(keys)
    return dict(zip(keys, [float(v.mean()), float(np.median(v)), float(v.std()), float(np.percentile(v, 90)),
                           float(np.percentile(v, 99))]))


def summarize_run(df: pd.DataFrame, itls: np.ndarray, cfg: BenchmarkConfig, duration_s: float,
                  max_concurrency_seen: int, model: Optional[str],
                  token_times: Optional[np.ndarray] = None) -> dict[str, Any]:
    from vidur.records import summarize

    token_times = np.zeros(0) if token_times is None else token_times[np.isfinite(token_times)]
    s = summarize(df, duration_s=duration_s)
    ok = df[df["status"] == "ok"]
    for name, col in (("ttft", "ttft_s"), ("tpot", "tpot_s"), ("e2el", "e2e_s")):
        s.update(_stats(name, ok[col].to_numpy(float)))
    s.update(_stats("itl", itls))
    if cfg.goodput:
        good = np.ones(len(ok), dtype=bool)
        for metric, col in (("ttft", "ttft_s"), ("tpot", "tpot_s"), ("e2el", "e2e_s")):
            if metric in cfg.goodput:
                v = ok[col].to_numpy(float) * 1e3
                good &= np.where(np.isfinite(v), v, 0.0) <= cfg.goodput[metric]  # one-token answers: tpot 0
        s["request_goodput"] = float(good.sum()) / max(duration_s, 1e-9)
    else:
        s["request_goodput"] = None
    # peak output tokens per second: token chunks per one-second (model time) bucket, as vLLM counts them
    s["max_output_tokens_per_s"] = float(np.bincount(np.floor(token_times).astype(int)).max()) \
        if token_times.size else 0.0
    s["num_preemptions"] = None  # unknown to a client
    s["max_concurrent_requests"] = int(max_concurrency_seen)
    errors = df.loc[df["status"] != "ok", "status"].value_counts()
    s["errors"] = {str(k): int(v) for k, v in errors.items()}
    s.update({
        "mode": "benchmark", "base_url": cfg.base_url, "endpoint": cfg.endpoint, "model_id": model,
        "qps": None if math.isinf(cfg.request_rate) else cfg.request_rate,
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness, "max_concurrency": cfg.max_concurrency, "num_prompts": int(len(df)),
        "hint": cfg.hint, "time_scale": cfg.time_scale, "seed": cfg.seed,
        "dataset": cfg.dataset_path or cfg.dataset,
    })
    if cfg.goodput:
        s["goodput_slos_ms"] = dict(cfg.goodput)
    s.update(cfg.metadata)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in s.items()}


def config_yaml(cfg: BenchmarkConfig, model: Optional[str]) -> str:
    import yaml

    d: dict[str, Any] = {"mode": "benchmark", "seed": cfg.seed, "benchmark": cfg.to_dict(),
                         "workload": {"qps": None if math.isinf(cfg.request_rate) else cfg.request_rate,
                                      "num_requests": cfg.num_requests, "arrival": "gamma",
                                      "burstiness": cfg.burstiness, "start_index": cfg.start_index},
                         "dataset": {"name": cfg.dataset, "path": cfg.dataset_path},
                         "model_id": model}
    for k, v in cfg.metadata.items():  # dotted keys go into the tree: policy.name=block -> policy: {name: block}
        cur = d
        parts = str(k).split(".")
        for p in parts[:-1]:
            nxt = cur.get(p)
            if not isinstance(nxt, dict):
                nxt = cur[p] = {}
            cur = nxt
        cur[parts[-1]] = v
    return yaml.safe_dump(d, sort_keys=False)


async def benchmark(config: Union[BenchmarkConfig, Mapping[str, Any]], requests: Optional[Sequence[Request]] = None,
                    pool: Optional[Pool] = None, instance_samples: Optional[Sequence[tuple]] = None) -> BenchmarkResult:
    """Run the benchmark; ``requests`` (ids, model-time arrivals, lengths) replace the dataset when given.

    ``instance_samples``: rows ``(time_s, instance, num_running, num_waiting, free_blocks, num_preemptions)`` that
    the caller collected (e.g. by polling the predictors) for ``instances.parquet``; it may be a list the caller
    keeps filling while the benchmark runs (it is read at the end). Empty by default.
    """
    cfg = config if isinstance(config, BenchmarkConfig) else BenchmarkConfig.from_mapping(config)
    cfg.validate()
    reqs = list(requests) if requests is not None else build_requests(cfg)
    if not reqs:
        raise ValueError("no request to send")
    S = cfg.time_scale
    origin = Origin(cfg.base_url.rstrip("/"))
    own_pool = pool is None
    pool = pool or Pool(connect_timeout_s=min(30.0, cfg.timeout_s), max_idle=4096)
    auth = {"authorization": f"Bearer {cfg.token}"} if cfg.token else {}
    try:
        model = cfg.model or await fetch_model(pool, origin, auth, min(30.0, cfg.timeout_s))
        bodies = []
        for r in reqs:
            h = {"content-type": "application/json", "x-request-id": f"bench-{cfg.seed}-{r.id}", **auth}
            hint = hint_of(r, cfg.hint)
            if hint is not None:
                h[HINT_HEADER] = str(hint)
            bodies.append((_dumps(request_body(r, cfg, model)), h))
        outs = [Outcome(int(r.id)) for r in reqs]
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        bar = None
        if not cfg.disable_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(reqs), desc="requests", unit="req")
        inflight = 0
        peak = 0

        async def run_one(k: int) -> None:
            nonlocal inflight, peak
            body, h = bodies[k]
            if sem is not None:
                await sem.acquire()
            inflight += 1
            peak = max(peak, inflight)
            try:
                await send_one(pool, origin, cfg, body, h, outs[k], t0)
            except Exception as err:  # noqa: BLE001 - a bug must not lose the request silently
                outs[k].status, outs[k].error = "client_error", f"{type(err).__name__}: {err}"
                outs[k].end = time.perf_counter() - t0
            finally:
                inflight -= 1
                if sem is not None:
                    sem.release()
                if bar is not None:
                    bar.update(1)

        order = sorted(range(len(reqs)), key=lambda k: reqs[k].arrival_s)
        tasks = []
        t0 = time.perf_counter()
        for k in order:
            delay = t0 + reqs[k].arrival_s / S - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(run_one(k)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        if bar is not None:
            bar.close()
    finally:
        if own_pool:
            await pool.aclose()

    from vidur.records import instances_frame, requests_frame, write_run

    df = requests_frame(_rows(reqs, outs, cfg))
    itls = np.array([g for o in outs if o.status == "ok" for g in o.itls], dtype=float) * S
    ends = [x for o in outs for x in (o.last, o.end) if not math.isnan(x)]
    duration = (max(ends) if ends else wall) * S
    token_times = np.concatenate([o.first + np.concatenate([[0.0], np.cumsum(o.itls)]) for o in outs
                                  if o.status == "ok"] or [np.zeros(0)]) * S
    summary = summarize_run(df, itls, cfg, duration, peak, model, token_times)
    summary["wall_s"] = wall
    run_dir = None
    if cfg.output_dir:
        run_dir = write_run(cfg.output_dir, config_yaml(cfg, model), df, instances_frame(instance_samples or []),
                            summary)
    return BenchmarkResult(summary, df, itls, run_dir)


async def run_benchmark(config: Union[BenchmarkConfig, Mapping[str, Any]],
                        requests: Optional[Sequence[Request]] = None,
                        instance_samples: Optional[Sequence[tuple]] = None) -> dict[str, Any]:
    """Run the benchmark and return its summary (``summary.json``'s content); see :func:`benchmark`."""
    return (await benchmark(config, requests, instance_samples=instance_samples)).summary
