"""Per-block memory and FLOP counts (the numbers every cost model and planner share).

Block kinds of one decoder layer (``testbed.core.placement`` names them ``L{l}.H{g}``, ``L{l}.proj``,
``L{l}.ffn{c0}-{c1}``):

- ``head``: one KV group = ``q`` query heads sharing one K/V head (``q = 1`` under MHA). Weights are
  the W_q slices of its ``q`` heads and its W_k, W_v slices: ``(q + 2)·D·d·p`` bytes. KV cache
  ``2·T·d·p``. FLOPs per decoded token ``2·(q + 2)·D·d`` (QKV) ``+ 4·q·T·d`` (scores and weighted
  sum over T positions). Convention: heads do NOT hold W_o rows; the output projection is its own
  block (as in placement.py's dataflow).
- ``proj``: W_o, ``H·d × D``: ``H·d·D·p`` bytes, ``2·H·d·D`` FLOPs.
- ``ffn``: ``c`` intermediate columns: ``m·D·c·p`` bytes and ``2·m·D·c`` FLOPs with ``m = 3`` for a
  gated (SwiGLU) MLP and ``m = 2`` for the GELU MLP.
- source-resident: embedding ``V·D·p`` (+ a separate LM head ``V·D·p`` unless tied); LM head FLOPs
  ``2·V·D``.
Norms, biases and residual adds are O(D) and ignored.
"""
from __future__ import annotations

from testbed.core.snapshot import ModelDims

BLOCK_KINDS = ("head", "proj", "ffn")


def head_weight_bytes(dims: ModelDims) -> int:
    return (dims.q_per_group + 2) * dims.d_model * dims.head_dim * dims.bytes_per_param


def head_kv_bytes(dims: ModelDims, context_len: int) -> int:
    return 2 * context_len * dims.head_dim * dims.bytes_per_param


def proj_bytes(dims: ModelDims) -> int:
    return dims.n_heads * dims.head_dim * dims.d_model * dims.bytes_per_param


def ffn_mats(dims: ModelDims) -> int:
    return 3 if dims.gated_ffn else 2


def ffn_bytes(dims: ModelDims, cols: int | None = None) -> int:
    cols = dims.ffn_dim if cols is None else cols
    return ffn_mats(dims) * dims.d_model * cols * dims.bytes_per_param


def source_bytes(dims: ModelDims) -> int:
    """Embedding + LM head held by the source device."""
    copies = 1 if dims.tie_embeddings else 2
    return copies * dims.vocab_size * dims.d_model * dims.bytes_per_param


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
    D, d, q, p, n = dims.d_model, dims.head_dim, dims.q_per_group, dims.bytes_per_param, n_tokens
    if kind == "attn":
        pos_sum = n * context_len - n * (n - 1) / 2.0
        flops = groups * (2.0 * (q + 2) * D * d * n + 4.0 * q * d * pos_sum)
        return flops, float(groups * (head_weight_bytes(dims) + head_kv_bytes(dims, context_len)))
    if kind == "proj":
        return proj_flops(dims) * n, float(proj_bytes(dims))
    if kind == "ffn":
        return ffn_flops(dims, cols) * n, float(ffn_bytes(dims, cols))
    if kind == "combine":
        return float(parts * D * n), float((parts + 1) * D * n * p)
    if kind == "embed":
        return 0.0, float(D * n * p)
    if kind == "head":
        return lm_head_flops(dims), float(dims.vocab_size * D * p)
    raise ValueError(f"unknown call kind {kind!r}; expected one of {CALL_KINDS}")
