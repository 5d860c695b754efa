"""The predictor's parts as a library: the finish seam of its proxy, served for real (uvicorn on loopback) in front
of a real misbehaving engine (tests/fake_engine.py)."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest

from block.predictor.app import PredictorService, build_app
from block.predictor.proxy import Finished
from vidur.types import EngineConfig
from sse_strict import sse_events
from waiting import wait_until


@contextmanager
def serving(app) -> Iterator[str]:
    """``app`` on a free loopback port, uvicorn in a thread (lifespan on: the service's start/stop run)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    try:
        assert wait_until(lambda: server.started or not th.is_alive(), timeout=60) and server.started
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(30)
        sock.close()


@pytest.fixture
def predictor(toy_model):
    from fake_engine import FakeEngine

    cfg = EngineConfig(max_num_seqs=4, chunk_size=512, max_num_batched_tokens=512, num_blocks=100, block_size=16,
                       max_model_len=1024)
    with FakeEngine() as eng:
        svc = PredictorService(cfg, toy_model, engine_url=eng.url, metrics_interval_s=0.1)
        with serving(build_app(svc)) as url:
            yield svc, url


def test_every_proxied_request_ends_once_in_the_finish_hooks_with_its_outcome_and_times(predictor):
    """The seam for prediction-error metrics: each tracked request reaches ``on_finish`` exactly once, after it left
    the tracker, with its outcome, its tokens and its times on the tracker's clock; a failing hook is logged, never
    the client's problem."""
    svc, url = predictor
    seen: list[Finished] = []
    lock = threading.Lock()

    def record(done: Finished) -> None:
        assert done.tracked.id not in svc.tracker.entries  # untracked before the hooks run
        with lock:
            seen.append(done)

    def broken(done: Finished) -> None:
        raise RuntimeError("an observer's bug")

    svc.proxy.on_finish[:] = [broken, record]
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/completions", json={"prompt": "mode:good", "max_tokens": 5})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
        with c.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "mode:good"}],
                                                            "max_tokens": 5, "stream": True}) as s:
            assert s.status_code == 200
            assert sse_events(s.read())[-1] == "[DONE]"
        r = c.post("/v1/completions", json={"prompt": "mode:role_close", "max_tokens": 5})
        assert r.status_code == 502 and r.json()["error"]["type"] == "engine_unavailable"
        r = c.post("/v1/completions", content=b"not json")  # refused before tracking: no Finished
        assert r.status_code == 400
    assert wait_until(lambda: len(seen) >= 3)
    by_kind = {(d.tracked.chat, d.tracked.stream, d.outcome): d for d in seen}
    assert len(seen) == 3 and set(by_kind) == {(False, False, "ok"), (True, True, "ok"),
                                               (False, False, "unavailable")}, seen
    for key in ((False, False, "ok"), (True, True, "ok")):
        d = by_kind[key]
        assert d.tracked.decoded == 3 and d.tracked.expected == 5
        assert d.ttft_s is not None and 0 <= d.ttft_s <= d.e2e_s
    lost = by_kind[(False, False, "unavailable")]
    assert lost.tracked.decoded == 0 and lost.ttft_s is None and lost.e2e_s >= 0
    assert not svc.tracker.entries
