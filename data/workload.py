"""Workload builder: a dataset plus an arrival process -> the list of ``Request`` every mode replays.

Semantics follow Block's benchmark client: take the records from ``start_index`` on, filter them, shuffle with the
seed and take ``num_requests``. When fewer rows are left, ``wrap=True`` repeats them cyclically (e.g. 100k requests
over the 19,366-row Azure trace); otherwise it is an error. With ``arrival="trace"`` rows are never shuffled: they
are taken in time order so that each keeps its own timestamp (see ``data.arrivals.trace_arrivals``).

Randomness: one ``numpy.random.SeedSequence(seed)`` spawns two independent streams, one for the shuffle and one for
the arrival gaps, so the same seed gives an identical workload and changing ``shuffle`` does not change the gaps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from vidur.types import Request

from .arrivals import ARRIVALS, arrival_times, tile_timestamps, trace_arrivals
from .datasets import Columns, filter_requests, load_columns

if TYPE_CHECKING:
    import pandas as pd

PREDICTED_LENGTH_MODES = ("none", "column", "oracle")


class WorkloadError(ValueError):
    """A workload the data cannot give; ``field`` names the ``WorkloadConfig`` field to change (``path`` for the
    file itself), so a caller can point the user at the right config key."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class WorkloadConfig:
    """What to replay. ``path`` (a user's file) takes precedence over ``dataset`` (a bundled name).

    ``qps`` is the mean arrival rate; for ``arrival="trace"`` None/0 keeps the trace's own rate.
    ``predicted_length``: "none" (no hint), "column" (the file's prediction column), "oracle" (the true length).
    """

    dataset: str = "sharegpt"
    path: str | None = None
    num_requests: int = 1000
    qps: float | None = 20.0
    arrival: str = "poisson"
    burstiness: float = 1.0
    seed: int = 0
    start_index: int = 0
    shuffle: bool = True
    wrap: bool = False
    max_model_len: int = 4096
    min_prompt_tokens: int = 4
    tokenizer: str = "llama2"
    predicted_length: str = "none"

    def to_dict(self) -> dict:
        return asdict(self)


def _select_rows(cfg: WorkloadConfig, df: Columns, shuffle: Optional[np.random.Generator], source: str) -> np.ndarray:
    """Row indices of the workload, in arrival order (before arrivals are drawn): shuffled with ``shuffle`` when
    given, else in file order."""
    m, n = len(df), cfg.num_requests
    order = shuffle.permutation(m) if shuffle is not None else np.arange(m)
    if n > m:
        if not cfg.wrap:
            raise WorkloadError(f"{source}: only {m} requests left after start_index={cfg.start_index} and filtering, "
                                f"{n} requested; set wrap=True to repeat them cyclically or lower num_requests",
                                "num_requests")
        return order[np.arange(n) % m]
    return order[:n]


def build_workload_columns(cfg: WorkloadConfig) -> Columns:
    """The workload as columns (those of ``workload_to_frame``, numpy arrays; no pandas): what ``build_workload``
    wraps into Requests and ``build_workload_frame`` into a DataFrame."""
    if cfg.num_requests <= 0:
        raise WorkloadError(f"num_requests={cfg.num_requests} must be > 0", "num_requests")
    if cfg.arrival not in ARRIVALS:
        raise WorkloadError(f"unknown arrival {cfg.arrival!r}: use one of {ARRIVALS}", "arrival")
    if cfg.predicted_length not in PREDICTED_LENGTH_MODES:
        raise WorkloadError(f"unknown predicted_length {cfg.predicted_length!r}: use one of {PREDICTED_LENGTH_MODES}",
                            "predicted_length")
    if cfg.start_index < 0:
        raise WorkloadError(f"start_index={cfg.start_index} must be >= 0", "start_index")

    file_field = "path" if cfg.path else "dataset"
    try:
        df = load_columns(cfg.path or cfg.dataset, tokenizer=cfg.tokenizer)
    except ValueError as err:  # unreadable file, unknown columns, non-numeric lengths (a missing one stays
        # FileNotFoundError: the caller checks the path first)
        raise WorkloadError(str(err), file_field) from err
    source = df.source or str(cfg.path or cfg.dataset)
    if cfg.start_index >= len(df):
        raise WorkloadError(f"{source}: start_index={cfg.start_index} is past the end ({len(df)} rows)", "start_index")
    try:
        df = filter_requests(df.take(slice(cfg.start_index, None)), cfg.min_prompt_tokens, cfg.max_model_len, source)
    except ValueError as err:
        raise WorkloadError(str(err), file_field) from err
    if cfg.predicted_length == "column" and "predicted_output_tokens" not in df.columns:
        raise WorkloadError(f"{source}: predicted_length='column' but the file has no prediction column "
                            "(num_predicted_decode_tokens, predicted_output_tokens or predicted_length)",
                            "predicted_length")
    if cfg.arrival == "trace":
        if "arrival_s" not in df.columns:
            raise WorkloadError(f"{source}: arrival='trace' needs timestamps (arrived_at or arrival_s); "
                                "use poisson/gamma", "arrival")
        df = df.take(np.argsort(df["arrival_s"], kind="stable"))

    # A trace is replayed in its own order and draws nothing: numpy.random is not even imported then (about 15 ms of a
    # 10,000-request run's process); the streams are the same whenever they are drawn from.
    shuffle = arrival_ss = None
    if cfg.arrival != "trace":
        shuffle_ss, arrival_ss = np.random.SeedSequence(cfg.seed).spawn(2)
        if cfg.shuffle:
            shuffle = np.random.default_rng(shuffle_ss)
    idx = _select_rows(cfg, df, shuffle, source)
    n = len(idx)

    if cfg.arrival == "trace":
        arrival = trace_arrivals(tile_timestamps(df["arrival_s"], n), cfg.qps)
    else:
        if cfg.qps is None:
            raise WorkloadError(f"qps must be set for arrival={cfg.arrival!r}", "qps")
        try:
            arrival = arrival_times(n, cfg.qps, cfg.arrival, cfg.burstiness, np.random.default_rng(arrival_ss))
        except ValueError as err:  # rate or burstiness out of range for the process
            raise WorkloadError(str(err), "burstiness" if "burstiness" in str(err) else "qps") from err

    out = {
        "id": np.arange(n, dtype=np.int64),
        "arrival_s": np.asarray(arrival, dtype=np.float64),
        "prompt_tokens": df["prompt_tokens"][idx],
        "output_tokens": df["output_tokens"][idx],
    }
    if cfg.predicted_length == "column":
        out["predicted_output_tokens"] = df["predicted_output_tokens"][idx]
    elif cfg.predicted_length == "oracle":
        out["predicted_output_tokens"] = out["output_tokens"]
    if "prompt" in df:
        out["prompt"] = df["prompt"][idx]
    return Columns(out, source)


def build_workload_frame(cfg: WorkloadConfig) -> "pd.DataFrame":
    """The workload as a DataFrame (columns of ``workload_to_frame``), ``attrs["source"]`` naming the file."""
    return build_workload_columns(cfg).frame()


def build_workload(cfg: WorkloadConfig) -> list[Request]:
    """The requests to replay, ids 0..n-1 in arrival order. Deterministic in ``cfg`` (same seed, same workload)."""
    f = build_workload_columns(cfg)
    n = len(f)
    ids = range(n)
    arr = f["arrival_s"].tolist()
    p = f["prompt_tokens"].tolist()
    o = f["output_tokens"].tolist()
    pred = f["predicted_output_tokens"].tolist() if "predicted_output_tokens" in f else [None] * n
    text = f["prompt"].tolist() if "prompt" in f else [None] * n
    return list(map(Request, ids, arr, p, o, pred, text))  # (map: no tuple per row to unpack)


def workload_to_frame(requests: list[Request]) -> "pd.DataFrame":
    """Requests as a DataFrame with columns id, arrival_s, prompt_tokens, output_tokens, predicted_output_tokens
    (nullable Int64) and prompt (object), e.g. to save a workload next to a run's records."""
    import pandas as pd

    return pd.DataFrame({
        "id": np.fromiter((r.id for r in requests), dtype=np.int64, count=len(requests)),
        "arrival_s": np.fromiter((r.arrival_s for r in requests), dtype=np.float64, count=len(requests)),
        "prompt_tokens": np.fromiter((r.prompt_tokens for r in requests), dtype=np.int64, count=len(requests)),
        "output_tokens": np.fromiter((r.output_tokens for r in requests), dtype=np.int64, count=len(requests)),
        "predicted_output_tokens": pd.array([r.predicted_output_tokens for r in requests], dtype="Int64"),
        "prompt": pd.Series([r.prompt for r in requests], dtype=object),
    })
