"""Shared fixtures. ``ToyModel`` is a transparent linear step-time model so engine tests can reason about times."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# the suite checks the Python sources (some tests look inside the engine's objects): a shell that asked for the compiled
# build (vidur/speedups.py) does not change that; tests/test_speedups.py compares the two itself
os.environ.pop("BLOCK_REPRO_SPEEDUPS", None)


class ToyModel:
    """step = base + per_token * tokens + attn * sum(chunk * ctx) + kv * decode_kv_sum (seconds)."""

    def __init__(self, base=0.01, per_token=2e-5, attn=1e-9, kv=1e-6):
        self.base, self.per_token, self.attn, self.kv = base, per_token, attn, kv

    def step_time(self, prefill_chunks, num_decode, decode_kv_sum):
        n = num_decode + sum(c for c, _ in prefill_chunks)
        t = self.base + self.per_token * n + self.kv * decode_kv_sum
        for c, ctx in prefill_chunks:
            t += self.attn * c * (ctx + c / 2)
        return t

    def decode_coeffs(self, batch):
        return self.base + self.per_token * batch, self.kv


@pytest.fixture
def toy_model():
    return ToyModel()
