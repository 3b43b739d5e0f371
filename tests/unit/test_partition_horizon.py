"""Memory horizons end with the generation (``ClusterSnapshot.tokens_remaining``): no block is moved
or refused for KV that will never be written.

Same setting as test_partition_forced: mini-gpt2 on a star of four hosts, d1's budget chosen so
that the current placement stops fitting at a chosen context length.
"""
from dataclasses import replace

import pytest

from testbed.run.controller import LoopSettings, _plan, _with_policy
from testbed.partition import plan
from testbed.partition.common import Problem, check_memory, fits_until
from testbed.partition.cost.latency import placement_memory
from testbed.core.errors import InfeasiblePlan
from testbed.partition.synthetic import star_snapshot
from testbed.core.placement import FfnShard, LayerPlacement, Placement, uniform_layer
from testbed.core.moves import moved_blocks
from testbed.core.snapshot import ModelDims

MINI = ModelDims("mini-gpt2", 6, 256, 8, 8, 32, 1024, 4096)
MIB, MBIT = 2**20, 1e6 / 8
T, N = 64, 8

HEADS = Placement("d0", tuple(uniform_layer("d1", 8, 1024) for _ in range(5)) + (
    LayerPlacement(("d1",) * 3 + ("d2",) * 5, "d2", (FfnShard("d2", 0, 1024),)),))
LAYERS = Placement("d0", tuple(uniform_layer("d1", 8, 1024) for _ in range(5)) + (uniform_layer("d2", 8, 1024),))


def star(d1_mbps: float, fits_to: int, current, tokens_remaining=None):
    """d1's budget is what ``current`` needs at context ``fits_to`` (it fits up to there)."""
    d1 = placement_memory(current, star_snapshot([1e9] * 4, [1] * 4, [1] * 4, [0] * 4), MINI, fits_to)["d1"]
    bws = [50 * MBIT, d1_mbps * MBIT, 10 * MBIT, 10 * MBIT]
    snap = star_snapshot([3.7e9] * 4, [2**30, d1, 16 * MIB, 16 * MIB], bws, [2e-3, 5e-3, 5e-3, 8e-3],
                         context_len=T, tokens_until_next_decision=N, current=current)
    return replace(snap, tokens_remaining=tokens_remaining)


def test_snapshot_horizon_helpers():
    snap = star(20, T + N, HEADS)
    assert snap.end_context_len == float("inf") and snap.mem_horizon(T + 10**6) == T + 10**6
    snap = replace(snap, tokens_remaining=5)
    assert snap.end_context_len == T + 5 and snap.mem_horizon(T + 40) == T + 5 and snap.mem_horizon(T + 2) == T + 2
    prob = Problem(snap, MINI, mem_tokens=4 * N)
    assert prob.T_mem == T + 5 and prob.T_end == T + 5


def test_fits_until_and_check_memory_stop_at_the_end_of_generation():
    fits_to = T + N - 3
    snap = star(20, fits_to, HEADS)
    assert fits_until(HEADS, snap, MINI, "decode", T) == fits_to
    with pytest.raises(InfeasiblePlan):
        check_memory(HEADS, snap, MINI, "decode", fits_to + 1)
    ends = replace(snap, tokens_remaining=fits_to - T)  # the last position written is fits_to
    assert fits_until(HEADS, ends, MINI, "decode", T) == float("inf")
    check_memory(HEADS, ends, MINI, "decode", fits_to + 100)  # KV past the end is never written
    late = replace(snap, tokens_remaining=fits_to + 1 - T)  # one position too many
    assert fits_until(HEADS, late, MINI, "decode", T) == fits_to


@pytest.mark.parametrize("mbps,fits_to", [(1, T + N - 3), (20, T + N - 3), (20, T + 2 * N + 4)])
def test_ra_moves_nothing_for_kv_growth_after_the_last_token(mbps, fits_to):
    """Forced (over a slow and a fast link) and anticipated (fast link) moves are made when the
    run is open-ended and not when the overflow comes only after the last token."""
    open_ended = plan("resource_aware", star(mbps, fits_to, HEADS), MINI)
    assert moved_blocks(HEADS, open_ended.placement), "the open-ended run must move (test premise)"
    r = plan("resource_aware", star(mbps, fits_to, HEADS, tokens_remaining=fits_to - T), MINI)
    assert r.placement == HEADS and r.migration_delay_s == 0
    # one position more and the growth overflows before the end: a forced move is made again (an
    # anticipated one buying a single token of headroom is not worth its price: deferred)
    r = plan("resource_aware", star(mbps, fits_to, HEADS, tokens_remaining=fits_to + 1 - T), MINI)
    if fits_to < T + N:
        moves = moved_blocks(HEADS, r.placement)
        assert moves and all(a == "d1" for _, a, _ in moves)
        check_memory(r.placement, star(mbps, fits_to, HEADS), MINI, "decode", fits_to + 1)
    else:
        assert r.placement == HEADS


def test_ra_top_up_stops_at_the_end_of_generation():
    """A forced move over a fast link is topped up towards the headroom horizon (3 heads), but not
    past the end of generation: with the end half an epoch after the next decision, the minimal
    repair (one head) is all that is worth moving."""
    fits_to = T + N - 3
    full = star(20, fits_to, HEADS)
    unlimited = plan("resource_aware", full, MINI)
    assert len(moved_blocks(HEADS, unlimited.placement)) == 3  # premise: topped up
    r = plan("resource_aware", replace(full, tokens_remaining=N + 4), MINI)
    moves = moved_blocks(HEADS, r.placement)
    assert len(moves) == 1 and moves[0][1] == "d1"
    assert T + N <= fits_until(r.placement, full, MINI, "decode", T) < fits_until(unlimited.placement, full, MINI, "decode", T)
    assert r.migration_delay_s < unlimited.migration_delay_s


def test_edgeshard_dynamic_moves_nothing_for_kv_growth_after_the_last_token():
    fits_to = T + N - 3  # d1's five layers stop fitting before the next decision
    open_ended = plan("edgeshard_dynamic", star(20, fits_to, LAYERS), MINI)
    assert open_ended.placement != LAYERS  # premise: forced
    r = plan("edgeshard_dynamic", star(20, fits_to, LAYERS, tokens_remaining=fits_to - T), MINI)
    assert r.placement == LAYERS and r.migration_delay_s == 0


def test_optimal_uses_the_capped_horizon():
    # one layer whose single host would overflow one token after the end: optimal keeps it there
    dims = ModelDims("one", 1, 256, 8, 8, 32, 1024, 4096)
    cur = Placement("d0", (uniform_layer("d1", 8, 1024),))
    need = placement_memory(cur, star_snapshot([1e9] * 3, [1] * 3, [1] * 3, [0] * 3), dims, T + 2)["d1"]
    snap = star_snapshot([3.7e9, 3.7e9, 1e8], [2**30, need, 2**30], [50 * MBIT, 20 * MBIT, 1 * MBIT],
                         [2e-3, 5e-3, 5e-3], context_len=T, tokens_until_next_decision=N, current=cur)
    with pytest.raises(InfeasiblePlan):
        check_memory(cur, snap, dims, "decode", T + N)
    assert moved_blocks(cur, plan("optimal", snap, dims).placement)  # premise: forced
    assert moved_blocks(cur, plan("optimal", replace(snap, tokens_remaining=3), dims).placement)
    r = plan("optimal", replace(snap, tokens_remaining=2), dims)
    assert r.placement == cur and r.migration_delay_s == 0


class _Cluster:
    def __init__(self, snap):
        self.snap = snap

    def snapshot(self, context_len, until_next):
        return replace(self.snap, context_len=context_len, tokens_until_next_decision=until_next)


def test_controller_tells_the_planner_how_many_tokens_remain(monkeypatch):
    import testbed.partition as P

    seen = []
    from types import SimpleNamespace

    monkeypatch.setattr(P, "plan", lambda alg, snap, dims, **kw: seen.append(snap) or SimpleNamespace())
    settings = LoopSettings("resource_aware", 0, {}, list(range(32)), 128, 8, "decode", False)
    base = star(20, T + N, HEADS)
    for token_index in (0, 8, 120):
        _plan(settings, _Cluster(base), MINI, 32 + token_index, None)
    assert [s.tokens_remaining for s in seen] == [128, 120, 8]
    assert [s.end_context_len for s in seen] == [32 + 128] * 3
    assert _with_policy(base, None, False, {}).tokens_remaining is None
    assert _with_policy(base, None, True, {}, tokens_remaining=3).tokens_remaining == 3


def test_a_move_late_in_the_run_must_pay_for_itself_before_the_end():
    from testbed.core.snapshot import ClusterSnapshot

    snap = ClusterSnapshot((), {}, 100, 8, tokens_remaining=5)
    assert snap.amortisation_tokens(32) == 5.0
    assert ClusterSnapshot((), {}, 100, 8).amortisation_tokens(32) == 32.0
    assert ClusterSnapshot((), {}, 100, 8, tokens_remaining=0).amortisation_tokens(32) == 1.0
