"""The placement contract shared by partitioners, cost models and every backend.

A placement says, for every decoder layer, which device runs each attention block (one KV group
under GQA, one head under MHA), which device holds the output projection (and adds the residual),
and how the FFN's intermediate columns are split over devices. The source device always holds the
embeddings and the LM head.

Dataflow of one decoded token (the cost models and the agents implement exactly this):
  x_0 = embed(token) on the source.  For each layer l, with x on device A (source for l = 0, else
  the FFN aggregator of layer l-1):
    1. A sends x (D values) to every distinct device of heads[l] and to proj[l].
    2. Each head device runs its groups (input norm, QKV, attention with its KV cache) and sends
       its head outputs (n_groups_there * q_per_group * head_dim values) to proj[l].
    3. proj[l] concatenates the head outputs, applies W_o and adds x -> h; sends h to every FFN
       shard device.
    4. Each FFN shard device computes its partial (post-attention norm, its columns of the MLP) and
       sends it (D values) to the aggregator ffn[l][0].device, which sums partials + bias + h -> x'.
  After the last layer the aggregator sends x to the source: final norm, LM head, greedy sample.
Sends between blocks on the same device are free.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator


@dataclass(frozen=True)
class FfnShard:
    """Columns [col_start, col_end) of one layer's FFN intermediate dimension on one device."""

    device: str
    col_start: int
    col_end: int


@dataclass(frozen=True)
class LayerPlacement:
    """Where one decoder layer's blocks live. ``heads[g]`` is the device of KV group ``g``."""

    heads: tuple[str, ...]
    proj: str
    ffn: tuple[FfnShard, ...]

    @property
    def ffn_aggregator(self) -> str:
        return self.ffn[0].device

    def head_devices(self) -> list[str]:
        """Distinct devices holding heads of this layer, in first-appearance order."""
        return list(dict.fromkeys(self.heads))

    def groups_on(self, device: str) -> list[int]:
        return [g for g, d in enumerate(self.heads) if d == device]


@dataclass(frozen=True)
class Placement:
    """A whole-model placement. Immutable; planners return new ones."""

    source: str
    layers: tuple[LayerPlacement, ...]
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def devices(self) -> set[str]:
        used = {self.source}
        for lp in self.layers:
            used.update(lp.heads)
            used.add(lp.proj)
            used.update(s.device for s in lp.ffn)
        return used

    def blocks(self) -> Iterator[tuple[str, str]]:
        """(block_id, device) for every movable block: ``L{l}.H{g}``, ``L{l}.proj``, ``L{l}.ffn{c0}-{c1}``."""
        for l, lp in enumerate(self.layers):
            for g, dev in enumerate(lp.heads):
                yield f"L{l}.H{g}", dev
            yield f"L{l}.proj", lp.proj
            for s in lp.ffn:
                yield f"L{l}.ffn{s.col_start}-{s.col_end}", s.device

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "layers": [
                {
                    "heads": list(lp.heads),
                    "proj": lp.proj,
                    "ffn": [[s.device, s.col_start, s.col_end] for s in lp.ffn],
                }
                for lp in self.layers
            ],
        }

    @classmethod
    def from_json(cls, obj: dict) -> "Placement":
        layers = tuple(
            LayerPlacement(
                heads=tuple(lp["heads"]),
                proj=lp["proj"],
                ffn=tuple(FfnShard(d, int(a), int(b)) for d, a, b in lp["ffn"]),
            )
            for lp in obj["layers"]
        )
        return cls(source=obj["source"], layers=layers)

    def validate(self, n_layers: int, n_groups: int, ffn_dim: int) -> None:
        """Raise ValueError unless the placement covers the model exactly once."""
        if len(self.layers) != n_layers:
            raise ValueError(f"placement has {len(self.layers)} layers, model has {n_layers}")
        for l, lp in enumerate(self.layers):
            if len(lp.heads) != n_groups:
                raise ValueError(f"layer {l}: {len(lp.heads)} head groups placed, model has {n_groups}")
            cols = sorted((s.col_start, s.col_end) for s in lp.ffn)
            pos = 0
            for a, b in cols:
                if a != pos or b <= a:
                    raise ValueError(f"layer {l}: FFN shards {cols} do not tile [0, {ffn_dim})")
                pos = b
            if pos != ffn_dim:
                raise ValueError(f"layer {l}: FFN shards {cols} do not tile [0, {ffn_dim})")


def uniform_layer(device: str, n_groups: int, ffn_dim: int) -> LayerPlacement:
    """A whole layer on one device (what layer-based partitioners produce)."""
    return LayerPlacement(heads=(device,) * n_groups, proj=device, ffn=(FfnShard(device, 0, ffn_dim),))
