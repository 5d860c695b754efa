"""The global scheduler's own cost: added TTFT at p99 under a steady load, and routing decisions per second.

    python benchmarks/scheduler.py                  # both measurements, prints the numbers
    python benchmarks/scheduler.py --rate 100 --k 2 --seconds 20 --repeats 3 --policy block
    python benchmarks/scheduler.py --realtime       # on a shared box: SCHED_FIFO during the latency phase (root)

Set-up (all on loopback): one process of *instant* upstreams -- minimal HTTP/1.1 servers that answer ``/predict``,
``/stats`` and ``/v1/completions`` (streaming: a few SSE token chunks, usage, ``[DONE]``) at once, one port per
instance -- the scheduler (``python -m block.scheduler``) and a lean asyncio load generator (raw HTTP/1.1 on
kept-alive connections, no httpx, so the client's own cost stays small and equal in both arms). On a machine with
at least two cores the scheduler is pinned to core 0 and the upstreams and the client to the other cores.

1. Added latency: two Poisson streams of streaming requests at ``--rate`` req/s each, run at the same time (so the
   background load of a shared machine hits both alike): one straight to an instant upstream, one through the
   scheduler (policy ``--policy``, ``--k``) in front of the others. The client measures TTFT (send -> first token
   chunk); the difference of the percentiles is the scheduler's cost: parsing, sampling, k concurrent probes, the
   policy, the extra proxy hop. ``--repeats`` runs, pooled. Goal: < 2 ms at p99 with k=2 at 100 req/s.
2. Decisions per second: closed loop with C concurrent clients (C doubled until the rate stops growing) through
   the scheduler; each request is one full routing decision (k probes + policy) plus its forwarding. Goal: >= 400/s
   (llm-d's Go endpoint picker: 324-388 req/s). Reported for streaming and non-streaming requests.

``python benchmarks/scheduler.py stub --ports 0,0`` runs the instant upstreams alone (prints their URLs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- instant upstreams


def _http(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + ctype + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def _sse_stream(tokens: int) -> bytes:
    parts = []
    for i in range(tokens):
        ev = {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": "stub",
              "choices": [{"index": 0, "text": " tok", "logprobs": None,
                           "finish_reason": "length" if i == tokens - 1 else None, "stop_reason": None}],
              "usage": None}
        parts.append(b"data: " + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n")
    usage = {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": "stub", "choices": [],
             "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}}
    parts.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    for p in parts:  # one HTTP chunk per SSE event, as a streaming engine sends them
        out += f"{len(p):x}\r\n".encode() + p + b"\r\n"
    return out + b"0\r\n\r\n"


class StubProtocol(asyncio.Protocol):
    """An instant predictor + engine: answers every request as soon as it is complete (keep-alive, no pipelining
    assumptions beyond processing requests in order)."""

    def __init__(self, index: int, tokens: int) -> None:
        self.buf = b""
        self.index = index
        pred = {"instance_id": index, "e2e_s": 1.0 + 0.01 * index, "ttft_s": 0.05, "queue_s": 0.0,
                "free_blocks": 1000, "num_requests": 0, "num_running": 0, "num_waiting": 0, "num_preemptions": 0,
                "predict_ms": 0.0}
        stats = {"instance_id": index, "num_running": index, "num_waiting": 0, "free_blocks": 1000,
                 "total_blocks": 1000, "num_preemptions": 0, "waiting_prompt_blocks": 0, "waiting_prompt_tokens": 0,
                 "unprocessed_tokens": 100 * index}
        full = {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": "stub",
                "choices": [{"index": 0, "text": " tok" * tokens, "logprobs": None, "finish_reason": "length",
                             "stop_reason": None}],
                "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}}
        models = {"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "stub"}]}
        self.responses = {
            b"/predict": _http("200 OK", json.dumps(pred).encode()),
            b"/stats": _http("200 OK", json.dumps(stats).encode()),
            b"/health": _http("200 OK", b'{"status":"ok"}'),
            b"/v1/models": _http("200 OK", json.dumps(models).encode()),
            b"full": _http("200 OK", json.dumps(full).encode()),
            b"stream": _sse_stream(tokens),
        }
        self.not_found = _http("404 Not Found", b'{"error":{"message":"not found","type":"x","code":404}}')

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buf[:end]
            clen = 0
            lower = head.lower()
            j = lower.find(b"content-length:")
            if j >= 0:
                clen = int(lower[j + 15:lower.find(b"\r\n", j) if lower.find(b"\r\n", j) > 0 else None].strip())
            if len(self.buf) < end + 4 + clen:
                break
            body = self.buf[end + 4:end + 4 + clen]
            self.buf = self.buf[end + 4 + clen:]
            path = head.split(b" ", 2)[1]
            if path.startswith(b"/v1/completions") or path.startswith(b"/v1/chat/completions"):
                stream = b'"stream":true' in body.replace(b" ", b"")
                out.append(self.responses[b"stream" if stream else b"full"])
            else:
                out.append(self.responses.get(path, self.not_found))
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]


async def run_stubs(ports: list[int], tokens: int, host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for i, port in enumerate(ports):
        srv = await loop.create_server(lambda i=i: StubProtocol(i, tokens), host, port)
        servers.append(srv)
        sock = srv.sockets[0]
        print(f"listening on http://{host}:{sock.getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------------- lean client


class Conn:
    """One kept-alive HTTP/1.1 connection: send a POST, read the answer, note when the first token arrived."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.r: Optional[asyncio.StreamReader] = None
        self.w: Optional[asyncio.StreamWriter] = None

    async def open(self) -> None:
        self.r, self.w = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, float, float, dict]:
        """(status, time of the first body byte of a token event, time of the end, response headers)."""
        head = f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: application/json\r\n" \
               f"content-length: {len(body)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        data = head.encode() + body
        for attempt in (0, 1):
            fresh = self.w is None
            if fresh:
                await self.open()
            assert self.r is not None and self.w is not None
            self.w.write(data)
            try:
                raw = await self.r.readuntil(b"\r\n\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError) as err:
                self.w.close()
                self.r = self.w = None
                if fresh or (isinstance(err, asyncio.IncompleteReadError) and err.partial):
                    raise
                # the server closed this kept-alive connection while idle (uvicorn: after 5 s): reconnect once
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs = {}
        for ln in lines[1:]:
            if ":" in ln:
                k, v = ln.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        first = math.nan
        if "content-length" in hdrs:
            await self.r.readexactly(int(hdrs["content-length"]))
            first = time.perf_counter()
        elif hdrs.get("transfer-encoding") == "chunked":
            while True:
                size_line = await self.r.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    await self.r.readuntil(b"\r\n")
                    break
                data = await self.r.readexactly(size + 2)
                if math.isnan(first) and b'"text":"' in data and b'"text":""' not in data:
                    first = time.perf_counter()
        if hdrs.get("connection", "").lower() == "close":
            self.w.close()
            self.r = self.w = None
        return status, first, time.perf_counter(), hdrs


def _request_body(i: int, stream: bool) -> bytes:
    return json.dumps({"model": "stub", "prompt": [100 + (i * 7 + j) % 30000 for j in range(8)], "max_tokens": 4,
                       "stream": stream, "ignore_eos": True,
                       **({"stream_options": {"include_usage": True}} if stream else {})}).encode()


async def open_loop(url: str, rate: float, n: int, seed: int, stream: bool = True,
                    warmup: int = 50) -> list[float]:
    """Poisson arrivals at ``rate``; returns the TTFTs (s) of the requests after the warm-up."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    idle: list[Conn] = []
    rng = random.Random(seed)
    ttfts: list[float] = []
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        c = idle.pop() if idle else Conn(host, int(port))
        t0 = time.perf_counter()
        try:
            status, first, _, _ = await c.post("/v1/completions", _request_body(i, stream),
                                               {"x-expected-output-tokens": "4"})
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            return
        idle.append(c)
        if status != 200 or math.isnan(first):
            errors += 1
        elif i >= warmup:
            ttfts.append(first - t0)

    # pre-open a pool of connections so connection set-up is not measured
    for _ in range(32):
        c = Conn(host, int(port))
        await c.open()
        idle.append(c)
    tasks = []
    start = time.perf_counter()
    t = 0.0
    for i in range(n + warmup):
        t += rng.expovariate(rate)
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    if errors:
        print(f"  ({errors} failed requests)", file=sys.stderr)
    return ttfts


async def closed_loop(url: str, concurrency: int, seconds: float, stream: bool) -> tuple[float, int]:
    """``concurrency`` clients each sending back to back for ``seconds``; returns (completed/s, errors)."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    done = 0
    errors = 0
    stop = time.perf_counter() + seconds + 0.5
    t_measure = time.perf_counter() + 0.5  # half a second of warm-up
    counted = 0

    async def worker(w: int) -> None:
        nonlocal done, errors, counted
        c = Conn(host, int(port))
        await c.open()
        i = w
        while time.perf_counter() < stop:
            try:
                status, _, end, _ = await c.post("/v1/completions", _request_body(i, stream), {})
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                c = Conn(host, int(port))
                continue
            i += concurrency
            if status != 200:
                errors += 1
            elif end >= t_measure and end < stop:
                counted += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return counted / seconds, errors


# ---------------------------------------------------------------------------------------------- orchestration


def _pinned(cpus: Optional[set[int]]):
    """A ``preexec_fn`` that pins the child to ``cpus`` (None: no pinning)."""
    if not cpus:
        return None

    def pin() -> None:
        try:
            os.sched_setaffinity(0, cpus)
        except (AttributeError, OSError):
            pass

    return pin


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    lo = int(math.floor(k))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    st = sub.add_parser("stub", help="run instant upstreams only")
    st.add_argument("--ports", default="0,0")
    st.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--rate", type=float, default=100.0, help="req/s of the latency measurement (default 100)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of one latency repetition (default 10 s)")
    ap.add_argument("--repeats", type=int, default=3, help="latency repetitions (default 3)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--instances", type=int, default=4, help="instant upstreams behind the scheduler (default 4)")
    ap.add_argument("--policy", default="block")
    ap.add_argument("--saturation-seconds", type=float, default=5.0)
    ap.add_argument("--max-concurrency", type=int, default=128)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-saturation", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-pin", action="store_true", help="do not pin the scheduler and the rest to separate cores")
    ap.add_argument("--nice", type=int, default=0,
                    help="run every process of the benchmark at this nice value (e.g. -10 on a shared box; root)")
    ap.add_argument("--realtime", action="store_true",
                    help="during the latency phase only, run the scheduler, the upstreams and the client with "
                         "SCHED_FIFO priority 10 (root): other tenants of a shared box cannot delay them, as on "
                         "dedicated cores. The processes sleep most of the time at this load")
    args = ap.parse_args(argv)
    if args.cmd == "stub":
        ports = [int(p) for p in args.ports.split(",")]
        try:
            asyncio.run(run_stubs(ports, args.tokens))
        except KeyboardInterrupt:
            pass
        return

    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    sched_cpus = {cpus[0]} if ncpu >= 2 and not args.no_pin else None
    other_cpus = set(cpus[1:]) if ncpu >= 2 and not args.no_pin else None
    if args.nice:
        os.nice(args.nice)  # inherited by the subprocesses
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {ncpu} CPUs (load average {load:.2f} before the run); scheduler pinned to {sched_cpus or 'any'}, "
          f"upstreams + client on {other_cpus or 'any'}; nice {args.nice}; python {sys.version.split()[0]}")
    sys.path.insert(0, str(ROOT))
    from experiments.local_stack import LocalStack

    with LocalStack() as stack:
        stubs = stack.start("stubs", "benchmarks.scheduler", ["stub", "--ports", ",".join("0" * (args.instances + 1))],
                            port=None, listens=args.instances + 1,
                            preexec_fn=_pinned(other_cpus))  # the last one is the direct arm's
        urls = stubs.urls
        sched = stack.start("scheduler", "block.scheduler", ["--instances", ",".join(urls[:-1]), "--policy",
                                                             args.policy, "--k", str(args.k), "--seed", str(args.seed),
                                                             "--tokenizer", "none"],
                            preexec_fn=_pinned(sched_cpus)).wait_healthy()
        surl = sched.url
        print(f"# policy {args.policy}, k={args.k}, {args.instances} instant upstreams")
        if not args.skip_latency:
            n = int(args.rate * args.seconds)
            asyncio.run(open_loop(surl, args.rate, 100, args.seed, warmup=0))  # warm the pools and the code
            direct: list[float] = []
            through: list[float] = []
            added_p99 = []

            async def both(rep: int) -> tuple[list[float], list[float]]:
                # the two arms run at the same time, so background load on a shared box hits both alike
                return tuple(await asyncio.gather(open_loop(urls[-1], args.rate, n, args.seed + 100 + rep),
                                                  open_loop(surl, args.rate, n, args.seed + rep)))

            rt_pids = [0, stubs.proc.pid, sched.proc.pid] if args.realtime else []
            for pid in rt_pids:
                os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(10))
            for rep in range(args.repeats):
                d, t = asyncio.run(both(rep))
                direct += d
                through += t
                added_p99.append((_pct(t, 99) - _pct(d, 99)) * 1e3)
            for pid in rt_pids:
                os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
            print(f"latency at {args.rate:g} req/s per arm, {args.repeats} x {n} streaming requests per arm, both "
                  f"arms at once{' (SCHED_FIFO)' if rt_pids else ''} (client TTFT, ms):")
            print(f"  {'':10s} {'p50':>8s} {'p90':>8s} {'p99':>8s} {'max':>8s}")
            for name, xs in (("direct", direct), ("scheduler", through)):
                print(f"  {name:10s} " + " ".join(f"{_pct(xs, p) * 1e3:8.3f}" for p in (50, 90, 99, 100)))
            print("  added      " + " ".join(f"{(_pct(through, p) - _pct(direct, p)) * 1e3:8.3f}"
                                              for p in (50, 90, 99)))
            print("  added p99 per repetition: " + ", ".join(f"{x:.3f}" for x in added_p99))
            print(f"ADDED_P99_MS {(_pct(through, 99) - _pct(direct, 99)) * 1e3:.3f} (pooled; median of repetitions "
                  f"{sorted(added_p99)[len(added_p99) // 2]:.3f}; goal < 2 ms at {args.rate:g} req/s, k={args.k})")
        if not args.skip_saturation:
            for stream in (False, True):
                best = 0.0
                c = 8
                results = []
                while c <= args.max_concurrency:
                    rate, errs = asyncio.run(closed_loop(surl, c, args.saturation_seconds, stream))
                    results.append((c, rate, errs))
                    if rate < best * 1.03:
                        best = max(best, rate)
                        break
                    best = max(best, rate)
                    c *= 2
                kind = "streaming" if stream else "non-streaming"
                print(f"decisions/s ({kind}, k={args.k} probes each): "
                      + ", ".join(f"C={c}: {r:.0f}/s" + (f" ({e} errors)" if e else "") for c, r, e in results))
                print(f"DECISIONS_PER_S_{'STREAM' if stream else 'NONSTREAM'} {best:.0f} (goal >= 400)")


if __name__ == "__main__":
    main()
