"""Wire hardening (issue 15 item 4): a real node agent (a subprocess on 127.0.0.1, a fake cgroup v2
directory as its memory budget) takes a fixed, seeded budget of malformed frames on its control and
data planes — bad JSON, wrong types, missing ids, unknown commands and types, frames announcing
more than its budget (refused before reading), send times in the future, NaN times, garbage bytes —
and afterwards still answers and computes a token equal to the monolithic model's. Its log holds no
uncaught thread exception and its peak RSS shows no announced-size allocation."""
from __future__ import annotations

import json
import math
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from node_agent import wire

CONTROL_FRAMES, DATA_FRAMES = 700, 700
MIB = 1 << 20
SAFE_CMDS = ["ping", "stats", "budget", "set_delays", "configure", "load", "set_placement", "forward", "drop",
             "migrate_out", "no_such_command", ""]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def agent():
    d = Path(tempfile.mkdtemp(prefix="hrfz-", dir="/tmp"))
    cg = d / "cg"
    cg.mkdir()
    (cg / "memory.max").write_text(str(512 * MIB))
    (cg / "memory.current").write_text(str(480 * MIB))  # ~30 MiB free: the payload limit
    port = _free_port()
    cfg = {"name": "h1", "control_path": str(d / "h1.sock"), "data_port": port, "data_host": "127.0.0.1",
           "mem_dir": str(cg), "mem_version": "v2", "model": {"arg": "tiny-gpt2", "seed": 0}}
    log = open(d / "agent.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", "import json, sys\nfrom node_agent.agent import run_agent\n"
                             "run_agent(json.loads(sys.argv[1]))", json.dumps(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
    try:
        ctl = _connect_unix(cfg["control_path"], proc)
        yield {"ctl": ctl, "port": port, "proc": proc, "log": d / "agent.log"}
        ctl.close()
    finally:
        if proc.poll() is None:
            proc.kill()  # only the agent this fixture started, by its Popen handle
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def _connect_unix(path: str, proc) -> socket.socket:
    deadline = time.monotonic() + 60
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            s.settimeout(20)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            assert proc.poll() is None and time.monotonic() < deadline, "agent did not come up"
            time.sleep(0.05)


def _raw(sock, header: bytes, payload: bytes = b"", plen: int | None = None, sent_at: float | None = None) -> None:
    sock.sendall(wire.PREFIX.pack(wire.MAGIC, wire.WIRE_VERSION, 0, len(header), len(payload) if plen is None else plen,
                                  time.time() if sent_at is None else sent_at) + header + payload)


def _junk(rng: random.Random, depth: int = 0):
    pick = rng.randrange(9 if depth < 2 else 6)
    if pick == 6:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(3))]
    if pick == 7:
        return {rng.choice(["a", "h1", "id", "placement", "layers", "delays"]): _junk(rng, depth + 1)
                for _ in range(rng.randrange(3))}
    if pick == 8:
        return {"h1": _junk(rng, depth + 1)}
    return [None, True, rng.randint(-2**40, 2**40), rng.random() * 1e9, float("nan"), "x" * rng.randrange(5)][pick]


def _control_case(rng: random.Random, k: int) -> tuple[bytes, object]:
    """(header bytes, the id the reply must carry) of one malformed or ill-typed control frame."""
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))), None  # not JSON
    if kind == 1:
        return json.dumps(_junk(rng) if rng.random() < 0.5 else [1, 2]).encode(), None  # not an object
    if kind == 2:
        return json.dumps({"cmd": "ping", "id": k}).encode(), None  # no type
    header = {"type": "req", "cmd": rng.choice(SAFE_CMDS), "id": k}
    if kind == 3:
        header["id"] = rng.choice([None, "7", 1.5, [k], {"k": k}])
        header.pop("id") if rng.random() < 0.3 else None
    elif kind == 4:
        header["cmd"] = rng.choice([None, 5, ["ping"], {"x": 1}])
    for _ in range(rng.randrange(4)):
        header[rng.choice(["delays", "rates", "peers", "placement", "pv", "ids", "seq", "start_pos", "dst",
                           "items", "token_timeout_s"])] = _junk(rng)
    if header.get("cmd") in ("configure", "set_delays") and isinstance(header.get("peers"), dict):
        header["peers"] = {"h9": ["127.0.0.1", 9]}  # never an emulated address from this namespace
    header.pop("threads", None)
    header["token_timeout_s"] = 2.0
    return json.dumps(header).encode(), header.get("id")


def _reply(sock) -> dict:
    return wire.recv_frame(sock).header


def _fuzz_control(ctl: socket.socket, rng: random.Random) -> int:
    for k in range(CONTROL_FRAMES):
        head, want_id = _control_case(rng, k)
        _raw(ctl, head, bytes(rng.randrange(256) for _ in range(rng.randrange(8))))
        reply = _reply(ctl)
        assert reply["type"] in ("error", "ok"), reply
        if reply["type"] == "ok":  # only a well-formed request of a harmless command may succeed
            assert reply["id"] == want_id and isinstance(want_id, int)
        elif isinstance(want_id, int) or want_id is None:
            assert reply.get("id") in (want_id, None), (reply, want_id)
    for size in (31 * MIB, 64 * MIB):  # beyond the budget's ~30 MiB: refused before the payload is read
        head = json.dumps({"type": "req", "cmd": "ping", "id": 1}).encode()
        ctl.sendall(wire.PREFIX.pack(wire.MAGIC, wire.WIRE_VERSION, 0, len(head), size, time.time()))
        ready, _, _ = select.select([ctl], [], [], 10)
        assert ready, "the refusal must come before any payload byte is sent"
        reply = _reply(ctl)
        assert reply["type"] == "error" and reply["code"] == "too_large", reply
        ctl.sendall(head + bytes(size))  # the agent discards these and stays in sync
    return CONTROL_FRAMES + 2


def _data_conn(port: int, hello: bool = True) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if hello:
        wire.send_frame(s, {"type": "hello", "from": "h2", "proto": 1})
    return s


def _data_case(rng: random.Random, s: socket.socket) -> bool:
    """Send one malformed data frame; True if the agent is expected to close this connection."""
    kind = rng.randrange(8)
    if kind == 0:
        s.sendall(bytes(rng.randrange(256) for _ in range(wire.PREFIX.size)))  # bad magic
        return True
    if kind == 1:
        _raw(s, b'{"type": "act"}', plen=rng.choice([2**31 - 1, 2**31 + 5, 2**40]))  # 2 GiB+: never allocated
        return True
    if kind == 2:
        _raw(s, json.dumps({"type": "act", "kind": "x", "seq": 1, "layer": 0, "pv": 0, "shape": [2], "cp": [0, 0, 0],
                            "tally": {}}).encode(), bytes(8), sent_at=rng.choice([time.time() + 3600, float("nan"),
                                                                                   float("inf")]))
        return False
    if kind == 3:
        _raw(s, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30))))  # header not JSON
        return False
    header = {"type": rng.choice(["act", "mig", "mig_ack", "mig_nack", "fail", "hello", "ok", "zzz"])}
    for _ in range(rng.randrange(6)):
        header[rng.choice(["kind", "seq", "layer", "pv", "shape", "cp", "tally", "mig_id", "item", "blk", "from",
                           "message"])] = _junk(rng)
    if kind == 4 and header["type"] == "act":  # well-typed but wrong: stale pv, shape vs payload
        header.update(kind="x", seq=rng.randrange(5), layer=rng.randrange(9), pv=rng.randrange(100, 200),
                      shape=[1, rng.randrange(4)], cp=[0.0, 0.0, 0.0], tally={})
    _raw(s, json.dumps(header).encode(), bytes(4 * rng.randrange(4)))
    return False


def _fuzz_data(port: int, rng: random.Random) -> int:
    greeted = True
    s = _data_conn(port)
    for _ in range(DATA_FRAMES):
        closes = _data_case(rng, s) or not greeted  # without hello the first frame ends the connection
        if closes:
            s.settimeout(10)
            try:
                while s.recv(4096):  # the agent closes this connection (it may still be reading)
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass
            s.close()
            greeted = rng.random() < 0.9
            s = _data_conn(port, hello=greeted)
    s.close()
    return DATA_FRAMES


def test_fuzzed_agent_survives_and_still_computes(agent):
    from node_agent import protocol as P
    from node_agent.model import load_model
    from testbed.core.placement import Placement, uniform_layer

    rng = random.Random(15)
    t0 = time.monotonic()
    sent = _fuzz_control(agent["ctl"], rng) + _fuzz_data(agent["port"], rng)
    assert sent >= 1000 and time.monotonic() - t0 < 60
    ctl, port = agent["ctl"], agent["port"]
    assert P.call(ctl, "ping", 10**6)[0]["name"] == "h1"
    P.call(ctl, "configure", 10**6 + 1, peers={"h1": ["127.0.0.1", port]}, delays={}, rates={})
    model = load_model("tiny-gpt2")
    cfg = model.config
    pl = Placement("h1", tuple(uniform_layer("h1", cfg.n_groups, cfg.ffn_dim) for _ in range(cfg.n_layers)))
    P.call(ctl, "load", 10**6 + 2, placement=pl.to_json(), pv=1)
    reply, _ = P.call(ctl, "forward", 10**6 + 3, ids=[1, 2, 3], start_pos=0, seq=0)
    assert reply["token_id"] == int(model.forward([1, 2, 3], 0)[0, -1].argmax())
    peak = next(int(l.split()[1]) for l in Path(f"/proc/{agent['proc'].pid}/status").read_text().splitlines()
                if l.startswith("VmHWM:")) * 1024
    assert peak < 1024 * MIB, f"agent peaked at {peak / MIB:.0f} MiB"
    P.call(ctl, "shutdown", 10**6 + 4)
    assert agent["proc"].wait(timeout=10) == 0
    text = agent["log"].read_text()
    assert text.count("Exception in thread") == 0, text[-3000:]
    assert "refused a data frame" in text and "data connection closed" in text
    assert not math.isnan(peak)
