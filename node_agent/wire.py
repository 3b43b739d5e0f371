"""Framed binary messages over a stream socket, with optional emulated one-way delay on receipt.

Frame layout (network byte order), no pickle anywhere:
    magic  4s  b"HDRM"
    version H  WIRE_VERSION
    flags   H  reserved, 0
    hlen    I  length of the JSON header (utf-8)
    plen    Q  length of the raw payload
    sent_at d  sender's time.time() when the frame was handed to the kernel
followed by the JSON header (must contain "type") and the payload bytes (e.g. raw tensor data).

Delay emulation: where the kernel has no netem, a receiver built with a ``delay_s`` releases each
frame at its arrival (last byte received) plus ``delay_s`` (sender and receiver share the host clock, since all
emulated hosts run on one kernel). The frame still crossed the shaped link, so rate and loss apply
in the kernel and the propagation delay applies here. ``delay_s`` may be a callable so that a
scenario can change it while the connection lives.
"""
from __future__ import annotations

import json
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

Delay = Union[float, Callable[[], float]]


class WireError(ProtocolError):
    """A peer sent something that is not a valid frame, or closed the connection mid-frame."""

    code = "wire"


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
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


def recv_frame(sock: socket.socket, delay_s: Delay = 0.0) -> Frame:
    """Receive one frame; with ``delay_s`` hold it until its arrival plus ``delay_s``."""
    magic, version, _flags, hlen, plen, sent_at = PREFIX.unpack(_recv_exact(sock, PREFIX.size))
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}: not a Headroom peer")
    if version != WIRE_VERSION:
        raise WireError(f"wire version {version}, this side speaks {WIRE_VERSION}")
    if hlen > MAX_HEADER_BYTES or plen > MAX_PAYLOAD_BYTES:
        raise WireError(f"frame too large: header {hlen} B, payload {plen} B")
    header = json.loads(_recv_exact(sock, hlen)) if hlen else {}
    payload = _recv_exact(sock, plen) if plen else b""  # bytearray: no second copy of a large payload
    received_at = time.time()
    delay = delay_s() if callable(delay_s) else delay_s
    # The last byte left the shaped link at received_at; propagation delay comes on top of the
    # transmission time, so a large frame is released at its arrival plus the delay. (A caller
    # that blocks between frames inflates received_at; the agents timestamp in a reader thread.)
    release = max(received_at, sent_at) + delay
    wait = release - time.time()
    if wait > 0:
        time.sleep(wait)
    return Frame(header, payload, sent_at, received_at, max(received_at, time.time()))


def connect(host: str, port: int, timeout_s: float = 10.0) -> socket.socket:
    """Connect with TCP_NODELAY (small activations must not wait for Nagle)."""
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock
