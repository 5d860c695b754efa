"""Serving a length estimator: load one by name or path, batch online requests without blocking an event loop,
and tag a workload's requests before a simulated run.

* ``load_estimator(spec)``: ``none`` -> None; ``cpu`` -> the shipped features-only CPU estimator
  (``length_estimation/artifacts/cpu_features.npz``, numpy only); a ``.npz`` file -> a CPU estimator saved by
  ``python -m length_estimation.cpu_estimator train``; a directory -> a transformer checkpoint
  (``length_estimation.transformer.TransformerEstimator``, needs torch). ``auto`` -> a transformer checkpoint when
  one is given in ``$BLOCK_LENGTH_CHECKPOINT`` and a GPU is present, else ``cpu``.
* ``BatchingEstimator``: the online path of the global scheduler. ``await estimate(prompt)`` queues the prompt;
  a collector takes every prompt that arrives within ``max_wait_ms`` of the first one (at most ``max_batch``) and
  runs one ``predict`` in a worker thread, so the asyncio loop keeps serving other requests meanwhile. Each answer
  says how long the request waited in total (``latency_ms``: queueing + batching window + prediction) -- the
  latency the estimator adds to that request.
* ``tag_requests(requests, estimator)``: sets ``predicted_output_tokens`` of every request that carries prompt text
  (what ``block_star`` routes on), for ``mode=sim``.

Layer rule: this module imports numpy, the standard library and ``vidur.types`` only (no ``block``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from length_estimation.base import LengthEstimator, clip_lengths

log = logging.getLogger("length_estimation.serve")

ESTIMATOR_CHOICES = "none | cpu | auto | <file.npz> | <transformer checkpoint dir>"
CHECKPOINT_ENV = "BLOCK_LENGTH_CHECKPOINT"


def _has_gpu() -> bool:
    try:
        import torch  # noqa: PLC0415

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def load_estimator(spec: Optional[str], device: str = "auto") -> Optional[LengthEstimator]:
    """An estimator from a spec (see the module doc), or None for ``none``/empty. Errors name the spec."""
    s = (spec or "").strip()
    if s.lower() in ("", "none", "off", "false", "null"):
        return None
    if s.lower() == "auto":
        ckpt = os.environ.get(CHECKPOINT_ENV)
        if ckpt and Path(ckpt).is_dir() and _has_gpu():
            return load_estimator(ckpt, device)
        s = "cpu"
    from length_estimation.cpu_estimator import CpuLengthEstimator, load_default  # noqa: PLC0415

    if s.lower() == "cpu":
        return load_default()
    p = Path(s).expanduser()
    if p.is_file():
        return CpuLengthEstimator.load(p)
    if p.is_dir():
        try:
            from length_estimation.transformer import TransformerEstimator  # noqa: PLC0415
        except ImportError as err:
            raise ValueError(f"length estimator {s}: a transformer checkpoint needs torch and transformers "
                             f"({err}); use --length-estimator cpu on a machine without them") from err
        return TransformerEstimator.load(p, device=device)
    raise ValueError(f"length estimator {s!r}: not a file or directory; use {ESTIMATOR_CHOICES}")


def estimator_name(est: Any) -> str:
    return str(getattr(est, "name", type(est).__name__))


# ------------------------------------------------------------------------------------------------ online batching
@dataclass
class Estimate:
    tokens: int  # predicted output tokens (>= 1)
    latency_ms: float  # from estimate() to the answer: queueing + batching window + prediction
    predict_ms: float  # the batch's predict call
    batch_size: int


@dataclass
class _Item:
    prompt: str
    future: asyncio.Future
    t0: float


class BatchingEstimator:
    """Micro-batching front of an estimator for an asyncio server (see the module doc).

    ``max_wait_ms``: how long the first prompt of a batch waits for company (0: take only what is already queued);
    ``max_batch``: prompts per predict call. Predictions run one batch at a time in a single worker thread; prompts
    arriving meanwhile form the next batch. ``close()`` stops the collector and fails pending requests.
    """

    def __init__(self, estimator: LengthEstimator, max_batch: int = 32, max_wait_ms: float = 2.0,
                 timeout_s: float = 5.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if not (max_wait_ms >= 0 and np.isfinite(max_wait_ms)):
            raise ValueError(f"max_wait_ms={max_wait_ms} must be >= 0")
        self.estimator = estimator
        self.name = estimator_name(estimator)
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1e3
        self.timeout_s = float(timeout_s)
        self._queue: Optional[asyncio.Queue[_Item]] = None
        self._task: Optional[asyncio.Task] = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="length-estimator")
        self._lock = threading.Lock()
        # counters (read by /metrics)
        self.requests = 0
        self.batches = 0
        self.failures = 0
        self.predict_s_total = 0.0

    def _ensure_started(self) -> asyncio.Queue:
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._collector(self._queue))
        return self._queue

    async def estimate(self, prompt: str) -> Estimate:
        """The predicted output length of one prompt; raises on an estimator failure or after ``timeout_s``."""
        q = self._ensure_started()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        q.put_nowait(_Item(prompt if isinstance(prompt, str) else "", fut, time.perf_counter()))
        self.requests += 1
        return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)

    def warmup(self) -> float:
        """One prediction outside any loop (loads lazy parts, fills caches); returns its seconds."""
        t0 = time.perf_counter()
        self.estimator.predict(["Hello, how are you?"])
        return time.perf_counter() - t0

    async def _collector(self, q: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await q.get()
            batch = [first]
            deadline = first.t0 + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(q.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(q.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [it for it in batch if not it.future.done()]
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                pred = await loop.run_in_executor(self._pool, self._predict, [it.prompt for it in live])
            except Exception as err:  # noqa: BLE001 - each waiting request gets the error
                self.failures += len(live)
                log.warning("length estimator %s failed on a batch of %d: %r", self.name, len(live), err)
                for it in live:
                    if not it.future.done():
                        it.future.set_exception(RuntimeError(f"length estimator failed: {err!r}"))
                continue
            t1 = time.perf_counter()
            self.batches += 1
            self.predict_s_total += t1 - t0
            for it, p in zip(live, pred):
                if not it.future.done():
                    it.future.set_result(Estimate(int(p), (t1 - it.t0) * 1e3, (t1 - t0) * 1e3, len(live)))

    def _predict(self, prompts: list[str]) -> np.ndarray:
        with self._lock:
            out = np.asarray(self.estimator.predict(prompts))
        if out.shape != (len(prompts),):
            raise RuntimeError(f"estimator returned shape {out.shape} for {len(prompts)} prompts")
        return clip_lengths(out)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                it = self._queue.get_nowait()
                if not it.future.done():
                    it.future.set_exception(RuntimeError("length estimator closed"))
        self._pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ sim tagging
def tag_requests(requests: Sequence[Any], estimator: "LengthEstimator | str", *, batch_size: int = 512,
                 require_text: bool = True) -> list[Any]:
    """Copies of ``requests`` (``vidur.types.Request``) with ``predicted_output_tokens`` from ``estimator`` (an
    estimator or a spec for ``load_estimator``), computed from each request's ``prompt`` text.

    Requests without text keep their prediction; with ``require_text`` (default) any such request is an error,
    naming how many lack text (a length-only dataset cannot be estimated: use ``sharegpt_text`` or a text file)."""
    est = load_estimator(estimator) if isinstance(estimator, str) else estimator
    if est is None:
        return list(requests)
    idx = [i for i, r in enumerate(requests) if isinstance(getattr(r, "prompt", None), str)]
    if require_text and len(idx) < len(requests):
        raise ValueError(f"{len(requests) - len(idx)} of {len(requests)} requests have no prompt text: the length "
                         "estimator needs a text dataset (e.g. dataset=sharegpt_text)")
    out = list(requests)
    for s in range(0, len(idx), batch_size):
        part = idx[s: s + batch_size]
        pred = clip_lengths(est.predict([requests[i].prompt for i in part]))
        for i, p in zip(part, pred):
            out[i] = replace(requests[i], predicted_output_tokens=int(p))
    return out


def tag_workload(cfg: Any, requests: Sequence[Any]) -> list[Any]:
    """The hook ``experiments.wiring.workload`` calls: with ``dataset.predicted_length=estimator``, tag the requests
    with the estimator named by ``dataset.estimator`` (default ``cpu``); otherwise return them unchanged."""
    from omegaconf import OmegaConf  # noqa: PLC0415

    mode = str(OmegaConf.select(cfg, "dataset.predicted_length", default="none") or "none")
    if mode != "estimator":
        return list(requests)
    spec = OmegaConf.select(cfg, "dataset.estimator", default=None) or "cpu"
    t0 = time.perf_counter()
    out = tag_requests(requests, str(spec))
    log.info("tagged %d requests with length estimator %s in %.2f s", len(out), spec, time.perf_counter() - t0)
    return out
