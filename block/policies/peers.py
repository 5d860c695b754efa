"""Production routers' load rules, without prefix caching, on ``InstanceStats``.

The rules follow the projects' public code and documentation: the llm-d inference scheduler (Gateway API Inference
Extension EPP scorers), the SGLang model gateway (``least_load``) and the NVIDIA Dynamo KV router. Upstream code
moves fast: re-check a formula there before citing it as current.

Our engines have no prefix cache, so every prefix/overlap term is zero (llm-d's prefix scorer drops out, Dynamo's
prefill blocks are the whole prompt). Candidates without stats are skipped; none left -> uniformly random.
"""

from __future__ import annotations

from block.policies.common import max_by, min_by, with_stats
from vidur.policy_contract import RoutingContext
from vidur.types import Candidate, InstanceStats, Request


def _kv_used_fraction(s: InstanceStats) -> float:
    return (s.total_blocks - s.free_blocks) / s.total_blocks if s.total_blocks > 0 else 1.0


def llmd(request: Request, candidates: list[Candidate], ctx: RoutingContext, *,
         queue_weight: float = 2.0, kv_weight: float = 2.0) -> int:
    """llm-d EPP weighted scorers (defaults: queue 2, KV 2; prefix scorer off); highest total wins.

    queue-scorer: (max_q - q) / (max_q - min_q) over the candidates' waiting queues (1.0 for all when equal);
    kv-cache-utilization-scorer: 1 - used/total blocks.
    """
    cands = with_stats(candidates)
    if not cands:
        return max_by(cands, [], ctx)
    q = [c.stats.num_waiting for c in cands]
    lo, hi = min(q), max(q)
    qs = [1.0 if hi == lo else (hi - x) / (hi - lo) for x in q]
    return max_by(cands, [queue_weight * a + kv_weight * (1.0 - _kv_used_fraction(c.stats))
                          for a, c in zip(qs, cands)], ctx)


def sglang_least_load(request: Request, candidates: list[Candidate], ctx: RoutingContext, *,
                      throughput_tok_s: float = 4000.0, kv_weight: float = 1.0, kv_scale_s: float = 1.0,
                      max_kv_fraction: float = 0.999) -> int:
    """SGLang SMG ``least_load``: tokens / throughput + w * k / (1 - k); lower wins.

    tokens = the instance's unprocessed tokens (queued prompts plus what in-flight requests still have to
    prefill and decode, ``InstanceStats.unprocessed_tokens``); throughput is one constant (homogeneous instances,
    so it only sets the exchange rate between the two terms); k = used KV fraction clipped to ``max_kv_fraction``;
    w = ``kv_weight * kv_scale_s`` seconds (default 1.0 x 1 s: at half-full KV the barrier is worth 1 s of queue).
    """
    cands = with_stats(candidates)
    w = kv_weight * kv_scale_s
    scores = []
    for c in cands:
        k = min(max(_kv_used_fraction(c.stats), 0.0), max_kv_fraction)
        scores.append(c.stats.unprocessed_tokens / throughput_tok_s + w * k / (1.0 - k))
    return min_by(cands, scores, ctx)


def dynamo_kv(request: Request, candidates: list[Candidate], ctx: RoutingContext, *,
              overlap_score_weight: float = 1.0, block_size: int = 16) -> int:
    """NVIDIA Dynamo KV router cost: overlap_score_weight * prefill_blocks + decode_blocks; lower wins.

    prefill_blocks = blocks of the new prompt (no prefix cache: all uncached, the same on every instance);
    decode_blocks = blocks the instance has committed: in use (total - free) plus the waiting prompts' blocks.
    """
    cands = with_stats(candidates)
    prefill = overlap_score_weight * -(-request.prompt_tokens // block_size)
    return min_by(cands, [prefill + (c.stats.total_blocks - c.stats.free_blocks) + c.stats.waiting_prompt_blocks
                          for c in cands], ctx)
