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
import socket
import time
from typing import Any

import torch

from node_agent.wire import Frame, WireError, recv_frame, send_frame
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


def error_frame(call_id: int, exc: BaseException) -> dict:
    details = getattr(exc, "details", None)
    out = {"type": "error", "id": call_id, "code": error_code(exc), "message": str(exc)}
    if isinstance(details, dict):
        out["details"] = details
    return out


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
    if token is not None and not hmac.compare_digest(str(frame.header.get("token", "")).encode(), token.encode()):
        raise ProtocolError(f"peer {str(frame.header.get('from'))[:16]!r} is not of this run (wrong run token)")
    return str(frame.header["from"])


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
