"""The scheduler's Prometheus metrics (``/metrics``): requests by status, dispatches, probe and upstream failures,
retries, fallbacks, decision and probe times, length hints and the length estimator."""

from __future__ import annotations

from block import prom
from block.scheduler.requestlog import HINT_SOURCES, STATUSES


class Metrics:
    """Every series is touched at start (a scrape shows zeros, not gaps); ``n`` instances get per-instance series."""

    def __init__(self, n: int) -> None:
        r = self.registry = prom.Registry()
        self.requests = r.counter("block_scheduler_requests", "Requests finished, by final status.", ("status",))
        for s in STATUSES:
            self.requests.touch(status=s)
        self.routed = r.counter("block_scheduler_routed", "Dispatches (first tries and retries) per instance.",
                                ("instance",))
        self.probe_failures = r.counter("block_scheduler_probe_failures",
                                        "Probes (/predict or /stats) that failed or timed out, per instance.",
                                        ("instance",))
        self.upstream_failures = r.counter("block_scheduler_upstream_failures",
                                           "Forwarded requests that failed before their first token, per instance.",
                                           ("instance",))
        for i in range(n):
            for c in (self.routed, self.probe_failures, self.upstream_failures):
                c.touch(instance=str(i))
        self.retries = r.counter("block_scheduler_retries", "Re-dispatches after a failure before the first token.")
        self.fallbacks = r.counter("block_scheduler_fallbacks",
                                   "Decisions where no probed instance answered (random healthy instance).")
        self.stream_errors = r.counter("block_scheduler_stream_errors",
                                       "Streams that failed after the first token (error event sent).")
        for c in (self.retries, self.fallbacks, self.stream_errors):
            c.touch()
        self.inflight = r.gauge("block_scheduler_requests_in_flight", "Requests being served now.")
        self.inflight.set(0)
        self.healthy = r.gauge("block_scheduler_healthy_instances", "Instances not marked down.")
        buckets = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
        self.decision = r.histogram("block_scheduler_decision_seconds",
                                    "Routing time per dispatch (sampling + probes + policy).", buckets)
        self.probe = r.histogram("block_scheduler_probe_seconds", "Time waiting for the probes per dispatch.",
                                 buckets)
        self.decision.touch()
        self.probe.touch()
        self.n_inflight = 0
        self.hints = r.counter("block_scheduler_length_hints",
                               "Where each routed request's expected output length came from.", ("source",))
        for src in HINT_SOURCES:
            self.hints.touch(source=src)
        self.estimator_latency = r.histogram(
            "block_scheduler_length_estimator_seconds",
            "Latency the length estimator added per estimated request (queueing + batching window + prediction).",
            buckets)
        self.estimator_batch = r.histogram("block_scheduler_length_estimator_batch_size",
                                           "Prompts per length-estimator call, per estimated request.",
                                           (1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.estimator_failures = r.counter("block_scheduler_length_estimator_failures",
                                            "Estimates that failed or timed out (default length used instead).")
        self.estimator_latency.touch()
        self.estimator_batch.touch()
        self.estimator_failures.touch()
