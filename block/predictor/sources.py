"""Where the predictor's ``InstanceState`` comes from: three sources behind one :meth:`StateView.current_state`.

- **proxy** (works in front of stock vLLM): the :class:`~block.predictor.tracker.Tracker`'s requests in flight,
  corrected by the engine's ``/metrics`` (:class:`MetricsSource`, vLLM's names, V0 and V1) when fresh;
- **engine** (the emulated engine only): its exact state from ``GET /state`` (:class:`EngineStateSource`), the last
  good one kept when a fetch fails, the proxy state until the first one arrives;
- **injected** (benchmarks, debugging, ``--debug-allow-state-injection``): a state posted to ``/debug/state``
  (:class:`InjectedState`); it wins over both while set.

Every fetch reports to :class:`~block.predictor.liveness.Liveness`, so the same polls keep the engine's liveness.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Optional

import httpx
import orjson

from block.predictor.liveness import Liveness
from block.predictor.tracker import Tracker, config_with_blocks
from block.prom import PromParseError, VllmLoad
from block.service import ServiceError, loads_json
from vidur.types import EngineConfig, InstanceState

Getter = Callable[[str], Awaitable[httpx.Response]]  # GET {engine}{path}; marks liveness failed on a transport error

METRIC_PREFIXES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:gpu_cache_usage_perc", "vllm:num_preemptions_total", "vllm:cache_config_info")
ENGINE_STATE_EXTRA = ("time_scale", "model", "num_steps", "request_ids")


def metrics_subset(text: str) -> str:
    """The lines of a /metrics scrape that VllmLoad needs (parsing all of vLLM's histograms takes ~1 ms)."""
    return "\n".join(line for line in text.splitlines() if line.startswith(METRIC_PREFIXES))


class MetricsSource:
    """The engine's last ``/metrics`` reading (proxy mode): running/waiting counts, KV usage, the cache config."""

    def __init__(self, interval_s: float, clock: Callable[[], float]) -> None:
        self.interval_s = max(0.0, interval_s)
        self.clock = clock
        self.supported = self.interval_s > 0  # False after a 404: an OpenAI server without /metrics
        self.load: Optional[VllmLoad] = None
        self.at: Optional[float] = None
        self.version = 0

    async def poll(self, get: Getter, live: Liveness) -> Optional[VllmLoad]:
        """One scrape; the new reading, or None (no /metrics, an error status, an unreadable scrape)."""
        r = await get("/metrics")
        if r.status_code == 404:  # liveness pings only from now on
            self.supported = False
            live.mark_ok()
            return None
        if r.status_code != 200:
            live.mark_err(f"GET /metrics: HTTP {r.status_code}")
            return None
        live.mark_ok()
        try:
            load = VllmLoad.from_metrics(metrics_subset(r.text))
        except PromParseError as err:
            live.mark_err(f"GET /metrics: {err}")
            return None
        self.load, self.at = load, self.clock()
        self.version += 1
        return load

    def fresh(self) -> Optional[VllmLoad]:
        """The last reading while it is recent enough to correct the tracker (4 poll intervals, at least 1 s)."""
        if self.load is None or self.at is None:
            return None
        if self.clock() - self.at > max(1.0, 4 * self.interval_s):
            return None
        return self.load


class EngineStateSource:
    """The emulated engine's exact state (``GET /state``); concurrent callers share one fetch."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.state: Optional[InstanceState] = None
        self.at: Optional[float] = None
        self.extra: dict[str, Any] = {}  # what /state carries besides the InstanceState (shown on our /state)
        self.version = 0
        self._fetching: Optional[asyncio.Future] = None

    async def fetch(self, get: Getter, live: Liveness) -> None:
        """Fetch once (or wait for the fetch in flight); keeps the last good state on failure."""
        if self._fetching is not None:
            await asyncio.shield(self._fetching)
            return
        fut = self._fetching = asyncio.get_running_loop().create_future()
        try:
            r = await get("/state")
            if r.status_code != 200:
                live.mark_err(f"GET /state: HTTP {r.status_code}")
                return
            live.mark_ok()
            try:
                d = orjson.loads(r.content)
                st = InstanceState.from_dict(d)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                live.mark_err(f"GET /state: unreadable state ({type(err).__name__}: {err})")
                return
            self.state, self.at = st, self.clock()
            self.extra = {k: d[k] for k in ENGINE_STATE_EXTRA if k in d}
            self.version += 1
        except httpx.HTTPError:
            return
        finally:
            self._fetching = None
            fut.set_result(None)


class InjectedState:
    """A state posted to ``/debug/state``: it answers every question until cleared, engine or not."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.state: Optional[InstanceState] = None
        self.at: Optional[float] = None

    def inject(self, raw: bytes, config: EngineConfig) -> dict[str, Any]:
        """Parse and validate a posted ``InstanceState`` (``config`` where it has none); 400 when it is not one."""
        try:
            d = loads_json(raw)  # a BadJSON is a ValueError: a 400 below
            if not isinstance(d, dict):
                raise TypeError("state must be a JSON object")
            st = InstanceState.from_dict(d)
            if "config" not in d:
                st.config = config
            st.config.validate()
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ServiceError(400, f"not an InstanceState: {type(err).__name__}: {err}") from None
        self.state, self.at = st, self.clock()
        return {"injected": True, "running": len(st.running), "waiting": len(st.waiting)}

    def clear(self) -> None:
        self.state = self.at = None


class StateView:
    """The three sources and the engine config they share; :meth:`current_state` picks the one in force."""

    def __init__(self, config: EngineConfig, tracker: Tracker, source: str, *, get: Getter, live: Liveness,
                 metrics_interval_s: float, state_interval_s: float, num_blocks_fixed: bool,
                 clock: Callable[[], float]) -> None:
        if source not in ("proxy", "engine"):
            raise ValueError(f"state source {source!r}: use 'proxy' or 'engine'")
        self.config = config  # its block count follows the engine's /metrics unless fixed (--num-blocks)
        self.tracker = tracker
        self.source = source
        self.get = get
        self.live = live
        self.clock = clock
        self.state_interval_s = max(0.0, state_interval_s)
        self.num_blocks_fixed = num_blocks_fixed
        self.metrics = MetricsSource(metrics_interval_s, clock)
        self.engine = EngineStateSource(clock)
        self.injected = InjectedState(clock)
        self._cache_key: Optional[tuple[int, int]] = None
        self._cache_state: Optional[InstanceState] = None

    @property
    def poll_interval_s(self) -> float:
        """How often the poll loop runs (it also keeps the engine's liveness): the active source's interval."""
        return self.state_interval_s if self.source == "engine" else self.metrics.interval_s

    async def poll_once(self) -> None:
        """One round of the poll loop: the engine's /state, or its /metrics, or a liveness ping."""
        if self.source == "engine" and self.state_interval_s > 0:
            await self.engine.fetch(self.get, self.live)
        elif self.source == "proxy" and self.metrics.supported:
            load = await self.metrics.poll(self.get, self.live)
            if load is not None and not self.num_blocks_fixed and (load.num_gpu_blocks or load.block_size):
                self.config = config_with_blocks(self.config, load.num_gpu_blocks, load.block_size)
        else:
            await self.live.ping(self.get)

    def proxy_state(self) -> InstanceState:
        """The tracker's state with the fresh /metrics correction; rebuilt only when either changed."""
        load = self.metrics.fresh()
        key = (self.tracker.version, self.metrics.version if load is not None else -1)
        if key != self._cache_key or self._cache_state is None:
            at = self.metrics.at
            pre = int(load.num_preemptions) if load is not None and load.num_preemptions is not None else 0
            lt = (at - self.tracker.t0) if load is not None and at is not None else None
            self._cache_state = self.tracker.build_state(self.config, self.config.num_blocks, load, pre, lt)
            self._cache_key = key
        else:
            self._cache_state.now_s = self.tracker.now()
        return self._cache_state

    async def current_state(self) -> tuple[InstanceState, str, float]:
        """(state, source, age in seconds): injected > engine (last good) > proxy tracking."""
        inj = self.injected
        if inj.state is not None:
            return inj.state, "injected", self.clock() - (inj.at or self.clock())
        if self.source == "engine":
            if self.state_interval_s <= 0:
                await self.engine.fetch(self.get, self.live)
            if self.engine.state is not None:
                return self.engine.state, "engine", self.clock() - (self.engine.at or 0.0)
            return self.proxy_state(), "proxy-fallback", 0.0
        return self.proxy_state(), "proxy", 0.0

    def age_s(self) -> Optional[float]:
        """Age of the injected or engine state (None for the proxy state, which is always current)."""
        now = self.clock()
        if self.injected.state is not None:
            return now - (self.injected.at or now)
        if self.source == "engine" and self.engine.at is not None:
            return now - self.engine.at
        return None

    def details(self, source: str) -> dict[str, Any]:
        """What ``GET /state`` shows besides the state itself, for the source that answered."""
        d: dict[str, Any] = {}
        if source == "engine":
            d.update(self.engine.extra)
            d["version"] = self.engine.version
        elif source.startswith("proxy"):
            d["request_ids"] = {str(t.id): t.upstream_id for t in self.tracker.entries.values() if t.upstream_id}
            load = self.metrics.fresh()
            if load is not None:
                d["engine_metrics"] = {"num_running": load.num_running, "num_waiting": load.num_waiting,
                                       "kv_cache_usage": load.kv_cache_usage, "free_blocks": load.free_blocks,
                                       "age_s": self.clock() - (self.metrics.at or 0.0)}
        return d
