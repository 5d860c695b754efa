"""Replay a prepared workload against running schedulers and write the run records (the benchmark side of a run).

``mode=deploy`` runs this on the scheduler host (as Block runs its benchmark next to its scheduler), so the client's
timings do not cross the WAN::

    python -m experiments.drive --config config.yaml --requests requests.jsonl \\
        --schedulers http://10.10.1.1:8200 --states http://10.10.1.1:8100,http://10.10.1.2:8100 --out records

``config.yaml`` is the run's resolved (token-free) config; ``requests.jsonl`` the workload built by the driver (one
``Request`` per line), so the host needs no dataset. The bearer token comes from ``$BLOCK_API_TOKEN`` or, with
``--secrets-stdin``, from a JSON object on stdin. Writes ``config.yaml``, ``requests.parquet``,
``instances.parquet`` and, last, ``summary.json`` into ``--out`` (the same records as every other mode).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from vidur.types import Request


def read_requests(path: Path) -> list[Request]:
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(Request.from_dict(json.loads(line)))
                except (ValueError, TypeError) as err:
                    raise SystemExit(f"{path} line {i}: not a request ({err})")
    return out


def write_requests(requests: Sequence[Request], path: Path) -> None:
    """The workload as JSON lines, written atomically (a killed driver leaves no half workload to upload)."""
    from vidur.records import write_atomic

    write_atomic(path, "".join(json.dumps(r.to_dict()) + "\n" for r in requests).encode())


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.drive", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the run's resolved config (YAML)")
    ap.add_argument("--requests", required=True, help="the workload, one JSON request per line")
    ap.add_argument("--schedulers", required=True, help="comma-separated scheduler URLs")
    ap.add_argument("--states", default="", help="comma-separated URLs serving GET /state (predictors or engines)")
    ap.add_argument("--out", required=True, help="directory for the run records")
    ap.add_argument("--mode", default="deploy", help="mode name recorded in the summary")
    ap.add_argument("--secrets-stdin", action="store_true", help="read {\"BLOCK_API_TOKEN\": ...} from stdin")
    a = ap.parse_args(argv)

    from experiments.emulate import drive, write_records

    token = os.environ.get("BLOCK_API_TOKEN")
    if a.secrets_stdin:
        raw = sys.stdin.read().strip()
        token = (json.loads(raw).get("BLOCK_API_TOKEN") if raw else None) or token
    cfg = OmegaConf.load(a.config)
    requests = read_requests(Path(a.requests))
    t0 = time.perf_counter()
    res = drive(cfg, requests, [u for u in a.schedulers.split(",") if u], [u for u in a.states.split(",") if u],
                token, bars=bool(cfg.get("progress", True)))
    summary = write_records(cfg, Path(a.out), requests, res, mode=a.mode, wall_s=time.perf_counter() - t0)
    print(json.dumps({k: summary.get(k) for k in ("completed", "failed", "request_throughput", "p99_ttft_ms")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
