"""block.ports: service ports are drawn outside the kernel's ephemeral range, free when drawn, never twice."""
from __future__ import annotations

import socket

import pytest

from block import ports


def test_a_port_is_free_bindable_and_below_the_ephemeral_range():
    lo, _ = ports.ephemeral_range()
    got = [ports.free_port() for _ in range(40)]
    assert len(set(got)) == len(got)  # one process never hands a number out twice
    for p in got:
        assert ports.LOW <= p < lo
        assert ports.is_free(p)


def test_a_block_of_ports_is_consecutive_and_free():
    lo, _ = ports.ephemeral_range()
    base = ports.free_ports(6)
    assert ports.LOW <= base and base + 5 < lo
    assert all(ports.is_free(base + i) for i in range(6))
    with pytest.raises(ValueError):
        ports.free_ports(0)


def test_taken_and_given_ports_are_skipped_and_exhaustion_says_so(monkeypatch):
    """Four candidate ports: two held by listeners, so the two others come out, once each, then a clear error."""
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (ports.LOW + 4, 60999))  # candidates LOW .. LOW+3
    monkeypatch.setattr(ports, "_given", set())
    held = []
    try:
        for p in (ports.LOW, ports.LOW + 1):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                s.close()
                pytest.skip(f"port {p} is in use on this machine")
            s.listen()
            held.append(s)
        assert not ports.is_free(ports.LOW)
        got = {ports.free_port(), ports.free_port()}
        assert got == {ports.LOW + 2, ports.LOW + 3}
        with pytest.raises(RuntimeError, match="no 1 consecutive free ports"):
            ports.free_port()
    finally:
        for s in held:
            s.close()


def test_a_machine_whose_ephemeral_range_starts_low_gets_ports_above_it(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (10000, 40000))
    p = ports.free_port()
    assert 40000 < p <= 65535
