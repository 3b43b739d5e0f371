"""Issue 18 (planner speed): the pieces made faster keep their meaning.

``PathMatrix`` behaves as the dict of paths it replaces (and ``Problem`` reads the same
matrices from it), the simulated backend's vectorised paths equal the per-pair ones, the
calibration cache is per machine, and planning a model whose hosts all have device profiles
imports no torch."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from testbed.backends import calibrate
from testbed.core.paths import PathMatrix
from testbed.core.snapshot import LinkState
from testbed.partition.common import Problem
from testbed.partition.synthetic import GPT2, random_star

ROOT = Path(__file__).resolve().parents[2]


def _as_matrix(snap):
    names = [d.name for d in snap.devices]
    n = len(names)
    bw, lat, up = np.zeros((n, n)), np.full((n, n), np.inf), np.zeros((n, n), dtype=bool)
    for (a, b), ls in snap.paths.items():
        i, j = names.index(a), names.index(b)
        bw[i, j], lat[i, j], up[i, j] = ls.bandwidth_bytes_per_s, ls.latency_s, ls.up
    return PathMatrix(names, bw, lat, up)


def test_path_matrix_is_the_mapping_and_gives_the_same_problem():
    from dataclasses import replace

    snap = random_star(np.random.default_rng(3), 9, GPT2)
    snap = replace(snap, paths={**snap.paths, ("d1", "d2"): LinkState(5e6, 0.01, up=False)})
    pm = _as_matrix(snap)
    assert dict(pm) == snap.paths and len(pm) == len(snap.paths) and ("d1", "d1") not in pm
    a, b = Problem(snap, GPT2), Problem(replace(snap, paths=pm), GPT2)
    assert np.array_equal(a.lat, b.lat) and np.array_equal(a.spb, b.spb)


def test_calibration_cache_is_per_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "CACHE", tmp_path / "per_core_flops.json")
    runs = []
    monkeypatch.setattr(calibrate, "measure_per_core_flops", lambda: runs.append(1) or 1e9 + len(runs))
    here = calibrate.machine_id()
    assert calibrate.per_core_flops()[0] == 1e9 + 1 and calibrate.per_core_flops()[0] == 1e9 + 1
    assert len(runs) == 1 and json.loads(calibrate.CACHE.read_text())["machine"] == here
    monkeypatch.setattr(calibrate, "machine_id", lambda: {**here, "cpus": (here["cpus"] or 1) + 1})
    assert calibrate.per_core_flops()[0] == 1e9 + 2 and len(runs) == 2  # another machine: measured again


def test_plan_imports_no_torch_once_calibrated(tmp_path):
    """``headroom plan`` of a model without weights here: the calibration cached for this machine
    is all it needs (a cache from another machine is measured again: the test above)."""
    (tmp_path / "per_core_flops.json").write_text(json.dumps(
        {"flops": 3e9, "machine": calibrate.machine_id(), "measured_at": "test"}))
    code = ("import sys, json; from testbed.spec.loader import load_experiment; "
            "from testbed.run.planning import plan_initial; "
            f"r = plan_initial(load_experiment({str(ROOT / 'bench/plan64.yaml')!r}), 'edgeshard'); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'ok': bool(r['placement'])}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"HEADROOM_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"torch": False, "ok": True}


def test_event_tail_reads_what_read_events_reads(tmp_path):
    from testbed.run.events import EventTail, read_events

    log = tmp_path / "events.jsonl"
    tail = EventTail(tmp_path)
    assert tail.read() == []
    parts = ['{"type": "a", "x": 1}\n{"type": "b"}\n', '{"type": "c", "s": "\\u00e9"}\nnot json\n{"typ',
             'e": "d"}\n\n', '{"type": "e"}']
    text = ""
    for part in parts:
        text += part
        log.write_text(text)
        assert tail.read() == read_events(tmp_path)
    assert [e["type"] for e in tail.read()] == ["a", "b", "c", "d", "e"]


def test_timeline_cursor_hands_out_each_change_once_in_order():
    from testbed.spec.scenario import Change, Timeline

    changes = [Change(at_token=t, at_s=None, link=("h1", "s1"), values={"bandwidth_mbps": t}) for t in (3, 1, 3, 7)]
    changes.append(Change(at_token=None, at_s=0.5, link=("h2", "s1"), values={"up": False}))
    tl = Timeline(changes)
    got = [[c.values for c in tl.due(k, 0.1 * k)] for k in range(9)]
    assert got == [[], [{"bandwidth_mbps": 1}], [], [{"bandwidth_mbps": 3}, {"bandwidth_mbps": 3}], [],
                   [{"up": False}], [], [{"bandwidth_mbps": 7}], []]


def test_milp_node_budget_returns_the_incumbent_with_its_gap_deterministically():
    from testbed.partition.exact.milp import Milp

    def knapsack(max_nodes):
        rng, m = np.random.default_rng(1), Milp()
        x = [m.binary(-float(v)) for v in rng.integers(5, 60, 60)]
        for _ in range(15):
            w = rng.integers(5, 60, 60).astype(float)
            m.le(dict(zip(x, w)), w.sum() / 4)
        sol, obj = m.solve(60.0, "knapsack", max_nodes)
        return m, tuple(np.round(sol).astype(int)), obj

    m, sol, obj = knapsack(20)
    assert m.node_limited and m.gap > 0 and m.dual_bound < obj
    assert knapsack(20)[1:] == (sol, obj)  # a work budget: the same plan every time
    full, _, best = knapsack(None)
    assert not full.node_limited and full.gap == 0.0 and best <= obj


def _reference_decode_layer(lp, src_dev, start, nics, k, tally):
    """``cost.latency._decode_layer`` as it was before issue 18 (one method call per message)."""
    from collections import Counter

    from testbed.partition.cost.latency import _cp_max

    net, P, xb = nics.net, lp.proj, k["x_bytes"]
    arrive = {}
    for dst in dict.fromkeys([P, *lp.heads]):
        arrive[dst] = nics.send(src_dev, dst, xb, start)
        tally.send(src_dev, dst, xb)
    att, msgs = arrive[P], []
    for j, n in Counter(lp.heads).items():
        done = (arrive[j][0] + net.call(j, n * k["head_flops"], n * k["head_read"]), arrive[j][1])
        if j == P:
            att = _cp_max(att, done)
            continue
        out_b = n * k["head_out_bytes"]
        msgs.append((nics.send(j, P, out_b, done), out_b * net.link(j, P)[1]))
        tally.send(j, P, out_b)
    got = nics.fan_in(msgs)
    att = att if got is None else _cp_max(att, got)
    pd = (att[0] + net.call(P, k["proj_flops"], k["proj_read"]), att[1])
    agg = lp.ffn[0].device
    cols = {}
    for s in lp.ffn:
        cols[s.device] = cols.get(s.device, 0) + (s.col_end - s.col_start)
    out, msgs = None, []
    for dev, c in cols.items():
        arr = nics.send(P, dev, xb, pd)
        tally.send(P, dev, xb)
        done = (arr[0] + net.call(dev, c * k["ffn_col_flops"], c * k["ffn_col_read"]), arr[1])
        if dev == agg:
            out = done
            continue
        msgs.append((nics.send(dev, agg, xb, done), xb * net.link(dev, agg)[1]))
        tally.send(dev, agg, xb)
    got = nics.fan_in(msgs)
    out = got if out is None else (out if got is None else _cp_max(out, got))
    return out, agg


def _random_placement(rng, names, dims):
    from testbed.core.placement import FfnShard, LayerPlacement, Placement

    layers = []
    for _ in range(dims.n_layers):
        pool = list(rng.choice(names, size=int(rng.integers(1, len(names) + 1)), replace=False))
        heads = tuple(str(rng.choice(pool)) for _ in range(dims.n_kv_heads))
        cuts = sorted(set(rng.integers(1, dims.ffn_dim, size=int(rng.integers(0, 4))).tolist()))
        bounds = list(zip([0, *cuts], [*cuts, dims.ffn_dim]))
        ffn = tuple(FfnShard(str(rng.choice(pool)), a, b) for a, b in bounds)
        layers.append(LayerPlacement(heads, str(rng.choice(pool)), ffn))
    return Placement(names[0], tuple(layers))


def test_decode_cost_is_the_reference_message_by_message(monkeypatch):
    from dataclasses import replace

    from testbed.partition.cost import latency

    rng = np.random.default_rng(7)
    for trial in range(30):
        snap = replace(random_star(rng, int(rng.integers(3, 9)), GPT2), allow_blocks_on_source=True)
        names = [d.name for d in snap.devices]
        pl = _random_placement(rng, names, GPT2)
        for serial in (True, False):
            new = latency.decode_cost(pl, snap, GPT2, serial_nics=serial)
            with monkeypatch.context() as m:
                m.setattr(latency, "_decode_layer", _reference_decode_layer)
                ref = latency.decode_cost(pl, snap, GPT2, serial_nics=serial)
            assert (new.token_latency_s, new.compute_s, new.transfer_s) == (
                ref.token_latency_s, ref.compute_s, ref.transfer_s), trial
            assert list(new.bytes_by_link.items()) == list(ref.bytes_by_link.items())
