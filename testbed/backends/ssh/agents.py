"""The SSH backend's agent pool: one ``node_agent.remote`` process per device, started over SSH
inside the device's transient cgroup, controlled over its SSH channel (stdin/stdout carry the
control frames). Shares peers, delays, pacing and parallel calls with the emulated pool
(``AgentPoolBase``); owns how agents start, are killed (by PID and start time, through the device
helper) and are found dead (their channel closed). Every agent is journalled the moment its PID
is known. Agents accept data connections only from peers presenting this run's token.
"""
from __future__ import annotations

import json
import secrets
import select
import time

from node_agent import protocol as P
from testbed.backends.emulated.agents import AgentCallError, AgentHandle, AgentPoolBase, ControlConn
from testbed.backends.ssh.helper import helper_json
from testbed.backends.ssh.transport import DeviceError

MODEL_LOAD_TIMEOUT_S = 600.0


class ChannelSock:
    """The socket calls ``ControlConn`` and ``node_agent.wire`` make, on a paramiko channel."""

    def __init__(self, chan):
        self.chan = chan

    def recv_into(self, view, nbytes: int = 0) -> int:
        data = self.chan.recv(nbytes or len(view))
        view[: len(data)] = data
        return len(data)

    def sendall(self, data) -> None:
        self.chan.sendall(bytes(data))

    def settimeout(self, t) -> None:
        self.chan.settimeout(t)

    def fileno(self) -> int:
        return self.chan.fileno()

    def close(self) -> None:
        self.chan.close()


class ChannelConn(ControlConn):
    """``ControlConn`` (request/reply, timeouts, watchdog) over an agent's SSH channel."""

    def __init__(self, chan, label: str):
        import threading

        self.path, self._id, self._lock = label, 0, threading.Lock()
        self.sock = ChannelSock(chan)


def _first_line(chan, timeout_s: float) -> str:
    buf, deadline = b"", time.monotonic() + timeout_s
    while not buf.endswith(b"\n") and len(buf) < 200:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if select.select([chan], [], [], min(left, 0.5))[0]:
            b = chan.recv(1)
            if not b:
                break
            buf += b
    return buf.decode(errors="replace")


class SshAgentPool(AgentPoolBase):
    def __init__(self, fleet, manifest, run_dir, model: dict | None, threads: int = 1):
        self.net, self.manifest, self.model, self.run_dir = fleet, manifest, model, run_dir
        self.data_port, self.threads = fleet.inventory.data_port, threads
        self.agents: dict[str, AgentHandle] = {}
        self.chans: dict[str, object] = {}
        self.cpu_emulation, self.machine = "cfs", None  # real devices are not paced
        self.token = secrets.token_urlsafe(24)  # never written anywhere: sent in configure only
        self.pacing = {h.name: {"speed": None} for h in fleet.topology.hosts}
        self.config: dict | None = None
        self._spawned: dict[str, int] = {}

    def start(self, hosts: list[str] | None = None) -> None:
        """Start every device's agent at once (each loads the model), then configure them."""
        self.each(self.spawn, hosts or [h.name for h in self.net.topology.hosts])
        self.configure_all()

    def _argv(self, host: str, log: str) -> list[str]:
        f, g = self.net, self.net.cgroups[host]
        argv = ["env", f"PYTHONPATH={f.bundle_dir(host)}", f"OMP_NUM_THREADS={self.threads}", f.device_python(host),
                "-m", "node_agent.remote", "--name", host, "--data-host", f.host_ip(host),
                "--data-port", str(self.data_port), "--log", log, "--model", json.dumps(self.model),
                "--threads", str(self.threads), "--mem-dir", g.memory_dir(), "--mem-version", g.version]
        for procs in g.procs_files():
            argv += ["--cgroup-procs", procs]
        return argv

    def spawn(self, host: str) -> AgentHandle:
        self._spawned[host] = self._spawned.get(host, 0) + 1
        log = f"{self.net.log_dir(host)}/agent.{self._spawned[host]}.log"
        chan = self.net.conns[host].start(self._argv(host, log))
        line = _first_line(chan, 60.0).split()
        if len(line) != 3 or line[0] != "headroom-agent":
            err = chan.recv_stderr(8192).decode(errors="replace").strip() if chan.recv_stderr_ready() else ""
            chan.close()
            raise DeviceError(f"device {host}: the agent did not start: "
                              f"{(err.splitlines() or ['no output'])[-1]} (log {log})")
        pid, start = int(line[1]), int(line[2])
        self.manifest.add("remote", what="process", device=host, pid=pid, start_time=start, label=f"agent {host}")
        handle = AgentHandle(host, pid, start, ChannelConn(chan, f"ssh:{host}"), log)
        self.agents[host], self.chans[host] = handle, chan
        try:  # the agent loads the model before it answers
            reply = handle.conn.call("ping", MODEL_LOAD_TIMEOUT_S, self._watch(host))
        except (AgentCallError, P.CallTimeout) as exc:
            raise DeviceError(f"device {host}: the agent died while starting ({exc}); if it was OOM-killed, "
                              f"raise mem_limit_mib (log {log})") from None
        self.config = self.config or reply.get("config")
        return handle

    def _watch(self, host: str):
        def check():
            if self.chans[host].exit_status_ready():
                raise AgentCallError(f"agent on {host} exited ({self.chans[host].recv_exit_status()})")
        return check

    def kill(self, handle: AgentHandle) -> None:
        conn = self.net.conns.get(handle.host)
        handle.conn.close()
        if conn is not None and conn.alive():
            try:
                helper_json(conn, self.net.device_python(handle.host),
                              ["kill", "--pid", str(handle.pid), "--start-time", str(handle.start_time)])
            except DeviceError:
                pass

    def dead(self) -> dict[str, int]:
        """Devices whose agent's channel has closed, with its exit status (-9: killed by a signal)."""
        out = {}
        for h, chan in self.chans.items():
            if h in self.agents and (chan.exit_status_ready() or chan.closed):
                rc = chan.recv_exit_status() if chan.exit_status_ready() else -255
                out[h] = -9 if rc == -1 else rc
        return out

    def close(self) -> None:
        self.shutdown_all()
        self.chans.clear()
