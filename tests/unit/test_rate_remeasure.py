"""The net check's re-measurement of a missed rate (``netcheck.measure_rate_within``) and the host
disturbance figures every rate run carries. The iperf3 run itself is replaced by scripted readings
here; the real one is exercised against real shaping in tests/integration/test_network.py."""
from __future__ import annotations

import pytest

from testbed.emulation import netcheck


def _scripted(monkeypatch, readings: list[float]) -> list[tuple]:
    calls = []

    def fake(net, src, dst, seconds, port):
        calls.append((src, dst, seconds, port))
        return {"l2_mbps": readings[len(calls) - 1], "goodput_mbps": 0.0, "host": {"steal_pct": 1.5, "cpu_wait_pct": 3.0}}

    monkeypatch.setattr(netcheck, "measure_rate", fake)
    return calls


def test_a_hit_is_not_re_measured(monkeypatch):
    calls = _scripted(monkeypatch, [49.9, 10.0])
    got = netcheck.measure_rate_within(None, "h1", "h2", 50, 0.05)
    assert got["tries"] == 1 and len(calls) == 1 and got["l2_mbps"] == 49.9


def test_a_miss_is_re_measured_until_a_hit(monkeypatch):
    calls = _scripted(monkeypatch, [45.7, 40.8, 49.8])
    got = netcheck.measure_rate_within(None, "h1", "h2", 50, 0.05, tries=3, seconds=2.0, port=6000)
    assert got["l2_mbps"] == 49.8 and got["tries"] == 3
    assert [r["l2_mbps"] for r in got["runs"]] == [45.7, 40.8, 49.8]
    assert got["runs"][0]["steal_pct"] == 1.5 and calls[0] == ("h1", "h2", 2.0, 6000)


def test_misses_on_every_try_return_the_closest_reading(monkeypatch):
    calls = _scripted(monkeypatch, [45.0, 47.0, 44.0, 49.9])
    got = netcheck.measure_rate_within(None, "h1", "h2", 50, 0.05, tries=3)
    assert len(calls) == 3 and got["l2_mbps"] == 47.0 and got["tries"] == 3  # bounded: the 4th never runs


def test_host_disturbance_reads_this_machine():
    before = netcheck.host_counters()
    got = netcheck.host_disturbance(before)
    assert set(got) == {"steal_pct", "cpu_wait_pct"}
    assert 0 <= got["steal_pct"] <= 100 and got["cpu_wait_pct"] >= 0
    assert netcheck.host_counters()[0] >= before[0]


@pytest.mark.parametrize("tries", [0, 1])
def test_at_least_one_run(monkeypatch, tries):
    calls = _scripted(monkeypatch, [30.0, 50.0])
    assert netcheck.measure_rate_within(None, "h1", "h2", 50, 0.05, tries=tries)["tries"] == 1 and len(calls) == 1
