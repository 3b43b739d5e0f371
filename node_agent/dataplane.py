"""The agent's data-plane sockets (a mixin of ``node_agent.agent.Agent``): accepting peers'
connections, reading their frames into the timed inbox at each frame's release time (transport
delay, jitter and the path's bottleneck, ``node_agent.wire.release_time``), and sending frames to
peers over one lazily opened connection each, every connection opened with this run's hello.
"""
from __future__ import annotations

import logging
import random
import socket
import threading
import traceback

from node_agent import protocol as P
from node_agent.wire import (BadFrame, TransitFloor, WireError, connect, draw_jitter, recv_frame, release_time,
                             send_frame)

log = logging.getLogger("headroom.agent")
MAX_FUTURE_S = 1.0  # a data frame sent more than this ahead of the receiver's clock is refused (one kernel, one clock)


class DataPlane:
    """Peer sockets of one agent (module docstring); the agent provides ``name``, ``token``,
    ``peers``, ``delays``, ``jitters``, ``rates``, ``inbox``, ``payload_limit``, ``_out``, ``sent_bytes``."""

    def _accept_data(self, srv: socket.socket) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._read_data, args=(conn,), daemon=True).start()

    def _read_data(self, conn: socket.socket) -> None:
        """One inbound data connection: hello, then frames into the inbox at their release time. A
        frame that is malformed, sent from the future or not a data message is refused (logged) and
        the connection goes on; one too large for the budget, or a broken stream, closes it."""
        try:
            hello = recv_frame(conn, max_payload=self.payload_limit, max_future_s=MAX_FUTURE_S)
            src = P.check_hello(hello, self.token)
            floor = TransitFloor()
            floor.observe(hello)
            rng = random.Random(f"{self.name}<-{src}")  # jitter draws: reproducible per connection
            while True:
                try:
                    f = recv_frame(conn, max_payload=self.payload_limit, max_future_s=MAX_FUTURE_S)
                    P.check_data_header(f.header, len(f.payload))
                except (BadFrame, P.ProtocolError) as exc:
                    if isinstance(exc, WireError) and not isinstance(exc, BadFrame):
                        raise
                    log.warning("refused a data frame from %s: %s", src, exc)
                    continue
                delay = self.delays.get(src, 0.0) + draw_jitter(rng, self.jitters.get(src, ()))
                release = floor.in_order(release_time(f, delay, self.rates.get(src), floor.observe(f)))
                self.inbox.put(("frame", src, f, release), release)
        except (WireError, OSError, P.ProtocolError) as exc:
            log.info("data connection closed: %s", exc)
        except Exception as exc:  # never an uncaught exception in a reader thread
            log.error("data connection dropped: %s", traceback.format_exc())
        finally:
            conn.close()

    def _send(self, dst: str, header: dict, payload: bytes = b"") -> int:
        sock = self._out.get(dst)
        try:
            if sock is None:
                ip, port = self.peers[dst]
                sock = connect(ip, port)
                send_frame(sock, P.hello_frame(self.name, self.token))
                self._out[dst] = sock
            n = send_frame(sock, header, payload)
        except OSError as exc:  # name the peer: the controller's failure message starts from here
            if self._out.get(dst) is sock and sock is not None:
                del self._out[dst]
                sock.close()
            raise ConnectionError(f"{self.name}->{dst}: {exc}") from exc
        self.sent_bytes[dst] = self.sent_bytes.get(dst, 0) + n
        return n
