"""The services' edges, on a real stack on loopback (engine <- predictor <- scheduler): hostile JSON and headers are
4xx JSON (never a 500, never a lost log row), the engine and the scheduler refuse what vLLM refuses with the same
400, and slow clients cannot hold a service's sockets."""

from __future__ import annotations

import json
import selectors
import socket
import time
from pathlib import Path

import httpx
import pytest

from experiments.local_stack import TOKEN_VARS, LocalStack

DEADLINE_S = 2  # the stack's --header-timeout-s and --body-timeout-s (short: the slow-client test waits for them)
LIMIT_FLAGS = ["--header-timeout-s", str(DEADLINE_S), "--body-timeout-s", str(DEADLINE_S)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("edges")
    log = d / "requests.jsonl"
    with LocalStack(d, env=dict.fromkeys(TOKEN_VARS)) as local:
        eng = local.start("engine", "block.engine", ["--time-scale", "50", "--tokenizer", "none", "--num-blocks",
                                                     "1000", *LIMIT_FLAGS], wait=False)
        eng.wait_healthy()
        pred = local.start("predictor", "block.predictor", ["--engine-url", eng.url, "--state-source", "engine",
                                                            "--tokenizer", "none", "--debug-allow-state-injection",
                                                            *LIMIT_FLAGS]).wait_healthy()
        sched = local.start("scheduler", "block.scheduler", ["--instances", pred.url, "--policy", "round_robin",
                                                             "--tokenizer", "none", "--log-file", str(log),
                                                             *LIMIT_FLAGS]).wait_healthy()
        yield {"engine": eng, "predictor": pred, "scheduler": sched, "log": log}


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def wait_rows(path: Path, n: int, timeout_s: float = 60.0) -> list[dict]:
    """The log's rows once it has at least ``n`` (the scheduler writes a row when a request ends)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = rows(path)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def post(url: str, path: str, raw: bytes, **headers: str) -> httpx.Response:
    return httpx.post(url + path, content=raw, headers={"content-type": "application/json", **headers}, timeout=60)


def assert_json_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["code"] == status and err["type"], err
    return err


# ------------------------------------------------------------------------------------------ 1. hostile JSON
HOSTILE = {
    "5000-digit integer": b'{"prompt": "hi", "max_tokens": 2, "seed": ' + b"7" * 5000 + b"}",
    "nested 1000 deep": b'{"prompt": "hi", "max_tokens": 2, "x": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    "nested 300 deep (orjson reads, cannot write)": b'{"prompt": "hi", "max_tokens": 2, "x": ' + b"[" * 300
                                                    + b"]" * 300 + b"}",
    "lone surrogate in the prompt": b'{"prompt": "a\\udc80b", "max_tokens": 2}',
    "invalid UTF-8": b'{"prompt": "a\xff", "max_tokens": 2}',
}


@pytest.mark.parametrize("service", ["engine", "predictor", "scheduler"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_json_is_a_400_json_everywhere(stack, service, case):
    """One bounded JSON reader (block.service.loads_json) in all three services: before it, the engine answered
    500 text/plain (int digits, recursion, a surrogate reaching the tokenizer), the predictor 500 (orjson reads
    1024 levels but writes 255) and the scheduler 502 for that."""
    err = assert_json_error(post(stack[service].url, "/v1/completions", HOSTILE[case]), 400)
    assert "JSON" in err["message"], err


def test_predictor_own_endpoints_read_bounded_json(stack):
    url = stack["predictor"].url
    for raw in (HOSTILE["nested 1000 deep"], HOSTILE["5000-digit integer"]):
        assert_json_error(post(url, "/predict", raw), 400)
        assert_json_error(post(url, "/debug/state", raw), 400)
    assert_json_error(post(url, "/predict", b'{"prompt_tokens": 10, "expected_output_tokens": ' + b"9" * 30 + b"}"),
                      400)
    assert httpx.get(url + "/health", timeout=30).status_code == 200


def test_scheduler_huge_numbers_are_400_and_logged(stack):
    """``max_tokens: 1e300`` and a 23-digit hint header were 500s whose log row was lost (orjson cannot write the
    integer); now 400s, each with its row."""
    url, log = stack["scheduler"].url, stack["log"]
    n0 = len(rows(log))
    r1 = post(url, "/v1/completions", b'{"prompt": [1, 2, 3], "max_tokens": 1e300}', **{"x-request-id": "huge-mt"})
    assert "max_tokens" in assert_json_error(r1, 400)["message"]
    r2 = post(url, "/v1/completions", b'{"prompt": [1, 2, 3], "max_tokens": 3}',
              **{"x-expected-output-tokens": "99999999999999999999999", "x-request-id": "huge-hint"})
    assert "expected_output_tokens" in assert_json_error(r2, 400)["message"]
    got = {r["id"]: r for r in wait_rows(log, n0 + 2)[n0:]}
    assert got["huge-mt"]["status"] == got["huge-hint"]["status"] == "client_error"
    assert got["huge-mt"]["http_status"] == got["huge-hint"]["http_status"] == 400


def test_the_log_writer_never_drops_a_row(tmp_path):
    """A row JSON cannot carry is written with the bad values as their repr and status internal_error."""
    from block.policies import policy_from_config
    from block.scheduler.core import Scheduler, SchedulerConfig

    log = tmp_path / "log.jsonl"
    sched = Scheduler(SchedulerConfig(instances=["http://127.0.0.1:9"], policy=policy_from_config(
        {"name": "round_robin", "k": None}), log_file=str(log), tokenizer="none"))
    sched.metrics.n_inflight = 1
    sched.finish({"id": "r1", "hint": 10**30, "text": "a\udc80", 7: object()}, "ok", 200)
    sched.finish({"id": "r2", "hint": 5}, "ok", 200)
    got = rows(log)
    assert [r["id"] for r in got] == ["r1", "r2"]
    assert got[0]["status"] == "internal_error" and got[0]["logged_status"] == "ok"
    assert got[0]["hint"] == str(10**30) and "udc80" in got[0]["text"] and "hint" in got[0]["log_error"]
    assert got[1]["status"] == "ok" and got[1]["hint"] == 5


# ------------------------------------------------------------------------------------------ 2. vLLM's validation
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMP = {"prompt": [1, 2, 3], "max_tokens": 2}
REFUSED = [  # (path, body, a phrase of vLLM's message)
    ("/v1/completions", {**COMP, "n": 0}, "n must be at least 1"),
    ("/v1/completions", {**COMP, "n": 20000}, "n must be at most 16384"),
    ("/v1/completions", {**COMP, "temperature": -0.5}, "temperature must be non-negative"),
    ("/v1/completions", {**COMP, "temperature": 2.5}, "temperature must be in [0, 2]"),
    ("/v1/completions", {**COMP, "temperature": "hot"}, "Input should be a valid number"),
    ("/v1/completions", {**COMP, "top_p": 0}, "top_p must be in (0, 1]"),
    ("/v1/completions", {**COMP, "top_p": 1.5}, "top_p must be in (0, 1]"),
    ("/v1/completions", {**COMP, "top_k": -2}, "top_k must be 0 (disable), or at least 1"),
    ("/v1/completions", {**COMP, "top_k": 1.5}, "Input should be a valid integer"),
    ("/v1/completions", {**COMP, "min_p": 1.5}, "min_p must be in [0, 1]"),
    ("/v1/completions", {**COMP, "presence_penalty": 3}, "presence_penalty must be in [-2, 2]"),
    ("/v1/completions", {**COMP, "frequency_penalty": -2.5}, "frequency_penalty must be in [-2, 2]"),
    ("/v1/completions", {**COMP, "repetition_penalty": 0}, "repetition_penalty must be greater than zero"),
    ("/v1/completions", {**COMP, "max_tokens": 0}, "max_tokens must be at least 1"),
    ("/v1/completions", {**COMP, "max_tokens": 2.5}, "Input should be a valid integer"),
    ("/v1/completions", {**COMP, "max_tokens": 1e300}, "exceeded maximum size"),
    ("/v1/completions", {"prompt": [1] * 4000, "max_tokens": 200}, "maximum context length is 4096"),
    ("/v1/completions", {**COMP, "min_tokens": -1}, "min_tokens must be greater than or equal to 0"),
    ("/v1/completions", {**COMP, "min_tokens": 5}, "min_tokens must be less than or equal to max_tokens=2"),
    ("/v1/completions", {**COMP, "logprobs": -2}, "`logprobs` must be a positive value or -1"),
    ("/v1/completions", {**COMP, "logprobs": 21}, "greater than max allowed: 20"),
    ("/v1/completions", {**COMP, "logprobs": "all"}, "`logprobs` must be an integer"),
    ("/v1/completions", {**COMP, "prompt_logprobs": -3}, "`prompt_logprobs` must be a positive value or -1"),
    ("/v1/completions", {**COMP, "prompt_logprobs": 1, "stream": True}, "not available when `stream=True`"),
    ("/v1/completions", {**COMP, "seed": 2**63}, "less than or equal to 9223372036854775807"),
    ("/v1/completions", {**COMP, "stop": ["a", ""]}, "stop cannot contain an empty string"),
    ("/v1/completions", {**COMP, "stop": ["a", "b", "c", "d", "e"]}, "at most 4 items"),
    ("/v1/completions", {**COMP, "stop": 5}, "Input should be a valid string"),
    ("/v1/completions", {**COMP, "stop_token_ids": ["x"]}, "Input should be a valid integer"),
    ("/v1/completions", {**COMP, "stream": "often"}, "Input should be a valid boolean"),
    ("/v1/completions", {**COMP, "stream_options": {"include_usage": True}}, "only be defined when `stream=True`"),
    ("/v1/completions", {**COMP, "stream": True, "stream_options": {"include_usage": 7}}, "valid boolean"),
    ("/v1/completions", {**COMP, "stream": True, "stream_options": 3}, "valid dictionary"),
    ("/v1/completions", {**COMP, "ignore_eos": None}, "Input should be a valid boolean"),
    ("/v1/completions", {**COMP, "ignore_eos": "maybe"}, "Input should be a valid boolean"),
    ("/v1/completions", {"max_tokens": 2}, "Either prompt or prompt_embeds must be provided"),
    ("/v1/completions", {"prompt": "", "max_tokens": 2}, "Either prompt or prompt_embeds must be provided"),
    ("/v1/completions", {"prompt": {"a": 1}, "max_tokens": 2}, "validation errors"),
    ("/v1/completions", {"prompt": [1, -2], "max_tokens": 2}, "validation errors"),
    ("/v1/completions", {"prompt": [[1], ["a"]], "max_tokens": 2}, "validation errors"),
    ("/v1/chat/completions", {"max_tokens": 2}, "'loc': 'body.messages', 'msg': 'Field required'"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, "`logprobs` must be set to true"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 30}, "greater than max allowed: 20"),
    ("/v1/chat/completions", {**CHAT, "logprobs": "lots"}, "Input should be a valid boolean"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_tokens must be at least 1"),
    ("/v1/chat/completions", {**CHAT, "temperature": 9}, "temperature must be in [0, 2]"),
    ("/v1/chat/completions", {"messages": "hi", "max_tokens": 2}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}], "max_tokens": 2}, "role"),
]


@pytest.mark.parametrize("path,body,phrase", REFUSED, ids=[f"{p.rsplit('/', 1)[1]}-{i}"
                                                             for i, (p, _, _) in enumerate(REFUSED)])
def test_engine_and_scheduler_refuse_what_vllm_refuses_alike(stack, path, body, phrase):
    """The same 400 (message included) from the engine directly and through the scheduler, worded as vLLM's
    (block.openai_params); before it both accepted most of these (e.g. temperature 2.5 was a 200)."""
    raw = json.dumps(body).encode()
    e = assert_json_error(post(stack["engine"].url, path, raw), 400)
    s = assert_json_error(post(stack["scheduler"].url, path, raw), 400)
    assert phrase in e["message"], e["message"]
    assert s["message"] == e["message"]


ACCEPTED = [  # what vLLM's lax parsing accepts: the scheduler forwards the parsed values
    ("/v1/completions", {**COMP, "max_tokens": "3", "stream": "true", "stream_options": {"include_usage": "yes"},
                         "temperature": 0, "top_k": -1, "top_p": 1, "min_p": 0, "seed": -5, "stop": "x",
                         "stop_token_ids": [2], "logprobs": None, "ignore_eos": True, "n": 1}),
    ("/v1/completions", {"prompt": [[5, 6, 7]], "max_tokens": 3.0, "min_tokens": 3, "repetition_penalty": 1.2}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 9, "max_completion_tokens": 3, "logprobs": False,
                              "top_logprobs": 0, "stream": 1, "stream_options": {"include_usage": 1, "continuous_usage_stats": False}}),
]


@pytest.mark.parametrize("path,body", ACCEPTED, ids=["completions-lax", "completions-batch1", "chat"])
def test_what_vllm_accepts_is_served_through_the_scheduler(stack, path, body):
    r = post(stack["scheduler"].url, path, json.dumps(body).encode())
    assert r.status_code == 200, r.text[:300]
    if str(body.get("stream")) in ("true", "1"):
        events = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")]
        assert events[-1] == "[DONE]"
        usage = [json.loads(x)["usage"] for x in events[:-1] if json.loads(x).get("usage")]
        assert usage and usage[-1]["completion_tokens"] == 3
    else:
        assert r.json()["usage"]["completion_tokens"] == 3


# ------------------------------------------------------------------------------------------ 3. slow clients
def raw_exchange(url: str, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    host, port = url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("service", ["engine", "predictor", "scheduler"])
def test_unparseable_http_and_a_missing_header_are_json_errors(stack, service):
    """What uvicorn answers itself (a request it cannot parse: text/plain before) and the header deadline (the
    connection was held before) are JSON errors like every other."""
    url = stack[service].url
    out = raw_exchange(url, b"NOT HTTP AT ALL\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head, out
    assert json.loads(body)["error"]["code"] == 400
    out = raw_exchange(url, b"GET /health HTTP/1.1\r\nhost: x\r\n")  # never finished: closed after the deadline
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == 408, out


@pytest.mark.parametrize("service", ["engine", "scheduler"])
def test_slow_clients_are_dropped_and_health_stays_answered(stack, service):
    """200 connections that send half a header and 50 that trickle a chunked body one byte at a time: every one is
    closed by the server (the half headers with a 408) once its deadline passes, while /health is answered.
    Before the read deadlines they were held for as long as the client liked. No wall-clock race: the test waits
    (up to 120 s) for the closes, whenever they come."""
    url = stack[service].url
    host, port = url.rsplit("//", 1)[1].split(":")
    n0 = len(rows(stack["log"]))
    head = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    half = [socket.create_connection((host, int(port)), timeout=30) for _ in range(200)]
    trickle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(50)]
    sel = selectors.DefaultSelector()
    try:
        for s in half:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-le")
        for s in trickle:
            s.sendall(head + b"1\r\n{\r\n")
        for s in half + trickle:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        got: dict[socket.socket, bytes] = {s: b"" for s in half + trickle}
        open_ = set(got)
        health = 0
        deadline = time.monotonic() + 120
        while open_ and time.monotonic() < deadline:
            r = httpx.get(url + "/health", timeout=30)
            assert r.status_code == 200 and r.json()["status"] == "ok"
            health += 1
            for key, _ in sel.select(timeout=0.2):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:  # reset: closed too
                    data = b""
                if data:
                    got[s] += data
                else:
                    open_.discard(s)
                    sel.unregister(s)
            for s in trickle:
                if s in open_:
                    try:
                        s.send(b"1\r\n \r\n")
                    except OSError:  # the server closed it (reset, broken pipe); the read above will see it
                        pass
        assert not open_, f"{len(open_)} slow connections still open after 120 s"
        assert health >= 1
        assert all(got[s].startswith(b"HTTP/1.1 408") and b'"code":408' in got[s] for s in half), \
            {got[s][:80] for s in half}
        assert all(not got[s] or b" 408 " not in got[s][:20] for s in trickle)  # a body cut short: just closed
    finally:
        sel.close()
        for s in half + trickle:
            s.close()
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    r = post(url, "/v1/completions", b'{"prompt": [1, 2], "max_tokens": 2}')
    assert r.status_code == 200, r.text
    if service == "scheduler":  # the trickled requests are logged as disconnects, the finished one as ok
        new = wait_rows(stack["log"], n0 + 51)[n0:]
        assert sum(1 for x in new if x["status"] == "client_disconnected") == 50, [x["status"] for x in new]


# ------------------------------------------------------------------------------------------ against vLLM itself
MORE = [  # lax parsing, nulls and edges, beside the two tables above
    ("/v1/completions", {**COMP, "temperature": 3}), ("/v1/completions", {**COMP, "temperature": "1.5"}),
    ("/v1/completions", {**COMP, "n": "2"}), ("/v1/completions", {**COMP, "n": True}),
    ("/v1/completions", {**COMP, "seed": "12"}), ("/v1/completions", {**COMP, "top_k": "5"}),
    ("/v1/completions", {**COMP, "stop": None}), ("/v1/completions", {**COMP, "stop": []}),
    ("/v1/completions", {**COMP, "stream_options": {}}), ("/v1/completions", {**COMP, "stream": None}),
    ("/v1/completions", {**COMP, "logprobs": 5}), ("/v1/completions", {**COMP, "logprobs": True}),
    ("/v1/completions", {**COMP, "logprobs": 2.5}), ("/v1/completions", {**COMP, "prompt_logprobs": 0, "stream": True}),
    ("/v1/completions", {**COMP, "ignore_eos": "false"}), ("/v1/completions", {**COMP, "user": 5}),
    ("/v1/completions", {**COMP, "model": 5}), ("/v1/completions", {**COMP, "echo": "yes"}),
    ("/v1/completions", {**COMP, "presence_penalty": "x"}), ("/v1/completions", {**COMP, "repetition_penalty": -1}),
    ("/v1/completions", {**COMP, "top_p": "0.5"}), ("/v1/completions", {**COMP, "seed": -2**63}),
    ("/v1/completions", {**COMP, "seed": -2**63 - 1}), ("/v1/completions", {**COMP, "logit_bias": {"5": "x"}}),
    ("/v1/completions", {**COMP, "stop_token_ids": 5}), ("/v1/completions", {"prompt": ["a"], "max_tokens": 2}),
    ("/v1/completions", {"prompt": [1.5], "max_tokens": 2}), ("/v1/completions", {"prompt": None, "max_tokens": 2}),
    ("/v1/completions", {"prompt": "x", "max_tokens": None}),
    ("/v1/chat/completions", {**CHAT, "n": None}), ("/v1/chat/completions", {**CHAT, "logprobs": None}),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": None}), ("/v1/chat/completions", {**CHAT, "top_logprobs": -1}),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 5}),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": "3"}), ("/v1/chat/completions", {**CHAT, "echo": None}),
]
# where we differ from vLLM 0.32 on purpose: prompt + max_tokens > max_model_len is refused (vLLM <= 0.10's rule;
# 0.32 shortens max_tokens); a message's shape is worded by count_request_prompt
DIFFERENT = ({"prompt": [1] * 4000, "max_tokens": 200}, {"messages": [{"content": "x"}], "max_tokens": 2})


def test_the_same_verdicts_and_words_as_vllm():
    """Every case of the tables through vLLM's own request models, validation handler and sampling checks (runs
    where vLLM is installed: the ``vllm`` extra): the same verdict, and the same message where vLLM names one."""
    import subprocess

    from block.engine.vllm_install import default_venv, venv_bin
    from block.engine.tokens import PromptError, TokenCounter, count_request_prompt
    from block.openai_params import check_context, validate_request
    from block.service import ServiceError

    py = venv_bin(default_venv(), "python")
    if not py.is_file():
        pytest.skip("vLLM is not installed (python -m block.engine.vllm_install, or set BLOCK_VLLM_VENV)")

    def ours(path: str, body: dict):
        chat = "chat" in path
        try:
            r = validate_request(body, chat, 32000)
            check_context(r, count_request_prompt(TokenCounter("none"), body, chat), 4096)
        except ServiceError as e:
            return 400, e.message
        except PromptError as e:
            return 400, str(e)
        return 200, None

    cases = [(p, b) for p, b, _ in REFUSED] + ACCEPTED + MORE
    cases = [(p, b) for p, b in cases if b not in DIFFERENT]
    res = subprocess.run([str(py), str(Path(__file__).with_name("vllm_verdicts.py"))], input=json.dumps(cases),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(theirs) == len(cases)
    n = 0
    for (path, body), (their_status, their_message) in zip(cases, theirs):
        status, message = ours(path, body)
        assert status == their_status, (body, message, their_message)
        if status != 200:
            assert message == their_message, (body, message, their_message)
        n += 1
    cases = [(p, b) for p, b, _ in REFUSED] + ACCEPTED + MORE
    assert n == len(cases) - len(DIFFERENT)
