"""What ``vllm serve`` adds to each engine step: measured, so the fitted execution model describes the served engine.

The profiler (:mod:`block.engine.vllm_profile`) times ``EngineCore`` steps inside the engine. A client of
``vllm serve`` sees more: every step's output goes through the API server (output processing, detokenisation,
one SSE chunk per running stream) and every new request is tokenised there first. On a GPU host that work runs on
other cores while the GPU computes; on a CPU host with the server pinned to one core it takes turns with the model,
so each step is longer by a constant plus a share per running stream, and each new request waits for its
tokenisation. Neither is in the step rows, so a profile fitted from them alone under-predicts a served engine
(measured on this project's 2-core machine, idle: decode of 2 streams 6.5 ms between tokens served vs 5.1 ms per
engine step; docs/vllm.md).

:func:`calibrate` starts the same server the experiments start (``python -m block.engine.vllm``, pinned to the
profile's cores), streams ``b`` identical requests at once for several ``b`` with ``ignore_eos`` (exact token
counts from ``continuous_usage_stats``) and keeps the steady-state inter-token latency of each, plus the TTFT of a
lone short request. :func:`overhead` then fits, against a fitted execution model, ``itl(b) - step(b) = a + c * b``
(non-negative least squares) and the first-token extra. :func:`served_steps` adds that to the profile's step rows
(``a`` per step, ``c`` per sequence that emits a token, the first-token extra per new prompt chunk), which the
profiler refits: the saved model is then the served step, and the calibration is stored beside it in the JSON's
``serving`` entry.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

BATCHES = (1, 2, 4, 8, 16, 32)
PROMPT_TOKENS = 32
OUT_TOKENS = 160


def steady_window(out_tokens: int) -> tuple[int, int]:
    """The token indices between which a stream's inter-token latency is read: past the first quarter (every
    stream's prefill done) and before the last eighth (streams start finishing). 160 tokens: 40..140."""
    return out_tokens // 4, out_tokens - out_tokens // 8


@dataclass
class ServeCalibration:
    """Measured on one served engine: steady inter-token latency per concurrent-stream count, a lone TTFT."""

    itl_s: dict[int, float]
    ttft_lone_s: float
    prompt_tokens: int = PROMPT_TOKENS
    out_tokens: int = OUT_TOKENS
    cpus: Optional[str] = None
    loadavg: Sequence[float] = field(default_factory=tuple)
    seconds: float = 0.0

    @property
    def steady_kv_each(self) -> int:
        """KV tokens each stream holds in the middle of the steady window: what a decode step there is modelled at."""
        return self.prompt_tokens + sum(steady_window(self.out_tokens)) // 2

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["itl_s"] = {str(k): v for k, v in self.itl_s.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ServeCalibration":
        d = dict(d)
        d["itl_s"] = {int(k): float(v) for k, v in d["itl_s"].items()}
        d["loadavg"] = tuple(d.get("loadavg") or ())
        return cls(**d)


@dataclass
class Overhead:
    """``a + c * b`` seconds per step with ``b`` sequences emitting a token, ``first_s`` per new request."""

    per_step_s: float
    per_seq_s: float
    first_s: float
    residual_ms: dict[int, float]  # itl - (step + a + c b) per b after the fit, for the docs

    def step_extra(self, n_emitting: int, n_new: int) -> float:
        return self.per_step_s + self.per_seq_s * n_emitting + self.first_s * n_new


async def _stream(client: Any, url: str, model: str, prompt: list[int], n_out: int) -> list[tuple[float, int]]:
    """(seconds since send, completion tokens so far) for every chunk that carries tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": n_out, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    t0 = time.perf_counter()
    marks: list[tuple[float, int]] = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"calibration request failed: HTTP {r.status_code} {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "error" in d:
                raise RuntimeError(f"calibration request failed in the stream: {d['error']}")
            n = int((d.get("usage") or {}).get("completion_tokens") or 0)
            if n and (not marks or n > marks[-1][1]):
                marks.append((time.perf_counter() - t0, n))
    return marks


def steady_itl(marks: Sequence[tuple[float, int]], lo: int, hi: int) -> float:
    """Seconds per token between the first chunk at or past token ``lo`` and the first at or past ``hi`` (chunks
    can carry several tokens: counted from the usage, not per chunk)."""
    a = next((m for m in marks if m[1] >= lo), None)
    b = next((m for m in marks if m[1] >= hi), None)
    if a is None or b is None or b[1] <= a[1]:
        raise ValueError(f"the stream ended before token {hi}: {marks[-1:] if marks else 'no tokens'}")
    return (b[0] - a[0]) / (b[1] - a[1])


async def measure_served(url: str, model: str, batches: Sequence[int] = BATCHES, prompt_tokens: int = PROMPT_TOKENS,
                         out_tokens: int = OUT_TOKENS, ttft_repeats: int = 10,
                         log: Any = print) -> tuple[dict[int, float], float]:
    import httpx

    prompt = list(range(100, 100 + prompt_tokens))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await _stream(client, url, model, prompt, 8)  # warm-up (first request's allocations)
        ttfts = [(await _stream(client, url, model, prompt, 1))[0][0] for _ in range(ttft_repeats)]
        itl: dict[int, float] = {}
        for b in batches:
            runs = await asyncio.gather(*[_stream(client, url, model, prompt, out_tokens) for _ in range(b)])
            itl[int(b)] = statistics.median(steady_itl(m, *steady_window(out_tokens)) for m in runs)
            log(f"  {b:3d} streams: {itl[int(b)] * 1e3:.2f} ms between tokens")
    return itl, statistics.median(ttfts)


def calibrate(model: str, engine: str, cpus: Optional[str] = None, batches: Sequence[int] = BATCHES,
              out_tokens: int = OUT_TOKENS, startup_timeout_s: float = 600.0, log: Any = print) -> ServeCalibration:
    """Start ``python -m block.engine.vllm`` (pinned to ``cpus``, in its own process group), wait for ``/health``,
    measure it, stop it (SIGTERM to the group, then SIGKILL)."""
    import signal
    import subprocess
    import sys

    import httpx

    from block.engine.config import load_conf
    from block.engine.vllm import vllm_executable
    from block.ports import free_port

    vllm_executable()  # VllmNotInstalled before anything starts
    served_name = str(load_conf("model", model)["name"])
    cores = _parse_cpus(cpus)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    import tempfile

    errlog = tempfile.TemporaryFile()  # vLLM logs a lot: a file, never a pipe that could fill and stall it
    proc = subprocess.Popen([sys.executable, "-m", "block.engine.vllm", "--port", str(port), "--model", model,
                             "--engine", engine], stdout=subprocess.DEVNULL, stderr=errlog,
                            start_new_session=True, preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores
                            else None)
    try:
        while True:
            if proc.poll() is not None:
                errlog.seek(0)
                err = errlog.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"vllm serve exited with {proc.returncode} before /health: {err}")
            try:
                if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > startup_timeout_s:
                raise TimeoutError(f"vllm serve not healthy after {startup_timeout_s:.0f} s")
            time.sleep(0.5)
        log(f"serving calibration against {url} (cores {cpus or 'any'}, up in {time.perf_counter() - t0:.0f} s)")
        itl, ttft = asyncio.run(measure_served(url, served_name, batches, out_tokens=out_tokens, log=log))
    finally:
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        errlog.close()
    return ServeCalibration(itl_s=itl, ttft_lone_s=ttft, out_tokens=out_tokens, cpus=cpus,
                            loadavg=tuple(os.getloadavg()),
                            seconds=round(time.perf_counter() - t0, 1))


def _parse_cpus(cpus: Optional[str]) -> set[int]:
    """``taskset -c`` syntax: ``1``, ``0,2``, ``0-3``."""
    out: set[int] = set()
    for part in (cpus or "").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def overhead(cal: ServeCalibration, em: Any) -> Overhead:
    """Fit ``itl(b) - step(b) = a + c b`` (a, c >= 0) against the execution model ``em`` (decode of ``b`` streams
    at their mean KV length in the steady window), and the first-token extra: lone TTFT minus the prefill step and
    that step's ``a + c``."""
    import numpy as np
    from scipy.optimize import nnls

    bs = sorted(cal.itl_s)
    kv_each = cal.steady_kv_each
    model = np.array([em.step_time([], b, b * kv_each) for b in bs])
    gap = np.array([cal.itl_s[b] for b in bs]) - model
    A = np.column_stack([np.ones(len(bs)), np.array(bs, dtype=float)])
    (a, c), _ = nnls(A, np.maximum(gap, 0.0))
    prefill = em.step_time([(cal.prompt_tokens, 0)], 0, 0)
    first = max(0.0, cal.ttft_lone_s - prefill - a - c)
    resid = {b: float((g - a - c * b) * 1e3) for b, g in zip(bs, gap)}
    return Overhead(per_step_s=float(a), per_seq_s=float(c), first_s=float(first), residual_ms=resid)


def served_steps(steps: Sequence[Any], times: Any, ov: Overhead) -> Any:
    """The step rows as the served engine takes them: each step plus ``a``, ``c`` per sequence that emits a token
    (every decode, every prefill chunk: on a row the last chunk of a prompt cannot be told from an earlier one, so
    every chunk counts) and the first-token extra per chunk that starts a prompt (nothing cached before it)."""
    import numpy as np

    extra = np.array([ov.step_extra(num_decode + len(chunks), sum(1 for _, cached in chunks if cached == 0))
                      for chunks, num_decode, _ in steps])
    return np.asarray(times, dtype=float) + extra


def save(cal: ServeCalibration, path: Path) -> None:
    from vidur.records import write_atomic

    write_atomic(path, json.dumps(cal.to_json(), indent=1).encode())


def load(path: Path) -> ServeCalibration:
    return ServeCalibration.from_json(json.loads(Path(path).read_text()))
