"""The predictor side-car under load: /predict latency over HTTP, memory, and one predictor's share of a cluster.

    python -m benchmarks.predictor [--duration 20] [--load-factor 2] [--priority 10] [--skip-populated] [--skip-sustained]

Real processes on loopback (``python -m block.engine`` and ``python -m block.predictor``), Llama-2-7B on an A30,
vllm_chunked (batch cap 48, chunk 512). Client-side latencies are measured with a lean keep-alive HTTP/1.1 client on a
raw socket in a separate process (so the client's own cost and GIL stay out of the numbers); ``predict_ms`` is the
time inside the handler as the predictor reports it.

1. injected: a 48 running + 16 waiting state (running requests part-way through decode, ShareGPT-like lengths)
   installed through ``--debug-allow-state-injection``; 3000 sequential /predict calls.
2. populated: 64 streaming requests (100-token prompts, 1000 output tokens) sent *through* a proxy-mode predictor to
   an emulated engine at ``--time-scale 0.25`` (slow enough that the 48 + 16 state holds for the measurement) while
   their token streams flow through the proxy (~480 chunks/s); 2000 /predict on that predictor and 2000 on an
   engine-mode predictor (state polled from the engine's /state) of the same engine.
3. sustained: one predictor's share of a 40 req/s cluster of 12 instances probed with power-of-two choices
   (40 x 2 / 12 = 6.7 predictions/s and 40 / 12 = 3.3 proxied streams/s per predictor), times ``--load-factor``
   (default 2): Poisson arrivals of both for ``--duration`` seconds against an emulated engine in real time
   (prompts 50-500 tokens, outputs 20-300). Reports achieved rates, latency, errors and the predictor's CPU use,
   then the closed-loop /predict rate one connection gets while the streams continue.
Also: the proxy's added latency (TTFT and e2e of the same small requests straight to an idle engine and through the
predictor, streaming and non-streaming).
Memory: VmRSS (and peak VmHWM) of each predictor process, from /proc/<pid>/status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from block.ports import free_port  # noqa: E402
from experiments.local_stack import LocalStack, Service  # noqa: E402

CLUSTER_QPS, INSTANCES, PROBES = 40.0, 12, 2


# ------------------------------------------------------------------------------------------------ processes


PRIORITY = 0  # --priority: raise the predictors and the /predict client this much above other processes


def _raise_priority() -> None:
    if PRIORITY > 0:
        try:
            os.nice(-PRIORITY)
        except OSError:  # not permitted: measure at normal priority
            pass


def start(stack: LocalStack, module: str, *args: str, port: int = 0) -> Service:
    """``python -m module`` in ``stack``, not waited for (``.wait_healthy()``); predictors at ``--priority``."""
    return stack.start(module.rsplit(".", 1)[-1], module, args, port=port, wait=False,
                       preexec_fn=_raise_priority if module == "block.predictor" else None)


def port_of(svc: Service) -> int:
    return int(svc.url.rsplit(":", 1)[1])


def proc_status(svc: Service, key: str) -> Optional[float]:
    """``key`` (VmRSS, VmHWM ...) of /proc/<pid>/status, in MiB."""
    try:
        with open(f"/proc/{svc.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_s(svc: Service) -> float:
    with open(f"/proc/{svc.proc.pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------------ lean client


class RawClient:
    """HTTP/1.1 keep-alive POSTs of small JSON bodies on one socket (Content-Length responses only)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                          b"\r\n%s" % (path.encode(), len(body), body))
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        n = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                n = int(v)
        while len(rest) < n:
            rest += self.sock.recv(65536)
        self.buf = rest[n:]
        return status, rest[:n]


def arrival_offsets(rate: float, duration: float, rng: random.Random) -> list[float]:
    """round(rate * duration) Poisson arrivals rescaled to span ``duration`` (as ``vllm bench serve`` does)."""
    n = max(1, round(rate * duration))
    gaps = [rng.expovariate(1.0) for _ in range(n)]
    k = duration / sum(gaps)
    out, t = [], 0.0
    for g in gaps:
        out.append(t)
        t += g * k
    return out


def _predict_worker(port: int, n: int, rate: float, duration: float, seed: int, q) -> None:
    """Sequential /predict calls: ``n`` back to back, Poisson at ``rate`` over ``duration`` seconds, or (rate=inf)
    back to back for ``duration`` seconds."""
    _raise_priority()
    rng = random.Random(seed)
    c = RawClient(port)
    lat, server, load, errors = [], [], [], 0
    bodies = [json.dumps({"prompt_tokens": rng.randint(20, 1500), "expected_output_tokens": rng.randint(10, 600)})
              .encode() for _ in range(512)]
    for b in bodies[:20]:  # warm-up
        c.post("/predict", b)
    sched = arrival_offsets(rate, duration, rng) if 0 < rate < float("inf") else None
    t0 = time.perf_counter()
    i = 0
    while True:
        if sched is not None:
            if i >= len(sched):
                break
            d = t0 + sched[i] - time.perf_counter()
            if d > 0:
                time.sleep(d)
        elif rate == float("inf"):
            if time.perf_counter() - t0 >= duration:
                break
        elif i >= n:
            break
        t = time.perf_counter()
        st, body = c.post("/predict", bodies[i % len(bodies)])
        lat.append(time.perf_counter() - t)
        if st == 200:
            d = json.loads(body)
            server.append(d["predict_ms"])
            load.append((d["num_running"], d["num_waiting"]))
        else:
            errors += 1
        i += 1
    q.put({"lat_ms": [x * 1e3 for x in lat], "server_ms": server, "errors": errors, "load": load,
           "elapsed": time.perf_counter() - t0})


def run_predictions(port: int, n: int = 0, rate: float = 0.0, duration: float = 0.0, seed: int = 0):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_predict_worker, args=(port, n, rate, duration, seed, q))
    p.start()
    return p, q


def collect(pq) -> dict:
    p, q = pq
    out = q.get()
    p.join()
    return out


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def line(name: str, r: dict) -> str:
    lat, srv = r["lat_ms"], r["server_ms"]
    return (f"{name:<34} n={len(lat):5d}  HTTP p50 {pct(lat, 50):6.3f}  p99 {pct(lat, 99):6.3f}  max {max(lat):7.3f} ms"
            f"   in-handler p50 {pct(srv, 50):6.3f}  p99 {pct(srv, 99):6.3f} ms   errors {r['errors']}")


# ------------------------------------------------------------------------------------------------ states


def make_state(cfg: dict, n_running: int = 48, n_waiting: int = 16, seed: int = 0) -> dict:
    """Running requests part-way through decode (ShareGPT-like lengths), all fitting in the KV cache."""
    rng = random.Random(seed)
    bs, nb = cfg["block_size"], cfg["num_blocks"]
    while True:
        running, used = [], 0
        for i in range(n_running):
            p, o = rng.randint(20, 700), rng.randint(20, 500)
            d = rng.randint(1, o)
            c = p + d - 1
            running.append({"id": i, "prompt_tokens": p, "expected_output_tokens": o, "computed_tokens": c,
                            "decoded_tokens": d})
            used += -(-c // bs)
        if used <= nb - int(cfg["watermark"] * nb):
            break
    waiting = [{"id": 1000 + j, "prompt_tokens": rng.randint(20, 700), "expected_output_tokens": rng.randint(20, 500)}
               for j in range(n_waiting)]
    return {"running": running, "waiting": waiting, "free_blocks": nb - used, "total_blocks": nb, "config": cfg}


# ------------------------------------------------------------------------------------------------ load


async def _stream(client: httpx.AsyncClient, body: dict, stats: dict) -> None:
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body,
                                 headers={"x-expected-output-tokens": str(body["max_tokens"])}) as r:
            if r.status_code != 200:
                stats["errors"] += 1
                await r.aread()
                return
            first = None
            async for chunk in r.aiter_raw():
                if first is None:
                    first = time.perf_counter() - t0
                stats["bytes"] += len(chunk)
            stats["ok"] += 1
            stats["ttft"].append(first or 0.0)
    except (httpx.HTTPError, asyncio.CancelledError):
        stats["errors"] += 1


async def _hold_streams(url: str, n: int, prompt: int, out_tokens: int, stop: asyncio.Event, stats: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=n + 8)) as c:
        tasks = [asyncio.create_task(_stream(c, {"prompt": list(range(1, prompt + 1)), "max_tokens": out_tokens,
                                                 "stream": True, "ignore_eos": True}, stats)) for _ in range(n)]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _poisson_streams(url: str, rate: float, duration: float, seed: int, stats: dict) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=2048)) as c:
        tasks = []
        t0 = time.perf_counter()
        for off in arrival_offsets(rate, duration, rng):
            await asyncio.sleep(max(0.0, t0 + off - time.perf_counter()))
            body = {"prompt": [rng.randint(1, 30000) for _ in range(rng.randint(50, 500))],
                    "max_tokens": rng.randint(20, 300), "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            tasks.append(asyncio.create_task(_stream(c, body, stats)))
            stats["sent"] += 1
        await asyncio.gather(*tasks, return_exceptions=True)


def _new_stats() -> dict:
    return {"ok": 0, "errors": 0, "bytes": 0, "ttft": [], "sent": 0}


# ------------------------------------------------------------------------------------------------ phases


def proxy_overhead(engine_url: str, pred_url: str, n: int = 20) -> None:
    """TTFT and e2e of the same requests sent straight to an idle engine and through the predictor, alternating."""
    res: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "e2e": [], "plain": []} for k in ("direct", "proxy")}
    with httpx.Client(timeout=60) as c:
        for i in range(n + 3):
            for name, url in (("direct", engine_url), ("proxy", pred_url)):
                body = {"prompt": list(range(1, 201)), "max_tokens": 8, "stream": True}
                t0 = time.perf_counter()
                first = None
                with c.stream("POST", url + "/v1/completions", json=body) as r:
                    for _ in r.iter_raw():
                        if first is None:
                            first = time.perf_counter() - t0
                e2e = time.perf_counter() - t0
                t1 = time.perf_counter()
                plain_body = {"prompt": list(range(1, 201)), "max_tokens": 8}
                c.post(url + "/v1/completions", json=plain_body).raise_for_status()
                plain = time.perf_counter() - t1
                if i >= 3:  # warm-up
                    res[name]["ttft"].append(first * 1e3)
                    res[name]["e2e"].append(e2e * 1e3)
                    res[name]["plain"].append(plain * 1e3)
    d, p = res["direct"], res["proxy"]
    print(f"proxy overhead, idle engine in real time, 200-token prompt + 8 tokens, {n} each (median ms): "
          f"stream TTFT {pct(d['ttft'], 50):.1f} -> {pct(p['ttft'], 50):.1f}, stream e2e {pct(d['e2e'], 50):.1f} -> "
          f"{pct(p['e2e'], 50):.1f}, non-stream e2e {pct(d['plain'], 50):.1f} -> {pct(p['plain'], 50):.1f} "
          f"(forced upstream stream + reassembly)")


def phase_injected(stack: LocalStack, args) -> Service:
    port = free_port()
    eng = start(stack, "block.engine", "--tokenizer", "none", port=port)
    pred = start(stack, "block.predictor", "--engine-url", f"http://127.0.0.1:{port}", "--debug-allow-state-injection",
                 "--tokenizer", "none")
    eng.wait_healthy(), pred.wait_healthy()
    proxy_overhead(eng.url, pred.url)
    cfg = httpx.get(pred.url + "/state").json()["config"]
    st = make_state(cfg)
    r = httpx.post(pred.url + "/debug/state", json=st)
    r.raise_for_status()
    res = collect(run_predictions(port_of(pred), n=args.samples))
    print(line("injected 48+16, idle engine", res))
    with httpx.Client(base_url=pred.url) as c:  # the same through httpx, for reference
        body = {"prompt_tokens": 400, "expected_output_tokens": 200}
        for _ in range(20):
            c.post("/predict", json=body)
        lat = []
        for _ in range(1000):
            t = time.perf_counter()
            c.post("/predict", json=body)
            lat.append((time.perf_counter() - t) * 1e3)
    print(f"{'  (same, httpx.Client: p50/p99)':<34} {pct(lat, 50):.3f} / {pct(lat, 99):.3f} ms")
    eng.stop()
    return pred


def phase_populated(stack: LocalStack, args) -> list[Service]:
    port = free_port()
    eurl = f"http://127.0.0.1:{port}"
    eng = start(stack, "block.engine", "--tokenizer", "none", "--time-scale", "0.25", port=port)
    pred = start(stack, "block.predictor", "--engine-url", eurl, "--tokenizer", "none")
    pe = start(stack, "block.predictor", "--engine-url", eurl, "--tokenizer", "none", "--state-source", "engine")
    for p in (eng, pred, pe):
        p.wait_healthy()
    stats = _new_stats()
    stop = None

    async def main():
        nonlocal stop
        stop = asyncio.Event()
        holder = asyncio.create_task(_hold_streams(pred.url, 64, 100, 1000, stop, stats))
        async with httpx.AsyncClient(base_url=pred.url) as c:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                s = (await c.get("/state")).json()
                if len(s["running"]) == 48 and len(s["waiting"]) == 16:
                    break
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError(f"state did not reach 48+16: {len(s['running'])}+{len(s['waiting'])}")
            b0 = stats["bytes"]
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            res = await loop.run_in_executor(None, lambda: collect(run_predictions(port_of(pred), n=args.samples)))
            s1 = (await c.get("/state")).json()
            res_e = await loop.run_in_executor(None, lambda: collect(run_predictions(port_of(pe), n=args.samples)))
            s2 = (await c.get("/state")).json()
            se = (await c.get(pe.url + "/state")).json()
            rate_kb = (stats["bytes"] - b0) / (time.perf_counter() - t0) / 1024
        stop.set()
        await holder
        return res, res_e, s1, s2, se, rate_kb

    res, res_e, s1, _, se, rate_kb = asyncio.run(main())
    print(line("proxy-populated 48+16, proxy mode", res))
    print(f"{'':<34} state after: {len(s1['running'])} running + {len(s1['waiting'])} waiting "
          f"(streams through the proxy meanwhile: {rate_kb:.0f} KiB/s)")
    print(line("same engine, engine-mode predictor", res_e))
    print(f"{'':<34} state after: {len(se['running'])} running + {len(se['waiting'])} waiting, "
          f"state age {se['age_s'] * 1e3:.0f} ms")
    eng.stop()
    return [pred, pe]


def phase_sustained(stack: LocalStack, args) -> Service:
    port = free_port()
    eurl = f"http://127.0.0.1:{port}"
    eng = start(stack, "block.engine", "--tokenizer", "none", port=port)
    pred = start(stack, "block.predictor", "--engine-url", eurl, "--tokenizer", "none")
    eng.wait_healthy(), pred.wait_healthy()
    share_pred = CLUSTER_QPS * PROBES / INSTANCES
    share_stream = CLUSTER_QPS / INSTANCES
    rp, rs = share_pred * args.load_factor, share_stream * args.load_factor
    stats = _new_stats()
    cpu0, t0 = cpu_s(pred), time.perf_counter()
    pq = run_predictions(port_of(pred), rate=rp, duration=args.duration, seed=1)
    asyncio.run(_poisson_streams(pred.url, rs, args.duration, 2, stats))
    res = collect(pq)
    wall = time.perf_counter() - t0
    cpu = cpu_s(pred) - cpu0
    print(f"share of {CLUSTER_QPS:.0f} req/s over {INSTANCES} instances, Po{PROBES}: {share_pred:.2f} predictions/s + "
          f"{share_stream:.2f} streams/s per predictor; offered x{args.load_factor:g} = {rp:.2f} + {rs:.2f}/s for "
          f"{args.duration:g} s")
    print(line("  predictions under load", res))
    nr = [a for a, _ in res["load"]]
    nw = [b for _, b in res["load"]]
    print(f"  achieved: {len(res['lat_ms']) / res['elapsed']:.2f} predictions/s (offered {rp:.2f}), "
          f"{stats['sent'] / args.duration:.2f} streams/s sent, {stats['ok']} completed, {stats['errors']} failed, "
          f"median TTFT via proxy {pct([x * 1e3 for x in stats['ttft']], 50):.1f} ms; predictor CPU "
          f"{100 * cpu / wall:.1f}% of one core over {wall:.1f} s; state at prediction time: median "
          f"{pct(nr, 50):.0f} running + {pct(nw, 50):.0f} waiting (max {max(nr)} + {max(nw)})")
    # headroom: closed loop on one connection while streams continue
    stats2 = _new_stats()

    async def closed():
        loop = asyncio.get_running_loop()
        streams = asyncio.create_task(_poisson_streams(pred.url, rs, 6.0, 3, stats2))
        await asyncio.sleep(1.0)
        r = await loop.run_in_executor(None, lambda: collect(run_predictions(port_of(pred), rate=float("inf"),
                                                                             duration=4.0, seed=4)))
        await streams
        return r

    res2 = asyncio.run(closed())
    print(f"  closed loop (1 connection) with the streams running: {len(res2['lat_ms']) / res2['elapsed']:.0f} "
          f"predictions/s, HTTP p50 {pct(res2['lat_ms'], 50):.3f} / p99 {pct(res2['lat_ms'], 99):.3f} ms")
    eng.stop()
    return pred


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3000, help="/predict calls per latency measurement")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of sustained load")
    ap.add_argument("--load-factor", type=float, default=2.0, help="multiple of one predictor's cluster share")
    ap.add_argument("--skip-populated", action="store_true")
    ap.add_argument("--skip-sustained", action="store_true")
    ap.add_argument("--priority", type=int, default=0,
                    help="run the predictors and the /predict client at nice -N (root only): isolates the numbers "
                         "from unrelated load on a shared host, as a dedicated core would")
    args = ap.parse_args(argv)
    global PRIORITY
    PRIORITY = max(0, args.priority)
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
          f"Python {sys.version.split()[0]}; predictors at nice {-PRIORITY}")
    preds: list[tuple[str, Service]] = []
    with LocalStack(env={"BLOCK_API_TOKEN": None}, startup_timeout_s=120) as stack:
        preds.append(("injected", phase_injected(stack, args)))
        if not args.skip_populated:
            a, b = phase_populated(stack, args)
            preds += [("populated/proxy", a), ("populated/engine", b)]
        if not args.skip_sustained:
            preds.append(("sustained", phase_sustained(stack, args)))
        print("memory of the predictor processes (VmRSS now / VmHWM peak):")
        for name, p in preds:
            print(f"  {name:<20} {proc_status(p, 'VmRSS'):6.1f} / {proc_status(p, 'VmHWM'):6.1f} MiB")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
