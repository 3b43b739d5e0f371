"""Framed wire: round trip, emulated delay on receipt, and refusal of foreign or oversized frames."""
from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest

from node_agent import wire


def pair():
    a, b = socket.socketpair()
    return a, b


def test_round_trip_header_and_raw_payload():
    a, b = pair()
    x = np.arange(1000, dtype=np.float32)
    n = wire.send_frame(a, {"type": "act", "layer": 3}, x.tobytes())
    f = wire.recv_frame(b)
    assert f.type == "act" and f.header["layer"] == 3
    assert np.array_equal(np.frombuffer(f.payload, dtype=np.float32), x)
    assert n == f.wire_bytes
    big = bytes(range(256)) * 1024  # takes the two-send path; larger than the socket buffer
    sender = threading.Thread(target=wire.send_frame, args=(a, {"type": "blob"}, big))
    sender.start()
    assert wire.recv_frame(b).payload == big
    sender.join(timeout=5)


def test_delay_holds_frame_until_sent_at_plus_delay():
    a, b = pair()
    wire.send_frame(a, {"type": "ping"})
    t0 = time.time()
    f = wire.recv_frame(b, delay_s=lambda: 0.05)
    assert f.released_at - f.sent_at >= 0.05
    assert 0.045 <= time.time() - t0 <= 0.2


def test_bad_magic_and_version_are_refused():
    a, b = pair()
    a.sendall(struct.pack("!4sHHIQd", b"HTTP", 1, 0, 0, 0, 0.0))
    with pytest.raises(wire.WireError, match="bad magic"):
        wire.recv_frame(b)
    a.sendall(wire.PREFIX.pack(wire.MAGIC, 99, 0, 0, 0, 0.0))
    with pytest.raises(wire.WireError, match="wire version 99"):
        wire.recv_frame(b)


def test_oversized_and_truncated_frames():
    a, b = pair()
    a.sendall(wire.PREFIX.pack(wire.MAGIC, wire.WIRE_VERSION, 0, wire.MAX_HEADER_BYTES + 1, 0, 0.0))
    with pytest.raises(wire.WireError, match="too large"):
        wire.recv_frame(b)
    a.sendall(wire.PREFIX.pack(wire.MAGIC, wire.WIRE_VERSION, 0, 2, 10, 0.0) + b"{}" + b"abc")
    a.close()
    with pytest.raises(wire.WireError, match="connection closed after 3 of 10 bytes"):
        wire.recv_frame(b)


def test_header_needs_type():
    a, _ = pair()
    with pytest.raises(ValueError, match="type"):
        wire.send_frame(a, {"layer": 1})


def test_tensor_payload_is_sent_without_assembly_and_matches_bytes():
    import torch

    from node_agent.serialize import tensors_from_bytes, tensors_to_bytes, tensors_to_payload

    ts = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(), "b": torch.ones(70000)}  # a is strided
    h1, eager = tensors_to_bytes(ts)
    h2, lazy = tensors_to_payload(ts)
    assert h1 == h2 and len(lazy) == len(eager) and lazy.to_bytearray() == eager
    a, b = pair()
    sender = threading.Thread(target=wire.send_frame, args=(a, {"type": "mig", "blk": h2}, lazy))
    sender.start()
    f = wire.recv_frame(b)
    sender.join(timeout=5)
    out = tensors_from_bytes(f.header["blk"], f.payload)
    assert torch.equal(out["a"], ts["a"]) and torch.equal(out["b"], ts["b"])


def test_a_column_slice_is_exported_in_bounded_runs_of_rows():
    """An FFN piece's ``w_down[:, a:b]`` is strided: it must go out in small copies (a host at
    its memory limit exports it), and the bytes must equal those of the whole tensor's copy."""
    import torch

    from node_agent.serialize import tensors_to_bytes, tensors_to_payload

    w_down = torch.randn(768, 3072)
    piece = {"w_down": w_down[:, 256:3072], "w_up": torch.randn(3072, 768)[256:3072]}  # 8.3 MB each
    _, eager = tensors_to_bytes(piece)
    _, lazy = tensors_to_payload(piece)
    bufs = list(lazy.buffers())
    assert b"".join(bytes(b) for b in bufs) == bytes(eager)
    assert max(len(b) for b in bufs[:-1]) <= 1 << 16  # w_down, copied 64 KB at a time
    assert not piece["w_down"].is_contiguous() and piece["w_up"].is_contiguous()
    assert len(bufs[-1]) == piece["w_up"].numel() * 4  # w_up: one view of its own memory


def test_jitter_draws_stay_within_the_hops_and_spread_as_uniforms():
    import random
    import statistics

    rng = random.Random(1)
    draws = [wire.draw_jitter(rng, (0.002, 0.001)) for _ in range(20000)]
    assert max(abs(d) for d in draws) <= 0.003
    assert statistics.pstdev(draws) == pytest.approx(((0.002**2 + 0.001**2) / 3) ** 0.5, rel=0.03)
    assert abs(statistics.fmean(draws)) < 5e-5
    assert wire.draw_jitter(rng, ()) == 0.0


def test_a_connection_releases_its_frames_in_order():
    floor = wire.TransitFloor()
    assert floor.in_order(10.0) == 10.0
    assert floor.in_order(9.5) == 10.0  # drawn earlier than its predecessor: waits for it (TCP order)
    assert floor.in_order(11.0) == 11.0


def test_jitter_may_not_exceed_the_delay():
    from testbed.spec.schema import LinkSpec

    link = LinkSpec.model_validate({"a": "h1", "b": "s1", "bandwidth_mbps": 10, "delay_ms": 4, "jitter_ms": 1,
                                    "b_to_a": {"jitter_ms": 3}})
    assert link.direction("h1").jitter_ms == 1 and link.direction("s1").jitter_ms == 3
    with pytest.raises(Exception, match=r"jitter_ms \(5\) must not exceed delay_ms \(4\) on h1->s1"):
        LinkSpec.model_validate({"a": "h1", "b": "s1", "bandwidth_mbps": 10, "delay_ms": 4, "jitter_ms": 5})


def test_payload_buffer_grows_with_the_bytes_not_the_announced_size():
    """A frame announcing 1 GiB that sends 10 bytes and closes costs about one receive chunk."""
    import tracemalloc

    a, b = pair()
    a.sendall(wire.PREFIX.pack(wire.MAGIC, wire.WIRE_VERSION, 0, 2, 1 << 30, time.time()) + b"{}" + b"0123456789")
    a.close()
    tracemalloc.start()
    with pytest.raises(wire.WireError, match="closed after 10 of 1073741824 bytes"):
        wire.recv_frame(b)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * wire.RECV_CHUNK, peak


def test_max_payload_refuses_before_reading_and_discard_keeps_the_stream():
    a, b = pair()
    head = b'{"type":"blob"}'
    a.sendall(wire.PREFIX.pack(wire.MAGIC, wire.WIRE_VERSION, 0, len(head), 3 << 20, time.time()))
    with pytest.raises(wire.FrameTooLarge) as exc:
        wire.recv_frame(b, max_payload=lambda: 2 << 20)  # nothing but the prefix was sent: not read
    assert exc.value.remaining == len(head) + (3 << 20)
    sender = threading.Thread(target=lambda: (a.sendall(head + bytes(3 << 20)), wire.send_frame(a, {"type": "next"})))
    sender.start()
    wire.discard(b, exc.value.remaining)
    assert wire.recv_frame(b).type == "next"
    sender.join(timeout=5)
    a.sendall(wire.PREFIX.pack(wire.MAGIC, wire.WIRE_VERSION, 0, 2, (1 << 31) + 1, time.time()))
    with pytest.raises(wire.FrameTooLarge):  # beyond the absolute bound without any limit given
        wire.recv_frame(b)


@pytest.mark.parametrize("header", [b"[1, 2]", b"\xff\xfe", b'{"type": 5}', b'"act"', b'{"no": "type"}'])
def test_a_bad_header_is_a_bad_frame_with_the_stream_in_sync(header):
    a, b = pair()
    a.sendall(wire.PREFIX.pack(wire.MAGIC, wire.WIRE_VERSION, 0, len(header), 4, time.time()) + header + b"abcd")
    wire.send_frame(a, {"type": "next"})
    with pytest.raises(wire.BadFrame):
        wire.recv_frame(b)
    assert wire.recv_frame(b).type == "next"


@pytest.mark.parametrize("ahead_s", [5.0, float("nan"), float("inf")])
def test_a_send_time_in_the_future_is_refused(ahead_s):
    sent_at = time.time() + ahead_s
    a, b = pair()
    a.sendall(wire.PREFIX.pack(wire.MAGIC, wire.WIRE_VERSION, 0, 15, 0, sent_at) + b'{"type":"act"} ')
    with pytest.raises(wire.BadFrame, match="ahead of this clock"):
        wire.recv_frame(b, max_future_s=1.0)
    wire.send_frame(a, {"type": "ok"})
    assert wire.recv_frame(b, max_future_s=1.0).type == "ok"
