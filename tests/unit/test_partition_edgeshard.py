"""EdgeShard-dynamic: strictly layer-level; voluntary moves pay for themselves; a memory-forced move
takes the cheaper of the new DP plan and the cheapest layer-contiguous repair of the current plan."""
from dataclasses import replace

import numpy as np
import pytest

from testbed.partition import plan
from testbed.partition.common import Problem, check_memory
from testbed.partition.cost.latency import Net, placement_memory
from testbed.core.errors import InfeasiblePlan
from testbed.partition.layer.edgeshard import edgeshard, layer_level, layer_repair
from testbed.partition.cost.migration import migration_delay
from testbed.partition.ra.choice import _objective
from testbed.partition.synthetic import star_snapshot
from testbed.core.placement import Placement, uniform_layer
from testbed.core.moves import moved_blocks
from testbed.core.snapshot import ModelDims

MINI = ModelDims("mini-gpt2", 6, 256, 8, 8, 32, 1024, 4096)
MIB, MBIT = 2**20, 1e6 / 8
T, N, H = 64, 8, 32


def layers_on(*devs):
    return Placement("d0", tuple(uniform_layer(d, 8, 1024) for d in devs))


def layer_mem(n_layers=1, T_=T + N):
    pl = layers_on(*(["d1"] * n_layers + ["d2"] * (6 - n_layers)))
    return placement_memory(pl, star_snapshot([1e9] * 3, [1] * 3, [1] * 3, [0] * 3), MINI, T_)["d1"]


CUR = layers_on("d1", "d1", "d1", "d2", "d2", "d2")


def snap(d1_layers: float, current=CUR, lats=(2e-3, 5e-3, 4e-3, 8e-3), mbps=(50, 50, 50, 10), **kw):
    """d1 may hold ``d1_layers`` layers (at T + N); d2 and d3 hold the whole model."""
    mems = [2**30, int(d1_layers * layer_mem()), 64 * MIB, 64 * MIB]
    return star_snapshot([3.7e9] * 4, mems, [m * MBIT for m in mbps], list(lats), context_len=T,
                         tokens_until_next_decision=N, current=current, **kw)


def objective(s, pl):
    return _objective(Problem(s, MINI), pl, H, Net(s))[0]


def test_forced_move_shifts_one_boundary_layer_instead_of_the_new_plan():
    s = snap(2.5)  # d1's limit fell: it holds two of its three layers
    new = edgeshard(s, MINI)  # from scratch: all six layers on d2 (nearest the source, one hop less)
    assert len({lp.proj for lp in new.layers}) == 1 and new.layers[0].proj == "d2"
    r = plan("edgeshard_dynamic", s, MINI)
    assert r.placement == layers_on("d1", "d1", "d2", "d2", "d2", "d2")  # layer 2 joins d2's shard
    assert {m[0].split(".")[0] for m in moved_blocks(CUR, r.placement)} == {"L2"}
    assert {(a, b) for _, a, b in moved_blocks(CUR, r.placement)} == {("d1", "d2")}
    check_memory(r.placement, s, MINI, "decode", T + N)
    # cheaper by the objective it is chosen with: the new plan is ~9 ms/token faster, but moving
    # three layers instead of one costs more than that over the horizon
    assert r.migration_delay_s < migration_delay(CUR, new, s, MINI) / 2
    assert objective(s, r.placement) < objective(s, new)
    # the same forced move with a very long horizon: the new plan's migration is amortised away
    far = plan("edgeshard_dynamic", s, MINI, horizon_tokens=10**6)
    assert far.placement == layers_on(*["d2"] * 6)


def test_forced_move_to_a_new_device_when_the_neighbour_is_full():
    # d1 keeps two layers, d2 has no room for more than its three: the third layer goes to a new
    # shard (d3) between them rather than re-planning from scratch
    s = snap(2.5)
    devs = tuple(replace(d, mem_limit_bytes=int(3.2 * layer_mem())) if d.name == "d2" else d for d in s.devices)
    s = replace(s, devices=devs)
    r = plan("edgeshard_dynamic", s, MINI).placement
    assert r == layers_on("d1", "d1", "d3", "d2", "d2", "d2") and layer_level(r, MINI)
    moves = moved_blocks(CUR, r)
    assert {m[0].split(".")[0] for m in moves} == {"L2"} and {(a, b) for _, a, b in moves} == {("d1", "d3")}
    check_memory(r, s, MINI, "decode", T + N)


def test_voluntary_moves_pay_for_themselves():
    s = snap(6)  # everything fits: only a latency gain can move layers
    new = edgeshard(s, MINI)
    assert new != CUR
    gain = objective(replace(s, current=None), CUR) - objective(replace(s, current=None), new)
    assert 0 < gain * H < migration_delay(CUR, new, s, MINI)
    assert plan("edgeshard_dynamic", s, MINI).placement == CUR
    assert plan("edgeshard_dynamic", s, MINI, horizon_tokens=10**6).placement == new


def test_the_cheaper_of_repair_and_new_plan_by_the_objective():
    """Random layer-level placements with a shrunk device: the result is layer-level, fits, and is
    the better of the new DP plan and the repair (both fit); the repair is layer-level too."""
    rng = np.random.default_rng(3)
    for _ in range(25):
        cuts = sorted(rng.choice(np.arange(1, 6), size=2, replace=False).tolist())
        devs = rng.permutation(["d1", "d2", "d3"]).tolist()
        cur = layers_on(*[devs[0]] * cuts[0] + [devs[1]] * (cuts[1] - cuts[0]) + [devs[2]] * (6 - cuts[1]))
        shrink = str(rng.choice(devs))
        n_on = sum(lp.proj == shrink for lp in cur.layers)
        mems = [2**30] + [int(rng.uniform(2.2, 4.5) * layer_mem()) for _ in range(3)]
        mems[int(shrink[1])] = int((n_on - 0.5) * layer_mem())
        s = star_snapshot([3.7e9, *rng.uniform(1e9, 5e9, 3)], mems, (rng.uniform(1, 50, 4) * MBIT).tolist(),
                          rng.uniform(1e-3, 8e-3, 4).tolist(), context_len=T, tokens_until_next_decision=N,
                          current=cur)
        prob = Problem(s, MINI)
        fixed = layer_repair(prob, H)
        try:
            new = edgeshard(s, MINI)
        except InfeasiblePlan:
            new = None
        if new is None and fixed is None:
            with pytest.raises(InfeasiblePlan):
                plan("edgeshard_dynamic", s, MINI)
            continue
        r = plan("edgeshard_dynamic", s, MINI).placement
        assert layer_level(r, MINI)
        check_memory(r, s, MINI, "decode", T + N)
        if fixed is not None:
            assert layer_level(fixed, MINI)
            check_memory(fixed, s, MINI, "decode", T + N)
        cands = [p for p in (new, fixed) if p is not None]
        assert objective(s, r) == pytest.approx(min(objective(s, p) for p in cands))


def test_device_down_takes_the_new_plan():
    s = snap(6)
    s = replace(s, devices=tuple(replace(d, up=False) if d.name == "d1" else d for d in s.devices))
    assert layer_repair(Problem(s, MINI), H) is None
    r = plan("edgeshard_dynamic", s, MINI).placement
    assert "d1" not in r.devices() and r == edgeshard(s, MINI)


def _splits(left: int, caps, most: int, first: bool = True):
    """Every split of ``left`` layers into contiguous shards along positions 0..len(caps)-1
    (position 0 holds at least one layer, later positions 0..min(most, cap)): lists of (position,
    layers)."""
    if len(caps) == 0:
        return [[]] if left == 0 else []
    out = []
    for m in range(1 if first else 0, min(left, caps[0] if first else min(most, caps[0])) + 1):
        for rest in _splits(left - m, caps[1:], most, first=False):
            out.append(([(0, m)] if m else []) + [(p + 1, k) for p, k in rest])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_layer_dp_is_the_best_split_along_its_order(seed):
    """``edgeshard_kernel.dp`` (the compiled DP of ``_dp``) against every split along the order:
    the best finish equals the cheapest split's cost (up to summation order), with and without
    per-layer extra costs, with small caps that bind."""
    from testbed.partition.layer.edgeshard_kernel import dp

    rng = np.random.default_rng(seed)
    L, n_dev = 5, 5
    src, order = 0, np.array([1, 3, 2, 4], dtype=np.int64)
    c = rng.uniform(0.1, 1.0, n_dev)
    X = rng.uniform(0.01, 0.5, (n_dev, n_dev))
    np.fill_diagonal(X, 0.0)
    caps = rng.integers(1, 4, n_dev).astype(np.int64)
    move = rng.uniform(0, 0.2, (n_dev, L)) if seed % 2 else np.zeros((n_dev, L))
    S = np.hstack([np.zeros((n_dev, 1)), np.cumsum(move, axis=1)])
    end, arg = dp(src, L, c, X, caps, order, S)
    best = np.inf
    for split in _splits(L, caps[order], L - 1):
        cost, prev, done = X[src, order[0]], order[0], 0
        for pos, m in split:
            k = order[pos]
            cost += (X[prev, k] if k != prev else 0.0) + m * c[k] + S[k, done + m] - S[k, done]
            prev, done = k, done + m
        best = min(best, cost + X[prev, src])
    if np.isfinite(best):
        assert end.min() == pytest.approx(best, rel=1e-12)
    else:
        assert not np.isfinite(end).any()
