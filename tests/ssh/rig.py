"""The SSH test rig: real ``sshd`` instances inside Mininet host namespaces made with the project's
own ``EmulatedNetwork`` (hosts h1..hN are the devices, ``ctl`` is the controller's host), keys
generated per rig, and an inventory that opens the SSH connections from inside ``ctl``'s network
namespace (``connect_netns``) — the root namespace never sends a packet to an emulated address.

Every sshd is started through ``EmulatedNetwork.popen_in_host`` (so its PID is in the rig's journal)
and listens only on its device's emulated address. ``stop`` ends the per-connection sshd children
of OUR sshd PIDs (found by parent PID), the network (which kills the sshd listeners by recorded PID),
removes ``/run/sshd`` if the rig created it, and deletes the keys. (Descendants are found by parent
PID from our recorded sshd PIDs: sshd's per-connection processes are not in its process group.)
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

from testbed.emulation.cleanup import Manifest
from testbed.emulation.network import EmulatedNetwork
from testbed.spec.schema import TopologySpec

SSHD = "/usr/sbin/sshd"
RATES = (50, 20, 10, 20, 20)  # Mbit/s of the devices' links to the switch (the "real" network)

SSHD_CONFIG = """ListenAddress {ip}:22
HostKey {host_key}
PidFile {dir}/sshd.pid
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
LoginGraceTime 15
Subsystem sftp internal-sftp
"""


def rig_topology(n: int) -> TopologySpec:
    hosts = [{"name": "ctl", "mem_limit_mib": 256, "cpu_cores": 1, "source": True}]
    hosts += [{"name": f"h{i + 1}", "mem_limit_mib": 256, "cpu_cores": 1} for i in range(n)]
    links = [{"a": "ctl", "b": "s1", "bandwidth_mbps": 100}]
    links += [{"a": f"h{i + 1}", "b": "s1", "bandwidth_mbps": RATES[i]} for i in range(n)]
    return TopologySpec.model_validate({"name": "sshrig", "hosts": hosts, "switches": ["s1"], "links": links})


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "headroom-test", "-f", str(path)],
                   check=True, capture_output=True)


class SshdRig:
    def __init__(self, tmp: Path, n: int = 3):
        self.tmp, self.n = Path(tmp), n
        self.devices = [f"h{i + 1}" for i in range(n)]
        self.net = EmulatedNetwork(rig_topology(n), f"rig{uuid.uuid4().hex[:6]}", Manifest(self.tmp / "rig.jsonl"),
                                   limits=False)
        self.sshd: dict[str, subprocess.Popen] = {}
        self.made_run_sshd = False
        self.keys = self.tmp / "keys"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "SshdRig":
        try:
            self.net.start()
            self.keys.mkdir(mode=0o700)
            keygen(self.keys / "client")
            keygen(self.keys / "wrong")
            shutil.copy(self.keys / "client.pub", self.keys / "authorized_keys")
            if not Path("/run/sshd").exists():
                os.makedirs("/run/sshd", mode=0o755)
                self.made_run_sshd = True
            for h in self.devices:
                self._start_sshd(h)
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sshd(self, h: str) -> None:
        d = self.keys / h
        d.mkdir()
        keygen(d / "host")
        cfg = d / "sshd_config"
        cfg.write_text(SSHD_CONFIG.format(ip=self.ip(h), host_key=d / "host", dir=d,
                                          authorized=self.keys / "authorized_keys"))
        log = open(d / "sshd.log", "wb")
        self.sshd[h] = self.net.popen_in_host(h, [SSHD, "-D", "-e", "-f", str(cfg)], cgroup=False,
                                              stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def _wait_listening(self) -> None:
        from testbed.backends.ssh.transport import socket_in_netns

        for h in self.devices:
            deadline = time.time() + 20
            while True:
                try:
                    socket_in_netns(self.netns(), self.ip(h), 22, 2.0).close()
                    break
                except OSError:
                    if time.time() > deadline or self.sshd[h].poll() is not None:
                        raise RuntimeError(f"sshd on {h} did not come up: "
                                           f"{(self.keys / h / 'sshd.log').read_text()[-500:]}")
                    time.sleep(0.1)

    def session_children(self, h: str) -> list[int]:
        """PIDs of the per-connection processes of OUR sshd on ``h``: its descendants by parent PID,
        deepest first (snapshotted while the parents live, so none is orphaned before it is found)."""
        children: dict[int, list[int]] = {}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(p.name))
        out, todo = [], [self.sshd[h].pid]
        while todo:
            kids = children.get(todo.pop(), [])
            out += kids
            todo += kids
        return out[::-1]

    def drop_connections(self, h: str) -> list[int]:
        """Kill the SSH sessions to ``h`` (the network connection dies as if cut); the listener stays."""
        pids = self.session_children(h)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def stop(self) -> None:
        for h in list(self.sshd):
            for pid in self.session_children(h):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.net.stop()
        for p in self.sshd.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        shutil.rmtree(self.keys, ignore_errors=True)

    # ------------------------------------------------------------------ what tests use
    def ip(self, h: str) -> str:
        return self.net.host_ip(h)

    def netns(self) -> str:
        return f"/proc/{self.net.host_pid('ctl')}/ns/net"

    def write_known_hosts(self, path: Path, devices=None) -> Path:
        lines = []
        for h in devices if devices is not None else self.devices:
            kind, key = (self.keys / h / "host.pub").read_text().split()[:2]
            lines.append(f"{self.ip(h)} {kind} {key}\n")
        path.write_text("".join(lines))
        return path

    def inventory(self, path: Path, known_hosts: Path | None = None, **overrides) -> Path:
        """An inventory of the rig's devices (``overrides``: per-inventory keys, or ``device_<h>``: a dict
        of per-device keys)."""
        known = known_hosts or self.write_known_hosts(path.parent / "known_hosts")
        devices = []
        for h in self.devices:
            d = {"name": h, "address": self.ip(h), "user": "root", "key_file": str(self.keys / "client"),
                 "interface": f"{h}-eth0", "python": sys.executable}
            d.update(overrides.pop(f"device_{h}", {}))
            devices.append(d)
        inv = {"name": "sshrig", "devices": devices, "known_hosts": str(known), "connect_netns": self.netns(),
               "work_dir": str(self.tmp / "devices"), **overrides}
        (self.tmp / "devices").mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(inv, sort_keys=False))
        return path
