"""Message types and their encoding over ``node_agent.wire`` (control plane and data plane).

Control plane (controller <-> agent, and controller <-> fork server): one Unix stream socket per
peer, strictly request/reply. A request is a frame ``{"type": "req", "cmd": NAME, "id": n, ...}``
(optionally with a raw payload); the reply is ``{"type": "ok", "id": n, ...}`` or
``{"type": "error", "id": n, "code": CODE, "message": TEXT, ...}`` where CODE is
``testbed.core.errors.error_code`` of the exception (``budget``, ``timeout``, ``token_failed``, ...;
never a class name). Every call has a timeout.

Data plane (agent -> agent, TCP over the emulated addresses, one connection per ordered pair,
opened by the sender): the first frame is ``hello`` (sender name, protocol version and, when the run
has one, its secret token: a receiver with a token drops a connection whose hello lacks it); then
  ``act``      one activation tensor of token ``seq`` (kinds: x, ho, h, part, out), raw float32
               payload, ``shape``, placement version ``pv``, the critical-path accumulator ``cp``
               = [compute_s, transfer_s, wait_s] and the ``tally`` of activation bytes per link;
  ``mig``      one migrating block (weights [+ KV]) as a ``node_agent.serialize`` payload;
  ``mig_ack``  / ``mig_nack``  the receiver's answer to one ``mig`` frame.
No pickle anywhere; sizes are bounded by ``wire``.
"""
from __future__ import annotations

import hmac
import math
import socket
import time
from typing import Any

import torch

from node_agent.wire import Frame, WireError, discard, recv_frame, send_frame
from testbed.core.errors import AgentError, ProtocolError, error_code

PROTOCOL_VERSION = 1
ACT_KINDS = ("x", "ho", "h", "part", "out")
CONTROL_TIMEOUT_S = 30.0


class RemoteError(AgentError):
    """An agent (or the fork server) answered a request with an error; ``code`` is the remote one."""

    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.details = code, message, details or {}


class CallTimeout(AgentError):
    """A control call got no reply within its timeout."""

    code = "timeout"


# ---------------------------------------------------------------------------- tensors
def tensor_payload(t: torch.Tensor) -> tuple[list[int], bytes]:
    """(shape, raw float32 bytes) of a tensor."""
    t = t.detach().to(torch.float32).contiguous()
    return list(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from(shape: list[int], payload: bytes | bytearray) -> torch.Tensor:
    """Inverse of ``tensor_payload`` (the tensor owns a writable copy)."""
    n = 1
    for s in shape:
        n *= int(s)
    if len(payload) != 4 * n:
        raise ProtocolError(f"payload of {len(payload)} B does not fit float32 shape {shape}")
    if n == 0:
        return torch.empty(shape, dtype=torch.float32)
    return torch.frombuffer(bytearray(payload), dtype=torch.float32).reshape(shape)


# ---------------------------------------------------------------------------- control plane
def request_frame(cmd: str, call_id: int, **args: Any) -> dict:
    return {"type": "req", "cmd": cmd, "id": call_id, **args}


def ok_frame(call_id: int, **result: Any) -> dict:
    return {"type": "ok", "id": call_id, **result}


MAX_MESSAGE_CHARS = 4000


def error_frame(call_id: int | None, exc: BaseException) -> dict:
    """An error reply (``call_id`` None when the request could not be read); the message is capped."""
    details = getattr(exc, "details", None)
    message = str(exc) if len(str(exc)) <= MAX_MESSAGE_CHARS else str(exc)[:MAX_MESSAGE_CHARS] + " ..."
    out = {"type": "error", "id": call_id, "code": error_code(exc), "message": message}
    if isinstance(details, dict):
        out["details"] = details
    return out


def reply(conn: socket.socket, header: dict, payload: bytes = b"") -> bool:
    """Send a reply on a control connection; False when the peer is gone or the reply unsendable."""
    try:
        send_frame(conn, header, payload)
        return True
    except (OSError, ValueError):  # WireError included
        return False


def discard_rest(conn: socket.socket, n: int) -> bool:
    """Drop the ``n`` unread bytes of a refused frame; False when the connection broke meanwhile."""
    try:
        discard(conn, n)
        return True
    except (WireError, OSError):
        return False


def call(sock: socket.socket, cmd: str, call_id: int, payload: bytes = b"", timeout_s: float = CONTROL_TIMEOUT_S,
         **args: Any) -> tuple[dict, bytes]:
    """One request/reply exchange on a control socket; raises RemoteError / CallTimeout / WireError."""
    sock.settimeout(timeout_s)
    try:
        send_frame(sock, request_frame(cmd, call_id, **args), payload)
        deadline = time.monotonic() + timeout_s
        while True:
            frame = recv_frame(sock)
            if frame.header.get("id") == call_id:
                break
            if time.monotonic() > deadline:  # stale replies of abandoned calls are skipped
                raise CallTimeout(f"{cmd}: no reply within {timeout_s:.1f} s")
    except socket.timeout:
        raise CallTimeout(f"{cmd}: no reply within {timeout_s:.1f} s") from None
    except OSError as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(f"{cmd}: control connection failed: {exc}") from exc
    return check_reply(frame)


def check_reply(frame: Frame) -> tuple[dict, bytes]:
    if frame.type == "error":
        h = frame.header
        raise RemoteError(h.get("code", "internal"), h.get("message", ""), h.get("details"))
    if frame.type != "ok":
        raise ProtocolError(f"expected a reply, got {frame.type!r}")
    return frame.header, frame.payload


# ---------------------------------------------------------------------------- data plane
def hello_frame(sender: str, token: str | None = None) -> dict:
    """The first frame of a data connection; ``token`` is the run's secret (when the run has one)."""
    out = {"type": "hello", "from": sender, "proto": PROTOCOL_VERSION}
    if token is not None:
        out["token"] = token
    return out


def check_hello(frame: Frame, token: str | None = None) -> str:
    """The sender's name; a ``ProtocolError`` unless the frame is a hello of this protocol and, when
    this agent has a run token, carries the same token (compared in constant time, never logged)."""
    if frame.type != "hello":
        raise ProtocolError(f"data connection must start with hello, got {frame.type!r}")
    if frame.header.get("proto") != PROTOCOL_VERSION:
        raise ProtocolError(f"peer speaks protocol {frame.header.get('proto')}, this agent {PROTOCOL_VERSION}")
    if not isinstance(frame.header.get("from"), str):
        raise ProtocolError(f"hello needs the sender's name in 'from', got {frame.header.get('from')!r}")
    if token is not None and not hmac.compare_digest(str(frame.header.get("token", "")).encode(), token.encode()):
        raise ProtocolError(f"peer {str(frame.header.get('from'))[:16]!r} is not of this run (wrong run token)")
    return str(frame.header["from"])


MAX_DELAY_S = 60.0  # an emulated one-way delay beyond this is a configuration error, not a delay
_INT, _STR, _LIST, _DICT = int, str, list, dict
_DATA_FIELDS = {  # type -> required fields and their types (checked before the worker sees a frame)
    "act": {"kind": _STR, "seq": _INT, "layer": _INT, "pv": _INT, "shape": _LIST, "cp": _LIST, "tally": _DICT},
    "mig": {"mig_id": _INT, "item": _DICT, "blk": _DICT},
    "mig_ack": {"mig_id": _INT},
    "mig_nack": {"mig_id": _INT},
    "fail": {"from": _STR, "message": _STR},
}


def check_data_header(h: dict, payload_bytes: int) -> None:
    """Raise ProtocolError unless ``h`` is a data-plane message with fields of the right types (an
    activation's shape must match its float32 payload, its critical-path times be finite)."""
    fields = _DATA_FIELDS.get(h.get("type"))
    if fields is None:
        raise ProtocolError(f"unexpected data frame type {h.get('type')!r} (expected one of {', '.join(_DATA_FIELDS)})")
    for name, kind in fields.items():
        value = h.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProtocolError(f"{h['type']} frame: {name!r} must be {kind.__name__}, got {value!r}"[:300])
    if h["type"] == "act":
        if h["kind"] not in ACT_KINDS:
            raise ProtocolError(f"unknown activation kind {h['kind']!r}")
        shape, cp = h["shape"], h["cp"]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) or \
                4 * math.prod(shape) != payload_bytes:
            raise ProtocolError(f"act shape {shape!r} does not fit a float32 payload of {payload_bytes} B"[:300])
        if len(cp) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in cp):
            raise ProtocolError(f"act cp must be 3 finite numbers, got {cp!r}"[:300])


def peer_delays(values: dict) -> dict[str, float]:
    """Per-peer one-way delays: finite seconds in [0, MAX_DELAY_S] (a NaN would break the inbox's order)."""
    out = {str(k): float(v) for k, v in values.items()}
    bad = {k: v for k, v in out.items() if not (math.isfinite(v) and 0 <= v <= MAX_DELAY_S)}
    if bad:
        raise ValueError(f"delays must be finite seconds in [0, {MAX_DELAY_S}], got {bad}"[:300])
    return out


def peer_jitters(values: dict | None) -> dict[str, tuple[float, ...]]:
    """Per-peer jitter of each jittered hop on the path: finite seconds in [0, MAX_DELAY_S]."""
    out = {str(k): tuple(float(x) for x in v) for k, v in (values or {}).items()}
    bad = {k: v for k, v in out.items() if not all(math.isfinite(x) and 0 <= x <= MAX_DELAY_S for x in v)}
    if bad:
        raise ValueError(f"jitters must be finite seconds in [0, {MAX_DELAY_S}], got {bad}"[:300])
    return out


def peer_rates(values: dict) -> dict[str, float]:
    """Per-peer path rates: finite bytes/s > 0."""
    out = {str(k): float(v) for k, v in values.items()}
    bad = {k: v for k, v in out.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"rates must be finite bytes/s > 0, got {bad}"[:300])
    return out


def act_header(kind: str, seq: int, layer: int, pv: int, shape: list[int], cp: list[float],
               tally: dict[str, int], **extra: Any) -> dict:
    """An activation message: ``layer`` is the layer the tensor feeds (or produced, for ho/part)."""
    if kind not in ACT_KINDS:
        raise ProtocolError(f"unknown activation kind {kind!r}")
    return {"type": "act", "kind": kind, "seq": seq, "layer": layer, "pv": pv, "shape": shape,
            "cp": [round(v, 9) for v in cp], "tally": tally, **extra}


def merge_tally(into: dict[str, int], other: dict[str, int]) -> dict[str, int]:
    for k, v in other.items():
        into[k] = into.get(k, 0) + int(v)
    return into
