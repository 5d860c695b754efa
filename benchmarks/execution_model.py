"""Cost of the execution model's hot path: step_time and decode_coeffs calls per second (pure Python).

    python benchmarks/execution_model.py [--profile-root data/profiling]

Prints calls per second and microseconds per call for typical steps of a chunked-prefill engine (A30, Qwen2-7B
and Llama-2-7B): decode-only, mixed (1 and 4 prefill chunks + 40 decodes), and decode_coeffs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf

from vidur.execution_model import ExecutionModel
from vidur.specs import GpuSpec, ModelSpec


def bench(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile-root", default=str(ROOT / "data" / "profiling"))
    ap.add_argument("-n", type=int, default=200_000)
    a = ap.parse_args()
    gpu = GpuSpec.from_dict(OmegaConf.load(ROOT / "conf/gpu/a30.yaml"))
    with tempfile.TemporaryDirectory() as cache:
        for name in ("qwen2_7b", "llama2_7b"):
            model = ModelSpec.from_dict(OmegaConf.load(ROOT / f"conf/model/{name}.yaml"))
            t0 = time.perf_counter()
            em = ExecutionModel.fit(model, gpu, 1, profile_root=a.profile_root, cache_dir=cache)
            t_fit = time.perf_counter() - t0
            t0 = time.perf_counter()
            ExecutionModel.fit(model, gpu, 1, profile_root=a.profile_root, cache_dir=cache)
            t_load = time.perf_counter() - t0
            st, dc = em.step_time, em.decode_coeffs
            one = [(472, 1024)]
            four = [(200, 0), (150, 512), (80, 0), (42, 2000)]

            def dec(n, st=st):
                for i in range(n):
                    st([], 40, 40_000 + i % 1000)

            def mix1(n, st=st, one=one):
                for i in range(n):
                    st(one, 40, 40_000 + i % 1000)

            def mix4(n, st=st, four=four):
                for i in range(n):
                    st(four, 40, 40_000 + i % 1000)

            def coeffs(n, dc=dc):
                for i in range(n):
                    dc(1 + i % 48)

            def empty(n):
                for i in range(n):
                    pass

            base = bench(empty, a.n)
            print(f"{model.name} on {gpu.name}: fit {t_fit * 1e3:.0f} ms, cached load {t_load * 1e3:.0f} ms "
                  f"(empty loop: {base * 1e6:.3f} us/iteration, included below)")
            for label, fn in (("step_time decode-only (40 seqs)", dec), ("step_time 1 chunk + 40 decodes", mix1),
                              ("step_time 4 chunks + 40 decodes", mix4), ("decode_coeffs", coeffs)):
                per = bench(fn, a.n)
                print(f"  {label:34s} {1 / per:12,.0f} calls/s  {per * 1e6:6.2f} us/call")


if __name__ == "__main__":
    main()
