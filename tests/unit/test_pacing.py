"""Compute-time pacing (node_agent.pacing) and the CPU emulation decisions (testbed.emulation.cpu)."""
import time

import pytest

from node_agent.pacing import ComputePacer
from testbed.emulation import cpu


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_paced_block_takes_cpu_time_over_speed():
    p = ComputePacer(0.25)
    t0 = time.perf_counter()
    with p.paced("ffn"):
        _spin(0.01)
    took = time.perf_counter() - t0
    assert 0.038 <= took <= 0.046  # 10 ms of CPU at a quarter of a core: 40 ms
    st = p.stats()["kinds"]["ffn"]
    assert st["calls"] == 1 and st["late_fraction"] == 0.0
    assert st["cpu_median_s"] == pytest.approx(0.01, abs=0.001)


def test_waiting_is_not_compute():
    """A body that sleeps uses no CPU: the pacer adds nothing (immune to time spent off the CPU)."""
    p = ComputePacer(0.1)
    t0 = time.perf_counter()
    with p.paced():
        time.sleep(0.005)
    assert time.perf_counter() - t0 < 0.009


def test_unpaced_and_spread():
    p = ComputePacer(None)
    t0 = time.perf_counter()
    with p.paced():
        _spin(0.005)
    assert time.perf_counter() - t0 < 0.02
    p.set_speed(0.5)
    for _ in range(20):
        with p.paced("attn"):
            _spin(0.002)
    st = p.stats()["kinds"]["attn"]
    assert st["median_s"] == pytest.approx(0.004, rel=0.1)
    assert st["p95_over_median"] < 1.3


@pytest.mark.parametrize("bad", [0.0, -1.0, 1.5])
def test_bad_speed(bad):
    with pytest.raises(ValueError, match=r"pacing speed must be in \(0, 1\]"):
        ComputePacer(bad)


def test_cpu_modes():
    assert cpu.shortest_period_us(0.05) == 20_000
    assert cpu.shortest_period_us(0.5) == 2000
    assert cpu.shortest_period_us(4.0) == 1000
    assert cpu.cgroup_cpu("cfs", 0.1) == (0.1, 100_000)
    assert cpu.cgroup_cpu("cfs-short", 0.1) == (0.1, 10_000)
    cores, _ = cpu.cgroup_cpu("pace", 0.1)
    assert cores >= 1.0  # relaxed: the cgroup never throttles a paced agent
    assert cpu.pace_speed("pace", 0.1) == 0.1 and cpu.pace_speed("pace", 2.0) == 1.0
    assert cpu.pace_speed("cfs", 0.1) is None
    with pytest.raises(ValueError, match="unknown cpu emulation 'x'"):
        cpu.cgroup_cpu("x", 1.0)
