"""The interface every response-length estimator implements (transformer regressor, CPU estimator, oracles).

An estimator maps prompts (text) to a predicted number of output tokens of the *serving* model. The scheduler calls
``predict`` on batches of prompts online; ``length_estimation.tag`` calls it offline to write a ``predicted_length``
column that the workload loaders read (``data.load_dataset`` maps it to ``predicted_output_tokens``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class LengthEstimator(Protocol):
    """``predict(prompts) -> integer array >= 1`` of predicted output tokens, one per prompt."""

    name: str

    def predict(self, prompts: Sequence[str]) -> np.ndarray: ...

    def save(self, path: str | Path) -> None: ...


def clip_lengths(pred: np.ndarray, max_tokens: int | None = None) -> np.ndarray:
    """As Block's client: ``max(1, int(pred))``, capped at ``max_tokens`` when given."""
    out = np.maximum(1, np.asarray(pred, dtype=float).round()).astype(np.int64)
    if max_tokens is not None:
        out = np.minimum(out, max_tokens)
    return out
