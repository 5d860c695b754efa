"""Execution time of one engine iteration (Vidur-style), fitted once per (model, GPU, TP) and cached.

A step's time is the sum of Vidur's components (``docs/execution_model.md`` has the details and the numbers):

- token-level ops by the total number of tokens ``n`` in the step, per layer: input_layernorm, attn_pre_proj,
  attn_rope, attn_post_proj, post_attention_layernorm, mlp_up_proj, mlp_act, mlp_down_proj, add, attn_kv_cache_save
  (and two all-reduces when TP > 1), times ``num_layers``; plus ``emb`` once;
- prefill attention per layer: ``alpha1(c) + beta(c) * kv`` for a chunk of ``c`` tokens after ``kv > 0`` cached
  tokens, ``alpha0(c)`` for a first chunk (kv = 0); several chunks in one step share one kernel launch: the launch
  floor ``alpha0(smallest chunk)`` is counted once;
- decode attention per layer: ``a_b + s_b * S`` for ``b`` decode sequences holding ``S`` KV tokens in total.

Every piece is a piecewise-linear table over measured points (cleaned, made monotone), so ``step_time`` is a few
list look-ups: the tables are precomputed Python lists indexed by token count, chunk size and batch size.
Sources, in order of preference: the Vidur profile for this (GPU, model, TP); the profile for TP 1 scaled by
the TP degree; another model's attention profile on the same GPU scaled by head counts and KV bytes per token
(Llama-2-7B on the A30); a roofline model whose efficiencies are calibrated on the A30 profile (every GPU without
a profile -- uncalibrated for that GPU).

The package, one module per job (imports go down this list):

- ``numerics``: op names, table sizes, knot tables, relative-error least squares, error statistics;
- ``cleaning``: one profiled series -> monotone knots; ``profiles``: the Vidur-format CSV readers;
- ``fitting``: each component from profile rows; ``roofline``: the roofline fallback and its calibration;
- ``derived``: attention derived from another model's profile; ``pipeline``: the source of each component for
  one (model, GPU, TP), fitted, with sources, methods and held-out errors;
- ``model``: the runtime ``ExecutionModel`` (the hot path) and its cache;
- ``report``: the held-out report over the A30 profiles (``python -m vidur.execution_model``).
"""

from vidur.execution_model.cleaning import COLLAPSE_FRACTION, HAMPEL_HALF_WINDOW, HAMPEL_TOLERANCE, clean_series
from vidur.execution_model.derived import derive_attention, derived_attention_report, hbm_fraction
from vidur.execution_model.fitting import (
    fit_allreduce,
    fit_decode,
    fit_kv_save,
    fit_prefill,
    fit_token_ops,
    scale_token_ops_tp,
)
from vidur.execution_model.model import ExecutionModel, default_cache_dir
from vidur.execution_model.numerics import (
    CODE_VERSION,
    GEMM_OPS,
    LAYER_OPS,
    ONCE_OPS,
    SHARDED_OPS,
    TABLE_BATCH,
    TABLE_TOKENS,
    TOKEN_OPS,
    PathLike,
)
from vidur.execution_model.pipeline import METHODS, holdout_attention, holdout_token_ops
from vidur.execution_model.profiles import read_attention, read_mlp
from vidur.execution_model.report import evaluate_holdout, format_holdout_table
from vidur.execution_model.roofline import DEFAULT_ROOFLINE, calibrate_roofline

__all__ = [
    "CODE_VERSION", "COLLAPSE_FRACTION", "DEFAULT_ROOFLINE", "GEMM_OPS", "HAMPEL_HALF_WINDOW", "HAMPEL_TOLERANCE",
    "LAYER_OPS", "METHODS", "ONCE_OPS", "SHARDED_OPS", "TABLE_BATCH", "TABLE_TOKENS", "TOKEN_OPS", "ExecutionModel",
    "PathLike", "calibrate_roofline", "clean_series", "default_cache_dir", "derive_attention",
    "derived_attention_report", "evaluate_holdout", "fit_allreduce", "fit_decode", "fit_kv_save", "fit_prefill",
    "fit_token_ops", "format_holdout_table", "hbm_fraction", "holdout_attention", "holdout_token_ops",
    "read_attention", "read_mlp", "scale_token_ops_tp",
]
