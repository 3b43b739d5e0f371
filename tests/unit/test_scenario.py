"""Scenario expansion is deterministic, ordered, and fires each change exactly once."""
from __future__ import annotations

from pathlib import Path

import pytest

from testbed.spec.scenario import ScenarioError, Timeline, expand
from testbed.spec.schema import ExperimentSpec

TOPO = {
    "name": "t",
    "hosts": [{"name": "h1", "mem_limit_mib": 512, "cpu_cores": 1, "source": True},
              {"name": "h2", "mem_limit_mib": 512, "cpu_cores": 1}],
    "switches": ["s1"],
    "links": [{"a": "h1", "b": "s1", "bandwidth_mbps": 10}, {"a": "h2", "b": "s1", "bandwidth_mbps": 10}],
}


def spec(scenario, new_tokens=40) -> ExperimentSpec:
    return ExperimentSpec.model_validate({
        "name": "e", "topology": TOPO, "model": {"name": "tiny-gpt2"}, "algorithms": ["greedy"],
        "workload": {"new_tokens": new_tokens}, "scenario": scenario,
    })


def test_ramp_reaches_target_in_steps():
    changes = expand(spec([{"ramp": {"link": ["h2", "s1"], "from_token": 8, "to_token": 16,
                                     "from_mbps": 10, "to_mbps": 2, "steps": 4}}]))
    assert [(c.at_token, c.values["bandwidth_mbps"]) for c in changes] == [(8, 10), (10, 8), (12, 6), (14, 4), (16, 2)]


def test_random_walk_is_seeded_and_bounded():
    item = {"random_walk": {"link": ["h1", "s1"], "min_mbps": 2, "max_mbps": 20, "every_tokens": 2, "seed": 7}}
    a = expand(spec([item]))
    b = expand(spec([item]))
    other = expand(spec([{"random_walk": {**item["random_walk"], "seed": 8}}]))
    rates = [c.values["bandwidth_mbps"] for c in a]
    assert a == b
    assert rates != [c.values["bandwidth_mbps"] for c in other]
    assert len(a) == 20 and all(2 <= r <= 20 for r in rates)


def test_trace_file(tmp_path: Path):
    (tmp_path / "tr.csv").write_text("token,bandwidth_mbps\n0,10\n5,1.5\n9,7\n")
    changes = expand(spec([{"trace": {"link": ["h2", "s1"], "file": "tr.csv"}}]), tmp_path)
    assert [(c.at_token, c.values["bandwidth_mbps"]) for c in changes] == [(0, 10), (5, 1.5), (9, 7)]
    (tmp_path / "bad.csv").write_text("token,bandwidth_mbps\n0,10\n5,-1\n")
    with pytest.raises(ScenarioError, match=r"bad.csv:3: bandwidth_mbps must be a finite number > 0"):
        expand(spec([{"trace": {"link": ["h2", "s1"], "file": "bad.csv"}}]), tmp_path)


def test_timeline_fires_token_and_time_changes_once_in_order():
    changes = expand(spec([
        {"at_token": 5, "link": ["h2", "s1"], "bandwidth_mbps": 3},
        {"at_token": 2, "host": "h2", "mem_limit_mib": 128},
        {"at_s": 0.5, "link": ["h1", "s1"], "up": False},
    ]))
    tl = Timeline(changes)
    assert tl.due(0, 0.0) == []
    assert [c.host for c in tl.due(3, 0.1)] == ["h2"]  # token 2 passed: fires at the next boundary
    fired = tl.due(5, 0.6)
    assert [c.values for c in fired] == [{"bandwidth_mbps": 3}, {"up": False}]
    assert tl.due(10, 9.0) == []


def test_random_walk_on_all_links_uses_one_stream_per_link():
    changes = expand(spec([{"random_walk": {"all_links": True, "min_mbps": 1, "max_mbps": 30, "every_tokens": 10}}]))
    by_link = {}
    for c in changes:
        by_link.setdefault(c.link, []).append(c.values["bandwidth_mbps"])
    assert set(by_link) == {("h1", "s1"), ("h2", "s1")}
    assert all(len(v) == 4 for v in by_link.values())


def test_only_drops_beyond_the_threshold_trigger_an_immediate_replan():
    from testbed.run.controller import _is_drop
    from testbed.spec.scenario import Change

    bw = lambda v: Change(at_token=3, at_s=None, link=("h2", "s1"), values={"bandwidth_mbps": v})  # noqa: E731
    before = {"bandwidth_mbps": 20.0}
    assert not _is_drop(bw(17.0), before, 20.0)  # -15 %
    assert _is_drop(bw(15.0), before, 20.0)  # -25 %
    assert _is_drop(bw(19.0), before, 0.0)
    assert not _is_drop(bw(30.0), before, 20.0)
    down = Change(at_token=3, at_s=None, link=("h2", "s1"), values={"up": False})
    assert _is_drop(down, {}, 90.0)
    ch = lambda **v: Change(at_token=3, at_s=None, link=("h2", "s1"), values=v)  # noqa: E731
    assert _is_drop(ch(delay_ms=13.0), {"delay_ms": 10.0}, 20.0)  # +30 % delay
    assert not _is_drop(ch(delay_ms=11.0), {"delay_ms": 10.0}, 20.0)
    assert _is_drop(ch(delay_ms=1.5), {"delay_ms": 0.0}, 20.0) and not _is_drop(ch(delay_ms=0.5), {"delay_ms": 0.0}, 20.0)
    assert _is_drop(ch(loss_pct=1.0), {"loss_pct": 0.0}, 20.0) and not _is_drop(ch(loss_pct=0.0), {"loss_pct": 1.0}, 20.0)


def test_relative_random_walk_starts_at_each_links_rate_and_stays_in_its_range():
    topo = {**TOPO, "links": [{"a": "h1", "b": "s1", "bandwidth_mbps": 10}, {"a": "h2", "b": "s1", "bandwidth_mbps": 200}]}
    s = ExperimentSpec.model_validate({
        "name": "e", "topology": topo, "model": {"name": "tiny-gpt2"}, "algorithms": ["greedy"],
        "workload": {"new_tokens": 40},
        "scenario": [{"random_walk": {"all_links": True, "min_frac": 0.2, "max_frac": 1.0, "every_tokens": 4,
                                      "step_pct": 50, "seed": 3}}]})
    by_link = {}
    for c in expand(s):
        by_link.setdefault(c.link, []).append(c.values["bandwidth_mbps"])
    assert by_link[("h1", "s1")][0] == 10 and by_link[("h2", "s1")][0] == 200
    assert all(2 <= r <= 10 for r in by_link[("h1", "s1")]) and all(40 <= r <= 200 for r in by_link[("h2", "s1")])
    assert min(by_link[("h2", "s1")]) < 200  # it does wander


@pytest.mark.parametrize("walk, message", [
    ({"min_mbps": 1, "max_mbps": 5, "min_frac": 0.2, "max_frac": 1}, "either an absolute range .* or min_frac"),
    ({"min_frac": 0.2}, "both bounds"),
    ({"min_frac": 0.9, "max_frac": 0.5}, "must not exceed"),
])
def test_random_walk_range_must_be_absolute_or_relative(walk, message):
    with pytest.raises(Exception, match=message):
        spec([{"random_walk": {"link": ["h1", "s1"], **walk}}])


# ---------------------------------------------------------------- issue 16: direction, delay and loss dynamics
def test_a_one_direction_event_names_the_node_its_traffic_leaves():
    a_to_b, b_to_a, both = expand(spec([
        {"at_token": 1, "link": ["h2", "s1"], "delay_ms": 5, "direction": "a_to_b"},
        {"at_token": 2, "link": ["h2", "s1"], "bandwidth_mbps": 3, "direction": "b_to_a"},
        {"at_token": 3, "link": ["h2", "s1"], "loss_pct": 1},
    ]))
    assert (a_to_b.direction, b_to_a.direction, both.direction) == ("h2", "s1", None)
    assert a_to_b.describe() == "token 1: link h2->s1 delay_ms=5.0"
    with pytest.raises(Exception, match="up is both ways"):
        spec([{"at_token": 1, "link": ["h2", "s1"], "up": False, "direction": "a_to_b"}])
    with pytest.raises(Exception, match="direction applies to a link"):
        spec([{"at_token": 1, "host": "h2", "mem_limit_mib": 100, "direction": "a_to_b"}])


def test_ramps_of_delay_and_loss():
    delay = expand(spec([{"ramp": {"link": ["h2", "s1"], "from_token": 0, "to_token": 8, "from_ms": 1,
                                   "to_ms": 9, "steps": 4, "direction": "b_to_a"}}]))
    assert [(c.at_token, c.values) for c in delay] == [(0, {"delay_ms": 1}), (2, {"delay_ms": 3}), (4, {"delay_ms": 5}),
                                                       (6, {"delay_ms": 7}), (8, {"delay_ms": 9})]
    assert {c.direction for c in delay} == {"s1"}
    loss = expand(spec([{"ramp": {"link": ["h2", "s1"], "from_token": 4, "to_token": 6, "from_pct": 0,
                                  "to_pct": 2, "steps": 2}}]))
    assert [(c.at_token, c.values["loss_pct"]) for c in loss] == [(4, 0), (5, 1), (6, 2)]
    with pytest.raises(Exception, match="exactly one pair"):
        spec([{"ramp": {"link": ["h2", "s1"], "from_token": 0, "to_token": 8, "from_ms": 1, "to_mbps": 9}}])
    with pytest.raises(Exception, match="exactly one pair"):
        spec([{"ramp": {"link": ["h2", "s1"], "from_token": 0, "to_token": 8, "from_ms": 1, "to_ms": 2,
                        "from_mbps": 1, "to_mbps": 2}}])


def test_walks_of_delay_are_multiplicative_and_of_loss_from_zero_additive():
    delay = expand(spec([{"random_walk": {"link": ["h1", "s1"], "min_ms": 1, "max_ms": 16, "every_tokens": 2,
                                          "step_pct": 50, "seed": 3}}]))
    values = [c.values["delay_ms"] for c in delay]
    assert values[0] == pytest.approx(4.0) and all(1 <= v <= 16 for v in values) and len(set(values)) > 5
    loss = expand(spec([{"random_walk": {"link": ["h1", "s1"], "min_pct": 0, "max_pct": 4, "every_tokens": 2,
                                         "step_pct": 25, "seed": 3}}]))
    values = [c.values["loss_pct"] for c in loss]
    assert values[0] == 2.0 and all(0 <= v <= 4 for v in values)
    steps = [abs(b - a) for a, b in zip(values, values[1:])]
    assert max(steps) <= 1.0 + 1e-9 and len(set(values)) > 5  # at most 25 % of the 4 % width a step
    rel = expand(spec([{"random_walk": {"all_links": True, "quantity": "delay_ms", "min_frac": 1, "max_frac": 3,
                                        "every_tokens": 10}}], new_tokens=20))
    assert {c.values["delay_ms"] for c in rel if c.at_token == 0} == {0.0}  # both links have no delay: 1x..3x of 0


def test_bandwidth_walks_are_unchanged_by_the_generalisation():
    """The same seed gives the walk it gave before delay and loss walks existed (regime map runs stay comparable)."""
    import numpy as np

    got = [c.values["bandwidth_mbps"] for c in expand(spec([{"random_walk": {
        "link": ["h1", "s1"], "min_mbps": 2, "max_mbps": 20, "every_tokens": 4, "step_pct": 30, "seed": 5}}]))]
    rng, rate, want = np.random.default_rng(5), float(np.sqrt(40)), []
    for _ in range(10):
        want.append(round(rate, 4))
        rate = float(np.clip(rate * (1 + 0.3 * rng.uniform(-1, 1)), 2, 20))
    assert got == want


def test_trace_of_delay_and_loss(tmp_path: Path):
    (tmp_path / "t.csv").write_text("t_s,delay_ms,loss_pct\n0.5,4,\n1.0,,2.5\n1.5,8,0\n")
    changes = expand(spec([{"trace": {"link": ["h2", "s1"], "file": "t.csv", "direction": "a_to_b"}}]), tmp_path)
    assert [(c.at_s, c.values, c.direction) for c in changes] == [
        (0.5, {"delay_ms": 4.0}, "h2"), (1.0, {"loss_pct": 2.5}, "h2"), (1.5, {"delay_ms": 8.0, "loss_pct": 0.0}, "h2")]
    for body, msg in (("t_s,loss_pct\n0,101\n", r"x.csv:2: loss_pct must be a finite number >= 0 and <= 100"),
                      ("t_s,delay_ms\n0,-1\n", r"x.csv:2: delay_ms must be a finite number >= 0"),
                      ("t_s,jitter\n0,1\n", r"x.csv:1: expected columns token \(or t_s\) and one or more of"),
                      ("token,delay_ms\nx,1\n", r"x.csv:2: token: expected a number")):
        (tmp_path / "x.csv").write_text(body)
        with pytest.raises(ScenarioError, match=msg):
            expand(spec([{"trace": {"link": ["h2", "s1"], "file": "x.csv"}}]), tmp_path)
