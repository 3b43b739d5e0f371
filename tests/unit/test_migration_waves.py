"""schedule_waves: a placement change ordered so that no receiver is overfilled."""
from __future__ import annotations

import pytest

from testbed.core.moves import MigrationBlocked, schedule_waves

KB = 1000


def _head(layer: int, group: int) -> dict:
    return {"kind": "head", "layer": layer, "group": group}


def _sizes(**hosts: dict[str, int]) -> dict[str, dict[str, int]]:
    return {h: dict(b) for h, b in hosts.items()}


def test_everything_in_one_wave_when_receivers_have_room():
    items = {("h2", "h3"): [_head(0, 0), _head(0, 1)], ("h4", "h3"): [_head(1, 0)]}
    sizes = _sizes(h2={"L0.H0": 100 * KB, "L0.H1": 100 * KB}, h4={"L1.H0": 100 * KB})
    waves = schedule_waves(items, sizes, {"h2": 0, "h3": 500 * KB, "h4": 0}, transient_extra=0)
    assert len(waves) == 1
    assert sorted(map(str, waves[0][("h2", "h3")])) == sorted(map(str, items[("h2", "h3")]))


def test_a_full_host_is_evacuated_before_it_is_refilled():
    # h3 is full; it sends its head to h4 and receives h2's. Only after h3's head has left (acked,
    # freed) does h2's head fit: two waves, the evacuation first.
    items = {("h2", "h3"): [_head(0, 0)], ("h3", "h4"): [_head(1, 0)]}
    sizes = _sizes(h2={"L0.H0": 300 * KB}, h3={"L1.H0": 300 * KB})
    avail = {"h2": 0, "h3": 100 * KB, "h4": 1000 * KB}
    waves = schedule_waves(items, sizes, avail, transient_extra=0, transient=lambda dst, it, n: 0)
    assert [list(w) for w in waves] == [[("h3", "h4")], [("h2", "h3")]]


def test_transient_copies_may_use_the_margin_but_not_more():
    items = {("h2", "h3"): [_head(0, 0)]}
    sizes = _sizes(h2={"L0.H0": 100 * KB})
    # keeps 100 KB of 120 KB; the 150 KB of transient copies fit only with the 200 KB margin share
    waves = schedule_waves(items, sizes, {"h2": 0, "h3": 120 * KB}, transient_extra=200 * KB,
                           transient=lambda dst, it, n: 150 * KB)
    assert len(waves) == 1
    with pytest.raises(MigrationBlocked, match=r"h3 cannot receive head of layer 0 \(100000 B.*150000 B of transient"):
        schedule_waves(items, sizes, {"h2": 0, "h3": 120 * KB}, transient_extra=100 * KB,
                       transient=lambda dst, it, n: 150 * KB)


def test_swap_between_two_full_hosts_is_blocked_with_the_numbers():
    items = {("h2", "h3"): [_head(0, 0)], ("h3", "h2"): [_head(1, 0)]}
    sizes = _sizes(h2={"L0.H0": 300 * KB}, h3={"L1.H0": 300 * KB})
    with pytest.raises(MigrationBlocked, match=r"has 0 B available"):
        schedule_waves(items, sizes, {"h2": 0, "h3": 0}, transient_extra=0, transient=lambda d, i, n: 0)


def test_part_of_an_ffn_shard_does_not_free_the_sender_before_the_switch():
    # Half of h3's FFN shard leaves: freed only when the new placement applies, h3 gains no room.
    items = {("h2", "h3"): [_head(0, 0)], ("h3", "h4"): [{"kind": "ffn", "layer": 1, "c0": 0, "c1": 64}]}
    sizes = _sizes(h2={"L0.H0": 300 * KB}, h3={"L1.ffn0-128": 600 * KB})
    with pytest.raises(MigrationBlocked, match="h3 cannot receive"):
        schedule_waves(items, sizes, {"h2": 0, "h3": 100 * KB, "h4": 10**6}, transient_extra=0,
                       transient=lambda d, i, n: 0)


def test_a_whole_ffn_shard_leaving_frees_its_sender_for_the_next_wave():
    # layer-level shift h2 -> h3 -> h4: h3's whole FFN shard leaves first, then h2's arrives
    items = {("h2", "h3"): [{"kind": "ffn", "layer": 0, "c0": 0, "c1": 64}],
             ("h3", "h4"): [{"kind": "ffn", "layer": 1, "c0": 0, "c1": 64}]}
    sizes = _sizes(h2={"L0.ffn0-64": 300 * KB}, h3={"L1.ffn0-64": 300 * KB})
    waves = schedule_waves(items, sizes, {"h2": 0, "h3": 100 * KB, "h4": 10**6}, transient_extra=0,
                           transient=lambda d, i, n: 0)
    assert [list(w) for w in waves] == [[("h3", "h4")], [("h2", "h3")]]


def test_warmup_placement_spreads_whole_layers_over_the_workers():
    from testbed.backends.emulated.warmup import warmup_placement

    pl = warmup_placement(["h1", "h2", "h3"], "h1", 5, 4, 64)
    assert [lp.proj for lp in pl.layers] == ["h2", "h3", "h2", "h3", "h2"]
    assert all(set(lp.heads) == {lp.proj} and lp.ffn[0].device == lp.proj for lp in pl.layers)
    pl.validate(5, 4, 64)
    assert warmup_placement(["h1"], "h1", 2, 4, 64).devices() == {"h1"}
