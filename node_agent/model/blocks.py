"""Placement blocks: the units the partitioners place and the node agents run.

Per decoder layer l the dataflow is (B = batch, T = new tokens, D = d_model, d = head_dim):
  x (B,T,D) ─► AttentionShard(l, groups) ×k  (each: input norm, Q/K/V of its KV groups, RoPE,
                causal attention with its own KV cache)  ─► raw head outputs (B,T,|groups|·q·d)
           ─► assemble_head_outputs → (B,T,H·d) in global head order
           ─► ProjBlock(l): h = x + head_out @ W_o^T + b_o                                 (B,T,D)
           ─► FfnShard(l, [c0,c1)) ×m  (each: post-attention norm, MLP restricted to
                intermediate columns [c0,c1), no residual, no down bias) → partial (B,T,D)
           ─► ffn_combine(partials, h, b_down) = h + Σ partials + b_down = next x          (B,T,D)
Source side: Embedder (ids → x of layer 0) and LMHead (final norm + lm head → logits).
Blocks are built from a full internal state dict by slicing index sets; by default they copy their
slices (so a node agent can drop the full dict), `share_storage=True` keeps views where possible.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kvcache import KVCache
from ..serialize import tensors_from_bytes, tensors_to_payload
from .config import ModelConfig, ModelError
from .ops import (_causal_attend, _rows, apply_rope, cat_gemv, gemv_layout, norm,  # noqa: F401  (re-exported)
                  prepare_state_dict, rope_tables)


class ShardError(ModelError):
    """An invalid operation on a shard (unknown group, mismatched layer, bad position)."""

    code = "shard"


_HEAD_TENSORS = ("wq", "wk", "wv")


def group_weights(cfg: ModelConfig, layer: int, weights: dict[str, Tensor], group: int) -> dict[str, Tensor]:
    """One KV group's rows of W_q/W_k/W_v (and biases) and its layer's norm, as views of a full
    state dict ``weights``: what ``AttentionShard.export_group`` ships, without the cache."""
    p = f"layers.{layer}."
    qw, kw = cfg.q_per_group * cfg.head_dim, cfg.head_dim
    t: dict[str, Tensor] = {}
    for n in _HEAD_TENSORS:
        width = qw if n == "wq" else kw
        t[n] = weights[p + n + ".weight"][group * width:(group + 1) * width]  # (width, D)
        if cfg.has_bias:
            t[n + "_b"] = weights[p + n + ".bias"][group * width:(group + 1) * width]  # (width,)
    t["norm_w"] = weights[p + "attn_norm.weight"]
    if p + "attn_norm.bias" in weights:
        t["norm_b"] = weights[p + "attn_norm.bias"]
    return t


class AttentionShard:
    """Any subset of the KV groups of one layer, with its head-major KV cache (B, G_local, T, d).

    forward(x (B,T,D), start_pos) → raw attention output (B, T, len(groups)*q_per_group*d), groups in
    `self.groups` order; W_o is NOT applied (that is ProjBlock).
    """

    def __init__(self, cfg: ModelConfig, layer: int, groups: list[int], weights: dict[str, Tensor],
                 share_storage: bool = False) -> None:
        self.cfg, self.layer = cfg, layer
        bad = [g for g in groups if not 0 <= g < cfg.n_groups]
        if bad or len(set(groups)) != len(groups):
            raise ShardError(f"layer {layer}: invalid or repeated groups {groups} (n_groups={cfg.n_groups})")
        p = f"layers.{layer}."
        self.groups: list[int] = list(groups)
        self.norm_w, self.norm_b = weights[p + "attn_norm.weight"], weights.get(p + "attn_norm.bias")
        qw, kw = cfg.q_per_group * cfg.head_dim, cfg.head_dim
        self.w: dict[str, Tensor] = {}
        for n in _HEAD_TENSORS:
            width = qw if n == "wq" else kw
            ranges = [(g * width, (g + 1) * width) for g in groups]
            self.w[n] = gemv_layout(_rows(weights[p + n + ".weight"], ranges, share_storage))  # (|g|·width, D)
            if cfg.has_bias:
                self.w[n + "_b"] = _rows(weights[p + n + ".bias"], ranges, share_storage)  # (|g|·width,)
        self.cache = KVCache(1, len(groups), cfg.head_dim)

    # ---- compute -------------------------------------------------------------------------------
    def forward(self, x: Tensor, start_pos: int) -> Tensor:
        cfg, (B, T, _) = self.cfg, x.shape
        G, d, qpg = len(self.groups), cfg.head_dim, cfg.q_per_group
        if start_pos > self.cache.length:
            raise ShardError(f"layer {self.layer}: start_pos {start_pos} beyond cached {self.cache.length}")
        self.cache.truncate(start_pos)
        if self.cache.batch != B:
            self._reset_batch(B, start_pos)
        if G == 0:
            return x.new_empty(B, T, 0)
        xn = norm(cfg, x, self.norm_w, self.norm_b)  # (B, T, D)
        q = F.linear(xn, self.w["wq"], self.w.get("wq_b")).view(B, T, G * qpg, d).transpose(1, 2)  # (B, Hq, T, d)
        k = F.linear(xn, self.w["wk"], self.w.get("wk_b")).view(B, T, G, d).transpose(1, 2)  # (B, G, T, d)
        v = F.linear(xn, self.w["wv"], self.w.get("wv_b")).view(B, T, G, d).transpose(1, 2)  # (B, G, T, d)
        if cfg.arch == "llama":
            if start_pos + T > cfg.max_positions:
                raise ShardError(f"position {start_pos + T} exceeds max_positions {cfg.max_positions}")
            cos, sin = rope_tables(d, cfg.rope_theta, cfg.max_positions)
            cos, sin = cos[start_pos : start_pos + T], sin[start_pos : start_pos + T]  # (T, d)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = self.cache.append(k, v)  # (B, G, S, d)
        o = _causal_attend(q, k_all, v_all, start_pos, qpg)  # (B, Hq, T, d)
        return o.transpose(1, 2).reshape(B, T, G * qpg * d)  # (B, T, Hq·d)

    __call__ = forward

    def _reset_batch(self, B: int, start_pos: int) -> None:
        if start_pos:
            raise ShardError(f"batch size changed to {B} in the middle of a sequence")
        self.cache = KVCache(B, len(self.groups), self.cfg.head_dim)

    def reset(self) -> None:
        self.cache.truncate(0)

    # ---- migration -----------------------------------------------------------------------------
    def _local(self, group: int) -> int:
        if group not in self.groups:
            raise ShardError(f"layer {self.layer}: group {group} not in shard {self.groups}")
        return self.groups.index(group)

    def _slices(self, i: int) -> dict[str, slice]:
        qw, kw = self.cfg.q_per_group * self.cfg.head_dim, self.cfg.head_dim
        return {n: slice(i * (qw if n.startswith("wq") else kw), (i + 1) * (qw if n.startswith("wq") else kw))
                for n in self.w}

    def export_group(self, group: int, weights: bool = True) -> tuple[dict[str, Any], bytes]:
        """Weights, norm and KV cache of one group as (JSON-able header, contiguous payload);
        ``weights=False``: the KV cache only (the receiver takes the weights from its own copy)."""
        i = self._local(group)
        t = {n: self.w[n][s] for n, s in self._slices(i).items()} if weights else {}
        if weights:
            t["norm_w"] = self.norm_w
            if self.norm_b is not None:
                t["norm_b"] = self.norm_b
        t["k"], t["v"] = self.cache.get_heads([i])  # (B, 1, T, d)
        meta = {"kind": "kv_group", "model": self.cfg.name, "arch": self.cfg.arch, "layer": self.layer,
                "group": group, "cached_len": self.cache.length, "head_dim": self.cfg.head_dim,
                "q_per_group": self.cfg.q_per_group, "d_model": self.cfg.d_model,
                "weights": "shipped" if weights else "destination"}
        return tensors_to_payload(t, meta)

    def import_group(self, header: dict[str, Any], payload: bytes,
                     local_weights: dict[str, Tensor] | None = None) -> None:
        """Add the group exported by `export_group` (appended last in `groups`). A KV-only export
        needs ``local_weights``: this host's full state dict, the group's rows are copied from it."""
        meta = header.get("meta", {})
        if meta.get("layer") != self.layer or meta.get("head_dim") != self.cfg.head_dim:
            raise ShardError(f"export of layer {meta.get('layer')} does not fit shard of layer {self.layer}")
        if meta["group"] in self.groups:
            raise ShardError(f"layer {self.layer}: group {meta['group']} already present")
        t = tensors_from_bytes(header, payload, copy=False)  # views of the received payload
        if meta.get("weights") == "destination":
            if local_weights is None:
                raise ShardError(f"layer {self.layer}: a KV-only import needs this host's own weights")
            t.update(group_weights(self.cfg, self.layer, local_weights, int(meta["group"])))
        self.cache.add_heads(t["k"], t["v"])
        for n in self.w:
            self.w[n] = cat_gemv([self.w[n], t[n]])  # one tensor at a time: transient = its new size
        self.groups.append(int(meta["group"]))

    def remove_group(self, group: int) -> None:
        """Drop a group's weights and KV cache; its memory is released."""
        i = self._local(group)
        keep = [j for j in range(len(self.groups)) if j != i]
        sl = [self._slices(j) for j in keep]
        for n in self.w:
            self.w[n] = cat_gemv([self.w[n][s[n]] for s in sl]) if sl else self.w[n][:0].clone()
        self.cache.keep_heads(keep)
        self.groups.pop(i)

    @classmethod
    def from_export(cls, cfg: ModelConfig, header: dict[str, Any], payload: bytes,
                    local_weights: dict[str, Tensor] | None = None) -> "AttentionShard":
        """A new shard holding exactly the exported group (e.g. on a device new to this layer)."""
        meta = header["meta"]
        layer = int(meta["layer"])
        t = tensors_from_bytes(header, payload, copy=False)  # views; what the shard keeps is cloned
        if meta.get("weights") == "destination":
            if local_weights is None:
                raise ShardError(f"layer {layer}: a KV-only import needs this host's own weights")
            t.update(group_weights(cfg, layer, local_weights, int(meta["group"])))
        p = f"layers.{layer}."
        empty = {p + "attn_norm.weight": t["norm_w"].clone()}  # the shard's own norm
        if "norm_b" in t:
            empty[p + "attn_norm.bias"] = t["norm_b"].clone()
        for n in _HEAD_TENSORS:  # only their shapes are used: the shard starts with no groups
            empty[p + n + ".weight"] = t[n]
            if cfg.has_bias:
                empty[p + n + ".bias"] = t[n + "_b"]
        shard = cls(cfg, layer, [], empty)
        shard.import_group(header, payload, local_weights)
        return shard

    # ---- accounting ----------------------------------------------------------------------------
    def weight_tensors(self) -> list[Tensor]:
        return list(self.w.values()) + [t for t in (self.norm_w, self.norm_b) if t is not None]

    def nbytes_weights(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weight_tensors())

    def nbytes_kv(self) -> int:
        return self.cache.nbytes_used()


def assemble_head_outputs(cfg: ModelConfig, parts: list[tuple[list[int], Tensor]]) -> Tensor:
    """Scatter shard outputs [(groups, (B,T,|groups|·q·d))] into (B, T, H·d) in global head order."""
    B, T = parts[0][1].shape[:2]
    w = cfg.q_per_group * cfg.head_dim
    out = parts[0][1].new_empty(B, T, cfg.n_groups * w)  # (B, T, H·d)
    seen = 0
    for groups, o in parts:
        for i, g in enumerate(groups):
            out[:, :, g * w : (g + 1) * w] = o[:, :, i * w : (i + 1) * w]
        seen += len(groups)
    if seen != cfg.n_groups:
        raise ShardError(f"head outputs cover {seen} of {cfg.n_groups} groups")
    return out


class ProjBlock:
    """Output projection of one layer: h = x + head_out @ W_o^T (+ b_o)."""

    def __init__(self, cfg: ModelConfig, layer: int, weights: dict[str, Tensor]) -> None:
        p = f"layers.{layer}."
        self.cfg, self.layer = cfg, layer
        self.wo, self.bo = gemv_layout(weights[p + "wo.weight"]), weights.get(p + "wo.bias")  # (D, H·d), (D,)

    def forward(self, head_out: Tensor, x: Tensor) -> Tensor:
        return x + F.linear(head_out, self.wo, self.bo)  # (B, T, D)

    __call__ = forward

    def weight_tensors(self) -> list[Tensor]:
        return [t for t in (self.wo, self.bo) if t is not None]


class FfnShard:
    """Intermediate columns [col_start, col_end) of one layer's MLP, post-attention norm included.

    forward(h (B,T,D)) → partial (B,T,D) without residual and without the down-proj bias.
    """

    def __init__(self, cfg: ModelConfig, layer: int, col_start: int, col_end: int,
                 weights: dict[str, Tensor], share_storage: bool = False) -> None:
        if not 0 <= col_start < col_end <= cfg.ffn_dim:
            raise ShardError(f"bad FFN column range [{col_start}, {col_end}) for ffn_dim={cfg.ffn_dim}")
        p, r = f"layers.{layer}.", [(col_start, col_end)]
        self.cfg, self.layer, self.col_start, self.col_end = cfg, layer, col_start, col_end
        self.norm_w, self.norm_b = weights[p + "ffn_norm.weight"], weights.get(p + "ffn_norm.bias")
        self.w_up = gemv_layout(_rows(weights[p + "w_up.weight"], r, share_storage))  # (n, D)
        self.b_up = _rows(weights[p + "w_up.bias"], r, share_storage) if cfg.has_bias else None  # (n,)
        gate = _rows(weights[p + "w_gate.weight"], r, share_storage) if cfg.arch == "llama" else None
        self.w_gate = gemv_layout(gate) if gate is not None else None  # (n, D)
        self.w_down = gemv_layout(_rows(weights[p + "w_down.weight"], r, share_storage, dim=1))  # (D, n)

    def forward(self, h: Tensor) -> Tensor:
        hn = norm(self.cfg, h, self.norm_w, self.norm_b)  # (B, T, D)
        if self.cfg.arch == "gpt2":
            a = F.gelu(F.linear(hn, self.w_up, self.b_up), approximate="tanh")  # (B, T, n)
        else:
            a = F.silu(F.linear(hn, self.w_gate)) * F.linear(hn, self.w_up)  # (B, T, n)
        return F.linear(a, self.w_down)  # (B, T, D)

    __call__ = forward

    def weight_tensors(self) -> list[Tensor]:
        ts = (self.norm_w, self.norm_b, self.w_up, self.b_up, self.w_gate, self.w_down)
        return [t for t in ts if t is not None]


def ffn_down_bias(cfg: ModelConfig, layer: int, weights: dict[str, Tensor]) -> Tensor | None:
    """The down-projection bias ffn_combine adds (None for llama)."""
    return weights.get(f"layers.{layer}.w_down.bias")


def ffn_combine(partials: list[Tensor], h: Tensor, down_bias: Tensor | None = None) -> Tensor:
    """Next layer input: h + Σ partials (+ b_down). Partials from FfnShards covering all columns."""
    out = h + partials[0]  # (B, T, D)
    for p in partials[1:]:
        out = out + p
    return out if down_bias is None else out + down_bias


class Embedder:
    """Token (+ learned position, gpt2) embeddings: ids (B,T) → x (B,T,D)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, Tensor]) -> None:
        self.cfg, self.tok, self.pos = cfg, weights["embed.tok"], weights.get("embed.pos")  # (V, D), (P, D)

    def forward(self, ids: Tensor, start_pos: int) -> Tensor:
        x = F.embedding(ids, self.tok)  # (B, T, D)
        if self.pos is not None:
            T = ids.shape[1]
            if start_pos + T > self.cfg.max_positions:
                raise ShardError(f"position {start_pos + T} exceeds max_positions {self.cfg.max_positions}")
            x = x + self.pos[start_pos : start_pos + T]  # (B, T, D)
        return x

    __call__ = forward

    def weight_tensors(self) -> list[Tensor]:
        return [t for t in (self.tok, self.pos) if t is not None]


class LMHead:
    """Final norm + LM head (tied to embed.tok when the config says so): x (B,T,D) → logits (B,T,V)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, Tensor]) -> None:
        self.cfg = cfg
        self.norm_w, self.norm_b = weights["final_norm.weight"], weights.get("final_norm.bias")
        self.w = gemv_layout(weights["embed.tok"] if cfg.tie_embeddings else weights["lm_head.weight"])  # (V, D)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(norm(self.cfg, x, self.norm_w, self.norm_b), self.w)  # (B, T, V)

    __call__ = forward

    def weight_tensors(self) -> list[Tensor]:
        return [t for t in (self.norm_w, self.norm_b, self.w) if t is not None]


def source_blocks(cfg: ModelConfig, weights: dict[str, Tensor]) -> tuple[Embedder, LMHead]:
    """Embedder and LMHead for the source device; a tied LM head shares the embedding storage."""
    head = LMHead(cfg, weights)
    emb = Embedder(cfg, {**weights, "embed.tok": head.w} if cfg.tie_embeddings else weights)
    return emb, head
