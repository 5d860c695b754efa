"""The emulated engine as a real server on loopback: OpenAI/vLLM formats, metrics, state, timing, robustness."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from block.prom import (
    Counter,
    Histogram,
    PromParseError,
    Registry,
    VllmLoad,
    get_histogram,
    get_value,
    parse_prometheus,
)
from experiments.local_stack import TOKEN_VARS, LocalStack, Service

ROOT = Path(__file__).resolve().parents[1]
MODEL = "meta-llama/Llama-2-7b-hf"
SCALE = 10.0


def start_engine(stack: LocalStack, *args: str, port: int = 0) -> Service:
    """``python -m block.engine`` in ``stack``, healthy; ``port=0`` lets it pick one (read from its "listening on"
    line).

    The timing tests pass an explicit free port: with ``--port 0`` ``block.service.serve`` binds the socket itself,
    with proto 0, so asyncio does not set TCP_NODELAY on accepted connections and Nagle + delayed ACKs hold a
    stream's first chunk on a kept-alive connection for up to 40 ms.
    """
    return stack.start("engine", "block.engine", args, port=port).wait_healthy()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from block.ports import free_port

    with LocalStack(tmp_path_factory.mktemp("engine"), env=dict.fromkeys(TOKEN_VARS)) as stack:
        s = start_engine(stack, "--time-scale", str(SCALE), "--max-num-seqs", "2", "--tokenizer", "none", "--seed",
                         "3", port=free_port())
        yield s
    assert s.proc.returncode is not None


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def sse_events(lines) -> list:
    """The JSON payloads of an SSE stream (``"[DONE]"`` kept as a string)."""
    out = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def stream(client: httpx.Client, path: str, body: dict) -> list:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def metrics(client: httpx.Client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_prometheus(r.text)


def wait_idle(client: httpx.Client, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = client.get("/state").json()
        if not st["running"] and not st["waiting"]:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------ formats
def test_completions_stream_format(client):
    n = 7
    ev = stream(client, "/v1/completions", {"model": MODEL, "prompt": list(range(1, 41)), "max_tokens": n,
                                                    "stream": True, "ignore_eos": True,
                                                    "stream_options": {"include_usage": True}})
    assert ev[-1] == "[DONE]"
    usage_chunk = ev[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["object"] == "text_completion"
    assert usage_chunk["usage"] == {"prompt_tokens": 40, "completion_tokens": n, "total_tokens": 40 + n,
                                    "prompt_tokens_details": None}
    text_chunks = [e for e in ev[:-2] if e["choices"] and e["choices"][0]["text"]]
    assert len(text_chunks) == len(ev) - 2 == n == usage_chunk["usage"]["completion_tokens"]
    for i, c in enumerate(text_chunks):
        assert c["id"].startswith("cmpl-") and c["id"] == usage_chunk["id"]
        assert c["object"] == "text_completion" and c["model"] == MODEL and isinstance(c["created"], int)
        ch = c["choices"][0]
        assert set(ch) == {"index", "text", "logprobs", "finish_reason", "stop_reason"}
        assert ch["index"] == 0 and ch["logprobs"] is None and ch["stop_reason"] is None
        assert ch["finish_reason"] == ("length" if i == n - 1 else None)
        assert c["usage"] is None
        assert ch["text"].startswith(" ") and " " not in ch["text"][1:]  # one word per token


def test_chat_stream_format(client):
    n = 5
    ev = stream(client, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": n, "stream": True,
        "stream_options": {"include_usage": True}})
    assert ev[-1] == "[DONE]"
    first = ev[0]
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = ev[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == n
    content = [e for e in ev[1:-2] if e["choices"][0]["delta"].get("content")]
    assert len(content) == len(ev) - 3 == n
    assert [e["choices"][0]["finish_reason"] for e in content] == [None] * (n - 1) + ["length"]
    # chat prompt count: contents (fallback: ceil(bytes / 4)) + 4 per message + 3
    assert usage["usage"]["prompt_tokens"] == 3 + 4 + 3
    # without include_usage: no usage chunk, still [DONE]
    ev = stream(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                         "max_tokens": 2, "stream": True})
    assert ev[-1] == "[DONE]" and all(e["choices"] for e in ev[:-1]) and len(ev) == 4


def test_non_streaming_shapes(client):
    c = client
    r = c.post("/v1/completions", json={"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 6})
    assert r.status_code == 200
    d = r.json()
    assert d["object"] == "text_completion" and d["id"].startswith("cmpl-") and d["model"] == MODEL
    ch = d["choices"][0]
    assert ch["finish_reason"] == "length" and ch["logprobs"] is None and ch["index"] == 0
    assert len(ch["text"].split()) == 6
    assert d["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11,  # 19 bytes / 4
                          "prompt_tokens_details": None}
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "be brief"},
                                                          {"role": "user", "content": [{"type": "text",
                                                                                        "text": "hi"}]}],
                                             "max_completion_tokens": 3, "seed": 11},
               headers={"x-request-id": "abc"})
    d = r.json()
    assert r.status_code == 200 and d["object"] == "chat.completion" and d["id"] == "chatcmpl-abc"
    assert d["choices"][0]["message"]["role"] == "assistant"
    assert len(d["choices"][0]["message"]["content"].split()) == 3 == d["usage"]["completion_tokens"]
    r2 = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "other"}],
                                              "max_tokens": 3, "seed": 11})
    assert r2.json()["choices"][0]["message"]["content"] == d["choices"][0]["message"]["content"]  # deterministic
    # no max_tokens: max_model_len - prompt, as vLLM -- too long to wait for here, so check the validation instead
    m = c.get("/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == MODEL and m["data"][0]["max_model_len"] == 4096
    assert m["data"][0]["object"] == "model" and m["data"][0]["owned_by"] == "vllm"


def test_metrics_names_and_prom_roundtrip(client):
    p = metrics(client)
    lab = {"model_name": MODEL}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_sum",
                 "vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_sum", "vllm:e2e_request_latency_seconds_count",
                 "vllm:cache_config_info"):
        assert get_value(p, name, lab) is not None, name
    assert get_value(p, "vllm:request_success_total", {**lab, "finished_reason": "length"}) is not None
    ttft = get_histogram(p, "vllm:time_to_first_token_seconds", lab)
    edges = [e for e, _ in ttft.buckets]
    assert edges[:4] == [0.001, 0.005, 0.01, 0.02] and edges[-2:] == [2560.0, float("inf")]
    e2e = get_histogram(p, "vllm:e2e_request_latency_seconds", lab)
    assert [e for e, _ in e2e.buckets][:3] == [0.3, 0.5, 0.8] and e2e.buckets[-1][1] == e2e.count
    info = p["vllm:cache_config_info"][0][0]
    total = client.get("/state").json()["total_blocks"]
    assert info["block_size"] == "16" and int(info["num_gpu_blocks"]) == total
    load = VllmLoad.from_metrics(client.get("/metrics").text, MODEL)
    assert load.num_gpu_blocks == total and load.block_size == 16 and load.kv_cache_usage is not None
    # our renderer and parser agree, including escapes, +Inf and the older vLLM gauge name
    reg = Registry()
    reg.gauge("vllm:gpu_cache_usage_perc", "old name", ("model_name",)).set(0.25, model_name='a"b\\c\nd')
    c = reg.counter("vllm:num_preemptions_total", "x", ("model_name",))
    c.inc(3, model_name="m")
    h = reg.histogram("h_seconds", "x", [0.1, 1.0])
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    q = parse_prometheus(reg.render() + "# EOF\n")
    assert q["vllm:gpu_cache_usage_perc"] == [({"model_name": 'a"b\\c\nd'}, 0.25)]
    assert get_value(q, "vllm:num_preemptions_total") == 3.0 and "vllm:num_preemptions" not in q
    hd = get_histogram(q, "h_seconds")
    assert hd.buckets == [(0.1, 1.0), (1.0, 2.0), (float("inf"), 3.0)] and hd.count == 3 and hd.sum == 5.55
    assert VllmLoad.from_metrics(q).kv_cache_usage == 0.25
    assert isinstance(Counter("a_total", "x").name, str) and Histogram("b", "x", [1]).buckets[-1] == float("inf")
    with pytest.raises(PromParseError):
        parse_prometheus('x{a="1} 2')


def test_state_consistent_with_metrics_and_concurrency(server, client):
    c = client
    before = metrics(c)
    gen0 = get_value(before, "vllm:generation_tokens_total")
    ok0 = get_value(before, "vllm:request_success_total", {"finished_reason": "length"})
    sizes = [(300, 120), (200, 120), (100, 60)]  # max_num_seqs=2: the third waits

    async def one(ac, prompt, out, first_token):
        got = 0
        async with ac.stream("POST", "/v1/completions", json={"prompt": [7] * prompt, "max_tokens": out,
                                                               "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    if json.loads(line[6:])["choices"]:
                        got += 1
                        first_token.set()
        return got

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as ac:
            ev = asyncio.Event()
            tasks = [asyncio.create_task(one(ac, p, o, ev)) for p, o in sizes]
            await ev.wait()
            await asyncio.sleep(0.05)
            st = (await ac.get("/state")).json()
            mt = parse_prometheus((await ac.get("/metrics")).text)
            return st, mt, await asyncio.gather(*tasks)

    st, mt, got = asyncio.run(main())
    assert got == [o for _, o in sizes]  # every concurrent request completes with all its tokens
    assert len(st["running"]) == get_value(mt, "vllm:num_requests_running") == 2
    assert len(st["waiting"]) == get_value(mt, "vllm:num_requests_waiting") == 1
    load = VllmLoad.from_metrics(mt)
    assert st["total_blocks"] == load.num_gpu_blocks
    assert abs(load.free_blocks - st["free_blocks"]) <= 2  # two scrapes a few decode steps apart
    assert st["busy_for_s"] >= 0 and st["config"]["max_num_seqs"] == 2 and st["time_scale"] == SCALE
    assert set(st["request_ids"].values()) and all(v.startswith("cmpl-") for v in st["request_ids"].values())
    for s in st["running"]:
        assert s["computed_tokens"] >= s["prompt_tokens"] and s["decoded_tokens"] >= 1
    st = wait_idle(c)
    after = metrics(c)
    assert st["free_blocks"] == st["total_blocks"] and get_value(after, "vllm:kv_cache_usage_perc") == 0.0
    assert get_value(after, "vllm:generation_tokens_total") - gen0 == sum(o for _, o in sizes)
    assert get_value(after, "vllm:request_success_total", {"finished_reason": "length"}) - ok0 == 3


def test_timing_follows_execution_model(client):
    from block.engine.config import build_setup
    from vidur.types import EngineConfig, InstanceState, Request
    from vidur.whatif import predict

    c = client
    cfg = EngineConfig.from_dict(wait_idle(c)["config"])
    em = build_setup().execution_model()
    prompt, out = 2500, 100
    pred = predict(InstanceState([], [], cfg.num_blocks, cfg.num_blocks, config=cfg), Request(0, 0.0, prompt, out), em)
    want_ttft, want_e2e = pred.ttft_s / SCALE, pred.e2e_s / SCALE
    wait_idle(c)
    t0 = time.perf_counter()
    ttft = None
    n = 0
    with c.stream("POST", "/v1/completions", json={"prompt": [5] * prompt, "max_tokens": out, "stream": True,
                                                    "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                n += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
                e2e = time.perf_counter() - t0
    assert n == out
    print(f"TTFT {ttft * 1e3:.1f} ms vs {want_ttft * 1e3:.1f} ms predicted; e2e {e2e * 1e3:.1f} ms vs "
          f"{want_e2e * 1e3:.1f} ms predicted (time scale {SCALE})")
    # deterministic: a step's tokens go out only once real time reached its modelled end, so the engine is never
    # faster than its model (a loaded machine only makes it slower; how close it comes is for benchmarks/)
    slack = 1e-4  # the loop's 2 us wake-up tolerance, and clock granularity
    assert ttft >= want_ttft - slack and e2e >= want_e2e - slack, (ttft, want_ttft, e2e, want_e2e)


# ------------------------------------------------------------------------------------------------ robustness
def test_hostile_input_gives_4xx_json(client):
    c = client
    cases = [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b"[1, 2]", 400),
        ("/v1/completions", b"", 400),
        ("/v1/completions", {"max_tokens": 5}, 400),  # no prompt
        ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10**30}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "lots"}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400),
        ("/v1/completions", {"prompt": [1] * 4096, "max_tokens": 1}, 400),  # prompt >= max_model_len
        ("/v1/completions", {"prompt": [1] * 4000, "max_tokens": 200}, 400),  # prompt + max_tokens > max_model_len
        ("/v1/completions", {"prompt": [], "max_tokens": 1}, 400),
        ("/v1/completions", {"prompt": [1, -2], "max_tokens": 1}, 400),
        ("/v1/completions", {"prompt": [1, 10**9], "max_tokens": 1}, 400),
        ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 1}, 400),
        ("/v1/completions", {"prompt": {"x": 1}, "max_tokens": 1}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "n": 2}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 9}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream": "often"}, 400),  # "yes" is True to vLLM
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream_options": {"include_usage": True}}, 400),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "expected_output_tokens": 0}, 400),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi", "max_tokens": 4}, 404),
        ("/v1/chat/completions", {"max_tokens": 4}, 400),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 4}, 400),
        ("/v1/chat/completions", {"messages": ["hi"], "max_tokens": 4}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}], "max_tokens": 4}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404),
    ]
    for path, body, status in cases:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = c.post(path, **kw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["code"] == status, (body, err)
    r = c.post("/v1/completions", json={"prompt": "x" * (5 * 1024 * 1024), "max_tokens": 1})
    assert r.status_code == 413 and "error" in r.json()
    r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers={"x-expected-output-tokens": "x"})
    assert r.status_code == 400
    r = c.get("/nope")
    assert r.status_code == 404 and "error" in r.json()
    assert c.get("/health").json()["status"] == "ok"
    r = c.post("/v1/completions", json={"prompt": [3] * 10, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_expected_hint_exported_and_disconnect_aborts(server, client):
    c = client
    wait_idle(c)
    m0 = metrics(c)
    ab0 = get_value(m0, "vllm:request_success_total", {"finished_reason": "abort"})
    with httpx.Client(base_url=server.url, timeout=30) as other:
        with other.stream("POST", "/v1/completions", json={"prompt": [9] * 64, "max_tokens": 2000, "stream": True},
                          headers={"x-expected-output-tokens": "77"}) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break
            st = c.get("/state").json()
            assert [s["expected_output_tokens"] for s in st["running"]] == [77]
            # leave without reading the rest: the client closes the connection
    st = wait_idle(c, timeout=5)
    assert st["free_blocks"] == st["total_blocks"]
    assert get_value(metrics(c), "vllm:request_success_total", {"finished_reason": "abort"}) == ab0 + 1
    r = c.post("/v1/completions", json={"prompt": [3] * 10, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_bearer_token_and_default_bind(tmp_path):
    from block.engine.cli import build_parser

    assert build_parser().parse_args([]).host == "127.0.0.1"
    with LocalStack(tmp_path, env=dict.fromkeys(TOKEN_VARS)) as stack:
        s = start_engine(stack, "--token", "s3cret", "--time-scale", "20", "--tokenizer", "none",
                         "--served-model-name", "emu")
        assert s.url.startswith("http://127.0.0.1:")
        c = s.client()
        assert c.get("/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/state"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == 401
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert r.status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=auth).json()["data"][0]["id"] == "emu"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.post("/v1/completions", json={"model": "emu", "prompt": "a", "max_tokens": 2}, headers=auth)
        assert r.status_code == 200 and r.json()["model"] == "emu"


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "block.engine", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for opt in ("--time-scale", "--model-config", "--engine", "--no-chunked-prefill", "--served-model-name",
                "--tokenizer", "--token"):
        assert opt in r.stdout


def test_token_counter_and_config():
    from block.engine.config import build_setup
    from block.engine.tokens import TokenCounter, filler_text

    fb = TokenCounter("none")
    assert fb.count_text("abcd") == 1 and fb.count_text("abcde") == 2 and fb.count_text("") == 1
    assert fb.count_chat(["abcd", ""]) == 1 + 2 * 4 + 3
    pytest.importorskip("tokenizers")
    tk = TokenCounter("llama2")
    assert tk.name == "llama2" and tk.count_text("hello world") == 3  # <s> hello world
    assert len(filler_text(5, 9).split()) == 9
    s = build_setup("llama2_7b", "a30", "vllm", max_num_seqs=8, chunked_prefill=True, chunk_size=256,
                    num_blocks=500)
    assert (s.engine.max_num_seqs, s.engine.chunked_prefill, s.engine.chunk_size, s.engine.num_blocks) == \
        (8, True, 256, 500)
    assert build_setup().engine.num_blocks == 1036
    with pytest.raises(ValueError, match="unknown model config"):
        build_setup("nope")


# ------------------------------------------------------------------------------------------------ in-process runner
def _run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


class SteppedClock:
    """A monotonic clock held still while the test places arrivals at exact times, then running in real time.

    Why: arrivals placed with ``asyncio.sleep`` land wherever the (loaded) machine wakes the test up, so whether the
    small KV cache forces a preemption was a race. Held still, the arrivals are exact model times; the stepping
    loop afterwards runs against real time (late or not, which is what the replay must survive)."""

    def __init__(self) -> None:
        self.held: float | None = 0.0
        self.offset = 0.0

    def __call__(self) -> float:
        return self.held if self.held is not None else time.monotonic() - self.offset

    def advance(self, dt: float) -> None:
        assert self.held is not None
        self.held += dt

    def release(self) -> None:
        assert self.held is not None
        self.offset, self.held = time.monotonic() - self.held, None


@pytest.mark.parametrize("chunked", [True, False])
def test_realtime_runner_replays_like_the_offline_engine(toy_model, chunked):
    """Stepping in real time (here 200x, often behind: the catch-up path) commits exactly the engine's steps:
    an offline engine fed the same arrivals finishes every request at the same model time; tokens are exact even
    across preemptions (a small KV cache forces them). The arrivals are placed on a held clock (no sleeps between
    submits: the loop has not run yet), so the preemptions do not depend on the machine's speed."""
    from block.engine.runner import RealTimeEngine
    from vidur.engine import Engine, Seq
    from vidur.types import EngineConfig

    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=512, chunked_prefill=chunked, chunk_size=128,
                       block_size=16, num_blocks=48, max_model_len=512)
    spec = [(200, 150, 0.0), (120, 200, 0.001), (300, 90, 0.0), (60, 250, 0.004), (250, 40, 0.002), (30, 5, 0.0)]

    async def main():
        clock = SteppedClock()
        rt = RealTimeEngine(cfg, toy_model, time_scale=200.0, clock=clock)
        hs = []
        for p, o, gap in spec:  # no await in between: the stepping loop starts after the last arrival
            hs.append(rt.submit(p, o))
            clock.advance(gap)
        clock.release()
        counts = []
        for h in hs:
            n = 0
            while True:
                k, reason = await h.queue.get()
                n += k
                if reason is not None:
                    break
            counts.append((n, reason))
        return rt, hs, counts

    rt, hs, counts = _run_async(main())
    assert counts == [(o, "length") for _, o, _ in spec]
    assert rt.engine.free == cfg.num_blocks and not rt.handles
    off = Engine(cfg, toy_model)
    ref = []
    for h in sorted(hs, key=lambda h: h.seq.arrival):
        off.sync(h.seq.arrival)
        ref.append((h, off.add(Seq(h.rid, h.prompt_tokens, h.max_tokens, h.seq.arrival), h.seq.arrival)))
    off.run_until_idle()
    assert off.num_preemptions == rt.engine.num_preemptions > 0
    for h, s in ref:
        assert h.seq.finish == pytest.approx(s.finish, rel=1e-9, abs=1e-9)
        assert h.seq.first_token == pytest.approx(s.first_token, rel=1e-9, abs=1e-9)


def test_runner_abort_frees_blocks(toy_model):
    from block.engine.runner import FINISH_ABORT, RealTimeEngine
    from vidur.types import EngineConfig

    cfg = EngineConfig(max_num_seqs=3, chunk_size=64, block_size=16, num_blocks=200, max_model_len=1024)

    async def main():
        rt = RealTimeEngine(cfg, toy_model, time_scale=20.0)
        dec = rt.submit(32, 400)
        pre = rt.submit(900, 10)  # 15 chunks of 64: still prefilling a few steps later
        other = rt.submit(32, 400)
        wait = rt.submit(32, 30)  # max_num_seqs=3: waits
        while dec.emitted < 2:
            await asyncio.sleep(0.001)
        assert dec.seq.in_decode and pre.seq in rt.engine.prefilling and wait.seq in rt.engine.waiting
        for h in (dec, pre, wait):
            assert rt.abort(h)
        assert not rt.abort(dec)  # twice is harmless
        await other.done.wait()
        return rt, (dec, pre, wait, other)

    rt, (dec, pre, wait, other) = _run_async(main())
    assert [h.finish_reason for h in (dec, pre, wait)] == [FINISH_ABORT] * 3
    assert other.finish_reason == "length" and other.emitted == 400
    assert rt.engine.free == cfg.num_blocks and not rt.engine.has_work() and rt.num_aborted == 3
