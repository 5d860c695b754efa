"""The held-out report over the A30 profiles (``python -m vidur.execution_model``): every fitted component scored on
rows it was not fitted on, and the fallbacks checked against measurements.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from vidur.config import PROFILE_ROOT, load_conf
from vidur.execution_model.derived import derive_attention, derived_attention_report
from vidur.execution_model.fitting import (
    _prefill_ms,
    fit_decode,
    fit_kv_save,
    fit_prefill,
    fit_token_ops,
    scale_token_ops_tp,
)
from vidur.execution_model.numerics import (
    LAYER_OPS,
    TOKEN_OPS,
    PathLike,
    _err_stats,
    _pl_eval,
)
from vidur.execution_model.pipeline import holdout_attention, holdout_token_ops
from vidur.execution_model.profiles import _attention_dims, read_attention, read_mlp
from vidur.execution_model.roofline import _Dims, _roof_ms, calibrate_roofline
from vidur.specs import A30, ModelSpec


def evaluate_holdout(profile_root: PathLike, seed: int = 0, frac: float = 0.8) -> dict[str, Any]:
    """Held-out errors (fit on a seeded random ``frac`` of the rows, MAPE / p90 APE on the rest) of every component
    that has measurements on the A30: token ops of Qwen2-7B and Llama-2-7B (every TP degree profiled), prefill /
    decode / kv_save attention of Qwen2-7B; plus checks of the fallbacks: TP scaling of the Llama-2-7B TP-1 rows
    against the TP 2/4/8 rows, the roofline calibrated on Qwen2-7B predicting Llama-2-7B's token ops, and the
    derived Llama-2-7B attention against the roofline minimum."""
    root = Path(profile_root)
    a30 = root / "compute" / str(A30.profile_dir)
    rows: list[dict[str, Any]] = []
    res: dict[str, Any] = {"seed": seed, "train_fraction": frac, "rows": rows}
    qdir, ldir = a30 / "Qwen" / "Qwen-2-7B", a30 / "meta-llama" / "Llama-2-7b-hf"

    def add(profile: str, component: str, st: dict) -> None:
        rows.append({"profile": profile, "component": component, **st})

    for label, d in (("A30 Qwen2-7B", qdir), ("A30 Llama-2-7B", ldir)):
        if (d / "mlp.csv").exists():
            mlp = read_mlp(d / "mlp.csv")
            for tp in sorted(mlp["tp"].unique()):
                h = holdout_token_ops(mlp[mlp["tp"] == tp], seed, frac)
                suffix = "" if tp == 1 else f" tp={tp}"
                add(label + suffix, "token ops: sum per layer", h["sum_per_layer"])
                if tp == 1:
                    for op in TOKEN_OPS:
                        add(label, f"token op {op}", h[op])
    # Qwen2-7B's attention rows, read once: its held-out fits, the roofline check and the derivation below use them
    qatt = read_attention(qdir / "attention.csv") if (qdir / "attention.csv").exists() else None
    if qatt is not None:
        for comp, st in holdout_attention(qatt[qatt["tp"] == 1], seed, frac).items():
            add("A30 Qwen2-7B", comp, st)
    # TP scaling check: the TP-1 rows scaled to tp (calibration from Qwen2-7B only) vs Llama's measured tp rows
    if (ldir / "mlp.csv").exists():
        mlp = read_mlp(ldir / "mlp.csv")
        ops1, _ = fit_token_ops(mlp[mlp["tp"] == 1])
        cal_q = calibrate_roofline(root, A30, only_models=["Qwen/Qwen-2-7B"]) if (qdir / "mlp.csv").exists() else None
        for tp in sorted(t for t in mlp["tp"].unique() if t > 1):
            te = mlp[mlp["tp"] == tp]
            info = fit_token_ops(te)[1]
            scaled = scale_token_ops_tp(ops1, int(tp), cal_q)
            xs = te["num_tokens"].to_numpy(float)
            obs = sum(te[op].to_numpy(float) for op in LAYER_OPS)
            ok = np.isfinite(obs)
            for op in LAYER_OPS:
                ok &= te[op].to_numpy(float) >= info[op]["collapse_floor_ms"]
            pred = sum(_pl_eval(scaled[op], xs) for op in LAYER_OPS)
            add(f"A30 Llama-2-7B tp={tp}", "fallback: TP-1 fit scaled to tp (vs valid tp rows)",
                _err_stats(pred[ok], obs[ok]))
    # roofline transfer: calibrate on Qwen2-7B, predict Llama-2-7B token ops (tp 1)
    if (qdir / "mlp.csv").exists() and (ldir / "mlp.csv").exists():
        cal_q = calibrate_roofline(root, A30, only_models=["Qwen/Qwen-2-7B"])
        cal_all = calibrate_roofline(root, A30)
        res["roofline_calibration"] = cal_all
        mlp = read_mlp(ldir / "mlp.csv")
        opsl, _ = fit_token_ops(mlp[mlp["tp"] == 1])
        r = mlp.iloc[0]
        dims = _Dims(int(r["n_embd"]), int(r["n_head"]), int(r["n_kv_head"]), int(r["n_embd"]) // int(r["n_head"]),
                     int(r["n_expanded_embd"]), int(r["vocab_size"]))
        xs = np.asarray(opsl["mlp_up_proj"]["x"])
        for tag, cal in (("calibrated on Qwen2-7B only", cal_q), ("calibrated on both (in-sample)", cal_all)):
            pred = sum(_roof_ms(cal[op], *dims.op_cost(op, xs), A30.fp16_tflops, A30.hbm_gbps) for op in LAYER_OPS)
            obs = sum(_pl_eval(opsl[op], xs) for op in LAYER_OPS)
            add("A30 Llama-2-7B", f"fallback: roofline token ops, {tag}", _err_stats(pred, obs))
        if qatt is not None:
            dd = _attention_dims(qatt)
            qd = _Dims(dd["hidden"], dd["q_heads"], dd["kv_heads"], dd["head_dim"], 1, 1)
            p = qatt[qatt["is_prefill"] & (qatt["chunk"] > 0)]
            pred = _roof_ms(cal_all["attn_prefill"], *qd.prefill_cost(p["chunk"], p["kv"]), A30.fp16_tflops,
                            A30.hbm_gbps)
            add("A30 Qwen2-7B", "fallback: roofline prefill attention (in-sample)", _err_stats(pred, p["prefill"]))
            d = qatt[~qatt["is_prefill"]]
            S = (d["batch"] * d["kv"]).to_numpy(float)
            cd = cal_all["attn_decode"]
            pred = (cd["overhead_ms"] + cd["per_seq_ms"] * d["batch"].to_numpy(float)
                    + qd.decode_cost(d["batch"], S)[1] / (A30.hbm_gbps * 1e6 * cd["eff_memory"]))
            add("A30 Qwen2-7B", "fallback: roofline decode attention (in-sample)", _err_stats(pred, d["decode"]))
    # the Llama-2-7B attention derived from Qwen2-7B's (one fit of the donor serves both reports below)
    derived = _derived_llama(qatt) if qatt is not None else None
    # the measured Llama-2-7B attention: held out, and the derivation from Qwen2-7B scored against it
    if (ldir / "attention.csv").exists():
        latt = read_attention(ldir / "attention.csv")
        latt = latt[latt["tp"] == 1]
        for comp, st in holdout_attention(latt, seed, frac).items():
            add("A30 Llama-2-7B", comp, st)
        if derived is not None:
            res["derived_vs_measured"] = derived_vs_measured(root, derived=derived)
            for comp, st in res["derived_vs_measured"]["errors"].items():
                add("A30 Llama-2-7B", f"derived from Qwen2-7B vs measured: {comp}", st)
    if derived is not None:
        res["derived_llama2_7b_attention"] = derived_attention_report(
            derived["donor"], derived["dims"], derived["attention"], derived["llama"], 1, A30)
    return res


def _derived_llama(qatt) -> dict[str, Any]:
    """The Llama-2-7B A30 attention derived from Qwen2-7B's TP-1 profile (``qatt``: its attention rows, as
    ``read_attention`` gives them), as runs made before the measured profile was bundled used it: the donor's fits,
    its dimensions, the Llama spec every run uses (conf/model) and the derived tables."""
    att = qatt[qatt["tp"] == 1]
    dims = _attention_dims(att)
    donor = {"prefill": fit_prefill(att), "decode": fit_decode(att)}
    donor["kv_save"], _ = fit_kv_save(att)
    llama = ModelSpec.from_dict(load_conf("model", "llama2_7b"))
    return {"donor": donor, "dims": dims, "llama": llama, "attention": derive_attention(donor, dims, llama, 1)}


def derived_vs_measured(profile_root: PathLike, batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 48),
                        derived: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The Llama-2-7B A30 attention derived from Qwen2-7B's profile (what every run used before the measured profile
    was bundled) against the measured rows: per-layer errors of decode and prefill attention over every TP-1 row, and
    decode slope per batch size (fitted on the measured rows vs derived; ms per KV token per layer). Decode rows
    beyond the donor's largest batch size (48) are left out.

    Positive signed errors mean the derivation is slower than the GPU measured. ``derived``: the derivation
    (``_derived_llama``) when the caller already made it."""
    root = Path(profile_root)
    latt = read_attention(root / "compute" / str(A30.profile_dir) / "meta-llama" / "Llama-2-7b-hf" / "attention.csv")
    latt = latt[latt["tp"] == 1]
    derived = derived or _derived_llama(
        read_attention(root / "compute" / str(A30.profile_dir) / "Qwen" / "Qwen-2-7B" / "attention.csv"))
    der, llama = derived["attention"], derived["llama"]
    meas = {"decode": fit_decode(latt)}  # only its decode slopes are compared
    d = latt[~latt["is_prefill"] & (latt["batch"] <= len(der["decode"]["a"]))]  # the donor's batch sizes (1-48)
    b = d["batch"].to_numpy(int) - 1
    S = (d["batch"] * d["kv"]).to_numpy(float)
    pred_dec = np.asarray(der["decode"]["a"], float)[b] + np.asarray(der["decode"]["s"], float)[b] * S  # a_b + s_b S
    p = latt[latt["is_prefill"] & (latt["chunk"] > 0)]
    pred_pre = _prefill_ms(der["prefill"], p["chunk"], p["kv"])
    errors = {}
    for comp, pred, obs in (("decode attention", pred_dec, d["decode"].to_numpy(float)),
                            ("prefill attention", pred_pre, p["prefill"].to_numpy(float))):
        st = _err_stats(pred, obs)
        st["mean_signed"] = float(np.mean(pred / obs - 1.0))
        errors[comp] = st
    slopes = {int(bb): {"measured": meas["decode"]["s"][bb - 1], "derived": der["decode"]["s"][bb - 1]}
              for bb in batches if bb <= min(len(meas["decode"]["s"]), len(der["decode"]["s"]))}
    return {"errors": errors, "decode_slope_ms": slopes,
            "roofline_slope_ms_per_token_layer": _Dims.of(llama, 1).kv_bytes_layer / (A30.hbm_gbps * 1e9) * 1e3}


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def format_holdout_table(res: dict[str, Any]) -> str:
    lines = _md_table(["profile", "component", "test rows", "MAPE", "p90 APE", "max APE"],
                      [[r["profile"], r["component"], r["n"], f"{100 * r['mape']:.1f}%", f"{100 * r['p90']:.1f}%",
                        f"{100 * r['max']:.1f}%"] for r in res["rows"]])
    dm = res.get("derived_vs_measured")
    if dm:
        roof = dm["roofline_slope_ms_per_token_layer"]
        lines += [""] + _md_table(
            ["batch", "measured Llama-2-7B decode slope (ms/token/layer)", "derived from Qwen2-7B",
             "derived / measured", "roofline min slope"],
            [[bb, f"{v['measured']:.3e}", f"{v['derived']:.3e}", f"{v['derived'] / v['measured']:.2f}", f"{roof:.3e}"]
             for bb, v in dm["decode_slope_ms"].items()])
    d = res.get("derived_llama2_7b_attention")
    if d:
        lines += [""] + _md_table(
            ["batch", "Qwen2-7B slope (ms/token/layer)", "HBM fraction", "derived Llama-2-7B slope", "HBM fraction",
             "roofline min slope", "max overestimate"],
            [[b, f"{d['donor_slope_ms'][b]:.3e}", f"{d['donor_hbm_fraction'][b]:.0%}", f"{d['derived_slope_ms'][b]:.3e}",
              f"{d['derived_hbm_fraction'][b]:.0%}", f"{d['roofline_slope_ms_per_token_layer']:.3e}",
              f"{d['max_overestimate_by_batch'][b]:.0%}"] for b in d["donor_slope_ms"]])
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Held-out errors of the execution model on the A30 profiles")
    ap.add_argument("--profile-root", default=str(PROFILE_ROOT))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    a = ap.parse_args(argv)
    res = evaluate_holdout(a.profile_root, a.seed)
    if a.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        print(format_holdout_table(res))
        d = res.get("derived_llama2_7b_attention")
        if d:
            print(f"\nQwen2-7B A30 decode slope at its largest batch implies {d['donor_hbm_fraction_max']:.0%} of "
                  f"{A30.hbm_gbps:g} GB/s; the scaled Llama-2-7B slope implies "
                  f"{max(d['derived_hbm_fraction'].values()):.0%} "
                  f"(x{d['r_kv']:.0f} KV bytes per token); prefill at the largest chunk runs at "
                  f"{d['prefill_compute_fraction_at_largest_chunk']:.0%} of {A30.fp16_tflops:g} TFLOPS")
