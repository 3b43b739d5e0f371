"""Build a Hugging Face `transformers` model (GPT2LMHeadModel / LlamaForCausalLM) holding exactly
our weights. Used only by parity tests and benchmarks; transformers is imported lazily."""

from __future__ import annotations

from .config import ModelConfig
from .weights import StateDict, to_hf_state_dict


def _hf_config(cfg: ModelConfig, attn_implementation: str):
    import transformers

    if cfg.arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.d_model,
            n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_dim, activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            attn_implementation=attn_implementation)
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False, attn_implementation=attn_implementation)


def to_transformers(cfg: ModelConfig, sd: StateDict, attn_implementation: str = "eager"):
    """A transformers model in eval mode with our weights (fp32, CPU)."""
    import transformers

    hc = _hf_config(cfg, attn_implementation)
    cls = transformers.GPT2LMHeadModel if cfg.arch == "gpt2" else transformers.LlamaForCausalLM
    m = cls(hc)
    missing, unexpected = m.load_state_dict(to_hf_state_dict(cfg, sd), strict=False)
    bad = [k for k in missing if not (k.endswith(".attn.bias") or k.endswith("masked_bias"))]
    if unexpected or bad:
        raise RuntimeError(f"weight mapping mismatch: missing={bad[:5]} unexpected={unexpected[:5]}")
    return m.eval()
