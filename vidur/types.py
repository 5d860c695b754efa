"""Core types shared by every layer: the simulator, the policies, the services and the analysis.

They are plain dataclasses so that they cross process boundaries as JSON (``to_dict`` / ``from_dict``) and stay
cheap to build in the simulator's hot loop. Units: seconds for times, tokens for lengths, blocks for KV memory.
The run-record columns live with the rest of that format in ``vidur.records``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional


@dataclass(slots=True)
class Request:
    """One inference request as the workload defines it.

    ``output_tokens`` is the true response length: engines generate exactly that many tokens (ignore_eos).
    ``predicted_output_tokens`` is what a length estimator (or an oracle) says; routers may only look at this one.
    """

    id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    predicted_output_tokens: Optional[int] = None
    prompt: Optional[str] = None

    def expected_output_tokens(self) -> int:
        """The length a router is allowed to know: the prediction when there is one, else the true length."""
        p = self.predicted_output_tokens
        return int(p) if p is not None and p > 0 else int(self.output_tokens)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Request":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


SCHEDULERS = ("v0", "v1")  # EngineConfig.scheduler: vLLM V0 as Block ran it, current vLLM V1 (vidur.sched)


@dataclass(slots=True)
class EngineConfig:
    """The knobs of one engine's (replica's) scheduler, as vLLM names them.

    With ``chunked_prefill`` the per-step token budget is ``chunk_size`` (Sarathi / vLLM chunked prefill: decodes
    first, then chunks of prefills). Without it, a step is either a prefill-only batch of whole prompts whose token
    sum is at most ``max_num_batched_tokens`` or a decode-only batch (vLLM V0, prefill first).
    ``watermark`` is the fraction of all blocks that must stay free when a new prompt is admitted.

    ``scheduler`` picks the scheduling rule (``vidur.sched``): ``"v0"`` is vLLM V0 as Block ran it (above);
    ``"v1"`` is current vLLM's V1 scheduler: one budget of ``max_num_batched_tokens`` per step for the running
    requests first, in running order, then waiting ones (``chunk_size`` is unused; ``chunked_prefill`` is vLLM's
    ``--enable-chunked-prefill``, on by default). ``long_prefill_token_threshold`` (V1 only, 0 = off) caps a
    prefill's tokens per step while more than one request is in the engine, as vLLM's flag of that name does.
    """

    max_num_seqs: int = 48
    max_num_batched_tokens: int = 4096
    chunked_prefill: bool = True
    chunk_size: int = 512
    block_size: int = 16
    num_blocks: int = 1052
    watermark: float = 0.01
    max_model_len: int = 4096
    scheduler: str = "v0"
    long_prefill_token_threshold: int = 0

    @property
    def token_budget(self) -> int:
        """Tokens one step may process (V1: always ``max_num_batched_tokens``)."""
        if self.scheduler == "v1" or not self.chunked_prefill:
            return self.max_num_batched_tokens
        return self.chunk_size

    @property
    def watermark_blocks(self) -> int:
        return int(self.watermark * self.num_blocks)

    def validate(self) -> None:
        """Raise ValueError naming the key(s) of an impossible combination."""
        problems = []
        for k in ("max_num_seqs", "max_num_batched_tokens", "chunk_size", "block_size", "num_blocks", "max_model_len"):
            if getattr(self, k) <= 0:
                problems.append(f"{k}={getattr(self, k)} must be > 0")
        if not 0.0 <= self.watermark < 1.0:
            problems.append(f"watermark={self.watermark} must be in [0, 1)")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler={self.scheduler!r} must be one of {list(SCHEDULERS)}")
        if self.long_prefill_token_threshold < 0:
            problems.append(f"long_prefill_token_threshold={self.long_prefill_token_threshold} must be >= 0")
        elif self.long_prefill_token_threshold and self.scheduler != "v1":
            problems.append("long_prefill_token_threshold is a vLLM V1 knob: set scheduler=v1 or leave it 0")
        elif self.long_prefill_token_threshold > self.max_model_len:
            problems.append(f"long_prefill_token_threshold={self.long_prefill_token_threshold} > "
                            f"max_model_len={self.max_model_len}")
        if self.scheduler == "v1":  # vLLM's SchedulerConfig checks; chunk_size plays no part in V1
            if self.max_num_batched_tokens < self.max_num_seqs:
                problems.append(f"max_num_batched_tokens={self.max_num_batched_tokens} < max_num_seqs="
                                f"{self.max_num_seqs}: vLLM V1 needs a token for every running request")
            if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
                problems.append(f"max_num_batched_tokens={self.max_num_batched_tokens} < max_model_len="
                                f"{self.max_model_len} without chunked prefill: long prompts could never be scheduled")
        elif self.chunked_prefill:
            if self.chunk_size > self.max_num_batched_tokens:
                problems.append(
                    f"chunk_size={self.chunk_size} is larger than max_num_batched_tokens={self.max_num_batched_tokens}"
                )
            if self.chunk_size < self.max_num_seqs:
                problems.append(
                    f"chunk_size={self.chunk_size} < max_num_seqs={self.max_num_seqs}: a step could not hold one "
                    "token for every running request"
                )
        elif self.max_num_batched_tokens < self.max_model_len:
            problems.append(
                f"max_num_batched_tokens={self.max_num_batched_tokens} < max_model_len={self.max_model_len} without "
                "chunked prefill: long prompts could never be scheduled"
            )
        if self.num_blocks * self.block_size < self.max_model_len:
            problems.append(
                f"num_blocks={self.num_blocks} x block_size={self.block_size} cannot hold one request of "
                f"max_model_len={self.max_model_len}"
            )
        if problems:
            raise ValueError("invalid engine config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(slots=True)
class SeqState:
    """One request inside an engine, as a predictor knows it.

    ``computed_tokens``: tokens whose KV is in the cache. ``decoded_tokens``: output tokens produced so far.
    ``expected_output_tokens``: the total output the predictor assumes (predicted or oracle).
    A waiting request that was preempted has ``decoded_tokens > 0`` and ``computed_tokens == 0`` (recompute).
    """

    id: int
    prompt_tokens: int
    expected_output_tokens: int
    computed_tokens: int = 0
    decoded_tokens: int = 0
    arrival_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SeqState":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(slots=True)
class InstanceState:
    """What a predictor knows of one engine at one moment.

    ``running`` is in the engine's running order (admission order, which decides preemption victims) and
    ``waiting`` in queue order. ``busy_for_s`` is how long the step already in flight still runs (0 when unknown
    or idle); the state of the requests is the state *after* that step, so a what-if can start from it exactly.
    """

    running: list[SeqState]
    waiting: list[SeqState]
    free_blocks: int
    total_blocks: int
    num_preemptions: int = 0
    config: EngineConfig = field(default_factory=EngineConfig)
    now_s: float = 0.0
    busy_for_s: float = 0.0

    @property
    def num_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    def blocks_needed_by_waiting(self) -> int:
        """KV blocks the waiting prompts will take when admitted (Llumnix's "adjusted" free blocks use it)."""
        bs = self.config.block_size
        return sum(math.ceil((s.prompt_tokens + s.decoded_tokens) / bs) for s in self.waiting)

    def to_dict(self) -> dict[str, Any]:
        return {
            "running": [s.to_dict() for s in self.running],
            "waiting": [s.to_dict() for s in self.waiting],
            "free_blocks": self.free_blocks,
            "total_blocks": self.total_blocks,
            "num_preemptions": self.num_preemptions,
            "config": self.config.to_dict(),
            "now_s": self.now_s,
            "busy_for_s": self.busy_for_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InstanceState":
        return cls(
            running=[SeqState.from_dict(s) for s in d.get("running", [])],
            waiting=[SeqState.from_dict(s) for s in d.get("waiting", [])],
            free_blocks=int(d["free_blocks"]),
            total_blocks=int(d["total_blocks"]),
            num_preemptions=int(d.get("num_preemptions", 0)),
            config=EngineConfig.from_dict(d.get("config", {})),
            now_s=float(d.get("now_s", 0.0)),
            busy_for_s=float(d.get("busy_for_s", 0.0)),
        )


@dataclass(slots=True)
class InstanceStats:
    """The cheap load figures every engine or predictor reports (no simulation needed)."""

    instance_id: int
    num_running: int
    num_waiting: int
    free_blocks: int
    total_blocks: int
    num_preemptions: int = 0
    waiting_prompt_blocks: int = 0  # blocks the waiting prompts need (Llumnix's adjusted free blocks)
    waiting_prompt_tokens: int = 0
    unprocessed_tokens: int = 0  # sum over requests of max(0, prompt + expected output - computed)

    @property
    def num_requests(self) -> int:
        return self.num_running + self.num_waiting

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InstanceStats":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(slots=True)
class Prediction:
    """The what-if answer for one candidate request on one instance (times in seconds from "now")."""

    instance_id: int
    e2e_s: float
    ttft_s: float
    queue_s: float
    free_blocks: int
    num_requests: int
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0
    predict_ms: float = 0.0
    # latency the request adds to the requests already on the instance (sum over them, s); filled only when asked
    # (vidur.whatif's others_delay: a run to idle with and without it), else 0
    others_delay_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Prediction":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(slots=True)
class Candidate:
    """One instance offered to a policy, with the signals the policy declared it needs."""

    instance_id: int
    stats: Optional[InstanceStats] = None
    prediction: Optional[Prediction] = None
