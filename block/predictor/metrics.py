"""The predictor's own ``/metrics``: what it served (predictions, proxied requests by outcome) and the state it used.

Counters are bumped where the work happens (:meth:`PredictorMetrics.predicted`, :meth:`PredictorMetrics.proxied`);
gauges are set from the current state at scrape time (:meth:`PredictorMetrics.render`), so a scrape costs nothing
between scrapes.
"""

from __future__ import annotations

from typing import Optional

from block import prom
from vidur.types import InstanceState

PREDICT_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
OUTCOMES = ("ok", "client_error", "engine_error", "unavailable", "failed_midstream", "client_disconnect",
            "bad_request")


def rss_bytes() -> Optional[int]:
    """This process's resident memory (Linux ``/proc``); None elsewhere."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PredictorMetrics:
    """The predictor's metric families, every labelled series created at 0 so it shows before its first event."""

    def __init__(self) -> None:
        r = self.registry = prom.Registry()
        self.c_pred = r.counter("block_predictor_predictions", "Predictions served by /predict.")
        self.h_pred = r.histogram("block_predictor_predict_seconds", "Time inside the /predict handler (seconds).",
                                  PREDICT_BUCKETS)
        self.c_proxied = r.counter("block_predictor_proxied_requests", "Requests proxied to the engine, by outcome.",
                                   ("outcome",))
        self.g_running = r.gauge("block_predictor_requests_running", "Running requests in the predictor's state.")
        self.g_waiting = r.gauge("block_predictor_requests_waiting", "Waiting requests in the predictor's state.")
        self.g_tracked = r.gauge("block_predictor_tracked_requests", "Proxied requests in flight.")
        self.g_free = r.gauge("block_predictor_free_blocks", "Free KV blocks in the predictor's state.")
        self.g_age = r.gauge("block_predictor_state_age_seconds", "Age of the state the predictor uses.")
        self.g_up = r.gauge("block_predictor_engine_up", "1 if the engine answered recently.")
        self.g_rss = r.gauge("process_resident_memory_bytes", "Resident memory size in bytes.")
        self.h_pred.touch()
        self.c_pred.touch()
        for o in OUTCOMES:
            self.c_proxied.touch(outcome=o)

    def predicted(self, seconds: float) -> None:
        self.c_pred.inc()
        self.h_pred.observe(seconds)

    def proxied(self, outcome: str) -> None:
        self.c_proxied.inc(outcome=outcome)

    def render(self, st: InstanceState, age_s: float, tracked: int, engine_up: bool) -> str:
        self.g_running.set(len(st.running))
        self.g_waiting.set(len(st.waiting))
        self.g_free.set(st.free_blocks)
        self.g_tracked.set(tracked)
        self.g_age.set(age_s)
        self.g_up.set(1.0 if engine_up else 0.0)
        rss = rss_bytes()
        if rss is not None:
            self.g_rss.set(rss)
        return self.registry.render()
