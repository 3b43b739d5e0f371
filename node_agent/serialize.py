"""Tensor (de)serialisation for the wire: a JSON-able header plus one contiguous payload.

No pickle. The header lists every tensor's name, dtype, shape, byte offset and length; the payload
is the tensors' raw little-endian bytes back to back. Used for block loading and KV-group
migration between node agents.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from testbed.core.errors import ProtocolError

FORMAT = "headroom-tensors/1"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SerializeError(ProtocolError, ValueError):
    """The header and payload do not describe a valid set of tensors."""


def tensors_to_bytes(tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> tuple[dict, bytearray]:
    """Pack tensors into (header, payload). `meta` (JSON-able) is copied into header["meta"].

    The payload is allocated once and each tensor copied into it once, so exporting a block costs
    the sender one block's worth of extra memory (it matters on a host at its memory limit)."""
    if sys.byteorder != "little":
        raise SerializeError("only little-endian hosts are supported")
    entries, off = [], 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise SerializeError(f"{name}: unsupported dtype {t.dtype}")
        n = t.numel() * t.element_size()
        entries.append({"name": name, "dtype": _NAMES[t.dtype], "shape": list(t.shape), "offset": off, "nbytes": n})
        off += n
    payload = bytearray(off)
    out = torch.frombuffer(payload, dtype=torch.uint8) if off else None  # (nbytes,) view of the payload
    for e, t in zip(entries, tensors.values()):
        if e["nbytes"]:
            src = t.detach().cpu().reshape(-1)  # a view when contiguous
            out[e["offset"] : e["offset"] + e["nbytes"]].view(t.dtype).copy_(src)
    header = {"format": FORMAT, "tensors": entries, "nbytes": off, "meta": dict(meta or {})}
    return header, payload


def _row_major_bytes(t: Tensor, chunk: int = 1 << 16):
    """``t``'s bytes in row-major order as memoryviews: its own memory when it is contiguous,
    else copies of ``chunk``-byte runs of rows (a column slice such as ``w_down[:, a:b]`` is never
    copied whole, so a host at its limit can still export it)."""
    if t.is_contiguous():
        yield memoryview(t.reshape(-1).view(torch.uint8).numpy())
        return
    if t.dim() <= 1:
        yield memoryview(t.contiguous().view(torch.uint8).numpy())
        return
    rows = max(1, chunk // max(1, t[0].numel() * t.element_size()))
    for i in range(0, t.shape[0], rows):
        yield memoryview(t[i:i + rows].contiguous().reshape(-1).view(torch.uint8).numpy())


class TensorPayload:
    """A payload that is never assembled: the tensors' own memory, sent one tensor at a time.

    A host at its memory limit can still export a block (a non-contiguous tensor is sent in
    64 KB runs of rows, each copied only while it is sent). ``len()`` is the payload size;
    ``node_agent.wire.send_frame`` sends ``buffers()``."""

    def __init__(self, tensors: list[Tensor]):
        self._tensors = tensors
        self._len = sum(t.numel() * t.element_size() for t in tensors)

    def __len__(self) -> int:
        return self._len

    def buffers(self):
        for t in self._tensors:
            if t.numel():
                yield from _row_major_bytes(t.detach().cpu())

    def to_bytearray(self) -> bytearray:
        out = bytearray(self._len)
        off = 0
        for b in self.buffers():
            out[off : off + len(b)] = b
            off += len(b)
        return out


def tensors_to_payload(tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> tuple[dict, TensorPayload]:
    """Like ``tensors_to_bytes`` (same header, same byte layout) without copying into one buffer."""
    if sys.byteorder != "little":
        raise SerializeError("only little-endian hosts are supported")
    entries, off = [], 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise SerializeError(f"{name}: unsupported dtype {t.dtype}")
        n = t.numel() * t.element_size()
        entries.append({"name": name, "dtype": _NAMES[t.dtype], "shape": list(t.shape), "offset": off, "nbytes": n})
        off += n
    header = {"format": FORMAT, "tensors": entries, "nbytes": off, "meta": dict(meta or {})}
    return header, TensorPayload(list(tensors.values()))


def tensors_from_bytes(header: dict, payload: bytes | bytearray | memoryview | TensorPayload,
                       copy: bool = True) -> dict[str, Tensor]:
    """Inverse of tensors_to_bytes; every returned tensor owns its memory (writable). With
    ``copy=False`` and a bytearray payload the tensors are views of the payload instead (no second
    copy; the payload stays alive while any of them does)."""
    if isinstance(payload, TensorPayload):
        payload = payload.to_bytearray()
    if header.get("format") != FORMAT:
        raise SerializeError(f"unknown format {header.get('format')!r}")
    if len(payload) != header["nbytes"]:
        raise SerializeError(f"payload has {len(payload)} bytes, header says {header['nbytes']}")
    if not len(payload):
        buf = torch.empty(0, dtype=torch.uint8)
    else:  # a bytearray is used in place (each tensor is cloned out of it below)
        buf = torch.frombuffer(payload if isinstance(payload, bytearray) else bytearray(payload), dtype=torch.uint8)
    out: dict[str, Tensor] = {}
    for e in header["tensors"]:
        dt = _DTYPES.get(e["dtype"])
        if dt is None:
            raise SerializeError(f"{e['name']}: unknown dtype {e['dtype']!r}")
        raw = buf[e["offset"] : e["offset"] + e["nbytes"]]
        numel = 1
        for s in e["shape"]:
            numel *= s
        if raw.numel() != numel * torch.empty(0, dtype=dt).element_size():
            raise SerializeError(f"{e['name']}: {raw.numel()} bytes do not fit shape {e['shape']} {e['dtype']}")
        aligned = e["offset"] % max(1, torch.empty(0, dtype=dt).element_size()) == 0
        out[e["name"]] = (raw if not copy and aligned else raw.clone()).view(dt).reshape(e["shape"])
    return out
