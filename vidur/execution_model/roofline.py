"""The roofline fallback: FLOPs and bytes per component, efficiencies calibrated on the A30 profiles, knot tables for a
GPU or model without a profile.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from vidur.execution_model.cleaning import clean_series
from vidur.execution_model.fitting import fit_token_ops
from vidur.execution_model.numerics import GEMM_OPS, TABLE_BATCH, TOKEN_OPS, PathLike, _knots, _wls_rel
from vidur.execution_model.profiles import _attention_dims, _profile_models, read_attention, read_mlp
from vidur.specs import A30, GpuSpec, ModelSpec

# The profiles the attention efficiencies are calibrated on. Qwen2-7B's only, as before the measured Llama-2-7B A30
# attention profile was bundled: calibrated on both, decode's per-sequence overhead triples (MHA's 32 KV heads
# against GQA's 4 take other kernel paths) and every GPU without a profile (the A100s of llumnix_full and the mixed
# pool) would get other step times; that recalibration needs its own re-runs (docs/execution_model.md).
ATTENTION_CALIBRATION_MODELS: tuple[str, ...] = ("Qwen/Qwen-2-7B",)

# Roofline efficiencies measured on the A30 profiles (ExecutionModel.calibrate_roofline on data/profiling); used
# only when the A30 profile is not available under profile_root. A test checks they match a fresh calibration.
DEFAULT_ROOFLINE: dict[str, Any] = {
    "gpu": "A30",
    "models": ["Qwen/Qwen-2-7B", "meta-llama/Llama-2-7b-hf"],
    "attention_models": list(ATTENTION_CALIBRATION_MODELS),
    "input_layernorm": {"overhead_ms": 0.00482, "eff_compute": None, "eff_memory": 0.4014},
    "attn_pre_proj": {"overhead_ms": 0.01899, "eff_compute": 0.7218, "eff_memory": 1.0},
    "attn_rope": {"overhead_ms": 0.005356, "eff_compute": None, "eff_memory": 0.5561},
    "attn_post_proj": {"overhead_ms": 0.0008411, "eff_compute": 0.7218, "eff_memory": 0.6762},
    "post_attention_layernorm": {"overhead_ms": 0.004721, "eff_compute": None, "eff_memory": 0.4014},
    "mlp_up_proj": {"overhead_ms": 0.0, "eff_compute": 0.7704, "eff_memory": 1.0},
    "mlp_act": {"overhead_ms": 0.0113, "eff_compute": None, "eff_memory": 0.5936},
    "mlp_down_proj": {"overhead_ms": 0.01701, "eff_compute": 0.7218, "eff_memory": 1.0},
    "add": {"overhead_ms": 0.001848, "eff_compute": None, "eff_memory": 1.0},
    "emb": {"overhead_ms": 0.007038, "eff_compute": None, "eff_memory": 0.1836},
    "kv_save": {"overhead_ms": 0.004122, "eff_compute": None, "eff_memory": 0.7218},
    "attn_prefill": {"overhead_ms": 0.0293, "eff_compute": 0.4014, "eff_memory": 0.521},
    "attn_decode": {"overhead_ms": 0.01858, "per_seq_ms": 3.511e-05, "eff_memory": 0.7906, "eff_compute": 0.4014},
}


class _Dims:
    """Per-GPU shapes of one TP shard."""

    def __init__(self, hidden: int, q_heads: int, kv_heads: int, head_dim: int, inter: int, vocab: int,
                 tp: int = 1, dtype_bytes: int = 2):
        self.h = hidden
        self.qw = q_heads * head_dim / tp
        self.kvw = max(kv_heads / tp, 1.0) * head_dim
        self.inter = inter / tp
        self.vocab = vocab
        self.dt = dtype_bytes
        self.tp = tp

    @classmethod
    def of(cls, m: ModelSpec, tp: int = 1) -> "_Dims":
        return cls(m.hidden_size, m.num_q_heads, m.num_kv_heads, m.head_dim, m.intermediate_size, m.vocab_size,
                   tp, m.dtype_bytes)

    @property
    def kv_bytes_layer(self) -> float:
        return 2 * self.kvw * self.dt

    def op_cost(self, op: str, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(FLOPs, bytes) of one token op on n tokens."""
        n = np.asarray(n, dtype=float)
        dt, h = self.dt, self.h
        z = np.zeros_like(n)

        def gemm(K, N):
            return 2.0 * n * K * N, (K * N + n * K + n * N) * dt

        if op == "attn_pre_proj":
            return gemm(h, self.qw + 2 * self.kvw)
        if op == "attn_post_proj":
            return gemm(self.qw, h)
        if op == "mlp_up_proj":
            return gemm(h, 2 * self.inter)
        if op == "mlp_down_proj":
            return gemm(self.inter, h)
        if op in ("input_layernorm", "post_attention_layernorm"):
            return z, 2 * n * h * dt
        if op == "add":
            return z, 3 * n * h * dt
        if op == "attn_rope":
            return z, 2 * n * (self.qw + self.kvw) * dt
        if op == "mlp_act":
            return z, 3 * n * self.inter * dt
        if op == "emb":
            return z, 2 * n * h * dt
        if op == "kv_save":
            return z, 2 * n * self.kv_bytes_layer
        raise KeyError(op)

    def prefill_cost(self, c, kv) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(c, dtype=float)
        kv = np.asarray(kv, dtype=float)
        flops = 4.0 * c * (kv + c) * self.qw  # non-causal count: the A30 FlashInfer profile scales like it
        byts = (kv + c) * self.kv_bytes_layer + 4.0 * c * self.qw * self.dt
        return flops, byts

    def decode_cost(self, b, S) -> tuple[np.ndarray, np.ndarray]:
        b = np.asarray(b, dtype=float)
        S = np.asarray(S, dtype=float)
        return 4.0 * S * self.qw, S * self.kv_bytes_layer + 4.0 * b * self.qw * self.dt


_EFF_GRID = np.exp(np.linspace(math.log(0.02), 0.0, 61))


def _fit_roofline_group(F: np.ndarray, B: np.ndarray, y: np.ndarray, tflops: float, hbm: float,
                        compute: bool) -> dict[str, float]:
    """Fit t = o + F / (P e_c) + B / (W e_m) (ms) in relative error by grid search over (e_c, e_m), o by weighted
    least squares for each pair. The additive form fits the GEMMs' transition between the weight-read bound and
    the compute bound better than max(.) and transfers better across models (docs/execution_model.md)."""
    P = tflops * 1e12 / 1e3  # FLOP per ms
    W = hbm * 1e9 / 1e3  # bytes per ms
    w = 1.0 / y**2
    best = None
    ecs = _EFF_GRID if compute else np.array([1.0])
    for ec in ecs:
        tc = F / (P * ec) if compute else np.zeros_like(y)
        roof = tc[None, :] + B[None, :] / (W * _EFF_GRID[:, None])  # (n_em, rows)
        o = np.clip(((y[None, :] - roof) * w[None, :]).sum(1) / w.sum(), 0.0, None)
        loss = (((y[None, :] - o[:, None] - roof) / y[None, :]) ** 2).sum(1)
        j = int(np.argmin(loss))
        if best is None or loss[j] < best[0]:
            best = (float(loss[j]), float(ec) if compute else None, float(_EFF_GRID[j]), float(o[j]))
    _, ec, em, o = best
    return {"overhead_ms": o, "eff_compute": ec, "eff_memory": em}


def _roof_ms(cal: dict, F, B, tflops: float, hbm: float) -> np.ndarray:
    P = tflops * 1e12 / 1e3
    W = hbm * 1e9 / 1e3
    tb = np.asarray(B, dtype=float) / (W * cal["eff_memory"])
    if cal.get("eff_compute") is None:
        return cal["overhead_ms"] + tb
    return cal["overhead_ms"] + np.asarray(F, dtype=float) / (P * cal["eff_compute"]) + tb


def calibrate_roofline(profile_root: PathLike, gpu: GpuSpec = A30, only_models: Optional[Sequence[str]] = None,
                       attention_models: Optional[Sequence[str]] = ATTENTION_CALIBRATION_MODELS) -> dict[str, Any]:
    """Efficiencies of the roofline model on ``gpu``'s profiles: per token op (GEMMs: overhead, compute and
    memory efficiency; element-wise ops: overhead and memory efficiency), kv_save, prefill and decode attention.
    Token ops pool the TP-1 rows of every profiled model; ``only_models`` restricts to some profile folders;
    attention takes the folders in ``attention_models`` (None: every one that has an attention.csv)."""
    cdir = Path(profile_root) / "compute" / str(gpu.profile_dir)
    models = [(n, p) for n, p in _profile_models(cdir) if only_models is None or n in only_models]
    if not models:
        raise FileNotFoundError(f"no profiles under {cdir}")
    cal: dict[str, Any] = {"gpu": gpu.name, "models": [n for n, _ in models]}
    att_models = [n for n, p in models if (p / "attention.csv").exists()
                  and (attention_models is None or n in attention_models)]
    if att_models:
        cal["attention_models"] = att_models
    # token ops
    per_op: dict[str, list] = {op: [] for op in TOKEN_OPS}
    attn_rows = []
    for name, path in models:
        if (path / "mlp.csv").exists():
            mlp = read_mlp(path / "mlp.csv")
            mlp = mlp[mlp["tp"] == 1]
            r = mlp.iloc[0]
            q = int(r["n_head"])
            dims = _Dims(int(r["n_embd"]), q, int(r["n_kv_head"]), int(r["n_embd"]) // q,
                         int(r["n_expanded_embd"]), int(r["vocab_size"]))
            ops, _ = fit_token_ops(mlp)
            for op in TOKEN_OPS:
                x = np.asarray(ops[op]["x"])
                F, B = dims.op_cost(op, x)
                per_op[op].append((F, B, np.asarray(ops[op]["y"])))
        if name in att_models:
            att = read_attention(path / "attention.csv")
            attn_rows.append((att[att["tp"] == 1], _attention_dims(att)))
    for op in TOKEN_OPS:
        if per_op[op]:
            F = np.concatenate([f for f, _, _ in per_op[op]])
            B = np.concatenate([b for _, b, _ in per_op[op]])
            y = np.concatenate([v for _, _, v in per_op[op]])
            cal[op] = _fit_roofline_group(F, B, y, gpu.fp16_tflops, gpu.hbm_gbps, op in GEMM_OPS)
    if attn_rows:
        Fs, Bs, ys, Fp, Bp, yp, bd, Sd, yd, Fd, Bd = ([] for _ in range(11))
        for att, dd in attn_rows:
            dims = _Dims(dd["hidden"], dd["q_heads"], dd["kv_heads"], dd["head_dim"], 1, 1)
            x, y, _ = clean_series(np.where(att["is_prefill"], att["chunk"], att["batch"]), att["kv_save"])
            F, B = dims.op_cost("kv_save", x)
            Fs.append(F), Bs.append(B), ys.append(y)
            p = att[att["is_prefill"] & (att["chunk"] > 0)]
            F, B = dims.prefill_cost(p["chunk"], p["kv"])
            Fp.append(F), Bp.append(B), yp.append(p["prefill"].to_numpy())
            d = att[~att["is_prefill"]]
            S = (d["batch"] * d["kv"]).to_numpy(float)
            F, B = dims.decode_cost(d["batch"], S)
            bd.append(d["batch"].to_numpy(float)), Sd.append(S), yd.append(d["decode"].to_numpy())
            Fd.append(F), Bd.append(B)
        cal["kv_save"] = _fit_roofline_group(np.concatenate(Fs), np.concatenate(Bs), np.concatenate(ys),
                                             gpu.fp16_tflops, gpu.hbm_gbps, False)
        cal["attn_prefill"] = _fit_roofline_group(np.concatenate(Fp), np.concatenate(Bp), np.concatenate(yp),
                                                  gpu.fp16_tflops, gpu.hbm_gbps, True)
        # decode: memory bound with a per-sequence overhead: t = o + o_b * b + B / (W e_m), linear in 1/e_m
        b_, y_, B_ = np.concatenate(bd), np.concatenate(yd), np.concatenate(Bd)
        W = gpu.hbm_gbps * 1e9 / 1e3
        o, ob, inv = _wls_rel(np.c_[np.ones(len(y_)), b_, B_ / W], y_)
        cal["attn_decode"] = {"overhead_ms": float(max(o, 0.0)), "per_seq_ms": float(max(ob, 0.0)),
                              "eff_memory": float(1.0 / inv) if inv > 0 else 1.0,
                              "eff_compute": cal["attn_prefill"]["eff_compute"]}
    return cal


def _roofline_components(model: ModelSpec, gpu: GpuSpec, tp: int, cal: dict, want_tokens: bool,
                         want_attention: bool) -> dict[str, Any]:
    """Knot tables of the roofline model (same representation as the profile fits)."""
    dims = _Dims.of(model, tp)
    out: dict[str, Any] = {}
    grid = np.unique(np.r_[np.arange(1, 64), np.arange(64, 1024, 8), np.arange(1024, 8192 + 1, 32)]).astype(float)
    if want_tokens:
        ops = {}
        for op in TOKEN_OPS:
            c = cal.get(op) or cal.get("mlp_up_proj" if op in GEMM_OPS else "add")
            F, B = dims.op_cost(op, grid)
            ops[op] = _knots(grid, _roof_ms(c, F, B, gpu.fp16_tflops, gpu.hbm_gbps), 1.0)
        out["token_ops"] = ops
    if want_attention:
        F, B = dims.op_cost("kv_save", grid)
        out["kv_save"] = _knots(grid, _roof_ms(cal["kv_save"], F, B, gpu.fp16_tflops, gpu.hbm_gbps), 1.0)
        cp = cal["attn_prefill"]
        P = gpu.fp16_tflops * 1e9  # FLOP per ms
        W = gpu.hbm_gbps * 1e6  # bytes per ms
        F0, B0 = dims.prefill_cost(grid, 0.0)
        alpha = cp["overhead_ms"] + F0 / (P * cp["eff_compute"]) + B0 / (W * cp["eff_memory"])
        beta = 4.0 * grid * dims.qw / (P * cp["eff_compute"]) + dims.kv_bytes_layer / (W * cp["eff_memory"])
        out["prefill"] = {"alpha0": _knots(grid, alpha, 2.0), "alpha1": _knots(grid, alpha, 2.0),
                          "beta": _knots(grid, beta, 1.0)}
        cd = cal["attn_decode"]
        bs = np.arange(1, TABLE_BATCH + 1, dtype=float)
        a = cd["overhead_ms"] + cd["per_seq_ms"] * bs + 4.0 * bs * dims.qw * dims.dt / (W * cd["eff_memory"])
        s = dims.kv_bytes_layer / (W * cd["eff_memory"])
        out["decode"] = {"a": [float(v) for v in a], "s": [float(s)] * len(bs), "global": [],
                         "per_seq_growth": float(cd["per_seq_ms"] + 4.0 * dims.qw * dims.dt / (W * cd["eff_memory"]))}
    return out


def _calibration(root: Optional[Path]) -> dict:
    if root is not None and (root / "compute" / str(A30.profile_dir)).is_dir():
        return calibrate_roofline(root, A30)
    if DEFAULT_ROOFLINE:
        return DEFAULT_ROOFLINE
    raise FileNotFoundError(
        f"roofline calibration needs the A30 profiles under <profile_root>/compute/{A30.profile_dir} "
        f"(profile_root={root})"
    )
