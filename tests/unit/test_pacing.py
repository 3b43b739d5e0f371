"""Compute-time pacing (node_agent.pacing) and the CPU emulation decisions (testbed.emulation.cpu)."""
import time

import pytest

from node_agent.pacing import ComputePacer, DeviceClock
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
    machine = {"flops_per_s": 1e11, "bytes_per_s": 2e10, "call_s": 5e-5}
    assert cpu.pacing_for("pace", 0.1, machine) == {"clock": {"flops_per_s": 1e10, "bytes_per_s": 2e9, "call_s": 5e-4}}
    assert cpu.pacing_for("pace", 2.0, machine)["clock"]["bytes_per_s"] == 2e10  # one worker thread: at most 1
    assert cpu.pacing_for("pace-cpu", 0.1) == {"speed": 0.1}
    assert cpu.pacing_for("cfs", 0.1) == {"speed": None}
    with pytest.raises(ValueError, match="needs the machine's measured roofline"):
        cpu.pacing_for("pace", 0.1)
    with pytest.raises(ValueError, match="unknown cpu emulation 'x'"):
        cpu.cgroup_cpu("x", 1.0)


def test_device_clock_holds_to_the_roofline_whatever_the_cpu():
    """Roofline pacing: a block is held to max(F/R, B/W) + call_s, however long it really computed."""
    clock = DeviceClock(flops_per_s=1e9, bytes_per_s=1e8, call_s=0.002)
    assert clock.time_s(1e6, 1e6) == pytest.approx(0.012)  # memory-bound: 10 ms + 2 ms
    assert clock.time_s(2e7, 1e6) == pytest.approx(0.022)  # compute-bound: 20 ms + 2 ms
    assert clock.time_s(0, 1e5, calls=0) == pytest.approx(0.001)
    assert clock.matvec_flops_per_s(4) == pytest.approx(5e7)
    assert clock.scaled(0.5).call_s == pytest.approx(0.004)
    p = ComputePacer(clock=clock)
    for spin in (0.0005, 0.003):  # different CPU, same device time
        t0 = time.perf_counter()
        with p.paced("ffn", 1e6, 1e6):
            _spin(spin)
        assert time.perf_counter() - t0 == pytest.approx(0.012, abs=0.0015)
    st = p.stats()
    assert st["mode"] == "device" and st["kinds"]["ffn"]["paced_over_device_p50"] == pytest.approx(1.0, abs=0.1)
    with p.paced("attn", 1e3, 1e3, calls=0):  # 10 us of device time, 20 ms of real work: late
        _spin(0.02)
    assert p.stats()["kinds"]["attn"]["late_fraction"] == 1.0
    with pytest.raises(ValueError, match="positive FLOP/s"):
        DeviceClock(0.0, 1.0)
