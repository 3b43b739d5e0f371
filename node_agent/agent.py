"""The node agent: one process per emulated host, forked by ``node_agent.forkserver`` into the
host's network namespace. It holds the host's blocks (``node_agent.shards``) and runs the per-token
dataflow of ``testbed.core.placement`` with its peers.

Threads: the control thread (one Unix-socket connection from the controller, request/reply; the
agent exits when it closes), the data listener (TCP on the host's emulated address), one reader
per inbound data connection, and ONE worker that does all block work in order. Readers put frames
into a timed inbox (``node_agent.inbox``) that releases each at ``node_agent.wire.release_time``: its arrival plus
the one-way delay (transport delay emulation; 0 under netem), never before the bytes could have
crossed the path's bottleneck — the worker never sleeps on behalf of a single frame.

The token steps live in ``node_agent.dataflow``, the migration endpoints in
``node_agent.migration`` (mixins of ``Agent``); this module owns the control socket, the control
commands and the worker loop; the peer sockets and the receive-side timing are
``node_agent.dataplane``'s.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future

import torch

from node_agent import protocol as P
from node_agent.dataflow import Dataflow, Inp, TokenState
from node_agent.dataplane import DataPlane
from node_agent.inbox import TimedInbox, lower_timer_slack
from node_agent.migration import Migration
from node_agent.pacing import ComputePacer
from node_agent.budget import Budget, BudgetError, return_freed_memory, rss_bytes, tune_allocator
from node_agent.shards import BlockStore, calibrate
from node_agent.wire import BadFrame, FrameTooLarge, WireError, recv_frame
from testbed.core.errors import TokenFailed
from testbed.core.placement import Placement
from testbed.core.snapshot import ModelDims

log = logging.getLogger("headroom.agent")
DATA_PORT = 7070


class Agent(Dataflow, Migration, DataPlane):
    """One host's agent (see the module docstring); ``serve`` runs it until control closes."""

    def __init__(self, name: str, control_path: str | None, data_port: int = DATA_PORT, mem_dir: str | None = None,
                 mem_version: str | None = None, model: dict | None = None, data_host: str = "0.0.0.0"):
        self.name, self.control_path, self.data_port, self.data_host = name, control_path, data_port, data_host
        self.token: str | None = None  # the run's secret: peers must present it in their hello (``configure``)
        self.budget = Budget(name, mem_dir, mem_version)
        self.model = model
        self.store: BlockStore | None = None
        self.placement: Placement | None = None
        self.pv = 0
        self.inbox = TimedInbox()
        self.pacer = ComputePacer()  # compute like the emulated device (``pace`` command); None = full speed
        self._work_dims = None
        self.local: deque = deque()  # hand-offs between this agent's own blocks (worker thread only)
        self.peers: dict[str, tuple[str, int]] = {}
        self.delays: dict[str, float] = {}
        self.jitters: dict[str, tuple[float, ...]] = {}  # src -> per-hop jitter (s, uniform ±j) of the path
        self.rates: dict[str, float] = {}  # bytes/s bottleneck of the path from each peer
        self._out: dict[str, socket.socket] = {}
        self.tokens: dict[int, TokenState] = {}
        self.pending_mig: dict[int, tuple[dict, Future, dict]] = {}
        self._mig_id = 0
        self.sent_bytes: dict[str, int] = {}
        self.stop = threading.Event()
        self.exit_on_shutdown = True  # False when agents run as threads inside one test process
        self._listeners: list[socket.socket] = []
        self._started = False

    # ------------------------------------------------------------------ entry point
    def serve(self) -> None:
        """Serve one controller connection on the Unix socket ``control_path`` (the emulated backend)."""
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ctl.bind(self.control_path)
        ctl.listen(1)
        self._listeners.append(ctl)
        self._start()
        conn, _ = ctl.accept()
        self.serve_stream(conn)

    def serve_stream(self, conn) -> None:
        """Serve the control protocol on ``conn`` (a socket, or ``node_agent.remote``'s stdio stream
        when the agent was started over SSH) until it closes; then the agent is done."""
        if not self._started:
            self._start()
        try:
            self._control_loop(conn)
        finally:
            log.info("agent %s: control connection closed, exiting", self.name)

    def _start(self) -> None:
        """The data listener (on ``data_host`` only), the worker, the model's block store."""
        self._started = True
        data = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        data.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        data.bind((self.data_host, self.data_port))
        data.listen(64)
        self._listeners.append(data)
        threading.Thread(target=self._accept_data, args=(data,), daemon=True, name="data-accept").start()
        threading.Thread(target=self._work, daemon=True, name="worker").start()
        if self.model:
            self.store = BlockStore(self.name, self.model["arg"], int(self.model.get("seed", 0)), self.budget)
        log.info("agent %s pid %d ready (control %s, data %s:%d)", self.name, os.getpid(),
                 self.control_path or "stream", self.data_host, self.data_port)

    # ------------------------------------------------------------------ control plane
    def _control_loop(self, conn: socket.socket) -> None:
        """Request/reply until the controller closes. A frame the agent cannot take (too large for
        its memory, not a well-formed request) gets an error reply and the loop goes on."""
        while not self.stop.is_set():
            try:
                frame = recv_frame(conn, max_payload=self.payload_limit)
            except FrameTooLarge as exc:  # refused before reading: drop its bytes, keep the stream
                if not P.reply(conn, P.error_frame(None, exc)) or not P.discard_rest(conn, exc.remaining):
                    return
                continue
            except BadFrame as exc:
                if not P.reply(conn, P.error_frame(None, exc)):
                    return
                continue
            except (WireError, OSError) as exc:
                log.info("control stream ended: %s", exc)
                return
            if not P.reply(conn, *self._serve_request(frame)):
                return

    def _serve_request(self, frame) -> tuple[dict, bytes]:
        h = frame.header
        call_id = h.get("id")
        try:
            cmd = h.get("cmd")
            if h.get("type") != "req" or not isinstance(cmd, str) or not isinstance(call_id, int):
                raise P.ProtocolError(f"expected a request {{type: req, cmd: NAME, id: INT}}, got "
                                      f"type {h.get('type')!r}, cmd {cmd!r}, id {call_id!r}")
            handler = getattr(self, "cmd_" + cmd, None)
            if handler is None:
                raise P.ProtocolError(f"unknown command {cmd!r}")
            result, payload = handler(h, frame.payload)
            return P.ok_frame(call_id, **result), payload
        except Exception as exc:  # reported to the controller, never swallowed
            if not isinstance(exc, (BudgetError, P.ProtocolError, KeyError, TypeError, ValueError, AttributeError)):
                log.error("command %s failed: %s", h.get("cmd"), traceback.format_exc())
            return P.error_frame(call_id, exc), b""

    def payload_limit(self) -> int:
        """The largest frame payload this agent takes: what its memory budget has free now."""
        return self.budget.available()

    def _on_worker(self, fn, timeout_s: float = 60.0):
        fut: Future = Future()
        self.inbox.put(("task", fn, fut))
        return fut.result(timeout=timeout_s)

    def cmd_ping(self, h, _):
        cfg = self.store.cfg.to_dict() if self.store is not None else None
        return {"pid": os.getpid(), "name": self.name, "config": cfg}, b""

    def cmd_configure(self, h, _):
        self._on_worker(lambda: self._configure(h))
        return {}, b""

    def _configure(self, h) -> None:
        if "peers" in h:
            self.peers = {k: (v[0], int(v[1])) for k, v in h["peers"].items()}
            for s in self._out.values():
                s.close()
            self._out.clear()
        if "delays" in h:
            self.delays = P.peer_delays(h["delays"])
            self.jitters = P.peer_jitters(h.get("jitters"))
        if "rates" in h:
            self.rates = P.peer_rates(h["rates"])
        if h.get("token"):
            self.token = str(h["token"])
        if h.get("threads"):
            torch.set_num_threads(int(h["threads"]))
        if h.get("model") and (self.store is None or self.model != h["model"]):
            self.model = h["model"]
            self.store = BlockStore(self.name, self.model["arg"], int(self.model.get("seed", 0)), self.budget)

    def cmd_set_delays(self, h, _):
        self.delays = P.peer_delays(h["delays"])  # atomic dict swap, read by readers
        self.jitters = P.peer_jitters(h.get("jitters"))
        if "rates" in h:
            self.rates = P.peer_rates(h["rates"])
        return {}, b""

    def cmd_load(self, h, _):
        placement = Placement.from_json(h["placement"])

        def run():
            self.tokens.clear()
            blocks = self.store.load(placement)
            self.placement, self.pv = placement, int(h["pv"])
            return blocks
        return {"blocks": self._on_worker(run, 300.0)}, b""

    def cmd_set_placement(self, h, _):
        placement = Placement.from_json(h["placement"])

        def run():
            self.store.apply(placement)
            self.placement, self.pv = placement, int(h["pv"])
            self.tokens.clear()
            return self.store.block_bytes()
        return {"blocks": self._on_worker(run)}, b""

    def cmd_drop(self, h, _):
        def run():
            if self.store:
                self.store.drop_all()
            self.placement, self.tokens = None, {}
        self._on_worker(run)
        return {}, b""

    def cmd_forward(self, h, _):
        fut: Future = Future()

        def start():
            try:
                self._start_token(h, fut)
            except BaseException as exc:
                fut.set_exception(exc)
        self.inbox.put(("task", start, Future()))
        try:
            rec = fut.result(timeout=float(h.get("token_timeout_s", 60.0)))
        except TimeoutError:
            raise TimeoutError(f"{self.name}: token {h['seq']} not finished within "
                               f"{h.get('token_timeout_s', 60.0)} s") from None
        return rec, b""

    def cmd_migrate_out(self, h, _):
        done: Future = Future()
        t0 = time.time()
        ship = h.get("weights_from", "source") == "source"  # "destination": the receiver's own copy
        self._on_worker(lambda: self._migrate_out(h["dst"], h["items"], done, ship))
        nbytes = done.result(timeout=float(h.get("mig_timeout_s", 300.0)))
        return {"bytes": nbytes, "duration_s": time.time() - t0}, b""

    def cmd_stats(self, h, _):
        return_freed_memory()  # freed tensors still in malloc's arenas would read as overhead
        limit, usage = self.budget.read()
        out = {"pid": os.getpid(), "rss_bytes": rss_bytes(), "cgroup_limit_bytes": limit, "cgroup_usage_bytes": usage,
               "sent_bytes": dict(self.sent_bytes), "threads": torch.get_num_threads()}
        if self.store is not None:
            out.update(blocks=self._on_worker(self.store.block_bytes), kv_bytes=self.store.kv_bytes())
        return out, b""

    def cmd_budget(self, h, _):
        limit, usage = self.budget.read()
        return {"limit_bytes": limit, "usage_bytes": usage, "available_bytes": self.budget.available()}, b""

    def cmd_calibrate(self, h, _):
        cfg = self.store.cfg if self.store is not None else None
        return self._on_worker(lambda: calibrate(cfg, float(h.get("seconds", 0.3)), pacer=self.pacer), 120.0), b""

    @property
    def work_dims(self):
        """The model's dimensions for counting a block call's work (``call_work``), built once per model."""
        if self._work_dims is None or self._work_dims[0] is not self.store.cfg:
            self._work_dims = (self.store.cfg, ModelDims.from_config(self.store.cfg))
        return self._work_dims[1]

    def cmd_pace(self, h, _):
        """Set how this agent computes like its device — ``clock`` (a ``DeviceClock``: roofline
        pacing), ``speed`` (a fraction of one core: CPU-time pacing) or neither (full speed); the
        pacer's stats come back."""
        def apply():
            if "clock" in h or "speed" in h:
                self.pacer.set_clock(h.get("clock"))
                self.pacer.set_speed(h.get("speed"))
            if h.get("clear"):
                self.pacer.clear()
            return self.pacer.stats()
        return self._on_worker(apply), b""

    def cmd_debug_alloc(self, h, _):
        """Test hook: allocate and touch ``nbytes`` WITHOUT the budget check (provokes a real OOM kill)."""
        self._ballast = getattr(self, "_ballast", []) + [torch.ones(int(h["nbytes"]) // 4)]
        return {"held_bytes": sum(t.numel() * 4 for t in self._ballast)}, b""

    def cmd_shutdown(self, h, _):
        self.stop.set()
        if self.exit_on_shutdown:
            threading.Timer(0.05, lambda: os._exit(0)).start()
        else:
            for s in self._listeners + list(self._out.values()):
                s.close()
        return {}, b""

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        torch.set_grad_enabled(False)
        lower_timer_slack()  # this thread's timed waits release frames: keep them punctual
        while True:
            # a block's output for another block here goes before anything else (no lock, no heap)
            item = self.local.popleft() if self.local else self.inbox.get()
            try:
                if item[0] == "task":
                    _, fn, fut = item
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:
                        fut.set_exception(exc)
                elif item[0] == "local":
                    self._on_act(item[1], item[2])
                else:
                    self._on_frame(item[1], item[2], item[3])
            except Exception as exc:
                log.error("worker: %s", traceback.format_exc())
                self._report_failure(exc)

    def _report_failure(self, exc: Exception) -> None:
        """A token cannot finish: fail it here (source) or tell the source."""
        src = self.placement.source if self.placement else None
        if src is not None and src != self.name:
            try:
                self._send(src, {"type": "fail", "from": self.name, "message": f"{type(exc).__name__}: {exc}"})
            except (OSError, WireError, KeyError):
                pass
            return
        self._fail_tokens(TokenFailed(f"{self.name}: {type(exc).__name__}: {exc}"))

    def _fail_tokens(self, exc: Exception) -> None:
        for st in self.tokens.values():
            if st.future is not None and not st.future.done():
                st.future.set_exception(exc)

    def _on_frame(self, src: str, f, release: float) -> None:
        h = f.header
        if f.type == "act":
            cp = list(h["cp"])
            cp[1] += release - f.sent_at
            inp = Inp(P.tensor_from(h["shape"], f.payload), cp, release, h.get("tally", {}),
                      {k: h[k] for k in ("groups",) if k in h})
            self._on_act(h, inp)
        elif f.type == "mig":
            self._on_mig(src, h, f.payload)
        elif f.type in ("mig_ack", "mig_nack"):
            self._on_mig_answer(h)
        elif f.type == "fail":
            self._fail_tokens(TokenFailed(f"{h['from']}: {h['message']}"))
        else:
            raise P.ProtocolError(f"unexpected data frame {f.type!r} from {src}")

def run_agent(cfg: dict) -> None:
    """Entry point inside the forked child (already in the host's network namespace)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {cfg['name']} %(levelname)s %(message)s")
    torch.set_num_threads(int(cfg.get("threads", 1)))
    tune_allocator()
    agent = Agent(cfg["name"], cfg["control_path"], int(cfg.get("data_port", DATA_PORT)), cfg.get("mem_dir"),
                  cfg.get("mem_version"), cfg.get("model"), cfg.get("data_host", "0.0.0.0"))
    log.info("config %s", json.dumps(cfg))
    agent.serve()
