"""Memory, FLOP and transfer accounting per block, computed from a ModelConfig alone.

These are the numbers the cost models and partitioners use; tests check the byte counts against
the tensors the block classes actually allocate (with p = bytes_per_param = 4 for fp32). A head
block is one KV group (q_per_group query heads + 1 KV head) and carries a copy of its layer's input
norm; W_o lives in the ProjBlock, not in the head blocks. KV bytes assume batch 1.
"""

from __future__ import annotations

from .config import ModelConfig


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.has_bias else 1)


def attention_shard_weight_bytes(cfg: ModelConfig, n_groups: int) -> int:
    """An AttentionShard with `n_groups` groups: per group Q rows (q·d), K and V rows (d each) and
    their biases; one copy of the layer's input norm per shard."""
    rows = (cfg.q_per_group + 2) * cfg.head_dim
    params = n_groups * (rows * cfg.d_model + (rows if cfg.has_bias else 0)) + _norm_params(cfg)
    return params * cfg.bytes_per_param


def head_block_weight_bytes(cfg: ModelConfig) -> int:
    """Weights of one KV-group block alone on its device (its own norm copy included)."""
    return attention_shard_weight_bytes(cfg, 1)


def kv_bytes_per_token_per_group(cfg: ModelConfig) -> int:
    """K and V of one KV head for one token: 2·d·p."""
    return 2 * cfg.head_dim * cfg.bytes_per_param


def head_block_bytes(cfg: ModelConfig, cached_tokens: int) -> int:
    """Weights + KV cache of one group holding `cached_tokens` tokens."""
    return head_block_weight_bytes(cfg) + cached_tokens * kv_bytes_per_token_per_group(cfg)


def proj_weight_bytes(cfg: ModelConfig) -> int:
    """W_o (D, H·d) plus its bias."""
    params = cfg.d_model * cfg.q_dim + (cfg.d_model if cfg.has_bias else 0)
    return params * cfg.bytes_per_param


def ffn_weight_bytes_per_column(cfg: ModelConfig) -> int:
    """One intermediate column: up row (+ gate row for llama) + down column (+ up bias)."""
    mats = 3 if cfg.arch == "llama" else 2
    return (mats * cfg.d_model + (1 if cfg.has_bias else 0)) * cfg.bytes_per_param


def ffn_shard_weight_bytes(cfg: ModelConfig, n_columns: int) -> int:
    """An FfnShard of `n_columns` columns, including its copy of the post-attention norm."""
    return n_columns * ffn_weight_bytes_per_column(cfg) + _norm_params(cfg) * cfg.bytes_per_param


def ffn_weight_bytes(cfg: ModelConfig) -> int:
    """A whole, unsplit FFN block (norm + all columns + down bias)."""
    return ffn_shard_weight_bytes(cfg, cfg.ffn_dim) + ffn_bias_bytes(cfg)


def ffn_bias_bytes(cfg: ModelConfig) -> int:
    """The down-projection bias added by ffn_combine."""
    return cfg.d_model * cfg.bytes_per_param if cfg.has_bias else 0


def embed_bytes(cfg: ModelConfig) -> int:
    pos = cfg.max_positions if cfg.arch == "gpt2" else 0
    return (cfg.vocab_size + pos) * cfg.d_model * cfg.bytes_per_param


def lm_head_bytes(cfg: ModelConfig, with_embedder: bool = True) -> int:
    """Final norm + LM head matrix; a tied head costs nothing extra next to the Embedder."""
    head = 0 if (cfg.tie_embeddings and with_embedder) else cfg.vocab_size * cfg.d_model
    return (head + _norm_params(cfg)) * cfg.bytes_per_param


def source_bytes(cfg: ModelConfig) -> int:
    """What the source device holds: Embedder + LMHead."""
    return embed_bytes(cfg) + lm_head_bytes(cfg, with_embedder=True)


def layer_weight_bytes(cfg: ModelConfig) -> int:
    """One decoder layer with all groups in one shard and an unsplit FFN."""
    return attention_shard_weight_bytes(cfg, cfg.n_groups) + proj_weight_bytes(cfg) + ffn_weight_bytes(cfg)


# ---- compute and transfer (decode phase, one token, batch 1) --------------------------------------

def head_block_flops(cfg: ModelConfig, context_len: int) -> int:
    """One group for one token: QKV projection 2·D·(q+2)·d, scores + weighted sum 2·2·T·d per q head."""
    qkv = 2 * cfg.d_model * (cfg.q_per_group + 2) * cfg.head_dim
    return qkv + 4 * context_len * cfg.head_dim * cfg.q_per_group


def proj_flops(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model * cfg.q_dim


def ffn_flops_per_column(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model * (3 if cfg.arch == "llama" else 2)


def hidden_bytes(cfg: ModelConfig) -> int:
    """One token's hidden state (sent to every head device, and proj → FFN)."""
    return cfg.d_model * cfg.bytes_per_param


def head_output_bytes(cfg: ModelConfig) -> int:
    """One group's raw attention output for one token (sent to the ProjBlock)."""
    return cfg.q_per_group * cfg.head_dim * cfg.bytes_per_param
