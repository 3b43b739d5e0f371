"""Per-block memory and FLOP counts (the numbers every cost model and planner share).

Block kinds of one decoder layer (``testbed.core.placement`` names them ``L{l}.H{g}``, ``L{l}.proj``,
``L{l}.ffn{c0}-{c1}``):

Sizes follow the model's weight format (``testbed.core.formats``): ``w`` bytes per weight of a
matrix (Q4_0: 18/32), ``k`` per KV-cache element, ``a`` per activation sent; an fp32 model has
``w = k = a = p``, its config's ``bytes_per_param``. Byte counts of blocks round up to whole bytes.

- ``head``: one KV group = ``q`` query heads sharing one K/V head (``q = 1`` under MHA). Weights are
  the W_q slices of its ``q`` heads and its W_k, W_v slices: ``(q + 2)·D·d·w`` bytes. KV cache
  ``2·T·d·k``. FLOPs per decoded token ``2·(q + 2)·D·d`` (QKV) ``+ 4·q·T·d`` (scores and weighted
  sum over T positions). Convention: heads do NOT hold W_o rows; the output projection is its own
  block (as in placement.py's dataflow).
- ``proj``: W_o, ``H·d × D``: ``H·d·D·w`` bytes, ``2·H·d·D`` FLOPs.
- ``ffn``: ``c`` intermediate columns: ``m·D·c·w`` bytes and ``2·m·D·c`` FLOPs with ``m = 3`` for a
  gated (SwiGLU) MLP and ``m = 2`` for the GELU MLP.
- source-resident: embedding ``V·D·w`` (+ a separate LM head ``V·D·w`` unless tied); LM head FLOPs
  ``2·V·D``; a token reads one embedding row (``D·w``) and the whole LM head.
Norms, biases and residual adds are O(D) and ignored.
"""
from __future__ import annotations

import math

from testbed.core.snapshot import ModelDims

BLOCK_KINDS = ("head", "proj", "ffn")


def _whole(nbytes: float) -> int:
    return int(math.ceil(nbytes - 1e-9))


def head_weight_bytes(dims: ModelDims) -> int:
    return _whole((dims.q_per_group + 2) * dims.d_model * dims.head_dim * dims.weight_bytes)


def head_kv_bytes(dims: ModelDims, context_len: int) -> int:
    return _whole(2 * context_len * dims.head_dim * dims.kv_bytes)


def proj_bytes(dims: ModelDims) -> int:
    return _whole(dims.n_heads * dims.head_dim * dims.d_model * dims.weight_bytes)


def ffn_mats(dims: ModelDims) -> int:
    return 3 if dims.gated_ffn else 2


def ffn_bytes(dims: ModelDims, cols: int | None = None) -> int:
    cols = dims.ffn_dim if cols is None else cols
    return _whole(ffn_mats(dims) * dims.d_model * cols * dims.weight_bytes)


def ffn_col_bytes(dims: ModelDims) -> float:
    """Weight bytes of ONE intermediate column (fractional under a block format: a share of blocks)."""
    return ffn_mats(dims) * dims.d_model * dims.weight_bytes


def source_bytes(dims: ModelDims) -> int:
    """Embedding + LM head held by the source device."""
    copies = 1 if dims.tie_embeddings else 2
    return _whole(copies * dims.vocab_size * dims.d_model * dims.weight_bytes)


def lm_head_read_bytes(dims: ModelDims) -> float:
    """Bytes the LM head reads for one token: the whole ``V × D`` matrix."""
    return float(dims.vocab_size * dims.d_model * dims.weight_bytes)


def hidden_bytes(dims: ModelDims, n_tokens: int = 1) -> float:
    """One hidden state (``D`` activations) per token as sent between devices."""
    return dims.d_model * dims.act_bytes * n_tokens


def head_out_bytes(dims: ModelDims, n_tokens: int = 1) -> float:
    """One KV group's attention output (``q·d`` activations) per token as sent to the projection."""
    return dims.q_per_group * dims.head_dim * dims.act_bytes * n_tokens


def total_weight_bytes(dims: ModelDims) -> int:
    """Every block of every layer plus the source's embedding/LM head: the model's size."""
    layer = dims.n_kv_heads * head_weight_bytes(dims) + proj_bytes(dims) + ffn_bytes(dims)
    return dims.n_layers * layer + source_bytes(dims)


def block_memory_bytes(dims: ModelDims, block_kind: str, context_len: int, cols: int | None = None) -> int:
    """Bytes one block needs at context length ``context_len`` (weights + its KV cache)."""
    if block_kind == "head":
        return head_weight_bytes(dims) + head_kv_bytes(dims, context_len)
    if block_kind == "proj":
        return proj_bytes(dims)
    if block_kind == "ffn":
        return ffn_bytes(dims, cols)
    if block_kind == "source":
        return source_bytes(dims)
    raise ValueError(f"unknown block kind {block_kind!r}; expected one of {BLOCK_KINDS}")


def head_flops(dims: ModelDims, context_len: int) -> float:
    D, d, q = dims.d_model, dims.head_dim, dims.q_per_group
    return 2.0 * (q + 2) * D * d + 4.0 * q * context_len * d


def proj_flops(dims: ModelDims) -> float:
    return 2.0 * dims.n_heads * dims.head_dim * dims.d_model


def ffn_flops(dims: ModelDims, cols: int | None = None) -> float:
    cols = dims.ffn_dim if cols is None else cols
    return 2.0 * ffn_mats(dims) * dims.d_model * cols


def lm_head_flops(dims: ModelDims) -> float:
    return 2.0 * dims.vocab_size * dims.d_model


def block_flops(dims: ModelDims, block_kind: str, context_len: int, cols: int | None = None) -> float:
    """FLOPs one block spends on one decoded token at context length ``context_len``."""
    if block_kind == "head":
        return head_flops(dims, context_len)
    if block_kind == "proj":
        return proj_flops(dims)
    if block_kind == "ffn":
        return ffn_flops(dims, cols)
    raise ValueError(f"unknown block kind {block_kind!r}; expected one of {BLOCK_KINDS}")


def block_kind_of(block_id: str) -> tuple[int, str, int | None]:
    """Parse ``L3.H2`` / ``L3.proj`` / ``L3.ffn0-512`` -> (layer, kind, ffn columns or None)."""
    layer_s, rest = block_id.split(".", 1)
    layer = int(layer_s[1:])
    if rest.startswith("H"):
        return layer, "head", None
    if rest == "proj":
        return layer, "proj", None
    if rest.startswith("ffn"):
        a, b = rest[3:].split("-")
        return layer, "ffn", int(b) - int(a)
    raise ValueError(f"unknown block id {block_id!r}")


def ffn_chunk_bounds(ffn_dim: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` near-equal contiguous column ranges tiling [0, ffn_dim)."""
    chunks = max(1, min(chunks, ffn_dim))
    cuts = [round(i * ffn_dim / chunks) for i in range(chunks + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(chunks)]


CALL_KINDS = ("embed", "attn", "proj", "ffn", "combine", "head")


def call_work(dims: ModelDims, kind: str, *, groups: int = 0, cols: int = 0, parts: int = 0,
              context_len: int = 0, n_tokens: int = 1) -> tuple[float, float]:
    """(FLOPs, bytes read) of ONE block call as a node agent runs it — the numbers the emulated
    device's clock (``node_agent.pacing.DeviceClock``) and the cost models both use.

    ``attn``: ``groups`` KV groups of one layer on ``n_tokens`` new tokens, ``context_len`` positions
    cached after the call (weights once, the whole KV read); ``proj``: W_o; ``ffn``: ``cols`` columns
    (one call however many local shards hold them); ``combine``: summing ``parts`` FFN partials into
    the residual; ``embed``: the embedding rows of ``n_tokens`` tokens; ``head``: the LM head on the
    last token. Weights are read once per call (batch 1: decode is memory-bound)."""
    D, d, q, a, n = dims.d_model, dims.head_dim, dims.q_per_group, dims.act_bytes, n_tokens
    if kind == "attn":
        pos_sum = n * context_len - n * (n - 1) / 2.0
        flops = groups * (2.0 * (q + 2) * D * d * n + 4.0 * q * d * pos_sum)
        return flops, float(groups * (head_weight_bytes(dims) + head_kv_bytes(dims, context_len)))
    if kind == "proj":
        return proj_flops(dims) * n, float(proj_bytes(dims))
    if kind == "ffn":
        return ffn_flops(dims, cols) * n, float(ffn_bytes(dims, cols))
    if kind == "combine":
        return float(parts * D * n), float((parts + 1) * D * n * a)
    if kind == "embed":
        return 0.0, float(D * n * dims.weight_bytes)
    if kind == "head":
        return lm_head_flops(dims), lm_head_read_bytes(dims)
    raise ValueError(f"unknown call kind {kind!r}; expected one of {CALL_KINDS}")
