"""The fitting pipeline: for one (model, GPU, TP) pick each component's source (profile, TP-scaled profile, derived,
roofline), fit it, and record sources, methods, cleaning and held-out errors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from vidur.execution_model.derived import derive_attention, derived_attention_report
from vidur.execution_model.fitting import (
    _decode_coef_ms,
    _prefill_ms,
    fit_allreduce,
    fit_decode,
    fit_kv_save,
    fit_prefill,
    fit_token_ops,
    scale_token_ops_tp,
)
from vidur.execution_model.numerics import CODE_VERSION, LAYER_OPS, TOKEN_OPS, _err_stats, _pl_eval
from vidur.execution_model.profiles import _attention_dims, _profile_models, read_attention, read_mlp
from vidur.execution_model.roofline import _calibration, _roofline_components
from vidur.specs import A30, GpuSpec, ModelSpec

if TYPE_CHECKING:  # imported where used: a cached model (every run but a profile's first) needs no pandas
    import pandas as pd

log = logging.getLogger("vidur.execution_model")


METHODS = {
    "token_ops": "per-op median times from mlp.csv, cleaned (NaN / collapsed / Hampel outliers dropped), isotonic "
                 "in num_tokens, linear interpolation, proportional beyond the last profiled count; sum of the 9 "
                 "per-layer ops and attn_kv_cache_save x num_layers + emb once",
    "token_ops_tp_scaled": "TP-1 rows of mlp.csv; sharded ops (qkv, rope, o_proj, up, act, down) -> "
                           "o + (t - o) / tp with o the op's calibrated fixed overhead, norms/add/emb unchanged",
    "prefill": "kv = 0: alpha0(c) = median per profiled chunk size; kv > 0: per chunk size least squares "
               "(relative error) of attn_prefill on (1, kv) -> alpha1(c), beta(c); all isotonic in c, linear "
               "interpolation between chunk sizes; one launch floor per step for several chunks",
    "decode": "per profiled batch size b: least squares (relative error) of attn_decode on (1, S = b*kv); a_b and "
              "b*s_b isotonic in b; beyond the profile: a_b grows by the per-sequence coefficient of a global "
              "linear fit in (1, b, S), s_b stays at the last profiled value",
    "kv_save": "attn_kv_cache_save by tokens written (chunk or batch), cleaned and isotonic like the token ops",
    "derived": "attention of another model on the same GPU: decode slope x KV-width ratio, prefill x query-width "
               "ratio (launch floor and decode intercepts kept), kv_save growth x KV-width ratio",
    "roofline": "overhead + FLOPs / (peak TFLOPS x e_c) + bytes / (peak HBM x e_m) per component (decode: "
                "+ per-sequence overhead), efficiencies calibrated on the A30 profiles (uncalibrated for any other "
                "GPU)",
    "allreduce": "2 all-reduces of tokens x hidden x dtype bytes per layer: network profile rows for this worker "
                 "count, else a ring formula (latency + 2(p-1)/p x bytes / bandwidth)",
}


def _model_dims_match(mlp: pd.DataFrame, model: ModelSpec) -> bool:
    try:
        r = mlp.iloc[0]
        return int(r["n_embd"]) == model.hidden_size and int(r["n_expanded_embd"]) == model.intermediate_size
    except (KeyError, IndexError):
        return True


def _holdout_split(n: int, seed: int, frac: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random(n) < frac


def holdout_token_ops(mlp: pd.DataFrame, seed: int = 0, frac: float = 0.8) -> dict[str, dict]:
    """Fit the token ops on a random ``frac`` of the mlp.csv rows and score the rest (valid values only)."""
    train = _holdout_split(len(mlp), seed, frac)
    tr, te = mlp[train], mlp[~train]
    ops, info = fit_token_ops(tr)
    out = {}
    preds, valid_all = {}, np.ones(len(te), dtype=bool)
    for op in TOKEN_OPS:
        obs = te[op].to_numpy(float)
        valid = np.isfinite(obs) & (obs > 0) & (obs >= info[op]["collapse_floor_ms"])
        pr = _pl_eval(ops[op], te["num_tokens"].to_numpy(float))
        preds[op] = pr
        valid_all &= valid
        out[op] = _err_stats(pr[valid], obs[valid])
    lay = [op for op in LAYER_OPS]
    tot_pred = sum(preds[op] for op in lay)[valid_all]
    tot_obs = sum(te[op].to_numpy(float) for op in lay)[valid_all]
    out["sum_per_layer"] = _err_stats(tot_pred, tot_obs)
    return out


def holdout_attention(att: pd.DataFrame, seed: int = 0, frac: float = 0.8) -> dict[str, dict]:
    """Held-out errors of the prefill, decode and kv_save fits (random ``frac`` of the rows to fit)."""
    out = {}
    p = att[att["is_prefill"] & (att["chunk"] > 0)].reset_index(drop=True)
    tr = _holdout_split(len(p), seed, frac)
    fp = fit_prefill(p[tr])
    te = p[~tr]
    out["attn_prefill"] = _err_stats(_prefill_ms(fp, te["chunk"], te["kv"]), te["prefill"])
    d = att[~att["is_prefill"]].reset_index(drop=True)
    tr = _holdout_split(len(d), seed + 1, frac)
    fd = fit_decode(d[tr])
    te = d[~tr]
    co = np.array([_decode_coef_ms(fd, int(b)) for b in te["batch"]])
    pred = co[:, 0] + co[:, 1] * (te["batch"] * te["kv"]).to_numpy(float)
    out["attn_decode"] = _err_stats(pred, te["decode"])
    tr = _holdout_split(len(att), seed + 2, frac)
    ks = fit_kv_save(att[tr])[0]
    te = att[~tr]
    tokens = np.where(te["is_prefill"], te["chunk"], te["batch"]).astype(float)
    out["attn_kv_cache_save"] = _err_stats(_pl_eval(ks, tokens), te["kv_save"])
    return out


def _fit_params(model: ModelSpec, gpu: GpuSpec, tp: int, root: Optional[Path]) -> dict:
    sources: dict[str, str] = {}
    methods: dict[str, str] = {}
    holdout: dict[str, Any] = {}
    cleaning: dict[str, Any] = {}
    notes: list[str] = []
    params: dict[str, Any] = {"version": CODE_VERSION, "model": model.to_dict(), "gpu": gpu.to_dict(), "tp": tp}
    cal = None
    gdir = root / "compute" / gpu.profile_dir if (root is not None and gpu.profile_dir) else None
    mdir = gdir / model.profile_name if gdir is not None else None

    # token ops -------------------------------------------------------------------------------------------------
    token_ops = None
    if mdir is not None and (mdir / "mlp.csv").exists():
        mlp_all = read_mlp(mdir / "mlp.csv")
        if not _model_dims_match(mlp_all, model):
            notes.append(f"{mdir / 'mlp.csv'} has other shapes than {model.name}; not used")
        elif (mlp_all["tp"] == tp).any():
            mlp = mlp_all[mlp_all["tp"] == tp]
            token_ops, cleaning["token_ops"] = fit_token_ops(mlp)
            sources["token_ops"] = f"profile {gpu.profile_dir}/{model.profile_name}/mlp.csv (tp={tp})"
            methods["token_ops"] = METHODS["token_ops"]
            holdout["token_ops"] = holdout_token_ops(mlp)
        elif (mlp_all["tp"] == 1).any():
            token_ops, cleaning["token_ops"] = fit_token_ops(mlp_all[mlp_all["tp"] == 1])
            try:
                cal = cal or _calibration(root)
            except FileNotFoundError:
                notes.append("no roofline calibration: TP scaling uses t / tp")
            token_ops = scale_token_ops_tp(token_ops, tp, cal)
            sources["token_ops"] = f"profile {gpu.profile_dir}/{model.profile_name}/mlp.csv (tp=1, scaled to tp={tp})"
            methods["token_ops"] = METHODS["token_ops_tp_scaled"]
    if token_ops is None:
        cal = cal or _calibration(root)
        token_ops = _roofline_components(model, gpu, tp, cal, True, False)["token_ops"]
        sources["token_ops"] = f"roofline ({gpu.name} peaks, efficiencies calibrated on A30" + (
            ")" if gpu.profile_dir == A30.profile_dir else "; uncalibrated for this GPU)")
        methods["token_ops"] = METHODS["roofline"]
    params["token_ops"] = token_ops

    # attention -------------------------------------------------------------------------------------------------
    att_src = None
    if mdir is not None and (mdir / "attention.csv").exists():
        att_all = read_attention(mdir / "attention.csv")
        dims = _attention_dims(att_all)
        if (att_all["tp"] == tp).any():
            att = att_all[att_all["tp"] == tp]
            params["prefill"] = fit_prefill(att)
            params["decode"] = fit_decode(att)
            params["kv_save"], cleaning["kv_save"] = fit_kv_save(att)
            sources["attention"] = f"profile {gpu.profile_dir}/{model.profile_name}/attention.csv (tp={tp})"
            methods.update({k: METHODS[k] for k in ("prefill", "decode", "kv_save")})
            holdout["attention"] = holdout_attention(att)
            att_src = "profile"
        elif (att_all["tp"] == 1).any():
            att_src = ("self", att_all[att_all["tp"] == 1], dims, model.profile_name)
    if att_src is None and gdir is not None:
        for name, path in _profile_models(gdir):
            if (path / "attention.csv").exists():
                att_all = read_attention(path / "attention.csv")
                if (att_all["tp"] == 1).any():
                    att_src = ("donor", att_all[att_all["tp"] == 1], _attention_dims(att_all), name)
                    break
    if isinstance(att_src, tuple):
        _, att, dims, name = att_src
        donor = {"prefill": fit_prefill(att), "decode": fit_decode(att)}
        donor["kv_save"], _ = fit_kv_save(att)
        der = derive_attention(donor, dims, model, tp)
        params["prefill"], params["decode"], params["kv_save"] = der["prefill"], der["decode"], der["kv_save"]
        sources["attention"] = (f"derived from {gpu.profile_dir}/{name}/attention.csv (tp=1): "
                                f"query-width ratio {der['r_q']:.4g}, KV-width ratio {der['r_kv']:.4g}")
        methods.update({"prefill": METHODS["derived"], "decode": METHODS["derived"], "kv_save": METHODS["derived"]})
        params["derived"] = derived_attention_report(donor, dims, der, model, tp, gpu)
        rep = params["derived"]
        notes.append(
            f"attention derived from {name}: donor decode slope implies {rep['donor_hbm_fraction_max']:.0%} of peak "
            f"HBM at its largest batch; the derived slope implies the same fraction by construction; it can be at "
            f"most {rep['max_overestimate_at_bmax']:.0%} too slow there (roofline bound)"
        )
        log.info(notes[-1])
        att_src = "derived"
    if att_src is None:
        cal = cal or _calibration(root)
        r = _roofline_components(model, gpu, tp, cal, False, True)
        params["prefill"], params["decode"], params["kv_save"] = r["prefill"], r["decode"], r["kv_save"]
        sources["attention"] = f"roofline ({gpu.name} peaks, efficiencies calibrated on A30" + (
            ")" if gpu.profile_dir == A30.profile_dir else "; uncalibrated for this GPU)")
        methods.update({"prefill": METHODS["roofline"], "decode": METHODS["roofline"],
                        "kv_save": METHODS["roofline"]})

    # tensor parallel all-reduce --------------------------------------------------------------------------------
    params["allreduce"] = None
    if tp > 1:
        net = (root / "network" / gpu.network_profile_dir / "all_reduce.csv"
               if (root is not None and gpu.network_profile_dir) else None)
        if net is not None and net.exists():
            params["allreduce"] = fit_allreduce(net, tp, model.hidden_size, model.dtype_bytes)
            sources["allreduce"] = f"network profile {gpu.network_profile_dir} ({params['allreduce']['kind']})"
        else:
            bw = gpu.interconnect_gbps or 25.0
            params["allreduce"] = {"kind": "ring_formula", "latency_ms": 0.01, "ms_per_byte": 1.0 / (bw * 1e6)}
            sources["allreduce"] = f"ring formula, {bw} GB/s bus bandwidth, 10 us latency (assumed)"
        methods["allreduce"] = METHODS["allreduce"]
    if cal is not None:
        params["roofline_calibration"] = cal
    params.update(sources=sources, methods=methods, holdout=holdout, cleaning=cleaning, notes=notes)
    return params
