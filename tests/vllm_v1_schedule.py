"""Drive vLLM's own V1 scheduler (``vllm.v1.core.sched.scheduler.Scheduler``) step by step, with no model and no GPU.

Run with the Python of a vLLM install (``python -m block.engine.vllm_install``); ``tests/test_engine.py`` compares
what it prints with ``vidur``'s V1 rule. Input (stdin, JSON): ``model_dir`` (an HF config directory, no weights) and
``cases``, each with ``max_num_seqs``, ``max_num_batched_tokens``, ``block_size``, ``num_blocks`` (usable blocks: vLLM
keeps one more as its null block), ``watermark``, ``long_prefill_token_threshold``, ``max_model_len``, ``requests``:
``[id, prompt tokens, output tokens, step at which it arrives]``. Output (stdout, last line, JSON): per case one entry
per step, ``{"tokens": {id: tokens scheduled}, "preempted": [ids]}``, until every request has finished.

The model runner is replaced by its contract: a request whose computed tokens reach its known tokens in a step gets
one sampled token; a partial prefill gets none. Synchronous scheduling, no prefix caching.
"""

from __future__ import annotations

import json
import sys


def run_case(model_dir: str, spec: dict) -> list[dict]:
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    bs, max_len = int(spec["block_size"]), int(spec["max_model_len"])
    model_config = ModelConfig(model=model_dir, max_model_len=max_len, skip_tokenizer_init=True, dtype="float32",
                               seed=0)
    sched_config = SchedulerConfig(
        max_model_len=max_len, is_encoder_decoder=False, max_num_seqs=int(spec["max_num_seqs"]),
        max_num_batched_tokens=int(spec["max_num_batched_tokens"]), enable_chunked_prefill=True,
        long_prefill_token_threshold=int(spec["long_prefill_token_threshold"]), watermark=float(spec["watermark"]),
        async_scheduling=False)
    cache_config = CacheConfig(block_size=bs, enable_prefix_caching=False)
    vllm_config = VllmConfig(model_config=model_config, scheduler_config=sched_config, cache_config=cache_config)
    nblocks = int(spec["num_blocks"]) + 1  # block 0 is vLLM's null block
    kv = KVCacheConfig(num_blocks=nblocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer"], FullAttentionSpec(bs, num_kv_heads=1, head_size=1, dtype=torch.float32))])
    cache_config.num_gpu_blocks = nblocks
    sched = Scheduler(vllm_config=vllm_config, kv_cache_config=kv, block_size=bs,
                      structured_output_manager=StructuredOutputManager(vllm_config))
    pending = sorted(spec["requests"], key=lambda r: (r[3], r[0]))
    steps: list[dict] = []
    reqs: dict = {}
    while pending or sched.has_unfinished_requests():
        while pending and pending[0][3] <= len(steps):
            rid, prompt, out, _ = pending.pop(0)
            r = Request(str(rid), [7] * int(prompt), SamplingParams(max_tokens=int(out), ignore_eos=True), None)
            reqs[str(rid)] = r
            sched.add_request(r)
        before = {k: r.num_preemptions for k, r in reqs.items()}
        so = sched.schedule()
        ids = list(so.num_scheduled_tokens)
        sampled = [[7] if reqs[i].num_computed_tokens >= reqs[i].num_tokens else [] for i in ids]
        sched.update_from_output(so, ModelRunnerOutput(req_ids=ids, req_id_to_index={i: n for n, i in enumerate(ids)},
                                                       sampled_token_ids=sampled))
        steps.append({"tokens": {i: int(n) for i, n in so.num_scheduled_tokens.items()},
                      "preempted": sorted(k for k, r in reqs.items() if r.num_preemptions > before[k])})
        if len(steps) > 200_000:
            raise RuntimeError("vLLM's scheduler did not finish the requests")
    return steps


def main() -> None:
    spec = json.loads(sys.stdin.read())
    print(json.dumps([run_case(spec["model_dir"], case) for case in spec["cases"]]))


if __name__ == "__main__":
    main()
