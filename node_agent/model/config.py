"""Model configuration: the frozen `ModelConfig` and the `REGISTRY` of named configs.

Owns the shape vocabulary every other part of the model side uses (KV groups, q heads per group,
FFN columns) and the translation from a Hugging Face `config.json` into a `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from testbed.core.errors import HeadroomError

Arch = Literal["gpt2", "llama"]


class ModelError(HeadroomError):
    """Base error of the model side (bad config, unknown model, bad checkpoint, bad shard op)."""

    code = "model"


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer.

    arch "gpt2": LayerNorm, learned positions, GELU-tanh MLP, MHA, biases everywhere.
    arch "llama": RMSNorm, RoPE (rotate_half convention), SwiGLU MLP, GQA, no biases.
    A KV group is one KV head together with the `q_per_group` query heads that read it; under MHA a
    group is exactly one head. Groups are the unit of head partitioning.
    """

    arch: Arch
    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_positions: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bytes_per_param: int = 4
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ModelError(f"arch must be 'gpt2' or 'llama', got {self.arch!r}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"n_heads={self.n_heads} not divisible by n_kv_heads={self.n_kv_heads}")
        if self.arch == "gpt2" and self.n_kv_heads != self.n_heads:
            raise ModelError("gpt2 arch is multi-head attention: n_kv_heads must equal n_heads")
        if self.arch == "llama" and self.head_dim % 2:
            raise ModelError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for f in ("vocab_size", "n_layers", "d_model", "n_heads", "head_dim", "ffn_dim", "max_positions"):
            if getattr(self, f) <= 0:
                raise ModelError(f"{f} must be positive, got {getattr(self, f)}")

    @property
    def n_groups(self) -> int:
        """Number of KV groups per layer (= head blocks per layer)."""
        return self.n_kv_heads

    @property
    def q_per_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def has_bias(self) -> bool:
        return self.arch == "gpt2"

    @property
    def q_dim(self) -> int:
        """Width of the concatenated attention output of all heads (n_heads * head_dim)."""
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ModelError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


def _gpt2_from_hf(c: dict[str, Any], name: str) -> ModelConfig:
    d, h = c["n_embd"], c["n_head"]
    return ModelConfig(
        arch="gpt2", vocab_size=c["vocab_size"], n_layers=c["n_layer"], d_model=d, n_heads=h,
        n_kv_heads=h, head_dim=d // h, ffn_dim=c.get("n_inner") or 4 * d,
        max_positions=c["n_positions"], norm_eps=c.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=True, name=name,
    )


def _llama_from_hf(c: dict[str, Any], name: str) -> ModelConfig:
    d, h = c["hidden_size"], c["num_attention_heads"]
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        arch="llama", vocab_size=c["vocab_size"], n_layers=c["num_hidden_layers"], d_model=d,
        n_heads=h, n_kv_heads=c.get("num_key_value_heads") or h,
        head_dim=c.get("head_dim") or d // h, ffn_dim=c["intermediate_size"],
        max_positions=c.get("max_position_embeddings", 2048), norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), tie_embeddings=bool(c.get("tie_word_embeddings", False)), name=name,
    )


def config_from_hf(c: dict[str, Any], name: str = "hf") -> ModelConfig:
    """Translate a Hugging Face config.json dict (GPT-2 or Llama family) into a ModelConfig."""
    mtype = c.get("model_type", "")
    if mtype == "gpt2":
        return _gpt2_from_hf(c, name)
    if mtype in ("llama", "mistral", "qwen2") or "num_key_value_heads" in c:
        return _llama_from_hf(c, name)
    raise ModelError(f"unsupported model_type {mtype!r} in config.json (need gpt2 or llama)")


REGISTRY: dict[str, ModelConfig] = {
    "tiny-gpt2": ModelConfig(
        arch="gpt2", vocab_size=256, n_layers=4, d_model=64, n_heads=4, n_kv_heads=4, head_dim=16,
        ffn_dim=256, max_positions=512, norm_eps=1e-5, tie_embeddings=True, name="tiny-gpt2",
    ),
    "tiny-llama": ModelConfig(
        arch="llama", vocab_size=256, n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16,
        ffn_dim=176, max_positions=512, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False,
        name="tiny-llama",
    ),
    "mini-gpt2": ModelConfig(
        arch="gpt2", vocab_size=4096, n_layers=6, d_model=256, n_heads=8, n_kv_heads=8, head_dim=32,
        ffn_dim=1024, max_positions=1024, norm_eps=1e-5, tie_embeddings=True, name="mini-gpt2",
    ),
    "gpt2-small": ModelConfig(
        arch="gpt2", vocab_size=50257, n_layers=12, d_model=768, n_heads=12, n_kv_heads=12,
        head_dim=64, ffn_dim=3072, max_positions=1024, norm_eps=1e-5, tie_embeddings=True,
        name="gpt2-small",
    ),
    "smollm2-135m": ModelConfig(
        arch="llama", vocab_size=49152, n_layers=30, d_model=576, n_heads=9, n_kv_heads=3,
        head_dim=64, ffn_dim=1536, max_positions=8192, norm_eps=1e-5, rope_theta=100000.0,
        tie_embeddings=True, name="smollm2-135m",
    ),
}
"""Named configs. All but smollm2-135m get random seeded weights; smollm2-135m loads the GGUF."""
