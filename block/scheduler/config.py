"""The scheduler's configuration: ``SchedulerConfig`` (checked when built) and where its instance URLs come from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from vidur.policy_contract import RoutingPolicy


@dataclass
class SchedulerConfig:
    instances: list[str]  # predictor base URLs; requests are forwarded through them
    policy: RoutingPolicy
    probe_timeout_s: float = 1.0
    default_output_tokens: Optional[int] = None  # None: max_tokens
    max_retries: int = 2
    seed: int = 0
    log_file: Optional[str] = None
    upstream_token: Optional[str] = None
    tokenizer: str = "llama2"
    connect_timeout_s: float = 5.0
    upstream_timeout_s: float = 1800.0  # between two chunks of an upstream answer
    down_cooldown_s: float = 2.0
    max_connections: int = 4096
    policy_config: dict[str, Any] = field(default_factory=dict)  # what built the policy (for /health and logs)
    # length estimator for requests without a hint: none | cpu | auto | <file.npz> | <checkpoint dir>
    length_estimator: Optional[str] = None
    estimator_max_batch: int = 32
    estimator_wait_ms: float = 2.0  # batching window: prompts arriving within it share one predict call
    estimator_timeout_s: float = 5.0  # an estimate slower than this falls back to the default length

    def __post_init__(self) -> None:
        if not self.instances:
            raise ValueError("the scheduler needs at least one instance (--instances or --instances-file)")
        self.instances = [normalize_url(u) for u in self.instances]
        if len(set(self.instances)) != len(self.instances):
            raise ValueError(f"duplicate instance URLs in {self.instances}")
        for name in ("probe_timeout_s", "connect_timeout_s", "upstream_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v} must be a positive number")
        if self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries} must be >= 0")
        if self.default_output_tokens is not None and self.default_output_tokens < 1:
            raise ValueError(f"default_output_tokens={self.default_output_tokens} must be >= 1")
        if self.down_cooldown_s < 0:
            raise ValueError(f"down_cooldown_s={self.down_cooldown_s} must be >= 0")
        if self.estimator_max_batch < 1:
            raise ValueError(f"estimator_max_batch={self.estimator_max_batch} must be >= 1")
        if not (math.isfinite(self.estimator_wait_ms) and self.estimator_wait_ms >= 0):
            raise ValueError(f"estimator_wait_ms={self.estimator_wait_ms} must be >= 0")


def normalize_url(u: str) -> str:
    u = str(u).strip()
    if not u:
        raise ValueError("empty instance URL")
    if "://" not in u:
        u = "http://" + u
    if not u.startswith(("http://", "https://")):
        raise ValueError(f"instance URL {u!r} must be http(s)://host:port")
    return u.rstrip("/")


def read_instances_file(path: str) -> list[str]:
    """Instance URLs from a file: a YAML/JSON list (of URLs or ``{url: ...}`` mappings) or one URL per line
    (blank lines and ``#`` comments skipped)."""
    with open(path) as f:
        text = f.read()
    stripped = text.strip()
    if stripped.startswith(("[", "-", "{", "instances:")):
        import yaml

        data = yaml.safe_load(text)
        if isinstance(data, dict) and "instances" in data:
            data = data["instances"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of instance URLs")
        out = []
        for i, x in enumerate(data):
            if isinstance(x, dict):
                x = x.get("url") or x.get("predictor")
            if not isinstance(x, str):
                raise ValueError(f"{path}: entry {i} is not a URL: {x!r}")
            out.append(x)
        return out
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]
