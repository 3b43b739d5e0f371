"""The agents' receive-side timing (no root): ``node_agent.wire.release_time`` holds a frame until
max(arrival - transit floor + delay, sent_at + wire bytes / path rate + delay) — the serialisation
floor that a lone small packet needs because HTB passes it at line rate — and ``TransitFloor``
learns the floor from small frames only."""
from __future__ import annotations

import pytest

from node_agent.wire import MAX_TRANSIT_FLOOR_S, PREFIX, Frame, TransitFloor, release_time as _release_time

RATE = 1.25e6  # 10 Mbit/s in bytes/s
DELAY = 0.005


def frame(payload_bytes: int, sent_at: float, received_at: float) -> Frame:
    return Frame({"type": "act", "kind": "x", "seq": 1}, b"\0" * payload_bytes, sent_at, received_at, received_at)


def test_small_frame_after_idle_held_for_serialisation_plus_delay():
    f = frame(3072, sent_at=100.0, received_at=100.00005)  # crossed at line rate: 50 us
    assert f.wire_bytes > PREFIX.size + 3072
    rel = _release_time(f, DELAY, RATE)
    assert rel == pytest.approx(100.0 + f.wire_bytes / RATE + DELAY, abs=1e-9)
    assert rel - f.received_at > f.wire_bytes / RATE  # ~2.5 ms held beyond arrival + delay


def test_large_frame_arriving_late_released_at_arrival_plus_delay():
    f = frame(100_000, sent_at=100.0, received_at=100.5)  # queued behind other traffic: 0.5 s > 80 ms
    assert f.wire_bytes / RATE < 0.5
    assert _release_time(f, DELAY, RATE) == pytest.approx(100.5 + DELAY, abs=1e-9)


def test_without_a_rate_only_the_delay_applies():
    f = frame(3072, sent_at=100.0, received_at=100.00005)
    assert _release_time(f, DELAY, None) == pytest.approx(100.00005 + DELAY, abs=1e-9)
    assert _release_time(f, 0.0, 0.0) == pytest.approx(100.00005, abs=1e-9)


def test_floor_and_arrival_meet_at_the_boundary():
    f = frame(10_000, sent_at=100.0, received_at=100.0)
    t_ser = f.wire_bytes / RATE
    on_time = frame(10_000, sent_at=100.0, received_at=100.0 + t_ser)
    assert _release_time(f, DELAY, RATE) == pytest.approx(_release_time(on_time, DELAY, RATE), abs=1e-9)
    later = frame(10_000, sent_at=100.0, received_at=100.0 + 2 * t_ser)
    assert _release_time(later, DELAY, RATE) == pytest.approx(100.0 + 2 * t_ser + DELAY, abs=1e-9)


def test_transit_floor_is_the_least_small_frame_transit_and_is_credited():
    floor = TransitFloor()
    assert floor.observe(frame(200_000, sent_at=100.0, received_at=100.2)) == 0.0  # large: not stack cost
    assert floor.observe(frame(100, sent_at=100.0, received_at=100.00012)) == pytest.approx(0.00012)
    assert floor.observe(frame(100, sent_at=101.0, received_at=101.00030)) == pytest.approx(0.00012)
    assert floor.observe(frame(100, sent_at=102.0, received_at=102.00008)) == pytest.approx(0.00008)
    f = frame(100, sent_at=103.0, received_at=103.00010)
    assert _release_time(f, DELAY, None, floor.seconds) == pytest.approx(103.00002 + DELAY, abs=1e-9)


def test_transit_floor_is_capped_and_never_releases_before_arrival():
    floor = TransitFloor()
    assert floor.observe(frame(100, sent_at=100.0, received_at=100.01)) == MAX_TRANSIT_FLOOR_S  # taken under load
    f = frame(100, sent_at=100.0, received_at=100.02)
    assert _release_time(f, 0.0, None, floor.seconds) == pytest.approx(100.02, abs=1e-9)  # no delay: no hold
