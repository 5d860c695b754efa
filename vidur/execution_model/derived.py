"""Attention derived from another model's profile on the same GPU, and how far it can be off.
"""

from __future__ import annotations

from vidur.execution_model.numerics import _knots
from vidur.execution_model.roofline import _Dims
from vidur.specs import GpuSpec, ModelSpec


def derive_attention(donor: dict, donor_dims: dict, model: ModelSpec, tp: int) -> dict:
    """Scale a donor's fitted attention (prefill, decode, kv_save per layer) to ``model`` sharded over ``tp``.

    r_q = query width ratio (heads x head_dim per GPU), r_kv = KV width ratio (KV bytes per token per layer).
    Decode: intercepts kept, slope per KV token x r_kv (memory bound: bytes per token). Prefill: launch floor
    kept, the rest of alpha0(c), alpha1(c) and beta(c) x r_q (FLOPs proportional to query heads x head_dim),
    beta floored at the donor's saturated decode cost per KV token x r_kv (a chunk must at least read the cached
    KV).
    kv_cache_save: intercept kept, growth x r_kv.
    """
    tgt = _Dims.of(model, tp)
    r_q = tgt.qw / (donor_dims["q_heads"] * donor_dims["head_dim"])
    r_kv = tgt.kvw / (donor_dims["kv_heads"] * donor_dims["head_dim"])
    dec = donor["decode"]
    s_sat = dec["s"][-1] * r_kv
    pre = donor["prefill"]
    floor = pre["alpha0"]["y"][0]
    a0 = [floor + (v - floor) * r_q for v in pre["alpha0"]["y"]]
    a1 = [floor + (v - floor) * r_q for v in pre["alpha1"]["y"]]
    beta = [max(v * r_q, s_sat) for v in pre["beta"]["y"]]
    ks = donor["kv_save"]
    k0 = ks["y"][0]
    return {
        "prefill": {"alpha0": _knots(pre["alpha0"]["x"], a0, 2.0), "alpha1": _knots(pre["alpha1"]["x"], a1, 2.0),
                    "beta": _knots(pre["beta"]["x"], beta, 1.0)},
        "decode": {"a": list(dec["a"]), "s": [v * r_kv for v in dec["s"]], "global": list(dec.get("global", [])),
                   "per_seq_growth": dec["per_seq_growth"]},
        "kv_save": _knots(ks["x"], [k0 + (v - k0) * r_kv for v in ks["y"]], 1.0),
        "r_q": r_q, "r_kv": r_kv,
    }


def hbm_fraction(slope_ms_per_token: float, kv_bytes_layer: float, hbm_gbps: float) -> float:
    """Fraction of peak HBM bandwidth a decode slope (ms per KV token per layer) implies."""
    return kv_bytes_layer / (slope_ms_per_token * 1e-3) / (hbm_gbps * 1e9)


def derived_attention_report(donor: dict, donor_dims: dict, der: dict, model: ModelSpec, tp: int,
                             gpu: GpuSpec) -> dict:
    """How far a derived decode slope can be off: the implied HBM fraction of donor and derived slopes per batch
    size, and the most the derived slope can overestimate (the true slope cannot beat the roofline minimum)."""
    dkvb = 2 * donor_dims["kv_heads"] * donor_dims["head_dim"] * 2
    tkvb = _Dims.of(model, tp).kv_bytes_layer
    ds, ts = donor["decode"]["s"], der["decode"]["s"]
    roof = tkvb / (gpu.hbm_gbps * 1e9) * 1e3  # ms per token per layer at 100 % of peak
    fr_d = [hbm_fraction(v, dkvb, gpu.hbm_gbps) for v in ds]
    fr_t = [hbm_fraction(v, tkvb, gpu.hbm_gbps) for v in ts]
    pick = [b for b in (1, 2, 4, 8, 16, 32, len(ds)) if b <= len(ds)]
    # prefill: compute fraction implied at the largest profiled chunk (kv = 0)
    a = donor["prefill"]["alpha0"]
    c = a["x"][-1]
    fl = 4.0 * c * c * donor_dims["q_heads"] * donor_dims["head_dim"]
    pre_frac = fl / (a["y"][-1] * 1e-3) / (gpu.fp16_tflops * 1e12)
    return {
        "roofline_slope_ms_per_token_layer": roof,
        "donor_slope_ms": {b: ds[b - 1] for b in pick},
        "derived_slope_ms": {b: ts[b - 1] for b in pick},
        "donor_hbm_fraction": {b: fr_d[b - 1] for b in pick},
        "derived_hbm_fraction": {b: fr_t[b - 1] for b in pick},
        "donor_hbm_fraction_max": max(fr_d),
        "max_overestimate_at_bmax": ts[-1] / roof - 1.0,
        "max_overestimate_by_batch": {b: ts[b - 1] / roof - 1.0 for b in pick},
        "prefill_compute_fraction_at_largest_chunk": pre_frac,
        "r_q": der["r_q"], "r_kv": der["r_kv"],
    }
