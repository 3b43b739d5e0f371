"""Real-size models by their published configs, for planners and the simulated backend only.

These have no weights here: ``testbed.spec.modelref`` resolves them to a ``ModelConfig`` (sizes,
FLOPs and bytes are all a planner needs) and an emulated run of one stops before anything starts,
saying it needs weights. The small models with weights live in ``node_agent.model.config.REGISTRY``;
``WEIGHTED`` names them without importing torch (a unit test keeps the two lists equal).

Each entry is the model's Hugging Face ``config.json`` as published (hidden size, layers, heads,
KV heads, FFN size, vocabulary, max positions, tied embeddings, RoPE theta). Biases are not
modelled: Qwen2.5's Q/K/V biases (3·D per layer) are below a block's rounding.
"""
from __future__ import annotations

WEIGHTED = ("tiny-gpt2", "tiny-llama", "mini-gpt2", "gpt2-small", "smollm2-135m")


def _llama(vocab, layers, d, heads, kv, ffn, pos, tied, theta, head_dim=None) -> dict:
    return dict(arch="llama", vocab_size=vocab, n_layers=layers, d_model=d, n_heads=heads, n_kv_heads=kv,
                head_dim=head_dim or d // heads, ffn_dim=ffn, max_positions=pos, tie_embeddings=tied,
                rope_theta=theta, norm_eps=1e-5)


# name -> (ModelConfig fields, where the config is published)
SIZE_ONLY: dict[str, tuple[dict, str]] = {
    "llama-2-7b": (_llama(32000, 32, 4096, 32, 32, 11008, 4096, False, 10000.0),
                   "https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json"),
    "llama-2-13b": (_llama(32000, 40, 5120, 40, 40, 13824, 4096, False, 10000.0),
                    "https://huggingface.co/meta-llama/Llama-2-13b-hf/blob/main/config.json"),
    "llama-3.2-1b": (_llama(128256, 16, 2048, 32, 8, 8192, 131072, True, 500000.0, head_dim=64),
                     "https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json"),
    "llama-3.2-3b": (_llama(128256, 28, 3072, 24, 8, 8192, 131072, True, 500000.0, head_dim=128),
                     "https://huggingface.co/meta-llama/Llama-3.2-3B/blob/main/config.json"),
    "llama-3.1-8b": (_llama(128256, 32, 4096, 32, 8, 14336, 131072, False, 500000.0),
                     "https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json"),
    "qwen2.5-0.5b": (_llama(151936, 24, 896, 14, 2, 4864, 32768, True, 1000000.0),
                     "https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json"),
    "smollm2-360m": (_llama(49152, 32, 960, 15, 5, 2560, 8192, True, 100000.0),
                     "https://huggingface.co/HuggingFaceTB/SmolLM2-360M/blob/main/config.json"),
    "smollm2-1.7b": (_llama(49152, 24, 2048, 32, 32, 8192, 8192, True, 130000.0),
                     "https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B/blob/main/config.json"),
}


def known_models() -> list[str]:
    """Every registry name a ``model: {name: ...}`` may use."""
    return [*WEIGHTED, *SIZE_ONLY]


def size_only_config(name: str):
    """The ``ModelConfig`` of a size-only model (imports the model side lazily)."""
    from node_agent.model.config import ModelConfig

    fields, _ = SIZE_ONLY[name]
    return ModelConfig(name=name, **fields)
