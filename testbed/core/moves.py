"""What a placement change ships between agents: pure functions over two placements (no I/O).

An item is a KV group (weights + cache), a projection, or an FFN column piece; a new FFN shard is
assembled from the pieces of the old shards it overlaps.
"""
from __future__ import annotations

from typing import Callable

from testbed.core.placement import LayerPlacement, Placement
from testbed.core.errors import HeadroomError


def migration_items(old: Placement, new: Placement) -> dict[tuple[str, str], list[dict]]:
    """What each (sender, receiver) pair must ship to go from ``old`` to ``new``: KV groups,
    projections, and FFN column pieces (a new shard is assembled from the old shards it overlaps)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for l, (a, b) in enumerate(zip(old.layers, new.layers)):
        for pair, kind, x, y in layer_moves(a, b):
            if kind == "head":
                item = {"kind": "head", "layer": l, "group": x}
            elif kind == "proj":
                item = {"kind": "proj", "layer": l}
            else:
                item = {"kind": "ffn", "layer": l, "c0": x, "c1": y}
            out.setdefault(pair, []).append(item)
    return out


def layer_moves(a: LayerPlacement, b: LayerPlacement):
    """The pieces one layer ships going from ``a`` to ``b``, in ``migration_items``' order:
    ((sender, receiver), "head", group, None), ((sender, receiver), "proj", None, None) and
    ((sender, receiver), "ffn", c0, c1) — an FFN piece being the intersection of a new shard that
    is not an old one with an old shard on another device, old shards in their order."""
    for g, (da, db) in enumerate(zip(a.heads, b.heads)):
        if da != db:
            yield (da, db), "head", g, None
    if a.proj != b.proj:
        yield (a.proj, b.proj), "proj", None, None
    if a.ffn == b.ffn:
        return
    olds = [(o.device, o.col_start, o.col_end) for o in a.ffn]
    kept = set(olds)
    for s in b.ffn:
        sd, s0, s1 = s.device, s.col_start, s.col_end
        if (sd, s0, s1) in kept:  # an unchanged shard ships nothing
            continue
        for od, o0, o1 in olds:  # the old shards it overlaps on other devices
            if o0 < s1 and s0 < o1 and od != sd:
                yield (od, sd), "ffn", (o0 if o0 > s0 else s0), (o1 if o1 < s1 else s1)


def moved_blocks(old: Placement, new: Placement) -> list[tuple[str, str, str]]:
    """(block_id, from_device, to_device) for every piece a placement change ships: exactly the items
    of ``migration_items`` (KV groups ``L{l}.H{g}``, projections
    ``L{l}.proj``, and FFN column pieces ``L{l}.ffn{c0}-{c1}``: the intersection of a new shard with
    each old shard on another device), per (sender, receiver) pair in its order.

    So a shard that grows on the device holding its first columns lists the columns it gains, from
    their old holders; a changed split lists only the columns that change device."""
    moves: list[tuple[str, str, str]] = []
    for (a, b), items in migration_items(old, new).items():
        for it in items:
            moves.append((item_block_id(it), a, b))
    return moves


def item_block_id(item: dict) -> str:
    """Block id of one ``migration_items`` item (an FFN piece is named by its columns)."""
    l = item["layer"]
    if item["kind"] == "head":
        return f"L{l}.H{item['group']}"
    if item["kind"] == "proj":
        return f"L{l}.proj"
    return f"L{l}.ffn{item['c0']}-{item['c1']}"


def item_bytes(item: dict, sizes: dict[str, int], shards: dict | None = None) -> int:
    """Bytes of one item, from the sender's per-block sizes (an FFN piece pro rata of its shard).
    ``shards``: ``ffn_shards(sizes)`` when the caller sizes many items of one sender."""
    l = item["layer"]
    if item["kind"] == "head":
        return sizes.get(f"L{l}.H{item['group']}", 0)
    if item["kind"] == "proj":
        return sizes.get(f"L{l}.proj", 0)
    for c0, c1, n in (ffn_shards(sizes) if shards is None else shards).get(l, ()):
        if c0 <= item["c0"] and item["c1"] <= c1:
            return n * (item["c1"] - item["c0"]) // (c1 - c0)
    return 0


def ffn_shards(sizes: dict[str, int]) -> dict[int, list[tuple[int, int, int]]]:
    """The FFN shards among one sender's block sizes: layer -> [(col_start, col_end, bytes)] in
    ``sizes`` order."""
    out: dict[int, list[tuple[int, int, int]]] = {}
    for key, n in sizes.items():
        layer, sep, cols = key[1:].partition(".ffn")
        if sep:
            c0, c1 = (int(x) for x in cols.split("-"))
            out.setdefault(int(layer), []).append((c0, c1, n))
    return out


class MigrationBlocked(HeadroomError):
    """No memory-safe order exists for the remaining items (the message carries the numbers)."""

    code = "migration_blocked"


def frees_sender(item: dict, sender_sizes: dict[str, int]) -> bool:
    """Heads, projections and FFN pieces that are a whole shard of the sender are freed on the
    receiver's ack; a part of a shard only when the new placement is applied, after every wave."""
    if item["kind"] == "ffn":
        return f"L{item['layer']}.ffn{item['c0']}-{item['c1']}" in sender_sizes
    return item["kind"] in ("head", "proj")


def schedule_waves(items: dict[tuple[str, str], list[dict]], sizes: dict[str, dict[str, int]],
                   available: dict[str, int], transient_extra: int,
                   transient: Callable[[str, dict, int], int] | None = None,
                   shards: dict | None = None) -> list[dict[tuple[str, str], list[dict]]]:
    """Order a placement change into waves that never overfill a receiver.

    ``available[h]``: bytes ``h`` may still keep (limit - usage - the agent's margin);
    ``transient_extra``: how far an import's transient copies may dip into that margin.
    A receiver takes an item in a wave when everything it keeps from the wave fits ``available``
    and, with the largest transient of its imports on top (``transient(dst, item, bytes)``: the
    payload and decode copies beyond what is kept; default twice the item), fits
    ``available + transient_extra``. Blocks leaving a host free their bytes on the receiver's ack
    (``frees_sender``), so a host that is emptied in one wave can fill up in the next (an evacuation
    before a refill; two full hosts swapping blocks need a third one: blocked).
    ``shards``: ``{src: ffn_shards(sizes[src])}`` when the caller schedules many moves from the
    same blocks (a planner's candidates).
    Pure; raises ``MigrationBlocked`` with the receiver, bytes and room when nothing can move."""
    transient = transient or (lambda dst, it, n: 2 * n)
    free = dict(available)
    if shards is None:
        shards = {src: ffn_shards(sz) for src, sz in sizes.items()}
    pending = [(src, dst, it, item_bytes(it, sizes.get(src, {}), shards.get(src, {})))
               for (src, dst), its in items.items() for it in its]
    pending.sort(key=lambda p: -p[3])
    waves: list[dict[tuple[str, str], list[dict]]] = []
    while pending:
        wave: dict[tuple[str, str], list[dict]] = {}
        kept: dict[str, int] = {}
        largest: dict[str, int] = {}
        rest, took = [], []
        for src, dst, it, n in pending:
            k, big = kept.get(dst, 0) + n, max(largest.get(dst, 0), transient(dst, it, n))
            room = free.get(dst, 0)
            if k <= room and k + big <= room + transient_extra:
                wave.setdefault((src, dst), []).append(it)
                kept[dst], largest[dst] = k, big
                took.append((src, dst, it, n))
            else:
                rest.append((src, dst, it, n))
        if not wave:
            src, dst, it, n = min(rest, key=lambda p: p[3])
            raise MigrationBlocked(
                f"{dst} cannot receive {it['kind']} of layer {it['layer']} ({n} B; {sum(p[3] for p in rest if p[1] == dst)} B "
                f"still due there, plus {transient(dst, it, n)} B of transient copies) but has {free.get(dst, 0)} B "
                f"available (+{transient_extra} B for transient copies) and no earlier move frees it")
        for src, dst, it, n in took:  # integer bytes: the order of the updates does not matter
            free[dst] = free.get(dst, 0) - n
            if frees_sender(it, sizes.get(src, {})):
                free[src] = free.get(src, 0) + n
        waves.append(wave)
        pending = rest
    return waves
