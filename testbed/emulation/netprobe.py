"""The probes ``headroom net check`` starts *inside* emulated hosts (``python -m testbed.emulation.netprobe CMD``):
a ``node_agent.wire`` ping-pong server and client that apply the agents' delay, jitter and
serialisation rule (the client prints its round trips and both ends' transit floors as JSON), and a
memory probe that grows until its cgroup's OOM killer ends it."""
from __future__ import annotations

import json
import os
import socket
import sys
import time


def _jitter_draw(hops: list[float], seed: str):
    import random

    from node_agent.wire import draw_jitter

    rng = random.Random(seed)
    return (lambda: draw_jitter(rng, hops)) if hops else None


def _wire_server(port: int, delay_s: float, rate_bytes_per_s: float, jitter_hops: list[float]) -> None:
    from node_agent.inbox import lower_timer_slack
    from node_agent.wire import TransitFloor, recv_frame, send_frame

    lower_timer_slack()  # as the agents' worker: timed holds punctual to ~10 us
    floor = TransitFloor()
    jitter = _jitter_draw(jitter_hops, f"server{port}")

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    print("ready", flush=True)
    srv.settimeout(30)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            f = recv_frame(conn, delay_s=delay_s, floor=floor, rate_bytes_per_s=rate_bytes_per_s, jitter=jitter)
            if f.type == "bye":
                return
            send_frame(conn, {"type": "pong", "seq": f.header.get("seq"), "floor": floor.seconds if delay_s else 0.0})
    finally:
        conn.close()


def _wire_client(ip: str, port: int, delay_s: float, count: int, rate_bytes_per_s: float,
                 jitter_hops: list[float]) -> None:
    from node_agent.inbox import lower_timer_slack
    from node_agent.wire import TransitFloor, connect, recv_frame, send_frame

    lower_timer_slack()
    floor = TransitFloor()
    jitter = _jitter_draw(jitter_hops, f"client{port}")
    sock = connect(ip, port)
    rtts = []
    for seq in range(count + 2):
        t0 = time.time()
        send_frame(sock, {"type": "ping", "seq": seq})
        pong = recv_frame(sock, delay_s=delay_s, floor=floor, rate_bytes_per_s=rate_bytes_per_s, jitter=jitter)
        if seq >= 2:  # first exchanges warm ARP and the connection
            rtts.append(time.time() - t0)
        time.sleep(0.01)
    send_frame(sock, {"type": "bye"})
    print(json.dumps({"rtt_s": rtts, "floor_c": floor.seconds if delay_s else 0.0,
                      "floor_s": float(pong.header.get("floor") or 0.0)}))


def _alloc(cap_mib: int) -> None:
    """Grow in 1 MiB steps, printing the process's private resident MiB (interpreter included) after each."""
    page = os.sysconf("SC_PAGE_SIZE")
    chunks = []
    rss_mib = 0
    while rss_mib < cap_mib:
        chunks.append(b"\x01" * 2**20)  # written, so every page is touched and charged
        with open("/proc/self/statm") as f:
            fields = f.read().split()
            rss_mib = (int(fields[1]) - int(fields[2])) * page // 2**20  # resident minus file-backed shared
        print(rss_mib, flush=True)
    sys.exit(3)  # never killed: the limit is not enforced


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "_wire_server":
        _wire_server(int(args[0]), float(args[1]), float(args[2]), json.loads(args[3]))
    elif cmd == "_wire_client":
        _wire_client(args[0], int(args[1]), float(args[2]), int(args[3]), float(args[4]), json.loads(args[5]))
    elif cmd == "_alloc":
        _alloc(int(args[0]))
    else:
        raise SystemExit(f"unknown probe {cmd}")
