"""Agent protocol without root: tensor/control encoding, migration planning, the memory budget, the
block store's export/import/apply, and whole tokens through in-process agents over localhost TCP
(random head/FFN placements, migrations) compared with the monolithic model."""
from __future__ import annotations

import random
import socket
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from node_agent import protocol as P
from node_agent.agent import Agent
from node_agent.model import load_model
from node_agent.budget import Budget, BudgetError
from node_agent.shards import BlockStore
from node_agent.wire import recv_frame, send_frame
from testbed.backends.emulated.agents import ControlConn
from testbed.core.moves import migration_items
from testbed.core.placement import FfnShard, LayerPlacement, Placement, uniform_layer
from testbed.core.moves import moved_blocks


def test_tensor_payload_roundtrip():
    t = torch.randn(1, 3, 64)
    shape, raw = P.tensor_payload(t)
    assert shape == [1, 3, 64] and len(raw) == 3 * 64 * 4
    assert torch.equal(P.tensor_from(shape, raw), t)
    with pytest.raises(P.ProtocolError):
        P.tensor_from([2, 2], raw)


def test_call_reply_and_error_over_socketpair():
    a, b = socket.socketpair()

    def server():
        for _ in range(2):
            f = recv_frame(b)
            if f.header["cmd"] == "echo":
                send_frame(b, P.ok_frame(f.header["id"], value=f.header["value"]), f.payload)
            else:
                send_frame(b, P.error_frame(f.header["id"], BudgetError("too big", {"needed_bytes": 5})))
    th = threading.Thread(target=server)
    th.start()
    head, payload = P.call(a, "echo", 1, payload=b"xyz", value=3)
    assert head["value"] == 3 and payload == b"xyz"
    with pytest.raises(P.RemoteError) as exc:
        P.call(a, "boom", 2)
    assert exc.value.code == "budget" and exc.value.details == {"needed_bytes": 5}
    th.join()
    a.close(), b.close()


def test_hello_version_checked():
    f = type("F", (), {"type": "hello", "header": {"type": "hello", "from": "h1", "proto": 99}})()
    with pytest.raises(P.ProtocolError):
        P.check_hello(f)


def _pl(heads, proj, ffn, n_layers=4):
    return Placement("h1", tuple(LayerPlacement(tuple(heads), proj, tuple(FfnShard(*s) for s in ffn))
                                 for _ in range(n_layers)))


def test_migration_items_heads_proj_and_ffn_pieces():
    old = _pl(["h2", "h2", "h3", "h3"], "h2", [("h2", 0, 128), ("h3", 128, 256)], 1)
    new = _pl(["h2", "h4", "h3", "h3"], "h3", [("h4", 0, 64), ("h2", 64, 200), ("h3", 200, 256)], 1)
    items = migration_items(old, new)
    assert items[("h2", "h4")] == [{"kind": "head", "layer": 0, "group": 1}, {"kind": "ffn", "layer": 0, "c0": 0, "c1": 64}]
    assert items[("h2", "h3")] == [{"kind": "proj", "layer": 0}]
    assert items[("h3", "h2")] == [{"kind": "ffn", "layer": 0, "c0": 128, "c1": 200}]
    assert {m[0] for m in moved_blocks(old, new)} >= {"L0.H1", "L0.proj"}


def test_budget_refuses_with_numbers(tmp_path):
    (tmp_path / "memory.limit_in_bytes").write_text(str(10 << 20))
    (tmp_path / "memory.usage_in_bytes").write_text(str(7 << 20))
    b = Budget("h9", str(tmp_path), "v1", margin_bytes=1 << 20)
    b.check(1 << 20, "small")
    with pytest.raises(BudgetError) as exc:
        b.check(3 << 20, "big")
    assert exc.value.details["needed_bytes"] == 3 << 20 and exc.value.details["available_bytes"] == 2 << 20
    assert "h9" in str(exc.value) and "limit" in str(exc.value)


def test_block_store_move_group_and_ffn_columns():
    unlimited = Budget("x", None, None)
    a, b = BlockStore("h2", "tiny-gpt2", 0, unlimited), BlockStore("h3", "tiny-gpt2", 0, unlimited)
    old = _pl(["h2", "h2", "h3", "h3"], "h2", [("h2", 0, 128), ("h3", 128, 256)])
    new = _pl(["h2", "h3", "h3", "h3"], "h3", [("h3", 0, 100), ("h2", 100, 256)])
    a.load(old), b.load(old)
    x = torch.randn(1, 5, 64)
    a.attn[0](x, 0), b.attn[0](x, 0)
    stores = {"h2": a, "h3": b}
    for (src, dst), its in migration_items(old, new).items():
        for it in its:
            stores[dst].import_(*stores[src].export(it))
            stores[src].free(it)
    a.apply(new), b.apply(new)
    assert a.attn[0].groups == [0] and sorted(b.attn[0].groups) == [1, 2, 3]
    assert b.attn[0].cache.length == 5 and 0 in b.proj and 0 not in a.proj
    assert list(a.ffn[0]) == [(100, 256)] and list(b.ffn[0]) == [(0, 100)]
    assert set(a.block_bytes()) >= {"L0.H0", "L0.ffn100-256"}


# ---------------------------------------------------------------------------- in-process agents
def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def agents():
    d = tempfile.mkdtemp(prefix="hrt-", dir="/tmp")
    names = ["h1", "h2", "h3", "h4"]
    ports = {n: _free_port() for n in names}
    conns = {}
    for n in names:
        ag = Agent(n, f"{d}/{n}.sock", ports[n], model={"arg": "tiny-gpt2", "seed": 0}, data_host="127.0.0.1")
        ag.exit_on_shutdown = False
        threading.Thread(target=ag.serve, daemon=True).start()
        conns[n] = ControlConn(f"{d}/{n}.sock")
    peers = {n: ["127.0.0.1", ports[n]] for n in names}
    for n in names:
        conns[n].call("configure", 10.0, peers=peers, delays={})
    yield conns
    for c in conns.values():
        c.call("shutdown", 5.0)
        c.close()
    for f in Path(d).iterdir():
        f.unlink()
    Path(d).rmdir()


def _random_placement(rng: random.Random, cfg, devs) -> Placement:
    layers = []
    for _ in range(cfg.n_layers):
        heads = tuple(rng.choice(devs) for _ in range(cfg.n_groups))
        cuts = sorted(rng.sample(range(1, cfg.ffn_dim), rng.randint(0, 2)))
        b = [0, *cuts, cfg.ffn_dim]
        layers.append(LayerPlacement(heads, rng.choice(devs), tuple(FfnShard(rng.choice(devs), b[i], b[i + 1])
                                                                     for i in range(len(b) - 1))))
    return Placement("h1", tuple(layers))


def _run(conns, placements: dict[int, Placement], prompt, n, pv0=1, weights_from="source", sent=None):
    """Generate n tokens; placements[i] (i > 0) is migrated to before token i."""
    pl = placements[0]
    for c in conns.values():
        c.call("load", 30.0, placement=pl.to_json(), pv=pv0)
    r = conns["h1"].call("forward", 30.0, ids=prompt, start_pos=0, seq=0)
    out, tops, pos, pv = [r["token_id"]], [r["top_logits"]], len(prompt), pv0
    for i in range(1, n):
        if i in placements:
            for (src, dst), its in migration_items(pl, placements[i]).items():
                r = conns[src].call("migrate_out", 30.0, dst=dst, items=its, weights_from=weights_from)
                if sent is not None:
                    sent.append(r["bytes"])
            pl, pv = placements[i], pv + 1
            for c in conns.values():
                c.call("set_placement", 30.0, placement=pl.to_json(), pv=pv)
        r = conns["h1"].call("forward", 30.0, ids=[out[-1]], start_pos=pos, seq=i)
        pos += 1
        out.append(r["token_id"])
        tops.append(r["top_logits"])
    return out, tops, r


def _reference(prompt, n):
    m = load_model("tiny-gpt2")
    logits = m.forward(prompt, 0)
    out, tops, pos = [], [], len(prompt)
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        tops.append(torch.topk(logits[0, -1], 5).values.tolist())
        logits = m.forward([out[-1]], pos)
        pos += 1
    return out, tops


def _scenario(seed: int, n: int, switch_at: tuple[int, int]):
    """A random prompt, the monolithic reference for it, and random placements at 0 and ``switch_at``."""
    rng = random.Random(seed)
    cfg = load_model("tiny-gpt2").config
    prompt = [rng.randrange(256) for _ in range(6)]
    ref, ref_top = _reference(prompt, n)
    devs = ["h1", "h2", "h3", "h4"]
    plans = {i: _random_placement(rng, cfg, devs) for i in (0, *switch_at)}
    return prompt, ref, ref_top, plans


def test_agents_random_placements_and_migrations_match_monolithic(agents):
    prompt, ref, ref_top, plans = _scenario(7, 24, (8, 16))
    out, tops, last = _run(agents, plans, prompt, 24)
    assert out == ref
    assert torch.allclose(torch.tensor(tops), torch.tensor(ref_top), atol=1e-4)
    assert last["bytes_moved"] == sum(last["bytes_by_link"].values()) > 0
    assert last["latency_s"] >= last["compute_s"] and last["wait_s"] >= 0


def test_migration_with_weights_from_the_destinations_own_copy(agents):
    # Same generation twice: weights shipped vs only KV caches shipped (the receivers copy the
    # weights from their own full state). Tokens equal the monolithic model's either way.
    prompt, ref, ref_top, plans = _scenario(11, 20, (7, 14))
    shipped, local = [], []
    out_s, _, _ = _run(agents, plans, prompt, 20, weights_from="source", sent=shipped)
    out_l, tops_l, _ = _run(agents, plans, prompt, 20, pv0=10, weights_from="destination", sent=local)
    assert out_s == out_l == ref
    assert torch.allclose(torch.tensor(tops_l), torch.tensor(ref_top), atol=1e-4)
    # KV only: per moved group 2 x T x d x 4 B (+ headers), far below the weights
    assert 0 < sum(local) < sum(shipped) / 4, (sum(local), sum(shipped))


def test_layer_placement_on_one_worker_sends_only_x_in_and_out(agents):
    cfg = load_model("tiny-gpt2").config
    pl = Placement("h1", tuple(uniform_layer("h2", cfg.n_groups, cfg.ffn_dim) for _ in range(cfg.n_layers)))
    out, _, last = _run(agents, {0: pl}, [1, 2, 3], 3)
    assert last["bytes_by_link"] == {"h1->h2": 64 * 4, "h2->h1": 64 * 4}


def test_export_of_a_block_not_held_is_a_remote_error(agents):
    cfg = load_model("tiny-gpt2").config
    pl = Placement("h1", tuple(uniform_layer("h2", cfg.n_groups, cfg.ffn_dim) for _ in range(cfg.n_layers)))
    for c in agents.values():
        c.call("load", 30.0, placement=pl.to_json(), pv=1)
    st = agents["h2"].call("stats", 5.0)
    assert st["blocks"]["L0.H0"] > 0 and st["rss_bytes"] > 0
    with pytest.raises(P.RemoteError) as exc:
        agents["h2"].call("migrate_out", 30.0, dst="h3", items=[{"kind": "head", "layer": 9, "group": 0}])
    assert "layer 9" in exc.value.message
