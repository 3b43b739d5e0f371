"""Migration delay between two placements (weights + KV caches moved over the paths).

What moves is what the runtime ships (``testbed.core.moves.migration_items``, used here as
is): KV groups, projections, and FFN column PIECES, a new shard being assembled from the
intersections with the old shards on other devices (a shard growing on its own device brings only
the columns it gains, from their old holders; a changed split moves only the columns that change
device). ``testbed.core.moves.moved_blocks`` lists the same items.
Aggregation (used everywhere: planners, the exact solver, the simulated backend):
  * all pieces moving from device ``a`` to device ``b`` travel as ONE transfer of their summed
    bytes: ``latency(a, b) + bytes / bandwidth(a, b)``;
  * one sender's transfers to different receivers are serialised (they share its uplink), so a
    sender is busy for the SUM of its per-receiver transfer times;
  * different senders run in parallel: the delay of one wave is the MAX over senders;
  * waves: when some receiver has no room for all it receives until its own blocks have left
    (a full host evacuated before it is refilled), the moves are ordered into memory-safe waves
    (``migration_items.schedule_waves``, a sender's block freed once received) and the delay is
    the SUM over waves; when no order exists (two full hosts swapping blocks) the estimate is
    ``inf`` with ``blocked`` saying why. Room = memory budget - the old placement's bytes at ``T``;
    import transients are the runtime's concern (the emulated controller checks them exactly).
A head carries its KV cache at the context length ``T``; proj/FFN blocks carry weights only (an FFN
piece its columns' share). Under the ``paper`` cost model a block's bytes are the paper's memory
figures.
"""
from __future__ import annotations

from dataclasses import dataclass

from testbed.partition.cost import blocks as B
from testbed.partition.cost.latency import Net, memory, paper_constants
from testbed.core.moves import MigrationBlocked, ffn_shards, layer_moves, migration_items, schedule_waves
from testbed.core.placement import Placement
from testbed.core.moves import item_block_id
from testbed.core.snapshot import ClusterSnapshot, ModelDims


@dataclass
class MigrationEstimate:
    delay_s: float
    bytes_moved: int
    moves: list[tuple[str, str, str]]
    pair_bytes: dict[tuple[str, str], int]
    waves: int = 1
    blocked: str | None = None  # no memory-safe order: why (delay_s is inf)


def pair_delay(pair_bytes: dict[tuple[str, str], float], net: Net) -> float:
    """Delay of moving ``pair_bytes[(a, b)]`` bytes a -> b for every pair, aggregated as above."""
    busy: dict[str, float] = {}
    for (a, b), nbytes in pair_bytes.items():
        if a != b and nbytes > 0:
            busy[a] = busy.get(a, 0.0) + net.xfer(a, b, nbytes)
    return max(busy.values(), default=0.0)


def _item_bytes(dims: ModelDims, T: int, cost_model: str, weights_shipped: bool = True):
    """Bytes of one ``migration_items`` item at context ``T`` (the blocks' memory figures; an FFN piece
    its columns' share); without shipped weights a head moves its KV cache only and the other blocks move nothing."""
    piece = _piece_bytes(dims, T, cost_model, weights_shipped)
    return lambda it: piece(it["kind"], it.get("c0"), it.get("c1"))


def _piece_bytes(dims: ModelDims, T: int, cost_model: str, weights_shipped: bool = True):
    """``_item_bytes`` of a piece given as (kind, c0, c1) (``moves.layer_moves``' fields)."""
    if not weights_shipped:
        kv = B.head_kv_bytes(dims, T)
        return lambda kind, c0, c1: kv if kind == "head" else 0
    if cost_model == "paper":
        k = paper_constants(dims, T)
        head, proj, ffn_b, F = k["head_bytes"], k["proj_bytes"], k["ffn_bytes"], dims.ffn_dim
        return lambda kind, c0, c1: (head if kind == "head" else proj if kind == "proj" else ffn_b * (c1 - c0) // F)
    head, proj, col = B.block_memory_bytes(dims, "head", T), B.proj_bytes(dims), B.ffn_bytes(dims, 1)
    return lambda kind, c0, c1: head if kind == "head" else proj if kind == "proj" else col * (c1 - c0)


def migration_estimate(old: Placement | None, new: Placement, snapshot: ClusterSnapshot, dims: ModelDims,
                       context_len: int | None = None, cost_model: str = "decode",
                       net: Net | None = None, memo: dict | None = None) -> MigrationEstimate:
    """What moving ``old`` -> ``new`` ships and how long it takes (the module docstring).
    ``memo``: a dict kept by a caller that estimates many moves from the same ``old`` in one
    snapshot (a planner's candidates): ``old``'s memory and block sizes are computed once."""
    if old is None or len(old.layers) != len(new.layers):
        return MigrationEstimate(0.0, 0, [], {})
    T = snapshot.context_len if context_len is None else context_len
    nbytes = _item_bytes(dims, T, cost_model, snapshot.weights_shipped)
    items = migration_items(old, new)
    moves: list[tuple[str, str, str]] = []
    pairs: dict[tuple[str, str], int] = {}
    for (a, b), its in items.items():
        pairs[(a, b)] = sum(nbytes(it) for it in its)
        moves.extend((item_block_id(it), a, b) for it in its)
    net = net or Net(snapshot)
    try:
        waves = _waves(old, items, pairs, snapshot, dims, T, cost_model, nbytes, memo)
    except MigrationBlocked as exc:
        return MigrationEstimate(float("inf"), sum(pairs.values()), moves, pairs, 0, str(exc))
    if waves is None:
        return MigrationEstimate(pair_delay(pairs, net), sum(pairs.values()), moves, pairs)
    delay = sum(pair_delay({k: sum(nbytes(it) for it in its) for k, its in w.items()}, net) for w in waves)
    return MigrationEstimate(delay, sum(pairs.values()), moves, pairs, len(waves))


def _waves(old: Placement, items: dict, pairs: dict, snapshot: ClusterSnapshot, dims: ModelDims, T: int,
           cost_model: str, nbytes, memo: dict | None = None) -> list[dict] | None:
    """None when every receiver has room for all it receives (one wave), else the memory-safe
    waves (raises ``MigrationBlocked``). Weights copied at the destination: always one wave."""
    if not snapshot.weights_shipped or not items:
        return None
    key = (id(old), T, cost_model)
    hit = memo.get(key) if memo is not None else None
    if hit is None or hit[0] is not old:
        held = memory(old, snapshot, dims, cost_model, T)
        hit = (old, {d.name: d.mem_budget_bytes - held.get(d.name, 0) for d in snapshot.devices}, None)
        if memo is not None:
            memo[key] = hit
    room = hit[1]
    due: dict[str, int] = {}
    for (_, b), n in pairs.items():
        due[b] = due.get(b, 0) + n
    if all(n <= room.get(b, 0) for b, n in due.items()):
        return None
    if hit[2] is None:
        sizes = _old_sizes(old, nbytes)
        hit = (old, room, (sizes, {src: ffn_shards(sz) for src, sz in sizes.items()}))
        if memo is not None:
            memo[key] = hit
    return schedule_waves(items, hit[2][0], dict(room), 0, lambda dst, it, n: 0, shards=hit[2][1])


def _old_sizes(old: Placement, nbytes) -> dict[str, dict[str, int]]:
    """Bytes of every block of ``old`` per device (``schedule_waves``' ``sizes``)."""
    sizes: dict[str, dict[str, int]] = {}
    for l, lp in enumerate(old.layers):
        for g, d in enumerate(lp.heads):
            sizes.setdefault(d, {})[f"L{l}.H{g}"] = nbytes({"kind": "head"})
        sizes.setdefault(lp.proj, {})[f"L{l}.proj"] = nbytes({"kind": "proj"})
        for sh in lp.ffn:
            sizes.setdefault(sh.device, {})[f"L{l}.ffn{sh.col_start}-{sh.col_end}"] = nbytes(
                {"kind": "ffn", "c0": sh.col_start, "c1": sh.col_end})
    return sizes


def migration_delay(old: Placement | None, new: Placement, snapshot: ClusterSnapshot, dims: ModelDims,
                    context_len: int | None = None, cost_model: str = "decode") -> float:
    """Seconds to move from ``old`` to ``new`` (0 if ``old`` is None); see the module docstring."""
    return migration_estimate(old, new, snapshot, dims, context_len, cost_model).delay_s


def planner_delay(old: Placement | None, new: Placement, snapshot: ClusterSnapshot, dims: ModelDims,
                  cost_model: str, net: Net, memo: dict, one_wave: bool = False) -> float:
    """``migration_estimate(...).delay_s`` for a planner weighing many candidates against the same
    ``old`` in one snapshot (``memo``: a dict it keeps for that snapshot): what each layer ships is
    listed once per (old layer, new layer) pair of objects, layers a candidate keeps ship nothing,
    and the per-pair byte lists are concatenated in layer order (so each pair's bytes are summed
    in ``migration_items``' order: the same floats; integer sizes, the ``decode`` model's, are
    summed per layer pair once, exact in any grouping). When some receiver lacks room for what it
    receives (memory-safe waves needed) the full estimate is made, unless ``one_wave``: then the
    delay of everything in one wave, a lower bound (every sender still sends all its bytes, and
    each wave lasts at least as long as any of its senders)."""
    if old is None or len(old.layers) != len(new.layers):
        return 0.0
    T = snapshot.context_len
    nbytes = memo.get("nbytes")
    if nbytes is None:
        nbytes = memo["nbytes"] = _item_bytes(dims, T, cost_model, snapshot.weights_shipped)
        memo["piece_bytes"] = _piece_bytes(dims, T, cost_model, snapshot.weights_shipped)
    piece = memo["piece_bytes"]
    per_layer = memo.setdefault("layers", {})
    # bytes per (sender, receiver): integer totals while every size is an integer, else lists
    totals: dict[tuple[str, str], int | list] = {}
    whole, src, moved = True, old.source, []
    for l, (a, b) in enumerate(zip(old.layers, new.layers)):
        if a is b:
            continue
        hit = per_layer.get((id(a), id(b)))
        if hit is None or hit[0] is not a or hit[1] is not b:
            sizes: dict[tuple[str, str], list] = {}
            for pair, kind, x, y in layer_moves(a, b):  # the items' bytes, without building the items
                sizes.setdefault(pair, []).append(piece(kind, x, y))
            # integer bytes (the decode model's) sum the same in any grouping: per pair at once
            sums = ({k: sum(v) for k, v in sizes.items()}
                    if all(type(n) is int for v in sizes.values() for n in v) else None)
            hit = per_layer[(id(a), id(b))] = [a, b, None, sizes, sums]  # the items: when waves need them
        moved.append((l, hit))
        if whole and hit[4] is not None:
            for k, n in hit[4].items():
                totals[k] = totals.get(k, 0) + n
            continue
        if whole:  # a size that is not an integer: the sums in order from here (the ints so far: exact)
            totals, whole = {k: [n] for k, n in totals.items()}, False
        for k, v in hit[3].items():
            totals.setdefault(k, []).extend(v)
    pairs = totals if whole else {k: sum(v) for k, v in totals.items()}
    if pairs and snapshot.weights_shipped and not one_wave:
        room = _room(old, snapshot, dims, T, cost_model, memo)
        due: dict[str, int] = {}
        for (_, b), n in pairs.items():
            due[b] = due.get(b, 0) + n
        if not all(n <= room.get(b, 0) for b, n in due.items()):
            for _, hit in moved:
                if hit[2] is None:
                    hit[2] = migration_items(Placement(src, (hit[0],)), Placement(src, (hit[1],)))
            moved = [(l, hit[2]) for l, hit in moved]
            return _in_waves(old, moved, pairs, snapshot, dims, cost_model, net, memo)
    return pair_delay(pairs, net)


def _in_waves(old: Placement, moved: list, pairs: dict, snapshot: ClusterSnapshot, dims: ModelDims,
              cost_model: str, net: Net, memo: dict) -> float:
    """``migration_estimate``'s delay when memory-safe waves are needed, from ``planner_delay``'s
    per-layer items (``moved``: (layer, its items)) renumbered: ``migration_items(old, new)``.
    The waves (which depend on memory, not on the links) are scheduled once per ``old`` and moved
    layers (the same items objects) in ``memo``: a plan weighed again at other link rates (the
    hedge's slowed links) only sums each wave's transfers over its own ``net``."""
    key = ("waves", id(old), snapshot.context_len, cost_model, tuple((l, id(its)) for l, its in moved))
    hit = memo.get(key)
    if hit is None or hit[0] is not old or any(a is not b for (_, a), (_, b) in zip(hit[1], moved)):
        items: dict[tuple[str, str], list[dict]] = {}
        for l, layer_items in moved:
            for k, its in layer_items.items():
                items.setdefault(k, []).extend({**it, "layer": l} for it in its)
        nbytes = memo["nbytes"]
        try:
            waves = _waves(old, items, pairs, snapshot, dims, snapshot.context_len, cost_model, nbytes, memo)
            wave_bytes = [{k: sum(nbytes(it) for it in its) for k, its in w.items()} for w in waves]
        except MigrationBlocked:
            wave_bytes = None
        hit = memo[key] = (old, list(moved), wave_bytes)  # keeps the items alive (their ids are in the key)
    if hit[2] is None:
        return float("inf")
    return sum(pair_delay(w, net) for w in hit[2])


def _room(old: Placement, snapshot: ClusterSnapshot, dims: ModelDims, T: int, cost_model: str, memo: dict):
    """Memory budget less ``old``'s bytes at ``T`` per device, once per ``memo``."""
    key = ("room", id(old), T, cost_model)
    hit = memo.get(key)
    if hit is None or hit[0] is not old:
        held = memory(old, snapshot, dims, cost_model, T)
        hit = memo[key] = (old, {d.name: d.mem_budget_bytes - held.get(d.name, 0) for d in snapshot.devices})
    return hit[1]
