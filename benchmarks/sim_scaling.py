"""How the cost of a simulated run grows with the cluster and the number of requests.

    python -m benchmarks.sim_scaling                 # the full grid (takes a while: block at k=N on 192 instances)
    python -m benchmarks.sim_scaling --quick         # 4 and 12 instances, 10k requests

Grid: 4, 12, 48 and 192 A30 Llama-2-7B instances x 10k and 100k ShareGPT requests (wrapped), at 2.2 req/s per
instance (about 75% of the capacity we measure for 12 instances), for round_robin, block at k=2 and block at k=N.
Prints simulated requests per wall second of the event loop and of the whole run (workload + loop + records).
Each point runs in this process, one after another; the execution model is fitted once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from block.policies import make_policy  # noqa: E402
from data import WorkloadConfig, build_workload  # noqa: E402
from experiments.wiring import REPO_ROOT, profile_root  # noqa: E402
from vidur.cluster import Cluster  # noqa: E402
from vidur.engine import Engine  # noqa: E402
from vidur.execution_model import ExecutionModel  # noqa: E402
from vidur.memory import kv_capacity_blocks  # noqa: E402
from vidur.records import requests_frame, summarize  # noqa: E402
from vidur.specs import GpuSpec, ModelSpec  # noqa: E402
from vidur.types import EngineConfig  # noqa: E402

PER_INSTANCE_QPS = 2.2


def one(n_inst: int, n_req: int, policy: str, k, em, ecfg) -> tuple[float, float, dict]:
    t0 = time.perf_counter()
    reqs = build_workload(WorkloadConfig(dataset="sharegpt", num_requests=n_req, qps=PER_INSTANCE_QPS * n_inst,
                                         wrap=True, predicted_length="oracle", seed=0))
    cl = Cluster([Engine(ecfg, em, i) for i in range(n_inst)], make_policy(policy, k=k), seed=0)
    t1 = time.perf_counter()
    res = cl.run(reqs)
    t2 = time.perf_counter()
    s = summarize(requests_frame(res.requests))
    t3 = time.perf_counter()
    return n_req / (t2 - t1), n_req / (t3 - t0), s


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 and 12 instances, 10k requests only")
    ap.add_argument("--instances", type=int, nargs="*", default=None)
    ap.add_argument("--requests", type=int, nargs="*", default=None)
    args = ap.parse_args(argv)
    sizes = args.instances or ([4, 12] if args.quick else [4, 12, 48, 192])
    counts = args.requests or ([10_000] if args.quick else [10_000, 100_000])
    model = ModelSpec.from_dict(OmegaConf.load(REPO_ROOT / "conf/model/llama2_7b.yaml"))
    gpu = GpuSpec.from_dict(OmegaConf.load(REPO_ROOT / "conf/gpu/a30.yaml"))
    em = ExecutionModel.fit(model, gpu, profile_root=profile_root())
    ecfg = EngineConfig(num_blocks=kv_capacity_blocks(model, gpu))
    print(f"{'instances':>9} {'requests':>8} {'policy':>14} {'loop req/s':>11} {'run req/s':>10} "
          f"{'p99 TTFT s':>10} {'mean e2e s':>10}")
    for n_inst in sizes:
        for n_req in counts:
            for policy, k in (("round_robin", None), ("block_oracle", 2), ("block_oracle", None)):
                if policy == "block_oracle" and k is None and n_inst * n_req > 48 * 100_000:
                    print(f"{n_inst:>9} {n_req:>8} {'block k=N':>14} {'(skipped: > 4.8M what-ifs)':>33}")
                    continue
                loop, whole, s = one(n_inst, n_req, policy, k, em, ecfg)
                name = policy if k is None and policy == "round_robin" else f"block k={k or 'N'}"
                print(f"{n_inst:>9} {n_req:>8} {name:>14} {loop:>11.0f} {whole:>10.0f} "
                      f"{s['p99_ttft_ms'] / 1e3:>10.2f} {s['mean_e2el_ms'] / 1e3:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
