"""Controller side of the node agents: the fork server process, one Unix-socket control connection
per agent, and the pool that spawns agents into the hosts of an ``EmulatedNetwork``
(``AgentPoolBase``, what the pools of all backends share, is also the SSH backend's base).

The controller (root namespace) NEVER talks to an emulated address: it reaches the fork server and
the agents only over Unix sockets in a short private directory; agents talk to each other over TCP
from inside their host namespaces. Every PID is recorded in the run manifest (with its start time)
the moment it exists, and each agent PID is written into its host's cgroup by the controller.
Every call has a timeout; while waiting, a watchdog can turn a dead agent into an error at once.
"""
from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from node_agent import protocol as P
from node_agent.agent import DATA_PORT
from node_agent.wire import WireError, recv_frame, send_frame
from testbed.emulation.cleanup import proc_start_time
from testbed.emulation.cpu import pacing_for
from testbed.core.errors import AgentError

REPO = Path(__file__).resolve().parents[3]


class AgentCallError(AgentError):
    """A control call failed (timeout, closed connection, remote error)."""


class ControlConn:
    """One request/reply Unix-socket connection (thread-safe: one call at a time)."""

    def __init__(self, path: str, connect_timeout_s: float = 15.0, alive: Callable[[], bool] | None = None):
        self.path = path
        self._id = 0
        self._lock = threading.Lock()
        deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline or (alive is not None and not alive()):
                    raise AgentCallError(f"cannot connect to {path}") from None
                time.sleep(0.01)

    def call(self, cmd: str, timeout_s: float = P.CONTROL_TIMEOUT_S, watchdog: Callable[[], None] | None = None,
             payload: bytes = b"", **args) -> dict:
        with self._lock:
            self._id += 1
            cid = self._id
            deadline = time.monotonic() + timeout_s
            try:
                self.sock.settimeout(timeout_s)
                send_frame(self.sock, P.request_frame(cmd, cid, **args), payload)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise P.CallTimeout(f"{cmd}: no reply within {timeout_s:.1f} s")
                    ready, _, _ = select.select([self.sock], [], [], min(0.2, left))
                    if not ready:
                        if watchdog is not None:
                            watchdog()
                        continue
                    self.sock.settimeout(max(left, 1.0))
                    frame = recv_frame(self.sock)
                    if frame.header.get("id") == cid:
                        return P.check_reply(frame)[0]
            except (OSError, WireError) as exc:
                raise AgentCallError(f"{cmd} via {self.path}: {exc}") from exc

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class ForkServerProcess:
    """The fork server, started in the root namespace (recorded in the manifest)."""

    def __init__(self, sock_dir: str, log_path: Path, manifest, threads: int = 1):
        self.path = os.path.join(sock_dir, "fs.sock")
        self.log = open(log_path, "ab")
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, "-m", "node_agent.forkserver", "--socket", self.path,
                                      "--threads", str(threads)], stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(REPO), env=env)
        manifest.add_process(self.proc.pid, what="headroom fork server", group=True)
        self.conn = ControlConn(self.path, 120.0, alive=lambda: self.proc.poll() is None)

    def call(self, cmd: str, timeout_s: float = 120.0, **args) -> dict:
        if self.proc.poll() is not None:
            raise AgentCallError(f"fork server exited with {self.proc.returncode}")
        return self.conn.call(cmd, timeout_s, **args)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.conn.call("shutdown", 10.0)
            except (AgentCallError, P.CallTimeout, P.RemoteError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.conn.close()
        self.log.close()


@dataclass
class AgentHandle:
    host: str
    pid: int
    start_time: Optional[int]
    conn: ControlConn
    control_path: str


class AgentPoolBase:
    """What every backend's agent pool shares: peers, delays and rates pushed to the agents, pacing,
    parallel calls. A subclass owns how agents start, die and are reached (``spawn``, ``kill``,
    ``dead``, ``close``) and sets ``net``, ``agents``, ``data_port``, ``threads``, ``pacing``,
    ``cpu_emulation``, ``machine`` and ``token`` (the run's data-plane secret, or None)."""

    token: str | None = None

    def start(self, hosts: list[str] | None = None) -> None:
        for h in hosts or [x.name for x in self.net.topology.hosts]:
            self.spawn(h)
        self.configure_all()

    def shutdown_all(self) -> None:
        """Ask every agent to shut down (5 s), then end it the pool's own way (``kill``)."""
        for h in list(self.agents.values()):
            try:
                h.conn.call("shutdown", 5.0)
            except (AgentCallError, P.RemoteError, P.CallTimeout):
                pass
            self.kill(h)
        self.agents.clear()

    def peers(self) -> dict[str, list]:
        return {h: [self.net.host_ip(h), self.data_port] for h in self.agents}

    def delays_to(self, dst: str) -> dict[str, float]:
        return {src: self.net.transport_delay_s(src, dst) for src in self.agents if src != dst}

    def jitters_to(self, dst: str) -> dict[str, list[float]]:
        """Per-hop jitters (seconds) of the path from each peer to ``dst`` that has any (a network
        without transport jitter: none)."""
        jitter = getattr(self.net, "transport_jitter_s", None)
        if jitter is None:
            return {}
        out = {src: list(jitter(src, dst)) for src in self.agents if src != dst}
        return {k: v for k, v in out.items() if v}

    def rates_to(self, dst: str) -> dict[str, float]:
        """Bottleneck rate (bytes/s) of the path from each peer to ``dst``: the receivers' floor for
        serialisation time (HTB lets a lone small packet pass at line rate; a real link does not)."""
        return {src: self.net.path_rate_bytes_per_s(src, dst) for src in self.agents if src != dst}

    def configure_all(self, hosts: list[str] | None = None) -> None:
        """Peers, delays, jitters, rates and pacing to every agent (or ``hosts``: e.g. all but a
        device that is gone)."""
        peers = self.peers()
        secret = {"token": self.token} if self.token else {}
        self.each(lambda h: self.call(h, "configure", 60.0, peers=peers, delays=self.delays_to(h),
                                      jitters=self.jitters_to(h), rates=self.rates_to(h), threads=self.threads,
                                      **secret), hosts)
        self.each(lambda h: self.call(h, "pace", 10.0, clear=True, **self.pacing[h]), hosts)

    def _pacing(self, cores: float) -> dict:
        if self.cpu_emulation == "pace" and self.machine is None:  # no model: nothing to pace
            return {"speed": None}
        return pacing_for(self.cpu_emulation, cores, self.machine)

    def set_cores(self, host: str, cores: float) -> dict:
        """Pace ``host``'s agent as a device of ``cores`` (this machine's cores); its stats back."""
        self.pacing[host] = self._pacing(cores)
        return self.call(host, "pace", 10.0, clear=True, **self.pacing[host])

    def push_delays(self, hosts: list[str] | None = None) -> None:
        """Send every agent (or ``hosts``) the current path delays, jitters and rates (after any link change)."""
        for h in hosts if hosts is not None else list(self.agents):
            self.call(h, "set_delays", 10.0, delays=self.delays_to(h), jitters=self.jitters_to(h), rates=self.rates_to(h))

    def respawn(self, host: str) -> None:
        old = self.agents.pop(host, None)
        if old is not None:
            self.kill(old)
        self.spawn(host)

    def call(self, host: str, cmd: str, timeout_s: float = P.CONTROL_TIMEOUT_S, watchdog=None, **args) -> dict:
        return self.agents[host].conn.call(cmd, timeout_s, watchdog, **args)

    def each(self, fn: Callable[[str], object], hosts: list[str] | None = None) -> dict[str, object]:
        """Run ``fn(host)`` for every host in parallel threads; re-raise the first error."""
        hosts = list(hosts if hosts is not None else self.agents)
        out: dict[str, object] = {}
        errs: list[BaseException] = []

        def run(h):
            try:
                out[h] = fn(h)
            except BaseException as exc:  # collected and re-raised in the caller's thread
                errs.append(exc)
        threads = [threading.Thread(target=run, args=(h,)) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errs:
            raise errs[0]
        return out


class AgentPool(AgentPoolBase):
    """One agent per host of ``net`` (an ``EmulatedNetwork``), all forked by one fork server."""

    def __init__(self, net, manifest, run_dir: Path, model: dict | None, data_port: int = DATA_PORT,
                 threads: int = 1, sock_dir: str | None = None):
        self.net, self.manifest, self.model = net, manifest, model
        self.run_dir, self.data_port, self.threads = Path(run_dir), data_port, threads
        self.log_dir = self.run_dir / "agents"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.sock_dir = sock_dir or tempfile.mkdtemp(prefix="hr-", dir="/tmp")
        manifest.add("socket_dir", path=self.sock_dir)
        self.agents: dict[str, AgentHandle] = {}
        self._spawned = 0
        self.fs = ForkServerProcess(self.sock_dir, self.log_dir / "forkserver.log", manifest, threads)
        self.config: dict | None = None
        self.cpu_emulation = getattr(net, "cpu_emulation", "cfs")
        self.machine: dict | None = None  # this machine's one-core roofline on the model (``pace``)
        if model is not None:
            self.config = self.fs.call("preload", 600.0, model=model)["config"]
            if self.cpu_emulation == "pace":
                self.machine = self._machine_roofline(model)
        # each agent's ``pace`` command (``testbed.emulation.cpu.pacing_for``)
        self.pacing: dict[str, dict] = {h.name: self._pacing(h.cpu_cores) for h in net.topology.hosts}

    def _mem_dir(self, host: str) -> tuple[str | None, str | None]:
        cg = getattr(self.net, "cgroups", None)
        if cg is None or host not in cg.groups:
            return None, None
        g = cg[host]
        return str(g.dirs.get("memory") or g.dirs.get("unified")), g.version

    def spawn(self, host: str) -> AgentHandle:
        self._spawned += 1
        ctl = os.path.join(self.sock_dir, f"{host}.{self._spawned}.sock")
        mem_dir, version = self._mem_dir(host)
        pid = self.fs.call("spawn", 30.0, name=host, netns_pid=self.net.host_pid(host), control_path=ctl,
                           log_path=str(self.log_dir / f"{host}.log"), data_port=self.data_port,
                           mem_dir=mem_dir, mem_version=version, model=self.model)["pid"]
        start = proc_start_time(pid)
        self.manifest.add("process", pid=pid, start_time=start, host=host, what=f"headroom agent {host}")
        if getattr(self.net, "cgroups", None) is not None and host in self.net.cgroups.groups:
            self.net.cgroups[host].add_pid(pid)
        conn = ControlConn(ctl, 30.0, alive=lambda: _alive(pid))
        handle = AgentHandle(host, pid, start, conn, ctl)
        self.agents[host] = handle
        return handle

    def _machine_roofline(self, model: dict) -> dict:
        """This machine's one-core roofline on ``model``, measured by the fork server once per machine
        and model (``testbed.backends.calibrate.cached_machine_roofline``)."""
        from testbed.backends.calibrate import cached_machine_roofline

        return cached_machine_roofline(model["arg"], int(model.get("seed", 0)),
                                       lambda: self.fs.call("roofline", 600.0, model=model)["roofline"])

    def kill(self, handle: AgentHandle) -> None:
        """SIGKILL one agent (through the fork server, its parent, which reaps it), then close."""
        try:
            self.fs.call("kill", 10.0, pid=handle.pid)
        except (AgentCallError, P.RemoteError, P.CallTimeout):
            pass
        handle.conn.close()
        try:
            os.unlink(handle.control_path)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown_all()
        self.fs.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def dead(self) -> dict[str, int]:
        """Hosts whose agent has exited, with its return code (-9 = SIGKILL, e.g. the OOM killer)."""
        gone = {h: a.pid for h, a in self.agents.items() if not _alive(a.pid)}
        if not gone:
            return {}
        try:
            st = self.fs.call("status", 10.0, pids=list(gone.values()))["status"]
        except (AgentCallError, P.RemoteError, P.CallTimeout):
            st = {}
        # None: exiting but not reaped yet -> reported on a later call
        return {h: int(st.get(str(pid), -255)) for h, pid in gone.items() if st.get(str(pid), -255) is not None}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
