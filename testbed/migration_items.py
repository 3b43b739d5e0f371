"""What a placement change ships between agents: pure functions over two placements (no I/O).

An item is a KV group (weights + cache), a projection, or an FFN column piece; a new FFN shard is
assembled from the pieces of the old shards it overlaps.
"""
from __future__ import annotations

from testbed.placement import Placement


def migration_items(old: Placement, new: Placement) -> dict[tuple[str, str], list[dict]]:
    """What each (sender, receiver) pair must ship to go from ``old`` to ``new``: KV groups,
    projections, and FFN column pieces (a new shard is assembled from the old shards it overlaps)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for l, (a, b) in enumerate(zip(old.layers, new.layers)):
        for g, (da, db) in enumerate(zip(a.heads, b.heads)):
            if da != db:
                out.setdefault((da, db), []).append({"kind": "head", "layer": l, "group": g})
        if a.proj != b.proj:
            out.setdefault((a.proj, b.proj), []).append({"kind": "proj", "layer": l})
        old_set = set(a.ffn)
        for s in b.ffn:
            if s in old_set:
                continue
            for o in a.ffn:
                lo, hi = max(o.col_start, s.col_start), min(o.col_end, s.col_end)
                if lo < hi and o.device != s.device:
                    out.setdefault((o.device, s.device), []).append({"kind": "ffn", "layer": l, "c0": lo, "c1": hi})
    return out


def item_bytes(item: dict, sizes: dict[str, int]) -> int:
    """Bytes of one item, from the sender's per-block sizes (an FFN piece pro rata of its shard)."""
    l = item["layer"]
    if item["kind"] == "head":
        return sizes.get(f"L{l}.H{item['group']}", 0)
    if item["kind"] == "proj":
        return sizes.get(f"L{l}.proj", 0)
    for key, n in sizes.items():
        if key.startswith(f"L{l}.ffn"):
            c0, c1 = (int(x) for x in key[len(f"L{l}.ffn"):].split("-"))
            if c0 <= item["c0"] and item["c1"] <= c1:
                return n * (item["c1"] - item["c0"]) // (c1 - c0)
    return 0
