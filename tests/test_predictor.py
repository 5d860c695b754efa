"""The predictor side-car: tracking rules in-process, then real engines and predictors as servers on loopback."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from block.engine.tokens import TokenCounter
from block.predictor.app import parse_predict
from block.predictor.tracker import Reassembler, SSEScanner, Tracker, chunk_progress, parse_payload
from block.prom import VllmLoad, get_histogram, get_value, parse_prometheus
from block.service import ServiceError
from experiments.local_stack import TOKEN_VARS, LocalStack
from vidur.engine import Engine
from vidur.types import EngineConfig, InstanceState, Prediction, Request, SeqState
from vidur.whatif import predict
from sse_strict import sse_events
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
SCALE = "20"
SEQS = "2"  # small batch cap: a handful of requests gives both running and waiting ones


# ---------------------------------------------------------------------------------------------------------------
# in-process: tracking rules, SSE, reassembly, /predict parsing
# ---------------------------------------------------------------------------------------------------------------


def _tracker(cfg: EngineConfig, now: list) -> tuple[Tracker, list]:
    tr = Tracker(cfg.max_model_len, clock=lambda: now[0])
    counter = TokenCounter("none")
    ts = []
    for i, (prompt, mt, hint) in enumerate([(100, 50, None), (40, 20, 30), (33, 10, 5), (200, None, None)]):
        body = {"prompt": list(range(prompt)), "max_tokens": mt, "stream": True}
        headers = {}
        if hint is not None and i % 2:
            body["expected_output_tokens"] = hint
        elif hint is not None:
            headers["x-expected-output-tokens"] = str(hint)
        ts.append(tr.add(body, headers, False, counter))
        now[0] += 1.0  # arrivals at t = 0, 1, 2, 3
    return tr, ts


def test_tracker_state_rules(toy_model):
    cfg = EngineConfig(max_num_seqs=8, chunk_size=512, max_num_batched_tokens=512, num_blocks=100, block_size=16,
                       max_model_len=1024)
    now = [100.0]
    tr, ts = _tracker(cfg, now)
    assert [t.expected for t in ts] == [50, 20, 5, cfg.max_model_len - 200]  # hint capped at max_tokens
    now[0] = 105.0  # t = 5: tokens arrive
    tr.progress(ts[0], 1)
    tr.progress(ts[0], 1)
    tr.progress(ts[2], 1, prompt_tokens=35)  # usage corrects the prompt count
    st = tr.build_state(cfg, 100)
    assert [s.id for s in st.running] == [0, 2] and [s.id for s in st.waiting] == [1, 3]
    r0, r2 = st.running
    assert (r0.prompt_tokens, r0.decoded_tokens, r0.computed_tokens) == (100, 2, 101)
    assert (r2.prompt_tokens, r2.computed_tokens) == (35, 35)
    assert st.free_blocks == 100 - 7 - 3 and st.busy_for_s == 0.0
    assert all(s.computed_tokens == 0 and s.decoded_tokens == 0 for s in st.waiting)
    now[0] = 106.0
    # /metrics says 3 running: the oldest no-token request is a running prefill holding its prompt's blocks
    st = tr.build_state(cfg, 100, VllmLoad(num_running=3, num_waiting=1))
    assert [s.id for s in st.running] == [0, 1, 2] and [s.id for s in st.waiting] == [3]
    assert st.free_blocks == 100 - 7 - 3 - 3
    # ... unless it arrived after the reading
    st = tr.build_state(cfg, 100, VllmLoad(num_running=3, num_waiting=1), load_t=0.5)
    assert [s.id for s in st.running] == [0, 2]
    # /metrics (read at t = 5.5) says 1 running and 3 waiting: the newest decode was preempted (recompute, front)
    st = tr.build_state(cfg, 100, VllmLoad(num_running=1, num_waiting=3), load_t=5.5)
    assert [s.id for s in st.running] == [0] and [s.id for s in st.waiting] == [2, 1, 3]
    assert st.waiting[0].decoded_tokens == 1 and st.waiting[0].computed_tokens == 0
    # a reading older than the last token proves nothing: the request ran after it
    st = tr.build_state(cfg, 100, VllmLoad(num_running=1, num_waiting=3), load_t=4.5)
    assert [s.id for s in st.running] == [0, 2]
    # completion_tokens from usage is authoritative (several tokens in one chunk)
    tr.progress(ts[0], 1, completion_tokens=9)
    assert ts[0].decoded == 9
    tr.remove(ts[0])
    assert [s.id for s in tr.build_state(cfg, 100).running] == [2]
    Engine.from_state(st, toy_model)  # the states are valid what-if inputs


def test_sse_scanner_and_reassembler():
    events = [
        {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": " a"}, "finish_reason": None}],
         "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": " b"}, "finish_reason": "length"}]},
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}},
    ]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    for cut in (1, 7, 50, len(raw)):  # any chunking gives the same payloads
        sc = SSEScanner()
        got = []
        for i in range(0, len(raw), cut):
            got.extend(sc.feed(raw[i:i + cut]))
        assert len(got) == 5 and got[-1] == b"[DONE]"
    ra = Reassembler(chat=True)
    for p in got:
        ra.add(parse_payload(p))
    out = ra.response()
    assert out["choices"][0]["message"]["content"] == " a b" and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 2 and out["object"] == "chat.completion" and ra.done
    assert chunk_progress(events[0])[0] == 0 and chunk_progress(events[1])[:3] == (1, 7, 1)
    assert chunk_progress({"error": {"message": "x"}})[4] == {"message": "x"}
    assert SSEScanner().feed(b"data: x\r\n\r\n") == [b"x"]


@pytest.mark.parametrize("body", [
    b"", b"{", b"[]", b'"x"', b"null", b"{}", b'{"prompt_tokens": 10}',
    b'{"prompt_tokens": 0, "expected_output_tokens": 5}',
    b'{"prompt_tokens": -3, "expected_output_tokens": 5}', b'{"prompt_tokens": "10", "expected_output_tokens": 5}',
    b'{"prompt_tokens": true, "expected_output_tokens": 5}', b'{"prompt_tokens": 1.5, "expected_output_tokens": 5}',
    b'{"prompt_tokens": [1], "expected_output_tokens": 5}', b'\xff\xfe',
])
def test_parse_predict_rejects(body):
    with pytest.raises(ServiceError) as e:
        parse_predict(body)
    assert e.value.status == 400


def test_parse_predict_accepts_block_names():
    assert parse_predict(b'{"prompt_tokens": 10, "expected_output_tokens": 5.0}') == (10, 5)
    assert parse_predict(b'{"id": 3, "arrival_time": 1.0, "num_context_tokens": 12, "num_decode_tokens": 4}') == (12, 4)


# ---------------------------------------------------------------------------------------------------------------
# real servers
# ---------------------------------------------------------------------------------------------------------------


ENGINE_ARGS = ("--time-scale", SCALE, "--max-num-seqs", SEQS, "--tokenizer", "none", "--seed", "3")
PRED_ARGS = ("--max-num-seqs", SEQS, "--tokenizer", "none")


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """Engines and predictors, started together: e1 (+ p1 proxy mode, pe engine mode), e2/p2 with bearer tokens
    and state injection, e3/p3 for the failure tests."""
    from block.ports import free_port

    ports = [free_port() for _ in range(3)]  # engines on known ports: everything starts at once
    url = [f"http://127.0.0.1:{p}" for p in ports]
    spec = {
        "e1": ("block.engine", ENGINE_ARGS, ports[0]),
        "e2": ("block.engine", (*ENGINE_ARGS, "--token", "engsecret"), ports[1]),
        "e3": ("block.engine", ENGINE_ARGS, ports[2]),
        "p1": ("block.predictor", ("--engine-url", url[0], "--metrics-interval-s", "0.1", *PRED_ARGS), 0),
        "pe": ("block.predictor", ("--engine-url", url[0], "--state-source", "engine", "--state-interval-s", "0.3",
                                   *PRED_ARGS), 0),
        "p2": ("block.predictor", ("--engine-url", url[1], "--token", "predsecret", "--engine-token", "engsecret",
                                   "--debug-allow-state-injection", *PRED_ARGS), 0),
        "p3": ("block.predictor", ("--engine-url", url[2], "--metrics-interval-s", "0.1", "--read-timeout-s", "5",
                                   *PRED_ARGS), 0),
    }
    with LocalStack(tmp_path_factory.mktemp("servers"), env=dict.fromkeys(TOKEN_VARS)) as stack:
        procs = {name: stack.start(name, module, args, port=port, wait=False)
                 for name, (module, args, port) in spec.items()}
        for p in procs.values():
            p.wait_healthy()
        yield procs


@pytest.fixture(scope="session")
def exec_model():
    from block.engine.config import build_setup

    return build_setup(max_num_seqs=int(SEQS)).execution_model()


def norm(raw: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', raw)


def idle(c: httpx.Client) -> bool:
    st = c.get("/state").json()
    return not st["running"] and not st["waiting"]


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "block.predictor", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "--engine-url" in r.stdout and "--state-source" in r.stdout
    assert "--debug-allow-state-injection" in r.stdout


def test_default_bind_loopback(servers):
    for p in ("p1", "pe", "p2", "p3"):
        assert servers[p].url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "the quick brown fox", "max_tokens": 12}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 9}),
])
def test_stream_is_the_engines_byte_stream(servers, path, body):
    e1, p1 = servers["e1"], servers["p1"]
    body = dict(body, stream=True, stream_options={"include_usage": True}, seed=11)
    hdr = {"X-Request-Id": "same", "x-expected-output-tokens": "7"}
    raws, chunks = [], []
    for srv in (e1, p1):
        with srv.client() as c, c.stream("POST", path, json=body, headers=hdr) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            parts = list(r.iter_raw())
            raws.append(b"".join(parts))
            chunks.append(parts)
    assert norm(raws[0]) == norm(raws[1])  # byte for byte, up to the "created" timestamp
    ev_e, ev_p = sse_events(raws[0]), sse_events(raws[1])
    assert len(ev_e) == len(ev_p) and ev_p[-1] == "[DONE]"
    assert ev_p[-2]["usage"] == ev_e[-2]["usage"] and ev_p[-2]["usage"]["completion_tokens"] == body["max_tokens"]
    texts = [e for e in ev_p[:-2] if e["choices"]]
    assert len(texts) >= body["max_tokens"]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": list(range(1, 60)), "max_tokens": 10}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 6}),
])
def test_non_stream_returns_the_normal_json(servers, path, body):
    body = dict(body, seed=5)
    hdr = {"X-Request-Id": "ns"}
    with servers["e1"].client() as ce, servers["p1"].client() as cp:
        a = ce.post(path, json=body, headers=hdr)
        b = cp.post(path, json=body, headers=hdr)
    assert a.status_code == b.status_code == 200 and b.headers["content-type"].startswith("application/json")
    ja, jb = a.json(), b.json()
    ja.pop("created"), jb.pop("created")
    assert ja == jb


@pytest.mark.parametrize("body", [
    {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "model": "nope"},
    {"prompt": list(range(5000)), "max_tokens": 5},
    {"prompt": {"a": 1}},
    {"prompt": "x", "stream": "often"},
    {"max_tokens": 3},
    {"prompt": "x", "stream_options": {"include_usage": True}},
])
def test_engine_errors_pass_through(servers, body):
    with servers["e1"].client() as ce, servers["p1"].client() as cp:
        a = ce.post("/v1/completions", json=body)
        b = cp.post("/v1/completions", json=body)
        assert 400 <= a.status_code < 500 and a.status_code == b.status_code
        assert a.json() == b.json() and "message" in b.json()["error"]
        if "stream" not in body and "stream_options" not in body:  # the same error on the streaming path
            s = cp.post("/v1/completions", json=dict(body, stream=True))
            assert s.status_code == a.status_code and s.json() == a.json()


def test_models_passthrough(servers):
    with servers["e1"].client() as ce, servers["p1"].client() as cp:
        assert cp.get("/v1/models").json() == ce.get("/v1/models").json()


def test_hostile_proxy_input(servers):
    with servers["p1"].client() as c:
        for raw in (b"", b"{", b"[1, 2]", b"\xff\xfe", b'"str"'):
            r = c.post("/v1/completions", content=raw)
            assert r.status_code == 400 and r.json()["error"]["message"], raw
        r = c.post("/v1/chat/completions", json={"messages": "not a list", "max_tokens": 3})
        assert r.status_code == 400
        r = c.post("/v1/completions", content=b"{" + b" " * (5 << 20) + b"}")
        assert r.status_code == 413
        assert c.get("/health").status_code == 200
        assert wait_until(lambda: c.get("/state").json()["request_ids"] == {} and idle(c))


def test_hostile_predict_input(servers):
    with servers["p1"].client() as c:
        for raw in (b"", b"{", b"[]", b"{}", b'{"prompt_tokens": 0, "expected_output_tokens": 1}',
                    b'{"prompt_tokens": 5, "expected_output_tokens": "many"}',
                    b'{"prompt_tokens": 4096, "expected_output_tokens": 1}', b"\x00" * 100,
                    b'{"prompt_tokens": 99999999999999999999999, "expected_output_tokens": 5}'):
            r = c.post("/predict", content=raw)
            assert r.status_code == 400 and r.json()["error"]["message"], raw
        assert c.post("/predict", content=b"{" + b" " * (5 << 20) + b"}").status_code == 413
        assert c.get("/predict").status_code == 405
        r = c.post("/predict", json={"num_context_tokens": 100, "num_decode_tokens": 10 ** 9})  # clamped
        assert r.status_code == 200 and r.json()["e2e_s"] > 0
        r = c.post("/predict", json={"prompt_tokens": 100, "expected_output_tokens": 20, "id": "abc"})
        assert r.status_code == 200 and set(r.json()) == set(Prediction(0, 0, 0, 0, 0, 0).to_dict())
        assert c.get("/health").json()["status"] == "ok"


def _stream_worker(url: str, body: dict, out: list, headers=None) -> None:
    with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body,
                                                              headers=headers or {}) as r:
        out.append(r.status_code)
        for _ in r.iter_raw():
            pass


def test_proxy_state_tracks_the_engine(servers, exec_model):
    """5 requests (one non-streaming) through the proxy on a 2-seat engine: the proxy-mode state agrees with the
    engine's own /state on who runs and who waits (in >= 3 samples: two reads can straddle a change) and prompts,
    is never ahead of the engine on progress; both go idle at the end."""
    e1, p1 = servers["e1"], servers["p1"]
    with e1.client() as ce, p1.client() as cp:
        assert wait_until(lambda: idle(ce) and idle(cp))
        bodies = [{"prompt": list(range(1, 80 + 10 * i)), "max_tokens": 500, "stream": i != 2} for i in range(5)]
        done: list = []
        pool = ThreadPoolExecutor(5)
        futs = []
        for b in bodies:
            if b["stream"]:
                futs.append(pool.submit(_stream_worker, p1.url, b, done, {"x-expected-output-tokens": "300"}))
            else:
                futs.append(pool.submit(lambda b=b: done.append(httpx.post(p1.url + "/v1/completions", json=b,
                                                                           timeout=60).status_code)))
            time.sleep(0.02)  # spread the arrivals (no assertion depends on their order)
        prompts = {len(b["prompt"]) for b in bodies}  # distinct: a prompt length names its request
        matches = 0
        while not all(f.done() for f in futs):
            sp = cp.get("/state").json()  # the proxy first: the engine read after it can only be further along
            se = ce.get("/state").json()
            tracked = sp["running"] + sp["waiting"]
            assert {s["prompt_tokens"] for s in tracked} <= prompts and len(tracked) <= 5
            assert {s["expected_output_tokens"] for s in tracked} <= {300, 500}
            assert sp["free_blocks"] <= sp["total_blocks"]
            # tokens reach the proxy after the engine decoded them: the proxy's count is never ahead of the engine's
            engine_decoded = {s["prompt_tokens"]: s["decoded_tokens"] for s in se["running"] + se["waiting"]}
            for s in sp["running"]:
                if s["prompt_tokens"] in engine_decoded:  # else finished in between
                    assert s["decoded_tokens"] <= engine_decoded[s["prompt_tokens"]], (sp, se)
            # who runs and who waits: the same split as the engine's (the reads can straddle a change: counted)
            split = [sorted(s["prompt_tokens"] for s in st[k]) for st in (sp, se) for k in ("running", "waiting")]
            if (se["running"] or se["waiting"]) and split[:2] == split[2:]:
                matches += 1
            st = cp.get("/stats").json()
            assert st["num_running"] + st["num_waiting"] <= 5
            time.sleep(0.03)
        for f in futs:
            f.result()
        assert done == [200] * 5
        assert matches >= 3, matches
        assert wait_until(lambda: idle(cp) and idle(ce))
        # a prediction on the proxy state is the what-if on that state
        r = cp.post("/predict", json={"prompt_tokens": 300, "expected_output_tokens": 40}).json()
        want = predict(InstanceState.from_dict(cp.get("/state").json()), Request(0, 0, 300, 40), exec_model)
        assert r["e2e_s"] == pytest.approx(want.e2e_s, rel=1e-9)


def test_predict_equals_whatif_on_engine_state(servers, exec_model):
    e1, pe = servers["e1"], servers["pe"]
    with e1.client() as ce, pe.client() as cp:
        assert wait_until(lambda: idle(ce))
        eng = ce.get("/state").json()
        keys = ("running", "waiting", "free_blocks", "total_blocks", "config", "num_preemptions")
        # the engine-mode predictor holds the idle engine's state from its next poll on
        assert wait_until(lambda: all(cp.get("/state").json()[k] == eng[k] for k in keys), timeout=60)
        mine = cp.get("/state").json()
        assert mine["source"] == "engine" and mine["time_scale"] == float(SCALE)
        for k in ("running", "waiting", "free_blocks", "total_blocks", "config", "num_preemptions"):
            assert mine[k] == eng[k], k
        got = cp.post("/predict", json={"prompt_tokens": 700, "expected_output_tokens": 90}).json()
        want = predict(InstanceState.from_dict(eng), Request(0, 0, 700, 90), exec_model).to_dict()
        got.pop("predict_ms"), want.pop("predict_ms")
        assert got == want
        # busy engine: the prediction is the what-if on the state the predictor holds (read before and after)
        out: list = []
        threads = [threading.Thread(target=_stream_worker, args=(e1.url, {"prompt": list(range(1, 200)),
                                                                          "max_tokens": 1000, "stream": True}, out))
                   for _ in range(4)]  # >= 2 s of real time in model time (2 seats, 2 rounds): several polls
        for t in threads:
            t.start()
        checked = 0
        while checked < 2 and any(t.is_alive() for t in threads):
            s1 = cp.get("/state").json()
            p = cp.post("/predict", json={"prompt_tokens": 300, "expected_output_tokens": 50}).json()
            s2 = cp.get("/state").json()
            if s1["version"] == s2["version"] and (s1["running"] or s1["waiting"]):
                w = predict(InstanceState.from_dict(s1), Request(0, 0, 300, 50), exec_model).to_dict()
                p.pop("predict_ms"), w.pop("predict_ms")
                assert p == w
                assert set(s1["request_ids"]) == {str(s["id"]) for s in s1["running"] + s1["waiting"]}
                checked += 1
            time.sleep(0.05)
        st = cp.get("/stats").json()
        assert st["num_running"] <= int(SEQS)
        for t in threads:
            t.join(30)
        assert checked == 2 and out == [200] * 4


def test_client_disconnect_untracks_and_aborts(servers):
    e1, p1 = servers["e1"], servers["p1"]
    with e1.client() as ce, p1.client() as cp:
        assert wait_until(lambda: idle(ce) and idle(cp))
        with cp.stream("POST", "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3000, "stream": True}) as r:
            it = r.iter_raw()  # keep a reference: a collected iterator closes the response
            next(it)
            sp = cp.get("/state").json()
            assert len(sp["running"]) == 1, json.dumps(sp)
        assert wait_until(lambda: idle(cp) and idle(ce), timeout=60)
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up (3000 tokens: >= 3 s real)
            httpx.post(p1.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3000},
                       timeout=httpx.Timeout(0.3, connect=60))  # only the read may time out, never the connect
        assert wait_until(lambda: idle(cp) and idle(ce), timeout=60)
        m = parse_prometheus(cp.get("/metrics").text)
        assert get_value(m, "block_predictor_proxied_requests_total", {"outcome": "client_disconnect"}) >= 2


def test_metrics_and_stats(servers):
    with servers["p1"].client() as c:
        for _ in range(3):
            assert c.post("/predict", json={"prompt_tokens": 50, "expected_output_tokens": 5}).status_code == 200
        # one request proxied here, so the test stands alone (-k): the counter below must have seen it
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = parse_prometheus(r.text)
        assert get_value(m, "block_predictor_predictions_total") >= 3
        h = get_histogram(m, "block_predictor_predict_seconds")
        assert h.count >= 3 and 0 < h.mean < 10  # seconds, not ms (how fast: benchmarks/predictor.py)
        assert get_value(m, "block_predictor_proxied_requests_total", {"outcome": "ok"}) >= 1
        assert get_value(m, "block_predictor_proxied_requests_total", {"outcome": "bad_request"}) >= 0
        for g in ("block_predictor_requests_running", "block_predictor_requests_waiting",
                  "block_predictor_engine_up", "process_resident_memory_bytes"):
            assert get_value(m, g) is not None, g
        assert get_value(m, "process_resident_memory_bytes") < 400e6
        st = c.get("/stats").json()
        assert {"num_running", "num_waiting", "free_blocks", "waiting_prompt_blocks", "unprocessed_tokens",
                "num_preemptions"} <= set(st)
        hl = c.get("/health").json()
        assert hl["engine_ok"] is True and hl["status"] == "ok"
        assert c.post("/debug/state", json={}).status_code in (404, 405)  # injection is off by default


def test_bearer_token_and_state_injection(servers, exec_model):
    p2, e2 = servers["p2"], servers["e2"]
    auth = {"Authorization": "Bearer predsecret"}
    with p2.client() as c:
        assert c.get("/health").status_code == 200
        for method, path in (("POST", "/predict"), ("GET", "/stats"), ("GET", "/state"), ("GET", "/metrics"),
                             ("POST", "/v1/completions"), ("GET", "/v1/models")):
            r = c.request(method, path, json={"prompt_tokens": 5, "expected_output_tokens": 5})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
            r = c.request(method, path, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
        assert httpx.post(e2.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 401
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth)  # engine token upstream
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert c.get("/health").json()["engine_ok"] is True
        # the injection hook (enabled on this predictor): a 48 + 16 state, prediction = what-if on it
        cfg = EngineConfig.from_dict(c.get("/state", headers=auth).json()["config"])
        running = [SeqState(i, 300 + i, 200, 300 + i + 49, 50, 0.0) for i in range(48)]
        waiting = [SeqState(100 + j, 200, 100, 0, 0, 0.0) for j in range(16)]
        used = sum(-(-s.computed_tokens // cfg.block_size) for s in running)
        st = InstanceState(running, waiting, cfg.num_blocks - used, cfg.num_blocks, config=cfg)
        assert c.post("/debug/state", json=st.to_dict()).status_code == 401
        assert c.post("/debug/state", content=b"[]", headers=auth).status_code == 400
        r = c.post("/debug/state", json=st.to_dict(), headers=auth)
        assert r.status_code == 200 and r.json()["running"] == 48
        got = c.post("/predict", json={"prompt_tokens": 500, "expected_output_tokens": 120}, headers=auth).json()
        want = predict(st, Request(0, 0, 500, 120), exec_model).to_dict()
        got.pop("predict_ms"), want.pop("predict_ms")
        assert got == want and got["num_running"] == 48 and got["num_waiting"] == 16
        # "others_delay": true (block_social): the delay the request adds to the others, the same what-if's
        body = {"prompt_tokens": 500, "expected_output_tokens": 120, "others_delay": True}
        got = c.post("/predict", json=body, headers=auth).json()
        want = predict(st, Request(0, 0, 500, 120), exec_model, others_delay=True)
        assert got["others_delay_s"] > 0 and got["others_delay_s"] == pytest.approx(want.others_delay_s, rel=1e-9)
        r = c.post("/predict", json={**body, "others_delay": 1}, headers=auth)
        assert r.status_code == 400 and "others_delay" in r.json()["error"]["message"]
        stats = c.get("/stats", headers=auth).json()
        assert stats == Engine.from_state(st, exec_model).stats().to_dict()
        assert c.get("/state", headers=auth).json()["source"] == "injected"
        assert c.delete("/debug/state", headers=auth).json() == {"injected": False}
        assert c.get("/state", headers=auth).json()["source"] == "proxy"


def test_killed_engine_gives_prompt_5xx(servers):
    """Last: it kills e3. An in-flight stream ends with an error event and [DONE]; new requests get a 5xx JSON
    (nothing sent, so the scheduler can retry elsewhere); /health says the engine is gone and the instance is
    unavailable; /predict and /stats answer 503 engine_down (a scheduler leaves the instance out)."""
    e3, p3 = servers["e3"], servers["p3"]
    with p3.client() as c:
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).status_code == 200
        h = c.get("/health").json()
        assert h["engine_ok"] is True and h["engine_down"] is False and h["available"] is True
        with c.stream("POST", "/v1/completions", json={"prompt": [1, 2], "max_tokens": 3000, "stream": True}) as r:
            it = r.iter_raw()
            next(it)
            e3.stop(signal.SIGKILL)
            rest = b"".join(it)
        ev = sse_events(rest)
        assert any(isinstance(e, dict) and "error" in e for e in ev) and ev[-1] == "[DONE]"
        for body in ({"prompt": "x", "max_tokens": 3}, {"prompt": "x", "max_tokens": 3, "stream": True}):
            r = c.post("/v1/completions", json=body)
            assert r.status_code in (502, 503) and r.json()["error"]["type"] in ("engine_unavailable", "engine_down")
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code in (502, 503)
        assert c.get("/v1/models").status_code in (502, 503)
        h = c.get("/health").json()
        assert h["engine_ok"] is False and h["status"] == "degraded" and h["engine_last_error"]
        assert h["engine_down"] is True and h["available"] is False
        for r in (c.post("/predict", json={"prompt_tokens": 10, "expected_output_tokens": 10}), c.get("/stats"),
                  c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})):
            assert r.status_code == 503 and r.json()["error"]["type"] == "engine_down", r.text
        assert idle(c)
        m = parse_prometheus(c.get("/metrics").text)
        assert get_value(m, "block_predictor_engine_up") == 0.0
        assert get_value(m, "block_predictor_proxied_requests_total", {"outcome": "unavailable"}) >= 3
        assert get_value(m, "block_predictor_proxied_requests_total", {"outcome": "failed_midstream"}) == 1


# ---------------------------------------------------------------------------------------------------------------
# a misbehaving engine (tests/fake_engine.py): no silent loss, client errors as such, exact token counts
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A FakeEngine and a proxy-mode predictor in front of it."""
    from fake_engine import FakeEngine

    with FakeEngine() as eng, LocalStack(tmp_path_factory.mktemp("fake"), env=dict.fromkeys(TOKEN_VARS)) as stack:
        pred = stack.start("predictor", "block.predictor", ["--engine-url", eng.url, "--metrics-interval-s", "0.1",
                                                            *PRED_ARGS]).wait_healthy()
        yield eng, pred


def outcomes(c: httpx.Client) -> dict:
    m = parse_prometheus(c.get("/metrics").text)
    return {o: get_value(m, "block_predictor_proxied_requests_total", {"outcome": o})
            for o in ("ok", "client_error", "engine_error", "unavailable", "failed_midstream")}


@pytest.mark.parametrize("chat", [False, True])
def test_an_answer_that_ends_without_finishing_is_a_failure_not_an_empty_200(fake, chat):
    """The engine closes cleanly after a chunk without output (chat: role only) or after two tokens, without
    finish_reason or [DONE]. Before the first token: a retryable 502 engine_unavailable, streaming or not (never
    ``200 {"text": ""}``). After it: non-streaming 502 engine_failed (not retryable); a stream already relayed ends
    with an error event and [DONE]."""
    eng, pred = fake
    path = "/v1/chat/completions" if chat else "/v1/completions"

    def req(mode: str, stream: bool) -> dict:
        b = {"messages": [{"role": "user", "content": f"mode:{mode}"}]} if chat else {"prompt": f"mode:{mode}"}
        return {**b, "max_tokens": 5, "stream": stream}

    with pred.client() as c:
        before = outcomes(c)
        for stream in (False, True):
            r = c.post(path, json=req("role_close", stream))
            assert r.status_code == 502 and r.json()["error"]["type"] == "engine_unavailable", r.text
        r = c.post(path, json=req("tokens_close", False))
        assert r.status_code == 502 and r.json()["error"]["type"] == "engine_failed", r.text
        assert "after 2 tokens" in r.json()["error"]["message"]
        with c.stream("POST", path, json=req("tokens_close", True)) as r:
            assert r.status_code == 200
            ev = sse_events(r.read())
        assert ev[-1] == "[DONE]" and ev[-2]["error"]["type"] == "engine_failed"
        r = c.post(path, json=req("good", False))  # a proper answer still is one
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        after = outcomes(c)
        assert after["unavailable"] - before["unavailable"] == 2
        assert after["failed_midstream"] - before["failed_midstream"] == 2
        assert after["ok"] - before["ok"] == 1
        assert wait_until(lambda: c.get("/state").json()["request_ids"] == {})


def test_an_in_stream_client_error_reaches_the_client_as_that_4xx(fake):
    """vLLM reports some client errors inside an HTTP 200 stream (``data: {"error": {... "code": 400}}``). Before
    the first token that is the answer: 400 with vLLM's error object, streaming or not (not a retryable 502).
    After it (headers sent): the error event is relayed, then [DONE]."""
    from fake_engine import CLIENT_ERROR

    eng, pred = fake
    with pred.client() as c:
        before = outcomes(c)
        for stream in (False, True):
            r = c.post("/v1/completions", json={"prompt": "mode:client_error", "max_tokens": 5, "stream": stream})
            assert r.status_code == 400 and r.json() == {"error": CLIENT_ERROR}, r.text
        with c.stream("POST", "/v1/completions", json={"prompt": "mode:token_then_client_error", "max_tokens": 5,
                                                       "stream": True}) as r:
            assert r.status_code == 200
            ev = sse_events(r.read())
        assert ev[0]["choices"][0]["text"] == " t1" and ev[1] == {"error": CLIENT_ERROR} and ev[-1] == "[DONE]"
        r = c.post("/v1/completions", json={"prompt": "mode:token_then_client_error", "max_tokens": 5})
        assert r.status_code == 400 and r.json() == {"error": CLIENT_ERROR}
        assert outcomes(c)["client_error"] - before["client_error"] == 4


@pytest.mark.parametrize("mode,want", [("multi", 9), ("multi_nousage", 3)])
def test_multi_token_chunks_are_counted_exactly(fake, mode, want):
    """Three chunks of three tokens each: the predictor asks the engine for per-chunk usage and tracks 9 decoded
    tokens (one per chunk, 3, only when the engine sends no usage); the client gets no usage it did not ask for."""
    eng, pred = fake
    eng.held.clear()
    n0 = len(eng.bodies)
    got: list = []

    def client() -> None:
        with pred.client() as c, c.stream("POST", "/v1/completions", json={
                "prompt": f"mode:{mode}", "max_tokens": 12, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            got.append(r.status_code)
            got.append(r.read())

    th = threading.Thread(target=client)
    th.start()
    try:
        assert eng.held.wait(30)
        with pred.client() as c:
            assert wait_until(lambda: [s["decoded_tokens"] for s in c.get("/state").json()["running"]] == [want])
    finally:
        eng.release()
        th.join(30)
    assert eng.bodies[n0]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert got[0] == 200
    ev = sse_events(got[1])
    assert ev[-1] == "[DONE]"
    if mode == "multi":  # the usage chunk the client asked for
        assert ev[-2]["choices"] == [] and ev[-2]["usage"]["completion_tokens"] == 12
        ev = ev[:-1]
    assert all(e["usage"] is None for e in ev[:-1]) and sum(len(e["choices"][0]["text"].split()) for e in ev[:-1]) == 12


def test_the_benchmark_client_reads_streams_as_the_services_do():
    """block/benchmark/client.py reads answers with block/sse.py: a proper stream is ok (3 token chunks, usage),
    one without a token or without [DONE] fails as such, an error event is a stream_error."""
    import asyncio

    from block.benchmark.client import BenchmarkConfig, Outcome, send_one
    from block.http import Origin, Pool
    from fake_engine import FakeEngine

    async def run(eng: FakeEngine, mode: str) -> Outcome:
        pool = Pool()
        out = Outcome(0)
        body = json.dumps({"prompt": f"mode:{mode}", "max_tokens": 3, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        try:
            await send_one(pool, Origin(eng.url), BenchmarkConfig(base_url=eng.url), body,
                           {"content-type": "application/json"}, out, time.perf_counter())
        finally:
            await pool.aclose()
        return out

    with FakeEngine() as eng:
        outs = {m: asyncio.run(run(eng, m)) for m in ("good", "role_close", "tokens_close", "client_error")}
    assert (outs["good"].status, outs["good"].chunks, outs["good"].usage_out) == ("ok", 3, 3)
    assert outs["role_close"].status == "no_token" and outs["tokens_close"].status == "incomplete"
    assert outs["client_error"].status == "stream_error" and "out of vocabulary" in outs["client_error"].error


def test_a_streaming_client_that_leaves_before_its_first_token_is_aborted_in_the_queue(tmp_path):
    """A slow one-seat engine runs one request; a second one, streamed through the predictor, waits in its queue.
    Its client leaves: the predictor closes the upstream request at once, so the engine drops the waiting request
    (no prefill for nobody) while the first one still runs."""
    import socket

    from block.ports import free_port

    with LocalStack(tmp_path, env=dict.fromkeys(TOKEN_VARS)) as stack:
        port = free_port()
        eng = stack.start("engine", "block.engine", ["--time-scale", "0.2", "--max-num-seqs", "1", "--tokenizer",
                                                     "none"], port=port, wait=False)
        pred = stack.start("predictor", "block.predictor", ["--engine-url", f"http://127.0.0.1:{port}",
                                                            *PRED_ARGS[2:]], wait=False)
        eng.wait_healthy(), pred.wait_healthy()
        stop = threading.Event()

        def holder() -> None:  # occupies the engine's only seat until told to leave
            with eng.client() as c, c.stream("POST", "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2000,
                                                                                "stream": True}) as r:
                for _ in r.iter_raw():
                    if stop.is_set():
                        return

        hold = threading.Thread(target=holder, daemon=True)
        hold.start()
        with eng.client() as ce:
            assert wait_until(lambda: len(ce.get("/state").json()["running"]) == 1, timeout=60)
            raw = json.dumps({"prompt": [1, 2, 3], "max_tokens": 50, "stream": True}).encode()

            def answered(sock: socket.socket) -> bytes:
                """What the predictor has answered so far (nothing while the request waits upstream)."""
                sock.setblocking(False)
                try:
                    return sock.recv(4096, socket.MSG_PEEK)
                except BlockingIOError:
                    return b""
                finally:
                    sock.setblocking(True)

            # A predictor that takes its engine for down answers 503 at once, until a poll reaches the engine again: on
            # a loaded machine one of its connections to the engine can fail ("All connection attempts failed", seen
            # in the full suite beside another), so wait for its engine_ok before each send, and send again if refused.
            with pred.client() as cp:
                for attempt in range(5):
                    assert wait_until(lambda: cp.get("/health").json()["engine_ok"], timeout=60)
                    sock = socket.create_connection(("127.0.0.1", int(pred.url.rsplit(":", 1)[1])), timeout=30)
                    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                 b"content-length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
                    wait_until(lambda: len(ce.get("/state").json()["waiting"]) == 1
                               or answered(sock).startswith(b"HTTP/1.1 503"), timeout=60)
                    if len(ce.get("/state").json()["waiting"]) == 1 or attempt == 4:
                        break
                    sock.close()  # refused: send it again
            # (the predictor's answer, if any, says why the request is not in the engine's queue)
            assert len(ce.get("/state").json()["waiting"]) == 1, answered(sock)[:500]
            sock.close()
            assert wait_until(lambda: not ce.get("/state").json()["waiting"], timeout=60)
            st = ce.get("/state").json()
            assert len(st["running"]) == 1 and st["running"][0]["prompt_tokens"] == 2  # the first one runs on
        with pred.client() as cp:
            assert wait_until(lambda: get_value(parse_prometheus(cp.get("/metrics").text),
                                                "block_predictor_proxied_requests_total",
                                                {"outcome": "client_disconnect"}) == 1, timeout=30)
        stop.set()
        hold.join(60)


def test_tracker_bounds_client_numbers_and_counts_v1_prefills_as_the_engine_does():
    """Huge max_tokens / hints never reach the tracked state (it stays serialisable and within the model's length);
    a running prefill holds its prompt's blocks under V0 rules and none under V1 (per computed chunk), as
    vidur.engine counts them."""
    tr = Tracker(max_model_len=4096)
    counter = TokenCounter("llama2")
    t = tr.add({"prompt": list(range(1, 101)), "max_tokens": 10**30}, {"x-expected-output-tokens": "9" * 30},
               False, counter)
    assert t.max_tokens is None and t.expected == 4096 - 100
    t2 = tr.add({"prompt": list(range(1, 101)), "max_tokens": 1e300}, {}, False, counter)
    assert t2.expected == 4096 - 100
    base = dict(max_num_seqs=8, max_num_batched_tokens=512, chunk_size=512, block_size=16, num_blocks=100)
    load = VllmLoad(num_running=2, num_waiting=0)
    v0 = tr.build_state(EngineConfig(**base), 100, load=load, load_t=tr.now())
    v1 = tr.build_state(EngineConfig(**base, scheduler="v1"), 100, load=load, load_t=tr.now())
    assert len(v0.running) == len(v1.running) == 2
    assert v0.free_blocks == 100 - 2 * 7 and v1.free_blocks == 100
    json.dumps(v1.to_dict())
