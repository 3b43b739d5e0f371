"""Model side of Headroom: configs, weights, placement blocks, the monolithic model and `load_model`.

`load_model(name_or_dir)` accepts a REGISTRY name (random seeded weights, except "smollm2-135m"
which loads the real GGUF weights) or a local Hugging Face checkpoint directory (GPT-2 or Llama).
"""

from __future__ import annotations

from pathlib import Path

from .config import REGISTRY, ModelConfig, ModelError, config_from_hf

# torch-backed names load on first use, so reading a config (``headroom validate``, planning) never
# imports torch
_LAZY = {
    **{n: "blocks" for n in ("AttentionShard", "Embedder", "FfnShard", "LMHead", "ProjBlock", "ShardError",
                             "assemble_head_outputs", "ffn_combine", "ffn_down_bias", "prepare_state_dict",
                             "source_blocks")},
    "Model": "model", "load_hf_dir": "weights", "random_state_dict": "weights",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_state(name_or_dir: str | Path, seed: int = 0) -> tuple[ModelConfig, dict]:
    """(config, full internal state dict) for a registry name, a HF checkpoint directory, or
    ``config:{json}`` (a ModelConfig as a dict; random seeded weights)."""
    from .weights import load_hf_dir, random_state_dict

    key = str(name_or_dir)
    if key.startswith("config:"):  # explicit dims (testbed.spec.modelref): random seeded weights
        import json

        cfg = ModelConfig.from_dict(json.loads(key[len("config:"):]))
        return cfg, random_state_dict(cfg, seed)
    if key == "smollm2-135m":
        from .gguf_loader import load_smollm2

        return load_smollm2()
    if key in REGISTRY:
        cfg = REGISTRY[key]
        return cfg, random_state_dict(cfg, seed)
    if Path(key).is_dir():
        return load_hf_dir(key)
    raise ModelError(f"unknown model {key!r}: not in REGISTRY {sorted(REGISTRY)} and not a directory")


def load_model(name_or_dir: str | Path | ModelConfig, seed: int = 0) -> Model:
    """A ready Model (fp32, CPU). A ModelConfig gets random seeded weights."""
    from .model import Model
    from .weights import random_state_dict

    if isinstance(name_or_dir, ModelConfig):
        return Model(name_or_dir, random_state_dict(name_or_dir, seed))
    return Model(*load_state(name_or_dir, seed))


__all__ = [
    "REGISTRY", "AttentionShard", "Embedder", "FfnShard", "LMHead", "Model", "ModelConfig", "ModelError",
    "ProjBlock", "ShardError", "assemble_head_outputs", "prepare_state_dict", "source_blocks", "config_from_hf", "ffn_combine", "ffn_down_bias",
    "load_model", "load_state", "random_state_dict",
]
