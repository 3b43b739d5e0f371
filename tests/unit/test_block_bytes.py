"""``testbed.partition.cost.blocks`` byte counts against the tensors node_agent's blocks really hold.

The planners' counts cover the matrices (and KV caches) exactly; what they leave out is O(D) per
block (norm gains, biases) and, on the source, gpt2's learned position embeddings: both are checked
to be exactly that, so a change on either side shows up here."""
from __future__ import annotations

import pytest
import torch

from node_agent.model import REGISTRY, AttentionShard, Embedder, FfnShard, LMHead, ProjBlock
from node_agent.model.weights import random_state_dict
from testbed.core.snapshot import ModelDims
from testbed.partition.cost import blocks as B


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _matrices(tensors) -> int:
    return _bytes(t for t in tensors if t is not None and t.dim() == 2)


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def model(request):
    cfg = REGISTRY[request.param]
    return cfg, random_state_dict(cfg, seed=3), ModelDims.from_config(cfg, name=cfg.name)


def test_head_block_weights_and_kv_cache(model):
    cfg, sd, dims = model
    shard = AttentionShard(cfg, 1, [0], sd)
    w = shard.weight_tensors()
    assert _matrices(w) == B.head_weight_bytes(dims)
    assert _bytes(w) - _matrices(w) == 4 * (cfg.d_model * (2 if cfg.has_bias else 1)
                                            + ((cfg.q_per_group + 2) * cfg.head_dim if cfg.has_bias else 0))
    T = 7
    with torch.no_grad():
        shard.forward(torch.randn(1, T, cfg.d_model), 0)
    assert shard.nbytes_kv() == B.head_kv_bytes(dims, T)
    assert B.block_memory_bytes(dims, "head", T) == _matrices(w) + shard.nbytes_kv()


def test_proj_and_ffn_blocks(model):
    cfg, sd, dims = model
    proj = ProjBlock(cfg, 0, sd).weight_tensors()
    assert _matrices(proj) == B.proj_bytes(dims) == B.block_memory_bytes(dims, "proj", 0)
    c0, c1 = 32, 96
    ffn = FfnShard(cfg, 2, c0, c1, sd)
    mats = [ffn.w_up, ffn.w_gate, ffn.w_down]
    assert _matrices(mats) == B.ffn_bytes(dims, c1 - c0) == B.block_memory_bytes(dims, "ffn", 0, c1 - c0)
    assert B.ffn_bytes(dims) == _matrices([FfnShard(cfg, 2, 0, cfg.ffn_dim, sd).w_up,
                                           FfnShard(cfg, 2, 0, cfg.ffn_dim, sd).w_gate,
                                           FfnShard(cfg, 2, 0, cfg.ffn_dim, sd).w_down])


def test_source_bytes(model):
    cfg, sd, dims = model
    emb, head = Embedder(cfg, sd), LMHead(cfg, sd)
    held = {id(t): t for t in [emb.tok, head.w]}  # a tied LM head is the embedding itself
    tok_and_head = _bytes(held.values()) if not cfg.tie_embeddings else _bytes([emb.tok])
    assert tok_and_head == B.source_bytes(dims) == B.block_memory_bytes(dims, "source", 0)
    pos = _bytes([emb.pos])  # learned positions (gpt2): not counted by the planners
    assert pos == (4 * cfg.max_positions * cfg.d_model if cfg.arch == "gpt2" else 0)
