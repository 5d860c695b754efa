"""The runtime model: ``ExecutionModel`` (precomputed step-time tables, the hot path) and its cache, a JSON file keyed
by the specs, the relevant profile files' contents and the code version.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from vidur.cache import default_cache_dir
from vidur.execution_model.fitting import _decode_coef_ms
from vidur.execution_model.numerics import CODE_VERSION, LAYER_OPS, TABLE_BATCH, TABLE_TOKENS, PathLike, _pl_eval
from vidur.execution_model.pipeline import _fit_params
from vidur.records import write_atomic
from vidur.specs import A30, GpuSpec, ModelSpec

log = logging.getLogger("vidur.execution_model")


def _relevant_files(root: Optional[Path], gpu: GpuSpec) -> list[Path]:
    if root is None:
        return []
    files: list[Path] = []
    dirs = []
    if gpu.profile_dir:
        dirs.append(root / "compute" / gpu.profile_dir)
    if A30.profile_dir and A30.profile_dir != gpu.profile_dir:
        dirs.append(root / "compute" / A30.profile_dir)
    if gpu.network_profile_dir:
        dirs.append(root / "network" / gpu.network_profile_dir)
    for d in dirs:
        if d.is_dir():
            files.extend(sorted(d.rglob("*.csv")))
    return files


def _cache_key(model: ModelSpec, gpu: GpuSpec, tp: int, root: Optional[Path], files: list[Path]) -> str:
    h = hashlib.sha256()
    g = {k: v for k, v in gpu.to_dict().items() if k not in ("cuda_context_gb", "visible_memory_mib", "memory_gb")}
    h.update(json.dumps({"v": CODE_VERSION, "model": model.to_dict(), "gpu": g, "tp": tp}, sort_keys=True).encode())
    for f in files:
        h.update(str(f.relative_to(root)).encode() if root else f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class ExecutionModel:
    """Step time of one engine iteration. Build with :meth:`fit`; query with :meth:`step_time` and
    :meth:`decode_coeffs` (both pure Python list look-ups)."""

    def __init__(self, params: dict, cpu_overhead_s: float = 0.0):
        self.params = params
        # what a run records of its model, so that a resumed sweep knows a run made under other profiles, fitting
        # code or specs (``experiments.run.stale``): the fit's cache key, or a hash of the parameters given
        self.fingerprint = str(params.get("key") or hashlib.sha256(
            json.dumps(params, sort_keys=True, default=str).encode()).hexdigest())[:16]
        self.model = ModelSpec.from_dict(params["model"])
        self.gpu = GpuSpec.from_dict(params["gpu"])
        self.tp = int(params["tp"])
        self.cpu_overhead_s = float(cpu_overhead_s)
        self.cache_path: Optional[Path] = None
        self.cache_hit = False
        self._build_tokens(TABLE_TOKENS)
        self._da: list[float] = [0.0]
        self._dk: list[float] = [0.0]
        self._dc: list[tuple[float, float]] = [(0.0, 0.0)]
        self._extend_decode(TABLE_BATCH)

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(cls, model: ModelSpec, gpu: GpuSpec, tp: int = 1, profile_root: Optional[PathLike] = None,
            cache_dir: Optional[PathLike] = None, cpu_overhead_s: float = 0.0) -> "ExecutionModel":
        """Fit (or load from the cache) the model for (model, gpu, tp) from the profiles under ``profile_root``.

        The cache is a JSON file under ``cache_dir`` (default ``$XDG_CACHE_HOME/block-repro``) keyed by a hash of
        the relevant profile files' contents, the specs, ``tp`` and the code version; nothing is written next to
        the profiles. ``cpu_overhead_s`` is added to every step and does not enter the cache.
        """
        if tp < 1:
            raise ValueError(f"tp={tp} must be >= 1")
        root = Path(profile_root) if profile_root is not None else None
        if root is not None:  # a model fitted on a real engine's step times (vidur.profile_fit) takes precedence
            fitted = root / "fitted" / str(gpu.profile_dir or gpu.name) / model.profile_name / f"tp{tp}.json"
            if fitted.is_file():
                return cls.from_json(fitted, cpu_overhead_s)
        files = _relevant_files(root, gpu)
        key = _cache_key(model, gpu, tp, root, files)
        cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        slug = f"{model.name}-{gpu.name}-tp{tp}".replace("/", "_").replace(" ", "_")
        path = cdir / f"execution_model-{slug}-{key[:20]}.json"
        params = None
        hit = False
        if path.exists():
            try:
                with open(path) as fh:
                    params = json.load(fh)
                hit = params.get("key") == key and params.get("version") == CODE_VERSION
                if not hit:
                    params = None
            except (OSError, ValueError):
                params = None
        if params is None:
            params = _fit_params(model, gpu, tp, root)
            params["key"] = key
            try:
                write_atomic(path, json.dumps(params).encode())
            except OSError as e:  # read-only cache dir: keep going without a cache
                log.warning("execution model cache not written to %s: %s", path, e)
        em = cls(params, cpu_overhead_s)
        em.cache_path = path
        em.cache_hit = hit
        return em

    @classmethod
    def from_json(cls, path: str | Path, cpu_overhead_s: float = 0.0) -> "ExecutionModel":
        """A model saved as JSON parameters (e.g. by ``python -m vidur.profile_fit`` from measured step times)."""
        with open(path) as fh:
            em = cls(json.load(fh), cpu_overhead_s)
        em.cache_path = Path(path)
        return em

    def _build_tokens(self, n_tok: int) -> None:
        """(Re)build the token-op and prefill tables for 0..n_tok tokens (seconds, all layers)."""
        p = self.params
        L = self.model.num_layers
        n = np.arange(n_tok + 1, dtype=float)
        per_layer = np.zeros_like(n)
        for op in LAYER_OPS:
            per_layer += _pl_eval(p["token_ops"][op], n)
        per_layer += _pl_eval(p["kv_save"], n)
        ar = p.get("allreduce")
        if ar:
            if ar["kind"] == "profile":
                per_layer += 2 * _pl_eval(ar, n)
            else:
                per_layer += 2 * (ar["latency_ms"] + ar["ms_per_byte"] * n * self.model.hidden_size
                                  * self.model.dtype_bytes * 2 * (self.tp - 1) / self.tp)
        tok = 1e-3 * (L * per_layer + _pl_eval(p["token_ops"]["emb"], n))
        tok[0] = 0.0
        pre = p["prefill"]
        floor = float(pre["alpha0"]["y"][0])
        pa0 = 1e-3 * L * np.maximum(_pl_eval(pre["alpha0"], n) - floor, 0.0)
        pa1 = 1e-3 * L * np.maximum(_pl_eval(pre["alpha1"], n) - floor, 0.0)
        pb = 1e-3 * L * _pl_eval(pre["beta"], n)
        pa0[0] = pa1[0] = pb[0] = 0.0
        self._tok = tok.tolist()
        self._pa0 = pa0.tolist()
        self._pa1 = pa1.tolist()
        self._pb = pb.tolist()
        self._pfloor = 1e-3 * L * floor
        self._cpu = self.cpu_overhead_s

    def _extend_decode(self, n_batch: int) -> None:
        """Decode coefficients for batch sizes up to n_batch (seconds, all layers)."""
        dec = self.params["decode"]
        L = self.model.num_layers
        if n_batch >= len(self._tok):
            self._build_tokens(2 * n_batch)
        for b in range(len(self._da), n_batch + 1):
            a, s = _decode_coef_ms(dec, b)
            da, dk = 1e-3 * L * a, 1e-3 * L * s
            self._da.append(da)
            self._dk.append(dk)
            self._dc.append((self._tok[b] + da + self._cpu, dk))

    # ------------------------------------------------------------------ hot path
    def step_time(self, prefill_chunks: Sequence[tuple[int, int]], num_decode: int, decode_kv_sum: int) -> float:
        """Seconds for one step: ``prefill_chunks`` = [(chunk tokens, tokens already cached)], ``num_decode``
        decode sequences holding ``decode_kv_sum`` KV tokens in total (each including its new token)."""
        if not prefill_chunks:
            if num_decode <= 0:
                return 0.0
            try:
                c, k = self._dc[num_decode]
            except IndexError:
                self._extend_decode(num_decode)
                c, k = self._dc[num_decode]
            return c + k * decode_kv_sum
        try:
            n = num_decode
            t = self._pfloor
            for c, kv in prefill_chunks:
                n += c
                if kv:
                    t += self._pa1[c] + self._pb[c] * kv
                else:
                    t += self._pa0[c]
            if num_decode > 0:
                t += self._da[num_decode] + self._dk[num_decode] * decode_kv_sum
            return t + self._tok[n] + self._cpu
        except IndexError:
            n = num_decode + sum(c for c, _ in prefill_chunks)
            if n >= len(self._tok):
                self._build_tokens(2 * n)
            if num_decode >= len(self._da):
                self._extend_decode(num_decode)
            return self.step_time(prefill_chunks, num_decode, decode_kv_sum)

    def decode_coeffs(self, batch: int) -> tuple[float, float]:
        """(c, k) with step_time([], batch, S) == c + k * S exactly (seconds)."""
        try:
            return self._dc[batch]
        except IndexError:
            self._extend_decode(batch)
            return self._dc[batch]

    # ------------------------------------------------------------------ introspection
    def component_times(self, prefill_chunks: Sequence[tuple[int, int]], num_decode: int,
                        decode_kv_sum: int) -> dict[str, float]:
        """The step split into token ops, prefill attention, decode attention and CPU overhead (seconds)."""
        n = num_decode + sum(c for c, _ in prefill_chunks)
        if n >= len(self._tok):
            self._build_tokens(2 * n)
        pre = (self._pfloor + sum(self._pa1[c] + self._pb[c] * kv if kv else self._pa0[c]
                                  for c, kv in prefill_chunks) if prefill_chunks else 0.0)
        if num_decode >= len(self._da):
            self._extend_decode(num_decode)
        dec = self._da[num_decode] + self._dk[num_decode] * decode_kv_sum if num_decode else 0.0
        return {"token_ops": self._tok[n], "prefill_attention": pre, "decode_attention": dec,
                "cpu": self._cpu if n else 0.0}

    def describe(self) -> dict[str, Any]:
        """Method and source per component, cleaning counts, and the held-out errors measured at fit time."""
        p = self.params
        return {
            "model": self.model.name, "gpu": self.gpu.name, "tp": self.tp, "version": p["version"],
            "sources": p["sources"], "methods": p["methods"], "holdout": p.get("holdout", {}),
            "cleaning": p.get("cleaning", {}), "notes": p.get("notes", []), "derived": p.get("derived"),
            "cache_path": str(self.cache_path) if self.cache_path else None, "cache_hit": self.cache_hit,
            "cpu_overhead_s": self.cpu_overhead_s,
        }
