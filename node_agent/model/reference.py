"""In-process sharded execution: a `Placement` of blocks onto named devices, run through the real
block classes in one process. It is the reference the node agents must reproduce over the wire
(and what the tests compare against the monolithic Model); it also performs KV-group migration
with the byte-level export/import path.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .blocks import (AttentionShard, Embedder, FfnShard, LMHead, ProjBlock, ShardError,
                     assemble_head_outputs, ffn_combine, ffn_down_bias, source_blocks)
from .config import ModelConfig
from .weights import StateDict


@dataclass
class LayerPlacement:
    """Where one layer's blocks live. heads: device → KV groups (any subset, any order);
    ffn: (device, col_start, col_end) ranges that together cover [0, ffn_dim) exactly once."""

    heads: dict[str, list[int]]
    proj: str
    ffn: list[tuple[str, int, int]]

    def validate(self, cfg: ModelConfig, layer: int) -> None:
        groups = sorted(g for gs in self.heads.values() for g in gs)
        if groups != list(range(cfg.n_groups)):
            raise ShardError(f"layer {layer}: head groups {groups} are not a partition of {cfg.n_groups}")
        cols = sorted((s, e) for _, s, e in self.ffn)
        pos = 0
        for s, e in cols:
            if s != pos or e <= s:
                raise ShardError(f"layer {layer}: FFN ranges {cols} do not tile [0, {cfg.ffn_dim})")
            pos = e
        if pos != cfg.ffn_dim:
            raise ShardError(f"layer {layer}: FFN ranges {cols} do not tile [0, {cfg.ffn_dim})")


@dataclass
class Placement:
    source: str  # holds Embedder and LMHead
    layers: list[LayerPlacement]

    def devices(self) -> list[str]:
        devs = {self.source}
        for lp in self.layers:
            devs.update(d for d, gs in lp.heads.items() if gs)
            devs.add(lp.proj)
            devs.update(d for d, _, _ in lp.ffn)
        return sorted(devs)


def random_placement(cfg: ModelConfig, devices: Sequence[str], rng: random.Random,
                     max_ffn_shards: int = 4) -> Placement:
    """Random groups → devices (random order within a device) and random FFN column cuts."""
    layers = []
    for _ in range(cfg.n_layers):
        heads: dict[str, list[int]] = {}
        for g in rng.sample(range(cfg.n_groups), cfg.n_groups):
            heads.setdefault(rng.choice(devices), []).append(g)
        k = rng.randint(1, min(max_ffn_shards, cfg.ffn_dim))
        cuts = sorted(rng.sample(range(1, cfg.ffn_dim), k - 1)) if k > 1 else []
        bounds = [0, *cuts, cfg.ffn_dim]
        ffn = [(rng.choice(devices), bounds[i], bounds[i + 1]) for i in range(k)]
        layers.append(LayerPlacement(heads=heads, proj=rng.choice(devices), ffn=ffn))
    return Placement(source=devices[0], layers=layers)


@dataclass
class DeviceBlocks:
    """Blocks resident on one device."""

    attn: dict[int, AttentionShard] = field(default_factory=dict)
    proj: dict[int, ProjBlock] = field(default_factory=dict)
    ffn: dict[int, list[FfnShard]] = field(default_factory=dict)
    embedder: Embedder | None = None
    lm_head: LMHead | None = None

    def blocks(self) -> list:
        bs: list = [*self.attn.values(), *self.proj.values()]
        bs += [f for fs in self.ffn.values() for f in fs]
        return bs + [b for b in (self.embedder, self.lm_head) if b is not None]

    def nbytes_weights(self) -> int:
        """Bytes of each block's weights as if every block owned its tensors (as in an agent);
        a tied LM head next to the Embedder shares the embedding matrix."""
        total = 0
        for b in self.blocks():
            ts = b.weight_tensors()
            if b is self.lm_head and self.embedder is not None:
                ts = [t for t in ts if t is not self.embedder.tok]
            total += sum(t.numel() * t.element_size() for t in ts)
        return total

    def nbytes_kv(self) -> int:
        return sum(a.nbytes_kv() for a in self.attn.values())


class ShardedReference:
    """Runs a Placement in one process; forward/generate mirror Model."""

    def __init__(self, cfg: ModelConfig, state_dict: StateDict, placement: Placement) -> None:
        for l, lp in enumerate(placement.layers):
            lp.validate(cfg, l)
        if len(placement.layers) != cfg.n_layers:
            raise ShardError(f"placement has {len(placement.layers)} layers, model {cfg.n_layers}")
        self.cfg, self.placement = cfg, placement
        self.dev: dict[str, DeviceBlocks] = {d: DeviceBlocks() for d in placement.devices()}
        src = self.dev[placement.source]
        src.embedder, src.lm_head = source_blocks(cfg, state_dict)
        for l, lp in enumerate(placement.layers):
            for d, gs in lp.heads.items():
                if gs:
                    self.dev[d].attn[l] = AttentionShard(cfg, l, gs, state_dict)
            self.dev[lp.proj].proj[l] = ProjBlock(cfg, l, state_dict)
            for d, s, e in lp.ffn:
                self.dev[d].ffn.setdefault(l, []).append(FfnShard(cfg, l, s, e, state_dict))
        self.ffn_bias = [ffn_down_bias(cfg, l, state_dict) for l in range(cfg.n_layers)]

    def _layer(self, l: int, x: Tensor, start_pos: int) -> Tensor:
        parts = [(a.groups, a(x, start_pos)) for d in self.dev.values() if (a := d.attn.get(l)) and a.groups]
        h = self.dev[self.placement.layers[l].proj].proj[l](assemble_head_outputs(self.cfg, parts), x)  # (B, T, D)
        partials = [f(h) for d in self.dev.values() for f in d.ffn.get(l, [])]  # [(B, T, D)]
        return ffn_combine(partials, h, self.ffn_bias[l])  # (B, T, D)

    @torch.inference_mode()
    def forward(self, ids: Tensor | Sequence[int], start_pos: int = 0) -> Tensor:
        if not isinstance(ids, Tensor):
            ids = torch.tensor([list(ids)], dtype=torch.long)
        src = self.dev[self.placement.source]
        x = src.embedder(ids, start_pos)  # (B, T, D)
        for l in range(self.cfg.n_layers):
            x = self._layer(l, x, start_pos)
        return src.lm_head(x)  # (B, T, V)

    __call__ = forward

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
                 on_step: Callable[[int, Tensor], None] | None = None) -> list[int]:
        """Greedy decode; on_step(step, logits (1,T,V)) runs after every forward (e.g. to migrate)."""
        logits, pos, out = self.forward(list(prompt_ids), 0), len(prompt_ids), []
        for step in range(max_new_tokens):
            if on_step is not None:
                on_step(step, logits)
            out.append(int(logits[0, -1].argmax()))
            if len(out) < max_new_tokens:
                logits = self.forward(torch.tensor([[out[-1]]]), pos)  # (1, 1, V)
                pos += 1
        return out

    def migrate_group(self, layer: int, group: int, src: str, dst: str) -> int:
        """Move one KV group (weights + cache) src → dst through bytes; returns payload bytes."""
        header, payload = self.dev[src].attn[layer].export_group(group)
        self.dev[src].attn[layer].remove_group(group)
        target = self.dev.setdefault(dst, DeviceBlocks())
        if layer in target.attn:
            target.attn[layer].import_group(header, payload)
        else:
            target.attn[layer] = AttentionShard.from_export(self.cfg, header, payload)
        lp = self.placement.layers[layer]
        lp.heads[src].remove(group)
        lp.heads.setdefault(dst, []).append(group)
        return len(payload)
