"""Tensor operations the blocks are built from: norms, rotary embeddings, causal attention, and the
weight layouts (``gemv_layout``, ``cat_gemv``, row/column slices) that keep a 1-token decode fast
and a block's memory exactly its own.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig


def norm(cfg: ModelConfig, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """LayerNorm (gpt2) or RMSNorm (llama) over the last dim."""
    if cfg.arch == "gpt2":
        return F.layer_norm(x, (x.shape[-1],), w, b, cfg.norm_eps)
    return F.rms_norm(x, (x.shape[-1],), w, cfg.norm_eps)


@lru_cache(maxsize=16)
def rope_tables(head_dim: int, theta: float, n_pos: int) -> tuple[Tensor, Tensor]:
    """cos, sin tables (n_pos, d) for rotate_half RoPE (HF Llama convention)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # (d/2,)
    freqs = torch.outer(torch.arange(n_pos, dtype=torch.int64).float(), inv)  # (P, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, d)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, d) rotated by cos/sin (T, d)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, H, T, d)
    return x * cos + rot * sin


def _rows(t: Tensor, ranges: list[tuple[int, int]], share: bool, dim: int = 0) -> Tensor:
    """Rows (or columns for dim=1) of `t` over `ranges`, in order. A view if share and contiguous."""
    merged: list[tuple[int, int]] = []
    for s, e in ranges:
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    if not merged:
        return t.narrow(dim, 0, 0).clone()
    if len(merged) == 1:
        view = t.narrow(dim, merged[0][0], merged[0][1] - merged[0][0])
        return view if share else view.clone(memory_format=torch.contiguous_format)
    return torch.cat([t.narrow(dim, s, e - s) for s, e in merged], dim=dim)


def gemv_layout(w: Tensor) -> Tensor:
    """Store a linear weight (out, in) the way a 1-token matmul reads fastest (measured, MKL, CPU):
    column-major when out >= in, row-major otherwise. Logical shape is unchanged; no copy if the
    layout already fits."""
    if w.dim() != 2:
        return w
    if w.shape[0] >= w.shape[1]:
        return w if w.stride() == (1, w.shape[0]) else w.t().contiguous().t()
    return w.contiguous()


def cat_gemv(parts: list[Tensor], dim: int = 0) -> Tensor:
    """``gemv_layout(torch.cat(parts, dim))`` built in one allocation: the result is created in its
    final layout and each part copied in, so the transient memory is the result alone (a plain cat
    followed by a re-layout briefly holds two copies — it matters on a host at its memory limit)."""
    if parts[0].dim() != 2:
        return torch.cat(parts, dim=dim)
    rows = sum(t.shape[0] for t in parts) if dim == 0 else parts[0].shape[0]
    cols = parts[0].shape[1] if dim == 0 else sum(t.shape[1] for t in parts)
    like = parts[0]
    if rows >= cols:
        out = torch.empty(cols, rows, dtype=like.dtype).t()  # (rows, cols), column-major
    else:
        out = torch.empty(rows, cols, dtype=like.dtype)  # (rows, cols), row-major
    pos = 0
    for t in parts:
        n = t.shape[dim]
        out.narrow(dim, pos, n).copy_(t)
        pos += n
    return out


def prepare_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """In place: give every matrix its gemv_layout (so blocks built with share_storage reuse it)."""
    for k, t in sd.items():
        if t.dim() == 2 and k != "embed.pos":
            sd[k] = gemv_layout(t)
    return sd


def _causal_attend(q: Tensor, k: Tensor, v: Tensor, start_pos: int, qpg: int) -> Tensor:
    """q (B, Hq, T, d), k/v (B, G, S, d) with S = start_pos + T → (B, Hq, T, d)."""
    B, Hq, T, d = q.shape
    G = k.shape[1]
    if T == 1:  # decode: fold the group's q heads into the query axis, no mask needed
        o = F.scaled_dot_product_attention(q.reshape(B, G, qpg, d), k, v)  # (B, G, q, d)
        return o.view(B, Hq, 1, d)
    gqa = qpg > 1
    if start_pos == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, Hq, T, d)
    S = k.shape[2]
    mask = torch.arange(S).view(1, S) <= (start_pos + torch.arange(T)).view(T, 1)  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, Hq, T, d)
