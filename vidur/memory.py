"""KV-cache capacity of one engine, following vLLM (V0 ``Worker.determine_num_available_blocks``).

vLLM runs one profiling forward pass with ``max_num_batched_tokens`` tokens spread over ``max_num_seqs`` dummy
sequences, then sets

    available = total_gpu_memory * gpu_memory_utilization - peak_memory
    num_gpu_blocks = available // (block_size * kv bytes per token per GPU)

where ``total_gpu_memory`` is what ``cudaMemGetInfo`` reports (``GpuSpec.visible_memory_bytes``: 24,258 MiB on an
A30, whose vendor figure "24 GB" is really 24 GiB less the driver's reservation) and ``peak_memory`` is the torch
peak (weights + activations of the profiling pass, incl. the sampler's logits) plus non-torch memory (CUDA context,
cuBLAS/NCCL workspaces: ``GpuSpec.cuda_context_gb``). We estimate the activation peak from the shapes:

- MLP phase (the largest): residual + normed input (2 x hidden) + gate_up output (2 x intermediate / tp)
  + activation output (intermediate / tp), per token, in the model dtype;
- sampler: logits of the last token of every dummy sequence, ``max_num_seqs x vocab``, once in the model dtype
  and about four FP32 copies (float logits, sorted logits for top-k/top-p, probs, logprobs).
"""

from __future__ import annotations

import math

from vidur.specs import GpuSpec, ModelSpec

SAMPLER_FP32_COPIES = 4


def activation_peak_bytes(model: ModelSpec, max_num_batched_tokens: int = 512, max_num_seqs: int = 48,
                          tp: int = 1) -> float:
    """Estimated torch peak of vLLM's profiling forward pass above the weights (bytes)."""
    t = int(max_num_batched_tokens)
    mlp = t * (2 * model.hidden_size + 3 * model.intermediate_size / tp) * model.dtype_bytes
    qkv = t * (2 * model.hidden_size + (model.q_width + 2 * model.kv_width) / tp) * model.dtype_bytes
    seqs = max(1, min(int(max_num_seqs), t))
    logits = seqs * model.vocab_size * (model.dtype_bytes + 4 * SAMPLER_FP32_COPIES)
    return max(mlp, qkv) + logits


def kv_capacity_breakdown(model: ModelSpec, gpu: GpuSpec, gpu_memory_utilization: float = 0.9,
                          block_size: int = 16, tp: int = 1, max_num_batched_tokens: int = 512,
                          max_num_seqs: int = 48) -> dict:
    """Every term of the capacity formula (bytes), the block size in bytes and the resulting number of blocks."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
    if tp < 1 or block_size < 1:
        raise ValueError(f"tp={tp} and block_size={block_size} must be >= 1")
    if model.num_kv_heads % tp and tp % model.num_kv_heads:
        raise ValueError(f"tp={tp} does not divide num_kv_heads={model.num_kv_heads} of {model.name}")
    total = gpu.visible_memory_bytes
    budget = total * gpu_memory_utilization
    weights = model.weight_bytes / tp
    act = activation_peak_bytes(model, max_num_batched_tokens, max_num_seqs, tp)
    ctx = gpu.cuda_context_gb * 1e9
    kv_per_token = model.kv_bytes_per_token / max(1, min(tp, model.num_kv_heads))  # KV heads replicate if tp > kv
    block_bytes = block_size * kv_per_token
    available = budget - weights - act - ctx
    blocks = int(available // block_bytes) if available > 0 else 0
    return {
        "total_bytes": total, "budget_bytes": budget, "weight_bytes": weights, "activation_bytes": act,
        "cuda_context_bytes": ctx, "available_bytes": available, "block_bytes": block_bytes, "num_blocks": blocks,
    }


def kv_capacity_blocks(model: ModelSpec, gpu: GpuSpec, gpu_memory_utilization: float = 0.9, block_size: int = 16,
                       tp: int = 1, max_num_batched_tokens: int = 512, max_num_seqs: int = 48) -> int:
    """Number of KV blocks vLLM would allocate on each GPU of one engine. Raises ValueError when the model does
    not fit or cannot hold one sequence of ``max_model_len`` tokens."""
    b = kv_capacity_breakdown(model, gpu, gpu_memory_utilization, block_size, tp, max_num_batched_tokens,
                              max_num_seqs)
    need = math.ceil(model.max_model_len / block_size)
    if b["num_blocks"] < need:
        gib = 2**30
        raise ValueError(
            f"model={model.name} does not fit on gpu={gpu.name} with tp={tp}, "
            f"gpu_memory_utilization={gpu_memory_utilization}: budget {b['budget_bytes'] / gib:.2f} GiB - weights "
            f"{b['weight_bytes'] / gib:.2f} GiB - activations {b['activation_bytes'] / gib:.2f} GiB - cuda_context "
            f"{b['cuda_context_bytes'] / gib:.2f} GiB leaves {b['num_blocks']} blocks of block_size={block_size}, "
            f"fewer than the {need} one max_model_len={model.max_model_len} sequence needs"
        )
    return b["num_blocks"]
