"""Full-model weights in the one internal naming: random seeded init and HF checkpoint I/O.

Internal names (all tensors fp32, PyTorch (out, in) layout for linear weights):
  embed.tok (V, D)            embed.pos (P, D)                       [pos: gpt2 only]
  layers.{l}.attn_norm.weight/bias (D,)                              [bias: gpt2 only]
  layers.{l}.wq.weight (H*d, D) .bias   wk/wv.weight (Hkv*d, D) .bias
  layers.{l}.wo.weight (D, H*d) .bias
  layers.{l}.ffn_norm.weight/bias (D,)
  layers.{l}.w_up.weight (F, D) .bias   w_gate.weight (F, D) [llama]   w_down.weight (D, F) .bias
  final_norm.weight/bias (D,)           lm_head.weight (V, D)          [only if not tied]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .config import ModelConfig, ModelError, config_from_hf

StateDict = dict[str, Tensor]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every internal tensor name of `cfg` with its shape."""
    D, F, V = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    bias = cfg.has_bias
    s: dict[str, tuple[int, ...]] = {"embed.tok": (V, D)}
    if cfg.arch == "gpt2":
        s["embed.pos"] = (cfg.max_positions, D)
    for l in range(cfg.n_layers):
        p = f"layers.{l}."
        lin = {"wq": (qd, D), "wk": (kvd, D), "wv": (kvd, D), "wo": (D, qd), "w_up": (F, D), "w_down": (D, F)}
        if cfg.arch == "llama":
            lin["w_gate"] = (F, D)
        for n, shp in lin.items():
            s[p + n + ".weight"] = shp
            if bias:
                s[p + n + ".bias"] = (shp[0],)
        for n in ("attn_norm", "ffn_norm"):
            s[p + n + ".weight"] = (D,)
            if bias:
                s[p + n + ".bias"] = (D,)
    s["final_norm.weight"] = (D,)
    if bias:
        s["final_norm.bias"] = (D,)
    if not cfg.tie_embeddings:
        s["lm_head.weight"] = (V, D)
    return s


def random_state_dict(cfg: ModelConfig, seed: int = 0) -> StateDict:
    """Seeded random weights: N(0, 0.5/sqrt(fan_in)) linears, N(1, 0.1) norm gains, small biases.

    Tensors are drawn in `expected_shapes` order from one generator, so (cfg, seed) fixes them.
    """
    gen = torch.Generator().manual_seed(seed)
    out: StateDict = {}
    for name, shape in expected_shapes(cfg).items():
        if "norm" in name and name.endswith(".weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=gen)
        elif name in ("embed.tok", "lm_head.weight"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif name == "embed.pos":
            t = 0.05 * torch.randn(shape, generator=gen)
        else:
            t = (0.5 / shape[1] ** 0.5) * torch.randn(shape, generator=gen)
        out[name] = t  # fp32
    return out


def check_state_dict(cfg: ModelConfig, sd: StateDict) -> None:
    """Raise ModelError unless `sd` has exactly the tensors and shapes `cfg` needs."""
    exp = expected_shapes(cfg)
    missing, extra = set(exp) - set(sd), set(sd) - set(exp)
    if missing or extra:
        raise ModelError(f"state dict mismatch: missing={sorted(missing)[:5]} extra={sorted(extra)[:5]}")
    for n, shp in exp.items():
        if tuple(sd[n].shape) != shp:
            raise ModelError(f"{n}: shape {tuple(sd[n].shape)} != expected {shp}")


# ---- Hugging Face naming -------------------------------------------------------------------------

_LLAMA_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "wq.weight",
    "self_attn.k_proj.weight": "wk.weight", "self_attn.v_proj.weight": "wv.weight",
    "self_attn.o_proj.weight": "wo.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "w_gate.weight", "mlp.up_proj.weight": "w_up.weight",
    "mlp.down_proj.weight": "w_down.weight",
}
_GPT2_LAYER = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
    "attn.c_proj.weight": "wo.weight", "attn.c_proj.bias": "wo.bias",
    "mlp.c_fc.weight": "w_up.weight", "mlp.c_fc.bias": "w_up.bias",
    "mlp.c_proj.weight": "w_down.weight", "mlp.c_proj.bias": "w_down.bias",
}


def _llama_from_hf_sd(cfg: ModelConfig, hf: StateDict) -> StateDict:
    sd: StateDict = {"embed.tok": hf["model.embed_tokens.weight"], "final_norm.weight": hf["model.norm.weight"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
    for l in range(cfg.n_layers):
        for hn, n in _LLAMA_LAYER.items():
            sd[f"layers.{l}.{n}"] = hf[f"model.layers.{l}.{hn}"]
    return sd


def _gpt2_from_hf_sd(cfg: ModelConfig, hf: StateDict) -> StateDict:
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    sd: StateDict = {"embed.tok": hf["wte.weight"], "embed.pos": hf["wpe.weight"],
                     "final_norm.weight": hf["ln_f.weight"], "final_norm.bias": hf["ln_f.bias"]}
    for l in range(cfg.n_layers):
        p = f"h.{l}."
        for hn, n in _GPT2_LAYER.items():
            t = hf[p + hn]
            sd[f"layers.{l}.{n}"] = t.t() if t.dim() == 2 else t  # Conv1D stores (in, out)
        w, b = hf[p + "attn.c_attn.weight"].t(), hf[p + "attn.c_attn.bias"]  # (3D, D), (3D,)
        for i, n in enumerate(("wq", "wk", "wv")):
            sl = slice(i * cfg.d_model, (i + 1) * cfg.d_model)
            sd[f"layers.{l}.{n}.weight"], sd[f"layers.{l}.{n}.bias"] = w[sl], b[sl]
    return sd


def from_hf_state_dict(cfg: ModelConfig, hf: StateDict) -> StateDict:
    """Map a HF GPT2LMHeadModel / LlamaForCausalLM state dict to internal names (fp32, contiguous)."""
    try:
        sd = _gpt2_from_hf_sd(cfg, hf) if cfg.arch == "gpt2" else _llama_from_hf_sd(cfg, hf)
    except KeyError as e:
        raise ModelError(f"checkpoint lacks tensor {e}") from None
    sd = {k: v.to(torch.float32).contiguous() for k, v in sd.items()}
    check_state_dict(cfg, sd)
    return sd


def to_hf_state_dict(cfg: ModelConfig, sd: StateDict) -> StateDict:
    """Inverse of from_hf_state_dict (used to build a transformers model with our weights)."""
    if cfg.arch == "llama":
        hf = {"model.embed_tokens.weight": sd["embed.tok"], "model.norm.weight": sd["final_norm.weight"],
              "lm_head.weight": sd.get("lm_head.weight", sd["embed.tok"])}
        for l in range(cfg.n_layers):
            for hn, n in _LLAMA_LAYER.items():
                hf[f"model.layers.{l}.{hn}"] = sd[f"layers.{l}.{n}"]
        return hf
    hf = {"transformer.wte.weight": sd["embed.tok"], "transformer.wpe.weight": sd["embed.pos"],
          "transformer.ln_f.weight": sd["final_norm.weight"], "transformer.ln_f.bias": sd["final_norm.bias"],
          "lm_head.weight": sd["embed.tok"]}
    for l in range(cfg.n_layers):
        p, q = f"transformer.h.{l}.", f"layers.{l}."
        for hn, n in _GPT2_LAYER.items():
            t = sd[q + n]
            hf[p + hn] = t.t().contiguous() if t.dim() == 2 else t
        hf[p + "attn.c_attn.weight"] = torch.cat([sd[q + f"{n}.weight"] for n in ("wq", "wk", "wv")]).t().contiguous()
        hf[p + "attn.c_attn.bias"] = torch.cat([sd[q + f"{n}.bias"] for n in ("wq", "wk", "wv")])
    return hf


def load_hf_dir(path: str | Path) -> tuple[ModelConfig, StateDict]:
    """Read a local HF checkpoint directory (config.json + model.safetensors or shards)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path}: no config.json")
    cfg = config_from_hf(json.loads(cfg_file.read_text()), name=path.name)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no *.safetensors weights")
    hf: StateDict = {}
    for f in files:
        hf.update(load_file(str(f)))
    return cfg, from_hf_state_dict(cfg, hf)
