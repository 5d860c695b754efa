"""The global scheduler: unit checks of its pieces, then real servers on loopback.

The live part starts three emulated engines (``python -m block.engine --time-scale 20``), a predictor side-car in
front of each (``python -m block.predictor --state-source engine``, bearer token required) and schedulers
(``python -m block.scheduler``) in subprocesses. Tests that kill a service run last and use their own instance.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from block.policies import make_policy
from block.prom import get_value, parse_prometheus
from block.scheduler.cli import build_parser, make_policy_from_args
from block.scheduler.core import (
    PromptCounter,
    Scheduler,
    SchedulerConfig,
    parse_body,
    read_instances_file,
)
from block.http import Origin, Pool, UpstreamError
from block.service import ServiceError
from experiments.local_stack import TOKEN_VARS, LocalStack, Service
from vidur.policy_contract import RoutingContext
from vidur.types import Candidate, InstanceStats, Prediction, Request

ROOT = Path(__file__).resolve().parents[1]
SCALE = 20.0
PTOKEN = "ptok"  # the predictors' bearer token (the schedulers pass it with --upstream-token)


# ================================================================================================ unit checks
def test_parse_body_counts_prompts_and_reads_the_hint():
    c = PromptCounter("none")
    _, p = parse_body(b'{"prompt": [1, 2, 3], "max_tokens": 7}', {}, False, c)
    assert (p.prompt_tokens, p.max_tokens, p.hint, p.stream) == (3, 7, None, False)
    _, p = parse_body(b'{"prompt": "abcdefgh", "stream": true}', {"x-expected-output-tokens": "12"}, False, c)
    assert (p.prompt_tokens, p.hint, p.hint_in_body, p.stream) == (2, 12, False, True)  # ceil(8 bytes / 4)
    _, p = parse_body(b'{"messages": [{"role": "user", "content": "abcd"}], "max_completion_tokens": 5, '
                      b'"expected_output_tokens": 9}', {"x-expected-output-tokens": "12"}, True, c)
    assert (p.prompt_tokens, p.max_tokens, p.hint, p.hint_in_body) == (1 + 4 + 3, 5, 9, True)  # body wins
    for raw, chat in [(b"", False), (b"{bad", False), (b"[1]", False), (b'{"max_tokens": 3}', False),
                      (b'{"prompt": 5}', False), (b'{"prompt": [1, "a"]}', False), (b'{"prompt": []}', False),
                      (b'{"prompt": [1], "max_tokens": 0}', False), (b'{"prompt": [1], "max_tokens": "x"}', False),
                      (b'{"prompt": [1], "stream": "often"}', False), (b'{"prompt": [1], "max_tokens": 1.5}', False),
                      (b'{"messages": "hi"}', True), (b'{"messages": [{"content": "x"}]}', True),
                      (b'{"prompt": [1], "expected_output_tokens": -2}', False)]:
        with pytest.raises(ServiceError) as e:
            parse_body(raw, {}, chat, c)
        assert e.value.status == 400, raw
    with pytest.raises(ServiceError):
        parse_body(b'{"prompt": [1]}', {"x-expected-output-tokens": "lots"}, False, c)


def test_instances_file_formats(tmp_path):
    f = tmp_path / "hosts.txt"
    f.write_text("# predictors\nhttp://10.0.0.1:8100\n\n10.0.0.2:8100  # second\n")
    assert read_instances_file(str(f)) == ["http://10.0.0.1:8100", "10.0.0.2:8100"]
    f.write_text("- http://a:1\n- {url: 'http://b:2'}\n")
    assert read_instances_file(str(f)) == ["http://a:1", "http://b:2"]
    f.write_text('["http://a:1", "http://b:2/"]')
    cfg = SchedulerConfig(instances=read_instances_file(str(f)), policy=make_policy("random"))
    assert cfg.instances == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError):
        SchedulerConfig(instances=["http://a:1", "http://a:1/"], policy=make_policy("random"))
    with pytest.raises(ValueError):
        SchedulerConfig(instances=[], policy=make_policy("random"))


def test_cli_builds_the_policy_with_its_defaults(tmp_path):
    ap = build_parser()
    pol, cfg = make_policy_from_args(ap.parse_args(["--instances", "http://a:1"]))
    assert (pol.name, pol.signal, pol.k) == ("block", "prediction", 2)
    pol, _ = make_policy_from_args(ap.parse_args(["--policy", "block", "--k", "all"]))
    assert pol.k is None
    pol, cfg = make_policy_from_args(ap.parse_args(["--policy", "llmd", "--param", "queue_weight=1.5", "--k", "3"]))
    assert (pol.signal, pol.k, cfg["queue_weight"]) == ("stats", 3, 1.5)
    pol, _ = make_policy_from_args(ap.parse_args(["--policy", "round_robin"]))
    assert (pol.signal, pol.k) == ("none", None)
    pc = tmp_path / "p.yaml"
    pc.write_text("name: block_noisy\nk: 4\nlength_noise_pct: 10\n")
    pol, cfg = make_policy_from_args(ap.parse_args(["--policy-config", str(pc)]))
    assert (pol.name, pol.k, cfg["length_noise_pct"]) == ("block_noisy", 4, 10)
    for bad in (["--policy", "llmd", "--param", "nope=1"], ["--policy", "random", "--latency-noise-pct", "5"],
                ["--k", "two"]):
        with pytest.raises(ValueError):
            make_policy_from_args(ap.parse_args(bad))
    r = subprocess.run([sys.executable, "-m", "block.scheduler", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--probe-timeout-ms" in r.stdout and "--instances-file" in r.stdout
    r = subprocess.run([sys.executable, "-m", "block.scheduler", "--policy", "block"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "instances" in r.stderr


def test_first_token_detection():
    """block/sse.py's StreamView, as the scheduler, the predictor and the benchmark client read a stream."""
    from block.sse import StreamView, client_error_status

    def view(*chunks: bytes) -> StreamView:
        v = StreamView()
        for c in chunks:
            v.feed(c)
        return v

    tok = b'data: {"choices":[{"index":0,"text":" the","finish_reason":null}]}\n\n'
    assert view(tok).outputs == 1
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    assert view(role).outputs == 0 and not view(role).complete
    assert view(role, b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n').outputs == 1
    v = view(b'data: {"error": {"message": "boom"}}\n\n', b"data: [DONE]\n\n")
    assert v.error == {"message": "boom"} and v.done and not v.complete and client_error_status(v.error) is None
    assert client_error_status(view(b'data: {"error": {"message": "oov", "code": 400}}\r\n\r\n').error) == 400
    v = view(b'data: {"choices":[{"index":0,"te', b'xt":" a"}]}\n', b"\n")  # an event cut in three: wait for it
    assert v.outputs == 1
    assert view(b'data: {"choices":[{"index":0,"text":"","finish_reason":"stop"}]}\n\ndata: [DONE]\n\n').complete


def _sched(policy, n=4, seed=7, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(instances=[f"http://127.0.0.1:{9000 + i}" for i in range(n)], policy=policy,
                                     seed=seed, tokenizer="none", **kw))


def _fake_signal(kind, i, rng_state):
    r = random.Random(rng_state * 1000 + i)
    if kind == "prediction":
        return Candidate(i, prediction=Prediction(i, e2e_s=r.uniform(0.5, 5.0), ttft_s=0.1, queue_s=0.0,
                                                  free_blocks=r.randint(0, 500), num_requests=r.randint(0, 9)))
    return Candidate(i, stats=InstanceStats(i, num_running=r.randint(0, 8), num_waiting=r.randint(0, 4),
                                            free_blocks=r.randint(0, 1000), total_blocks=1000,
                                            waiting_prompt_blocks=r.randint(0, 50),
                                            unprocessed_tokens=r.randint(0, 9000)))


@pytest.mark.parametrize("name,k", [("block", 2), ("block", None), ("block_noisy", 2), ("least_requests", 2),
                                    ("llumnix", None), ("llmd", 3), ("block_nosim", 2), ("min_qpm", None),
                                    ("round_robin", None), ("random", None)])
def test_route_is_the_simulators_decision(name, k, monkeypatch):
    """route() samples with the process rng, gathers the signals and calls exactly the policy's function: a
    replica of vidur.cluster.Cluster's routing on the same answers makes the same choices."""
    sched = _sched(make_policy(name, k=k))
    told = {}

    async def probe_one(kind, i, req, length, rid):
        told[(req.id, i)] = length
        return _fake_signal(kind, i, req.id)

    monkeypatch.setattr(sched, "_probe_one", probe_one)
    ref = make_policy(name, k=k)
    rng = random.Random(7)
    state: dict = {}
    ids = list(range(4))

    async def run():
        got, want = [], []
        for n in range(60):
            req = Request(n, n * 0.1, prompt_tokens=50 + n, output_tokens=20 + n, predicted_output_tokens=10 + n)
            d = await sched.route(req, n)
            got.append(d.instance)
            ctx = RoutingContext(now_s=0.0, num_instances=4, instance_ids=ids, rng=rng, request_index=n, state=state)
            probe = rng.sample(ids, ref.k) if ref.k is not None and ref.k < 4 else ids
            sent = {}

            def length(i):
                if i not in sent:
                    sent[i] = int(ref.expected_length(req, i, ctx)) if ref.expected_length else \
                        req.expected_output_tokens()
                return sent[i]
            if ref.signal == "none":
                cands = [Candidate(i) for i in probe]
            else:
                cands = []
                for i in probe:
                    length(i)
                    cands.append(_fake_signal(ref.signal, i, req.id))
            choice = ref.choose(req, cands, ctx)
            if ref.observe:
                ref.observe(req, choice, cands, ctx)
            want.append(choice)
            # the chosen instance keeps the told length, or the un-noised one when the probes carried noise (Block)
            kept = max(1, int(ref.kept_length(req))) if ref.kept_length else length(choice)
            assert d.told_tokens == kept
            assert d.probed == list(probe) and not d.fallback
        return got, want

    got, want = asyncio.run(run())
    assert got == want
    if name == "round_robin":
        assert got[:8] == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("cooldown", [0.0, 30.0])
def test_route_falls_back_when_no_probe_answers(monkeypatch, cooldown):
    sched = _sched(make_policy("block", k=2), down_cooldown_s=cooldown)

    async def dead(kind, i, req, length, rid):
        if i in (0, 1):
            raise UpstreamError("connect", "refused")
        return _fake_signal(kind, i, req.id)

    monkeypatch.setattr(sched, "_probe_one", dead)

    async def run():
        out = []
        for n in range(40):
            out.append(await sched.route(Request(n, 0.0, 10, 10), n))
        return out

    ds = asyncio.run(run())
    fb = [d for d in ds if d.fallback]
    assert all(d.instance in (2, 3) for d in ds)  # never the ones that just failed
    assert sched.metrics.fallbacks.get() == len(fb)
    if cooldown == 0:
        assert len(fb) >= 3 and all(d.probed == [0, 1] or d.probed == [1, 0] for d in fb)
    else:  # refused connections put 0 and 1 out of the sampling: later requests probe 2 and 3 only
        assert sched.instances[0].down_until > time.monotonic() or 0 not in {i for d in ds for i in d.probed}
        assert all(set(d.probed) == {2, 3} for d in ds[-10:])


def test_upstream_pool_deframes_chunks_and_survives_stale_connections():
    async def serve(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            path = head.split(b" ")[1]
            if path == b"/chunked":
                payload = [bytes([65 + i % 26]) * (1 + (i * 37) % 200) for i in range(40)]
                wire = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in payload) + b"0\r\n\r\n"
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(0, len(wire), 7):  # dribble the answer in 7-byte pieces
                    writer.write(wire[i:i + 7])
                    await writer.drain()
                    if i % 3 == 0:
                        await asyncio.sleep(0)
                serve.want = b"".join(payload)
            elif path == b"/len":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
            elif path == b"/slow":
                await asyncio.sleep(1.0)
            elif path == b"/bye":  # answer, then close the kept-alive connection (an idle timeout)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
                writer.close()
                return
            await writer.drain()

    async def run():
        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        o = Origin(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}")
        pool = Pool()
        for _ in range(5):
            r = await pool.request("GET", o, "/chunked", timeout=5)
            assert b"".join([x async for x in r.aiter_raw()]) == serve.want
            r = await pool.request("GET", o, "/len", timeout=5)
            assert await r.read() == b"hello"
        assert sum(len(q) for q in pool._idle.values()) == 1  # one connection did it all
        r = await pool.request("GET", o, "/bye", timeout=5)
        assert await r.read() == b"ok"
        await asyncio.sleep(0.05)
        r = await pool.request("GET", o, "/len", timeout=5)  # the pooled connection is dead: a new one is used
        assert await r.read() == b"hello"
        with pytest.raises(UpstreamError) as e:
            await pool.request("GET", o, "/slow", timeout=0.2)
        assert e.value.kind == "timeout"
        with pytest.raises(UpstreamError) as e:
            await pool.request("GET", Origin("http://127.0.0.1:1"), "/", timeout=1)
        assert e.value.kind == "connect"
        await pool.aclose()
        srv.close()

    asyncio.run(run())


# ================================================================================================ live services
def engine(local: LocalStack, *extra: str) -> Service:
    return local.start("engine", "block.engine", ["--time-scale", str(SCALE), "--tokenizer", "none",
                                                  "--num-blocks", "1000", *extra], wait=False)


def predictor(local: LocalStack, engine_url: str) -> Service:
    return local.start("predictor", "block.predictor", ["--engine-url", engine_url, "--state-source", "engine",
                                                        "--state-interval-s", "0", "--tokenizer", "none",
                                                        "--token", PTOKEN], wait=False)


def scheduler(stack: dict, instances, *extra: str, log_file=None, token: bool = True, wait: bool = True) -> Service:
    """A scheduler in the ``stack`` fixture's LocalStack (with the predictors' token unless ``token=False``)."""
    args = ["--instances", ",".join(instances), *(["--upstream-token", PTOKEN] if token else []),
            "--tokenizer", "none", *extra]
    if log_file:
        args += ["--log-file", str(log_file)]
    s = stack["local"].start("scheduler", "block.scheduler", args, wait=False)
    return s.wait_healthy() if wait else s


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Three instances: engine i (instance 1 holds 2 running requests at most) behind predictor i."""
    with LocalStack(tmp_path_factory.mktemp("services"), env=dict.fromkeys(TOKEN_VARS),
                    startup_timeout_s=90) as local:
        engines = [engine(local), engine(local, "--max-num-seqs", "2"), engine(local)]
        for e in engines:
            e.wait_healthy()
        preds = [predictor(local, e.url) for e in engines]
        for p in preds:
            p.wait_healthy()
        yield {"local": local, "engines": engines, "predictors": preds, "urls": [p.url for p in preds]}


def body(n_prompt=20, out=8, stream=False, **kw):
    b = {"prompt": [7] * n_prompt, "max_tokens": out, "stream": stream, **kw}
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


def sse(r) -> list:
    out = []
    for line in r.iter_lines():
        if line.startswith("data: "):
            p = line[6:]
            out.append(p if p == "[DONE]" else json.loads(p))
    return out


def metrics(url, **kw) -> dict:
    r = httpx.get(url + "/metrics", timeout=5, **kw)
    assert r.status_code == 200
    return parse_prometheus(r.text)


def log_rows(path) -> list:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def wait_idle(engine_url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = httpx.get(engine_url + "/state", timeout=5).json()
        if not st["running"] and not st["waiting"]:
            return
        time.sleep(0.05)
    raise AssertionError("engine did not go idle")


def test_streaming_and_non_streaming_through_the_scheduler(stack, tmp_path):
    log = tmp_path / "sched.jsonl"
    s = scheduler(stack, stack["urls"], "--policy", "block", "--k", "2", log_file=log)
    try:
        assert "\nlistening on http://127.0.0.1:" in "\n" + s.log_path.read_text()  # loopback unless --host says so
        c = httpx.Client(base_url=s.url, timeout=30)
        r = c.post("/v1/completions", json=body(out=5), headers={"x-expected-output-tokens": "5"})
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["object"] == "text_completion" and j["usage"]["completion_tokens"] == 5
        assert len(j["choices"][0]["text"].split()) == 5
        h = r.headers
        assert int(h["x-block-instance"]) in (0, 1, 2) and h["x-block-retries"] == "0"
        assert float(h["x-block-predicted-e2e-s"]) > 0
        assert float(h["x-block-decision-ms"]) >= float(h["x-block-probe-ms"]) > 0

        with c.stream("POST", "/v1/completions", json=body(out=6, stream=True)) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert "x-block-instance" in r.headers
            ev = sse(r)
        assert ev[-1] == "[DONE]" and ev[-2]["usage"]["completion_tokens"] == 6
        assert sum(1 for e in ev[:-1] if e["choices"] and e["choices"][0]["text"]) == 6

        chat = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}, "expected_output_tokens": 4}
        with c.stream("POST", "/v1/chat/completions", json=chat) as r:
            assert r.status_code == 200
            ev = sse(r)
        assert ev[0]["choices"][0]["delta"]["role"] == "assistant" and ev[-2]["usage"]["completion_tokens"] == 4
        r = c.post("/v1/chat/completions", json={**chat, "stream": False, "stream_options": None})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"

        r = c.get("/v1/models")
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "meta-llama/Llama-2-7b-hf"
        m = metrics(s.url)
        assert get_value(m, "block_scheduler_requests_total", {"status": "ok"}) == 4
        assert get_value(m, "block_scheduler_routed_total") == 4
        rows = log_rows(log)
        assert len(rows) == 4 and all(x["status"] == "ok" for x in rows)
        for x in rows:
            for key in ("id", "arrival_s", "instance", "predicted_e2e_s", "probe_ms", "decision_ms", "retries",
                        "fallback", "status"):
                assert key in x
        assert rows[0]["told_tokens"] == 5 and rows[0]["hint"] == 5

        # the benchmark client through the scheduler records its headers (time scale: the engines')
        from block.benchmark import BenchmarkConfig, benchmark

        reqs = [Request(i, 0.02 * i, 30 + i, 5 + i) for i in range(4)]
        res = asyncio.run(benchmark(BenchmarkConfig(base_url=s.url, hint="oracle", time_scale=SCALE,
                                                    disable_tqdm=True), requests=reqs))
        df = res.requests
        assert (df["status"] == "ok").all() and df["instance"].isin([0, 1, 2]).all()
        assert (df["predicted_e2e_s"] > 0).all() and (df["decision_ms"] > 0).all() and (df["retries"] == 0).all()
        assert (df["output_tokens"] == [5, 6, 7, 8]).all()
        rows = log_rows(log)
        assert {x["id"] for x in rows[-4:]} == {f"bench-0-{i}" for i in range(4)}  # the client's request ids
    finally:
        s.stop()


def _hold(url: str, prompt: int, out: int, started: threading.Event, done: list, stop: threading.Event) -> None:
    """A long streaming request sent straight to an instance (keeps it loaded until it ends or ``stop``)."""
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/completions", json=body(prompt, out, stream=True),
                      headers={"authorization": f"Bearer {PTOKEN}", "x-expected-output-tokens": str(out)}) as r:
            for _ in r.iter_lines():
                started.set()
                if stop.is_set():
                    return  # closing the stream aborts the request in the engine
    done.append(True)


def test_the_policy_decides_block_avoids_the_loaded_instance_and_round_robin_alternates(stack):
    urls = stack["urls"]
    scheds = [scheduler(stack, urls, "--policy", *policy, wait=False)
              for policy in (("block", "--k", "all"), ("least_requests",), ("round_robin",))]
    stop = threading.Event()
    threads: list = []
    try:
        s, lr, rr = (x.wait_healthy() for x in scheds)
        started, done = threading.Event(), []
        threads = [threading.Thread(target=_hold, args=(urls[1], 500, 3000, started, done, stop), daemon=True)
                   for _ in range(3)]  # two run, one waits on instance 1 (max-num-seqs 2)
        for t in threads:
            t.start()
        assert started.wait(60)
        # all three held requests are in instance 1's engine (two run, one waits) before the first decision
        _wait_for(lambda: len([x for k in ("running", "waiting") for x in httpx.get(
            stack["engines"][1].url + "/state", timeout=30).json()[k]]) == 3, what="the load on instance 1")
        picks = []
        with httpx.Client(timeout=30) as c:
            for _ in range(4):
                r = c.post(s.url + "/v1/completions", json=body(200, 20), headers={"x-expected-output-tokens": "20"})
                assert r.status_code == 200
                picks.append(int(r.headers["x-block-instance"]))
                # what the policy saw: the loaded instance predicts far later than the chosen one
                pred = c.post(urls[1] + "/predict", json={"prompt_tokens": 200, "expected_output_tokens": 20},
                              headers={"authorization": f"Bearer {PTOKEN}"}).json()
                assert pred["e2e_s"] > float(r.headers["x-block-predicted-e2e-s"])
            lr_picks = [int(c.post(lr.url + "/v1/completions", json=body()).headers["x-block-instance"])
                        for _ in range(3)]
            assert not done  # the load was there throughout
            assert 1 not in picks, picks
            assert 1 not in lr_picks, lr_picks
            rr_picks = [int(c.post(rr.url + "/v1/completions", json=body()).headers["x-block-instance"])
                        for _ in range(6)]
            assert rr_picks == [0, 1, 2, 0, 1, 2]
    finally:
        stop.set()
        for x in scheds:
            x.stop()
    for t in threads:
        t.join(30)
    wait_idle(stack["engines"][1].url)


def test_hostile_input_gets_4xx_json_and_the_service_stays_up(stack):
    s = scheduler(stack, stack["urls"][:1], "--policy", "round_robin")
    try:
        c = httpx.Client(base_url=s.url, timeout=30)
        cases = [
            (b"{not json", 400), (b"[1, 2]", 400), (b"", 400), (b'{"max_tokens": 5}', 400),
            (b'{"prompt": {"a": 1}}', 400), (b'{"prompt": [1, null]}', 400),
            (b'{"prompt": [1], "max_tokens": -1}', 400),
            (b'{"prompt": [1], "max_tokens": 9999999}', 400),  # the engine's verdict, relayed
            (b'{"prompt": [1], "stream": 3}', 400), (b'{"prompt": [1], "model": "nope"}', 404),
            (b"\xff\xfe\x00garbage", 400), (b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}', 413),
        ]
        for raw, want in cases:
            r = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == want, (raw[:40], r.status_code, r.text[:200])
            assert "message" in r.json()["error"]
        r = c.post("/v1/completions", json=body(), headers={"x-expected-output-tokens": "many"})
        assert r.status_code == 400 and "expected_output_tokens" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": 1}]})
        assert r.status_code == 400
        assert c.get("/v1/completions").status_code == 405
        assert c.get("/nope").status_code == 404
        assert c.get("/health").json()["status"] == "ok"
        assert c.post("/v1/completions", json=body()).status_code == 200
        m = metrics(s.url)
        assert get_value(m, "block_scheduler_requests_total", {"status": "client_error"}) >= 11
    finally:
        s.stop()


def test_bearer_token_is_enforced(stack):
    s = scheduler(stack, stack["urls"][:1], "--policy", "random", "--token", "s3cret")
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        for hdr in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = httpx.post(s.url + "/v1/completions", json=body(), headers=hdr)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(s.url + "/metrics").status_code == 401
        r = httpx.post(s.url + "/v1/completions", json=body(), headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200
    finally:
        s.stop()
    # a scheduler without the predictors' token: probes are refused (fallback), the forward's 401 is relayed
    s = scheduler(stack, stack["urls"][:1], token=False)
    try:
        r = httpx.post(s.url + "/v1/completions", json=body())
        assert r.status_code == 401 and r.headers["x-block-fallback"] == "1"
    finally:
        s.stop()


def test_a_killed_or_stuck_predictor_is_left_out_and_the_fallback_counted(stack, tmp_path):
    urls = stack["urls"]
    log = tmp_path / "log.jsonl"
    victim = stack["predictors"][2]
    s = scheduler(stack, [urls[0], urls[2]], "--policy", "block", "--k", "1", "--probe-timeout-ms", "300",
                  "--down-cooldown-s", "0", log_file=log)
    try:
        c = httpx.Client(base_url=s.url, timeout=30)
        assert all(c.post("/v1/completions", json=body()).status_code == 200 for _ in range(4))
        victim.proc.send_signal(signal.SIGSTOP)  # stuck: accepts connections, never answers
        try:
            stuck = [c.post("/v1/completions", json=body(stream=True)) for _ in range(6)]
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        victim.stop(signal.SIGKILL)  # then gone
        dead = [c.post("/v1/completions", json=body()) for _ in range(8)]
        for r in stuck + dead:
            assert r.status_code == 200 and r.headers["x-block-instance"] == "0", r.text
        assert all(x.text.rstrip().endswith("data: [DONE]") for x in stuck)
        fb = get_value(metrics(s.url), "block_scheduler_fallbacks_total")
        rows = log_rows(log)
        assert len(rows) == 18 and all(x["status"] == "ok" for x in rows)
        assert fb >= 2 and fb == sum(1 for x in rows if x["fallback"])
        assert get_value(metrics(s.url), "block_scheduler_probe_failures_total", {"instance": "1"}) == fb
    finally:
        s.stop()


def _metric(url: str, name: str, **labels) -> float:
    return get_value(parse_prometheus(httpx.get(url + "/metrics", timeout=5).text), name, labels or None) or 0.0


def _wait_for(fn, timeout: float = 120.0, what: str = "condition"):
    """Poll ``fn`` until it returns something truthy (a generous deadline: a busy machine is slow, never wrong)."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_non_streaming_client_that_disconnects_aborts_its_request(stack, tmp_path):
    """A non-streaming client leaves while its request runs: the scheduler closes the upstream request, the
    predictor and the engine abort it (the engine counts an abort, it goes idle long before 3000 tokens), and the
    log row says the client went away."""
    import socket

    log = tmp_path / "log.jsonl"
    eng = stack["engines"][0]
    s = scheduler(stack, stack["urls"][:1], "--policy", "round_robin", log_file=log)
    try:
        wait_idle(eng.url)
        aborts = _metric(eng.url, "vllm:request_success_total", finished_reason="abort")
        raw = json.dumps(body(20, 3000)).encode()
        port = int(s.url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
        _wait_for(lambda: httpx.get(eng.url + "/state", timeout=5).json()["running"], what="the request to run")
        sock.close()
        _wait_for(lambda: _metric(eng.url, "vllm:request_success_total", finished_reason="abort") == aborts + 1,
                  what="the engine to abort the request")
        wait_idle(eng.url)
        rows = _wait_for(lambda: log_rows(log), what="the log row")
        assert len(rows) == 1 and rows[0]["status"] == "client_disconnected" and rows[0]["http_status"] == 499
        assert _metric(s.url, "block_scheduler_requests_in_flight") == 0
    finally:
        s.stop()


def test_misbehaving_engines_no_silent_loss_and_client_errors_once(stack, tmp_path):
    """Instances in front of tests/fake_engine.py. An engine that ends its answer without finish_reason/[DONE]
    before the first token: retried elsewhere (never a 200 with an empty text). After the first token: the client
    gets the error (non-streamed: 502 engine_failed; streamed: error event, then [DONE]) and the row says
    stream_error. vLLM's in-stream 400: answered as that 400 once, without retries (row client_error)."""
    from fake_engine import CLIENT_ERROR, FakeEngine

    log = tmp_path / "log.jsonl"
    local = stack["local"]
    with FakeEngine("role_close") as bad, FakeEngine("good") as good:
        preds = [local.start("predictor", "block.predictor", ["--engine-url", e.url, "--tokenizer", "none",
                                                              "--metrics-interval-s", "0.1", "--token", PTOKEN],
                             wait=False) for e in (bad, good)]
        try:
            for p in preds:
                p.wait_healthy()
            s = scheduler(stack, [p.url for p in preds], "--policy", "round_robin", log_file=log)
            c = httpx.Client(base_url=s.url, timeout=30)
            for stream in (False, True):  # one lands on the bad instance and is retried on the good one
                rs = [c.post("/v1/completions", json=body(4, 3, stream=stream)) for _ in range(2)]
                for r in rs:
                    assert r.status_code == 200, r.text
                    text = r.json()["choices"][0]["text"] if not stream else \
                        "".join(e["choices"][0]["text"] for e in sse(r) if isinstance(e, dict) and e["choices"])
                    assert text == " t1 t2 t3" and r.headers["x-block-instance"] == "1"
                assert sorted(int(r.headers["x-block-retries"]) for r in rs) == [0, 1]
            n_bad, n_good = len(bad.bodies), len(good.bodies)
            for stream in (False, True):
                r = c.post("/v1/completions", json={"prompt": "mode:client_error", "max_tokens": 3, "stream": stream})
                assert r.status_code == 400 and r.json() == {"error": CLIENT_ERROR}, r.text
                assert r.headers["x-block-retries"] == "0"
            assert len(bad.bodies) + len(good.bodies) == n_bad + n_good + 2  # each sent once
            with c.stream("POST", "/v1/completions", json={"prompt": "mode:token_then_client_error", "max_tokens": 3,
                                                           "stream": True}) as r:
                ev = sse(r)
            assert ev[1] == {"error": CLIENT_ERROR} and ev[-1] == "[DONE]"
            r = c.post("/v1/completions", json={"prompt": "mode:tokens_close", "max_tokens": 3})
            assert r.status_code == 502 and r.json()["error"]["type"] == "engine_failed", r.text
            assert r.headers["x-block-retries"] == "0"
            with c.stream("POST", "/v1/completions", json={"prompt": "mode:tokens_close", "max_tokens": 3,
                                                           "stream": True}) as r:
                ev = sse(r)
            assert [e["choices"][0]["text"] for e in ev[:2]] == [" t1", " t2"]
            assert "error" in ev[-2] and ev[-1] == "[DONE]"
            rows = log_rows(log)
            assert [x["status"] for x in rows] == ["ok"] * 4 + ["client_error"] * 3 + ["stream_error"] * 2
            assert [x["http_status"] for x in rows[4:7]] == [400, 400, 200] and rows[7]["http_status"] == 502
            assert sum(x["retries"] for x in rows) == 2
            m = metrics(s.url)
            assert get_value(m, "block_scheduler_stream_errors_total") == 2
            assert get_value(m, "block_scheduler_requests_total", {"status": "ok"}) == 4
            s.stop()
        finally:
            for p in preds:
                p.stop()


def _instance(stack: dict, *engine_args: str, port: int = 0) -> tuple[Service, Service]:
    """An engine (on ``port``; 0 = any) and a predictor in front of it, owned by one test."""
    local = stack["local"]
    e = local.start("engine", "block.engine", ["--tokenizer", "none", "--num-blocks", "1000", *engine_args],
                    port=port, wait=False)
    e.wait_healthy()
    p = predictor(local, e.url)
    return e, p.wait_healthy()


def test_an_instance_whose_engine_is_down_is_left_out_until_it_is_back(stack, tmp_path):
    """Its engine killed, a predictor says so (/health: engine_down; /predict: 503 engine_down) and the scheduler
    leaves the instance out when probing: no request is forwarded to it (zero first-attempt failures), even though
    the other instance is loaded. Restarted on the same port, it is probed and chosen again."""
    from block.ports import free_port

    log = tmp_path / "log.jsonl"
    port = free_port()
    args = ("--time-scale", str(SCALE))
    eng, pred = _instance(stack, *args, port=port)
    s = scheduler(stack, [stack["urls"][0], pred.url], "--policy", "block", "--k", "all", log_file=log)
    stop = threading.Event()
    holds: list = []

    def load_instance_0() -> None:
        """A long stream on instance 0: the what-if prefers instance 1 whenever it is a candidate."""
        started = threading.Event()
        th = threading.Thread(target=_hold, args=(stack["urls"][0], 500, 3000, started, [], stop), daemon=True)
        th.start()
        holds.append(th)
        assert started.wait(60)

    try:
        c = httpx.Client(base_url=s.url, timeout=30)
        eng.stop(signal.SIGKILL)
        health = lambda: httpx.get(pred.url + "/health", timeout=5).json()  # noqa: E731
        _wait_for(lambda: health()["engine_down"], what="the predictor to report its engine down")
        assert health()["available"] is False
        r = httpx.post(pred.url + "/predict", json={"prompt_tokens": 20, "expected_output_tokens": 8},
                       headers={"authorization": f"Bearer {PTOKEN}"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "engine_down"
        load_instance_0()
        rs = [c.post("/v1/completions", json=body()) for _ in range(10)]
        assert all(r.status_code == 200 and r.headers["x-block-instance"] == "0" for r in rs), [r.text for r in rs]
        m = metrics(s.url)
        assert get_value(m, "block_scheduler_upstream_failures_total", {"instance": "1"}) == 0
        assert get_value(m, "block_scheduler_retries_total") == 0
        assert all(x["retries"] == 0 and 1 not in x["answered"] for x in log_rows(log))
        stop.set()
        for th in holds:
            th.join(60)
        stop.clear()
        # back: the same engine on the same port
        eng2 = stack["local"].start("engine", "block.engine", ["--tokenizer", "none", "--num-blocks", "1000", *args],
                                    port=port, wait=False)
        eng2.wait_healthy()
        _wait_for(lambda: health()["available"], what="the predictor to see its engine again")
        _wait_for(lambda: httpx.get(s.url + "/instances", timeout=5).json()["instances"][1]["down_for_s"] == 0,
                  what="the scheduler's down mark to expire")
        load_instance_0()
        r = c.post("/v1/completions", json=body())
        assert r.status_code == 200 and r.headers["x-block-instance"] == "1" and r.headers["x-block-retries"] == "0"
        assert 1 in log_rows(log)[-1]["answered"]
    finally:
        stop.set()
        s.stop()
        for th in holds:
            th.join(60)


def test_a_killed_engine_requests_without_a_token_are_retried_and_none_is_lost(stack, tmp_path):
    """Instance 1 (a slow engine: two running at most, 1000 tokens take minutes) gets half of 8 long streams; its
    engine dies once two of them stream (their clients have a token) and two wait. The waiting two are retried on
    instance 0 and complete; the two that streamed end with an error event and [DONE]; every request has its row.
    Driven by observed state only (no race with the machine's speed)."""
    urls = stack["urls"]
    log = tmp_path / "log.jsonl"
    slow, slow_pred = _instance(stack, "--time-scale", "0.2", "--max-num-seqs", "2")
    s = scheduler(stack, [urls[0], slow_pred.url], "--policy", "round_robin", "--max-retries", "2", log_file=log)
    out = 1000
    results: list = [None] * 8
    instance_of: list = [None] * 8
    streaming = [threading.Event() for _ in range(8)]

    def client(k: int) -> None:
        try:
            with httpx.Client(timeout=300) as c:
                with c.stream("POST", s.url + "/v1/completions", json=body(100, out, stream=True)) as r:
                    if r.status_code != 200:
                        results[k] = ("http", r.status_code, r.read())
                        return
                    instance_of[k] = r.headers["x-block-instance"]
                    ev = []
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            p = line[6:]
                            ev.append(p if p == "[DONE]" else json.loads(p))
                            streaming[k].set()
                    results[k] = ("stream", r.headers["x-block-instance"], int(r.headers["x-block-retries"]), ev)
        except Exception as err:  # noqa: BLE001
            results[k] = ("exception", repr(err))
        finally:
            streaming[k].set()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(8)]
    try:
        for t in threads:
            t.start()

        def ready() -> bool:
            st = httpx.get(slow.url + "/state", timeout=5).json()
            on_slow = [k for k in range(8) if instance_of[k] == "1" and streaming[k].is_set()]
            return len(st["running"]) == 2 and len(st["waiting"]) == 2 and len(on_slow) == 2

        _wait_for(ready, what="two streams running and two requests waiting on instance 1")
        slow.stop(signal.SIGKILL)
        for t in threads:
            t.join(300)
        assert all(r is not None and r[0] == "stream" for r in results), [r and r[:3] for r in results]
        after = [httpx.post(s.url + "/v1/completions", json=body(), timeout=30) for _ in range(4)]
        assert all(r.status_code == 200 and r.headers["x-block-instance"] == "0" for r in after)
        ok = [r for r in results if r[3][-1] == "[DONE]" and r[3][-2].get("usage")
              and r[3][-2]["usage"]["completion_tokens"] == out]
        failed = [r for r in results if r not in ok]
        assert len(ok) == 6 and len(failed) == 2
        for r in failed:  # a clear error (an SSE error event, then [DONE]), never a silently cut stream
            assert r[1] == "1" and "error" in r[3][-2] and r[3][-1] == "[DONE]", r[3][-3:]
        retried = [r for r in ok if r[2] > 0]
        assert len(retried) == 2 and all(r[1] == "0" and r[2] == 1 for r in retried)  # the waiting ones
        rows = log_rows(log)
        assert len(rows) == 12  # every request has its row
        statuses = [x["status"] for x in rows]
        assert statuses.count("ok") == 10 and statuses.count("stream_error") == 2
        m = metrics(s.url)
        assert get_value(m, "block_scheduler_retries_total") == sum(x["retries"] for x in rows) >= 2
        assert get_value(m, "block_scheduler_stream_errors_total") == 2
        assert get_value(m, "block_scheduler_requests_in_flight") == 0
    finally:
        s.stop()
        slow_pred.stop()
