"""Sharded execution through the placement blocks equals the monolithic model; KV-group migration."""

from __future__ import annotations

import json
import random

import pytest
import torch

from node_agent.model import REGISTRY, AttentionShard, FfnShard, Model, ShardError, ffn_combine
from node_agent.model.reference import LayerPlacement, Placement, ShardedReference, random_placement
from node_agent.model.weights import random_state_dict

TOL = 1e-4
ARCHS = ["tiny-gpt2", "tiny-llama"]


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    cfg = REGISTRY[request.param]
    return Model(cfg, random_state_dict(cfg, seed=11))


def _decode_compare(mono: Model, ref: ShardedReference, prompt: list[int], steps: int, migrate=None) -> None:
    want, got = mono.forward(prompt, 0), ref.forward(prompt, 0)
    assert (want - got).abs().max().item() <= TOL
    pos = len(prompt)
    for step in range(steps):
        if migrate is not None:
            migrate(step)
        nxt = torch.tensor([[int(want[0, -1].argmax())]])
        want, got = mono.forward(nxt, pos), ref.forward(nxt, pos)
        assert (want - got).abs().max().item() <= TOL, f"step {step}"
        pos += 1


@pytest.mark.parametrize("n_devices", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_placement_matches_monolithic(model, n_devices, seed):
    rng = random.Random(seed * 10 + n_devices)
    devices = [f"d{i}" for i in range(n_devices)]
    placement = random_placement(model.config, devices, rng)
    ref = ShardedReference(model.config, model.state_dict, placement)
    prompt = [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 12))]
    _decode_compare(model, ref, prompt, steps=33)


def test_batched_prefill_matches(model):
    placement = random_placement(model.config, ["a", "b", "c"], random.Random(5))
    ref = ShardedReference(model.config, model.state_dict, placement)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    assert (model.forward(ids, 0) - ref.forward(ids, 0)).abs().max().item() <= TOL
    nxt = torch.tensor([[1], [2], [3]])
    assert (model.forward(nxt, 9) - ref.forward(nxt, 9)).abs().max().item() <= TOL


def test_chunked_prefill_and_rewind(model):
    ids = list(range(3, 23))
    full = model.forward(ids, 0)
    model.forward(ids[:7], 0)
    part = model.forward(ids[7:], 7)  # prefill continuation with a mask
    assert (full[0, 7:] - part[0]).abs().max().item() <= TOL
    again = model.forward(ids[5:], 5)  # rewind: cache truncated to 5
    assert (full[0, 5:] - again[0]).abs().max().item() <= TOL


def test_migration_mid_generation_identical(model):
    cfg = model.config
    rng = random.Random(7)
    devices = ["src", "a", "b", "c"]
    ref = ShardedReference(cfg, model.state_dict, random_placement(cfg, devices, rng))
    moved = []

    def migrate(step: int) -> None:
        if step % 4 != 2:
            return
        layer = rng.randrange(cfg.n_layers)
        src = rng.choice([d for d, gs in ref.placement.layers[layer].heads.items() if gs])
        group = rng.choice(ref.placement.layers[layer].heads[src])
        dst = rng.choice(devices + ["new"])
        if dst != src:
            moved.append(ref.migrate_group(layer, group, src, dst))

    _decode_compare(model, ref, [5, 6, 7, 8, 9], steps=32, migrate=migrate)
    assert moved and all(n > 0 for n in moved)
    mono_tokens = model.generate([5, 6, 7, 8, 9], 40)
    ref_tokens = ref.generate([5, 6, 7, 8, 9], 40, on_step=lambda s, _: migrate(s))
    assert ref_tokens == mono_tokens


def test_export_header_is_json_and_import_resumes(model):
    cfg, sd = model.config, model.state_dict
    a = AttentionShard(cfg, 1, list(range(cfg.n_groups)), sd)
    b = AttentionShard(cfg, 1, [], sd)
    x = torch.randn(1, 6, cfg.d_model, generator=torch.Generator().manual_seed(0))
    full = a(x, 0)  # (1, 6, H·d)
    g = cfg.n_groups - 1
    header, payload = a.export_group(g)
    header = json.loads(json.dumps(header))
    assert header["meta"]["cached_len"] == 6 and header["meta"]["group"] == g
    assert len(payload) == header["nbytes"]
    b.import_group(header, payload)
    a.remove_group(g)
    step = torch.randn(1, 1, cfg.d_model, generator=torch.Generator().manual_seed(1))
    ref = AttentionShard(cfg, 1, list(range(cfg.n_groups)), sd)
    ref(x, 0)
    want = ref(step, 6)  # (1, 1, H·d)
    w = cfg.q_per_group * cfg.head_dim
    assert torch.allclose(torch.cat([a(step, 6), b(step, 6)], -1), want, atol=1e-6)
    assert full.shape[-1] == cfg.n_groups * w


def test_remove_group_frees_memory_and_errors(model):
    cfg, sd = model.config, model.state_dict
    shard = AttentionShard(cfg, 0, list(range(cfg.n_groups)), sd)
    shard(torch.randn(1, 5, cfg.d_model), 0)
    before_w, before_kv = shard.nbytes_weights(), shard.nbytes_kv()
    shard.remove_group(0)
    assert shard.groups == list(range(1, cfg.n_groups))
    assert shard.nbytes_kv() == before_kv * (cfg.n_groups - 1) // cfg.n_groups
    assert shard.nbytes_weights() < before_w
    with pytest.raises(ShardError):
        shard.remove_group(0)
    header, payload = shard.export_group(1)
    with pytest.raises(ShardError):
        shard.import_group(header, payload)  # already present
    other_layer = AttentionShard(cfg, 2, [], sd)
    with pytest.raises(ShardError):
        other_layer.import_group(header, payload)


def test_ffn_splits_sum_to_full(model):
    cfg, sd = model.config, model.state_dict
    h = torch.randn(2, 4, cfg.d_model, generator=torch.Generator().manual_seed(3))
    bias = sd.get("layers.2.w_down.bias")
    full = ffn_combine([FfnShard(cfg, 2, 0, cfg.ffn_dim, sd)(h)], h, bias)
    cuts = [0, 1, 17, cfg.ffn_dim - 5, cfg.ffn_dim]
    parts = [FfnShard(cfg, 2, s, e, sd)(h) for s, e in zip(cuts, cuts[1:])]
    assert (ffn_combine(parts, h, bias) - full).abs().max().item() <= 1e-5
    with pytest.raises(ShardError):
        FfnShard(cfg, 2, 5, 5, sd)


def test_placement_validation(model):
    cfg = model.config
    bad = Placement("s", [LayerPlacement({"a": [0]}, "a", [("a", 0, cfg.ffn_dim)])] * cfg.n_layers)
    with pytest.raises(ShardError):
        ShardedReference(cfg, model.state_dict, bad)
    all_g = list(range(cfg.n_groups))
    gap = Placement("s", [LayerPlacement({"a": all_g}, "a", [("a", 0, 10), ("b", 11, cfg.ffn_dim)])] * cfg.n_layers)
    with pytest.raises(ShardError):
        ShardedReference(cfg, model.state_dict, gap)


def test_uneven_group_order_output_layout(model):
    cfg, sd = model.config, model.state_dict
    if cfg.n_groups < 2:
        pytest.skip("needs two groups")
    x = torch.randn(1, 3, cfg.d_model)
    whole = AttentionShard(cfg, 0, list(range(cfg.n_groups)), sd)(x, 0)
    rev = list(reversed(range(cfg.n_groups)))
    out = AttentionShard(cfg, 0, rev, sd)(x, 0)
    w = cfg.q_per_group * cfg.head_dim
    for i, g in enumerate(rev):
        assert torch.allclose(out[..., i * w:(i + 1) * w], whole[..., g * w:(g + 1) * w], atol=1e-6)
