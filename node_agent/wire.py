"""Framed binary messages over a stream socket, with optional emulated one-way delay on receipt.

Frame layout (network byte order), no pickle anywhere:
    magic  4s  b"HDRM"
    version H  WIRE_VERSION
    flags   H  reserved, 0
    hlen    I  length of the JSON header (utf-8)
    plen    Q  length of the raw payload
    sent_at d  sender's time.time() when the frame was handed to the kernel
followed by the JSON header (must contain "type") and the payload bytes (e.g. raw tensor data).

Delay emulation: where the kernel has no netem, the receiver holds each frame until ``release_time``:
its arrival (last byte received) plus the one-way delay, less the connection's *transit floor*
(``TransitFloor``: the least arrival-minus-send seen for a small frame, i.e. this machine's own
stack cost — syscalls, veth pairs, bridges, the reader's wake-up — which on a real link is part of
the propagation delay the spec states; without it every hop read ~0.1-0.2 ms long), and never
before the frame could have crossed the bottleneck. Sender and receiver share the host clock, since
all emulated hosts run on one kernel. The frame still crossed the shaped link, so rate, queueing and
loss apply in the kernel and the propagation delay applies here. ``delay_s`` may be a callable so
that a scenario can change it while the connection lives. Jitter: each frame's delay gains the sum
over the path's jittered hops of a uniform draw in ±j (``draw_jitter``), and a connection's frames are
released in order (``TransitFloor.last_release``), as TCP delivers them.

Hardening (issue 15 item 4): a payload buffer grows as its bytes arrive, never to the announced
size up front; ``max_payload`` refuses a frame larger than the receiver can hold before any of it is
read (``FrameTooLarge``: the caller discards or closes); a frame read whole whose header is not a
JSON object with a string ``type``, or (with ``max_future_s``) whose send time is not finite or lies
in the future beyond the bound, raises ``BadFrame`` with the stream still in sync.
"""
from __future__ import annotations

import json
import math
import random
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable, Union

from testbed.core.errors import ProtocolError

MAGIC = b"HDRM"
WIRE_VERSION = 1
PREFIX = struct.Struct("!4sHHIQd")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 31
RECV_CHUNK = 1 << 20  # a payload buffer grows by at most this much ahead of the bytes received
CHECK_LIMIT_ABOVE = 1 << 20  # max_payload (a callable may read a cgroup) is asked only above this

Delay = Union[float, Callable[[], float]]


class WireError(ProtocolError):
    """A peer sent something that is not a valid frame, or closed the connection mid-frame."""

    code = "wire"


class BadFrame(WireError):
    """A frame was read whole but cannot be used; the stream is still in sync (reply, go on)."""

    code = "bad_frame"


class FrameTooLarge(WireError):
    """A frame's announced size is beyond the receiver's limit: only its prefix was read, so the
    caller must ``discard(sock, remaining)`` or close the connection."""

    code = "too_large"

    def __init__(self, hlen: int, plen: int, limit: int):
        super().__init__(f"frame refused: payload of {plen} B (header {hlen} B) is beyond the {limit} B this "
                         "receiver can hold")
        self.hlen, self.plen, self.limit = hlen, plen, limit

    @property
    def remaining(self) -> int:
        return self.hlen + self.plen


@dataclass
class Frame:
    header: dict
    payload: bytes | bytearray
    sent_at: float
    received_at: float  # when the bytes arrived (before any emulated delay)
    released_at: float  # when the frame was handed to the caller (after the emulated delay)

    @property
    def type(self) -> str:
        return self.header["type"]

    @property
    def wire_bytes(self) -> int:
        return PREFIX.size + len(json.dumps(self.header, separators=(",", ":")).encode()) + len(self.payload)


SMALL_FRAME_BYTES = 4096  # a frame this small crosses any shaped link here in well under its delay
MAX_TRANSIT_FLOOR_S = 0.0005  # the stack cost measured here is ~0.1 ms; never credit more than this


class TransitFloor:
    """One connection's receive state: its transit floor, the least ``received_at - sent_at`` over
    its small frames (0 until one is seen; small frames only, so serialisation of a large one is
    never taken for stack cost; capped, so a first sample taken under load cannot shorten a delay by
    much), and the release time of its last frame (frames leave in order)."""

    def __init__(self) -> None:
        self.seconds = MAX_TRANSIT_FLOOR_S
        self._seen = False
        self.last_release = 0.0

    def in_order(self, release: float) -> float:
        """``release``, but never before the connection's previous frame; remembered."""
        self.last_release = max(release, self.last_release)
        return self.last_release

    def observe(self, f: "Frame") -> float:
        if f.wire_bytes <= SMALL_FRAME_BYTES:
            transit = max(0.0, f.received_at - f.sent_at)
            self.seconds = min(self.seconds, transit) if self._seen else min(transit, MAX_TRANSIT_FLOOR_S)
            self._seen = True
        return self.seconds if self._seen else 0.0


def draw_jitter(rng: random.Random, hops: tuple[float, ...] | list[float]) -> float:
    """One frame's extra one-way delay (seconds): a uniform draw in ±j for each jittered hop, summed."""
    return sum(rng.uniform(-j, j) for j in hops)


def release_time(f: "Frame", delay_s: float, rate_bytes_per_s: float | None = None, floor_s: float = 0.0) -> float:
    """When a received frame may be used: its arrival less the transit floor, plus the path's
    propagation delay (this frame's, jitter drawn) — but never before it could have crossed the
    bottleneck (sent_at + size / rate + delay; that matters for small frames after idle, which the
    kernel's token bucket passes at line rate), and never before it arrived."""
    release = max(f.received_at - floor_s, f.sent_at) + delay_s
    if rate_bytes_per_s:
        release = max(release, f.sent_at + f.wire_bytes / rate_bytes_per_s + delay_s)
    return max(release, f.received_at)


def send_frame(sock: socket.socket, header: dict, payload: bytes | memoryview = b"") -> int:
    """Send one frame; returns the number of bytes put on the wire."""
    if "type" not in header:
        raise ValueError("frame header needs a 'type'")
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES or len(payload) > MAX_PAYLOAD_BYTES:
        raise WireError(f"frame too large: header {len(head)} B, payload {len(payload)} B")
    prefix = PREFIX.pack(MAGIC, WIRE_VERSION, 0, len(head), len(payload), time.time())
    if hasattr(payload, "buffers"):  # node_agent.serialize.TensorPayload: tensor by tensor, no assembly
        sock.sendall(prefix + head)
        for buf in payload.buffers():
            sock.sendall(buf)
    elif len(payload) < 65536:
        sock.sendall(prefix + head + bytes(payload))
    else:
        sock.sendall(prefix + head)
        sock.sendall(payload)
    return PREFIX.size + len(head) + len(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    """``n`` bytes; the buffer grows as they arrive (by at most ``RECV_CHUNK`` beyond them), so a
    peer that announces more than it sends costs no more than what it sent."""
    buf = bytearray(min(n, RECV_CHUNK))
    got = 0
    while got < n:
        if got == len(buf):
            buf.extend(bytes(min(max(len(buf), RECV_CHUNK), n - len(buf))))  # at most doubles
        with memoryview(buf) as view, view[got:] as tail:
            k = sock.recv_into(tail, len(buf) - got)
        if k == 0:
            raise WireError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def discard(sock: socket.socket, n: int) -> None:
    """Read and drop ``n`` bytes (the rest of a refused frame) in bounded chunks."""
    left = n
    while left > 0:
        chunk = sock.recv(min(left, RECV_CHUNK))
        if not chunk:
            raise WireError(f"connection closed with {left} bytes of a refused frame unread")
        left -= len(chunk)


def _header(raw: bytearray) -> dict:
    try:
        header = json.loads(raw) if raw else {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadFrame(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise BadFrame(f"frame header must be a JSON object with a string 'type', got {str(header)[:80]}")
    return header


def recv_frame(sock: socket.socket, delay_s: Delay = 0.0, floor: TransitFloor | None = None,
               rate_bytes_per_s: float | None = None, max_payload: int | Callable[[], int] | None = None,
               max_future_s: float | None = None, jitter: Callable[[], float] | None = None) -> Frame:
    """Receive one frame; with ``delay_s`` hold it until ``release_time`` (``floor``: the
    connection's ``TransitFloor``, updated with this frame, which also keeps frames in order; none
    means no floor is credited; ``rate_bytes_per_s``: the path's bottleneck, for the serialisation
    floor; ``jitter()``: this frame's jitter draw, seconds). ``max_payload`` (bytes, or a callable
    asked for large frames only) refuses larger frames before reading them; ``max_future_s``
    refuses a send time beyond now + that (see the module docstring)."""
    magic, version, _flags, hlen, plen, sent_at = PREFIX.unpack(_recv_exact(sock, PREFIX.size))
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}: not a Headroom peer")
    if version != WIRE_VERSION:
        raise WireError(f"wire version {version}, this side speaks {WIRE_VERSION}")
    if hlen > MAX_HEADER_BYTES:
        raise WireError(f"frame too large: header {hlen} B, payload {plen} B")
    if plen > MAX_PAYLOAD_BYTES:
        raise FrameTooLarge(hlen, plen, MAX_PAYLOAD_BYTES)
    if max_payload is not None and plen > CHECK_LIMIT_ABOVE:
        limit = max_payload() if callable(max_payload) else max_payload
        if plen > limit:
            raise FrameTooLarge(hlen, plen, max(0, int(limit)))
    raw = _recv_exact(sock, hlen) if hlen else bytearray()
    payload = _recv_exact(sock, plen) if plen else b""  # bytearray: no second copy of a large payload
    received_at = time.time()
    header = _header(raw)
    if max_future_s is not None and not (math.isfinite(sent_at) and sent_at <= received_at + max_future_s):
        raise BadFrame(f"send time {sent_at} is {sent_at - received_at:.3f} s ahead of this clock (bound "
                       f"{max_future_s} s): refused")
    delay = delay_s() if callable(delay_s) else delay_s
    frame = Frame(header, payload, sent_at, received_at, received_at)
    if delay:
        # (A caller that blocks between frames inflates received_at; the agents timestamp in a reader thread.)
        delay += jitter() if jitter else 0.0
        release = release_time(frame, delay, rate_bytes_per_s, floor.observe(frame) if floor else 0.0)
        wait = (floor.in_order(release) if floor else release) - time.time()
        if wait > 0:
            time.sleep(wait)
        frame.released_at = max(received_at, time.time())
    return frame


def connect(host: str, port: int, timeout_s: float = 10.0) -> socket.socket:
    """Connect with TCP_NODELAY (small activations must not wait for Nagle)."""
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock
