"""Free TCP ports for services that another process binds later (tests, local stacks, launchers, lab hosts).

Why not bind to port 0 and hand the number on: the kernel picks that number from its *ephemeral* range
(``/proc/sys/net/ipv4/ip_local_port_range``, 32768-60999 on Linux by default), the same range it draws from for
every outgoing connection's local port. Between the pick and the service's own bind (seconds, for a process that
imports a web stack first) any outgoing connection on the machine may take it -- a health check, a pip download,
another test suite -- and the service dies with "address already in use". This happened in CI. So ports are drawn
at random *below* the ephemeral range, where the kernel never assigns one on its own, and checked free by binding.
A process also never hands out the same number twice (several services picked before any of them binds).

A service that can report the port it bound (``--port 0``; see ``block.service.serve``) needs none of this."""
from __future__ import annotations

import random
import socket
import threading
from typing import Set, Tuple

#: the lowest port handed out: above the registered services most machines run (databases, caches, 8000s)
LOW = 20000
_DEFAULT_EPHEMERAL = (32768, 60999)
_rng = random.SystemRandom()
_given: Set[Tuple[str, int]] = set()
_lock = threading.Lock()


def ephemeral_range() -> Tuple[int, int]:
    """The kernel's range for automatically assigned local ports (Linux's setting, else its default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL


def _candidates(n: int) -> range:
    """Where a block of ``n`` consecutive ports may start: between LOW and the ephemeral range, or, on a machine
    whose ephemeral range reaches down that far, above it."""
    lo, hi = ephemeral_range()
    if lo - n > LOW:
        return range(LOW, lo - n + 1)
    if hi + 1 <= 65536 - n:
        return range(hi + 1, 65536 - n + 1)
    raise RuntimeError(f"no room for {n} ports outside the ephemeral range {lo}-{hi}")


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` on ``host`` can be bound now (no listener, no lingering connection)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_ports(n: int, host: str = "127.0.0.1") -> int:
    """The first of ``n`` consecutive ports on ``host`` that are free now, outside the kernel's ephemeral range
    and not handed out before by this process. Raises ``RuntimeError`` when 500 random tries find none."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    starts = _candidates(n)
    with _lock:
        for _ in range(500):
            p = _rng.choice(starts)
            block = [(host, p + i) for i in range(n)]
            if any(b in _given for b in block) or not all(is_free(p + i, host) for i in range(n)):
                continue
            _given.update(block)
            return p
    raise RuntimeError(f"no {n} consecutive free ports on {host} between {starts.start} and {starts.stop + n - 1}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that is free now and that no outgoing connection will take before a service binds it."""
    return free_ports(1, host)
