"""SSH connections to the devices of an inventory (paramiko): host-key policy, authentication,
commands as argv lists (quoted here, executed, return codes checked), long-lived channels for the
agents, file transfer. Every failure to connect becomes a one-line ``DeviceError`` naming the device
and what to do.

Host keys are verified against the inventory's ``known_hosts``; an unknown host is refused unless
``trust_on_first_use`` is set, in which case its key is added to that file and its fingerprint
recorded (``SshConnection.fingerprint``). Passwords are never used; keys are named by path only.

``connect_netns``: the TCP socket is created by a helper thread that first joins that network
namespace (``setns`` affects the calling thread only), so an orchestrator in the root namespace can
reach devices that live in emulated namespaces without sending a packet from the root namespace.
"""
from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import paramiko

from testbed.core.errors import BackendError

CLONE_NEWNET = 0x40000000


class DeviceError(BackendError):
    """A device cannot be used as asked (unreachable, refused, missing a tool, too small)."""


class DeviceRefused(DeviceError):
    """Found by the bring-up checks, before anything was created on any device: the inventory or
    topology does not fit the devices (bad input; ``headroom run`` exits 2)."""


@dataclass
class Result:
    argv: list[str]
    rc: int
    out: str
    err: str


def fingerprint(key) -> str:
    """OpenSSH-style SHA256 fingerprint of a paramiko public key."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


def socket_in_netns(netns_path: str, address: str, port: int, timeout_s: float) -> socket.socket:
    """A TCP socket connected to ``address:port`` from inside the network namespace ``netns_path``."""
    box: dict = {}

    def work():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns_path}: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
            box["sock"] = socket.create_connection((address, port), timeout=timeout_s)
        except BaseException as exc:  # handed to the caller's thread
            box["exc"] = exc
    t = threading.Thread(target=work, name="netns-connect", daemon=True)
    t.start()
    t.join()
    if "exc" in box:
        raise box["exc"]
    return box["sock"]


class SshConnection:
    """One device's SSH connection (thread-safe: paramiko multiplexes channels on one transport)."""

    def __init__(self, device, inventory):
        self.device, self.name = device, device.name
        self.fingerprint: Optional[str] = None
        self.trusted_on_first_use = False
        self.where = f"device {device.name} ({device.user}@{device.address}:{device.port})"
        try:
            sock = (socket_in_netns(inventory.connect_netns, device.address, device.port, inventory.connect_timeout_s)
                    if inventory.connect_netns else
                    socket.create_connection((device.address, device.port), timeout=inventory.connect_timeout_s))
        except OSError as exc:
            raise DeviceError(f"{self.where}: unreachable ({exc.strerror or exc}): check address, port and that "
                              "sshd runs there") from None
        self.client = paramiko.SSHClient()
        known = Path(inventory.known_hosts).expanduser()
        if known.exists():
            self.client.load_host_keys(str(known))
        self.client.set_missing_host_key_policy(_Policy(self, known, inventory.trust_on_first_use, self.where))
        try:
            self.client.connect(device.address, device.port, username=device.user, key_filename=device.key_file,
                                allow_agent=device.agent, look_for_keys=False, sock=sock,
                                timeout=inventory.connect_timeout_s, banner_timeout=inventory.connect_timeout_s,
                                auth_timeout=inventory.connect_timeout_s)
        except Exception as exc:  # every way of failing becomes one line naming the device
            self.client.close()
            sock.close()
            raise self._refused(exc, known) from None
        key = self.client.get_transport().get_remote_server_key()
        self.fingerprint = self.fingerprint or fingerprint(key)

    def _refused(self, exc: Exception, known: Path) -> Exception:
        """The one-line ``DeviceError`` for a failed SSH handshake (what happened, what to do)."""
        if isinstance(exc, DeviceError):  # from the host-key policy
            return exc
        if isinstance(exc, paramiko.BadHostKeyException):
            return DeviceError(f"{self.where}: host key CHANGED (got {fingerprint(exc.key)}, known_hosts has "
                               f"{fingerprint(exc.expected_key)}): verify the device, then fix {known}")
        if isinstance(exc, paramiko.AuthenticationException):
            what = f"key {self.device.key_file}" if self.device.key_file else "the ssh-agent's keys"
            return DeviceError(f"{self.where}: authentication failed with {what}: put its public key in the "
                               "device's authorized_keys or fix key_file")
        if isinstance(exc, (paramiko.SSHException, OSError)):
            return DeviceError(f"{self.where}: SSH failed ({exc}): check that sshd answers on that port")
        return exc

    # ------------------------------------------------------------------ commands
    def run(self, argv: Sequence[str], timeout_s: float = 60.0, check: bool = True, input: str | None = None) -> Result:
        """Run ``argv`` on the device (quoted for its shell); ``DeviceError`` on a non-zero exit when ``check``."""
        argv = [str(a) for a in argv]
        chan = self._session(timeout_s)
        try:
            chan.exec_command(shlex.join(argv))
            if input is not None:
                chan.sendall(input.encode())
            chan.shutdown_write()
        except (paramiko.SSHException, OSError) as exc:
            raise DeviceError(f"device {self.name}: SSH connection lost ({exc})") from None
        out, err = _drain(chan, timeout_s, argv)
        rc = chan.recv_exit_status()
        chan.close()
        res = Result(argv, rc, out, err)
        if check and rc != 0:
            raise DeviceError(f"device {self.name}: `{shlex.join(argv)[:120]}` exited {rc}: "
                              f"{(err or out).strip().splitlines()[-1:] or ['(no output)']}")
        return res

    def start(self, argv: Sequence[str]):
        """Start ``argv`` on a channel that stays open (its stdin/stdout are the caller's stream)."""
        chan = self._session(None)
        try:
            chan.exec_command(shlex.join([str(a) for a in argv]))
        except (paramiko.SSHException, OSError) as exc:
            raise DeviceError(f"device {self.name}: SSH connection lost ({exc})") from None
        return chan

    def _session(self, timeout_s: float | None):
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise DeviceError(f"device {self.name}: SSH connection lost")
        try:
            chan = transport.open_session(timeout=30.0)
        except (paramiko.SSHException, OSError) as exc:
            raise DeviceError(f"device {self.name}: SSH connection lost ({exc})") from None
        chan.settimeout(timeout_s)
        return chan

    def put(self, local: Path, remote: str) -> None:
        with self.client.open_sftp() as sftp:
            sftp.put(str(local), remote)

    def get(self, remote: str, local: Path) -> None:
        with self.client.open_sftp() as sftp:
            sftp.get(remote, str(local))

    def alive(self) -> bool:
        t = self.client.get_transport()
        return t is not None and t.is_active()

    def close(self) -> None:
        self.client.close()


def _drain(chan, timeout_s: float, argv: list[str]) -> tuple[str, str]:
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout_s
    while True:
        if chan.recv_ready():
            out += chan.recv(65536)
        elif chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        elif chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
            break
        elif time.monotonic() > deadline:
            chan.close()
            raise DeviceError(f"`{shlex.join(argv)[:120]}` did not finish within {timeout_s:.0f} s")
        else:
            time.sleep(0.002)
    return out.decode(errors="replace"), err.decode(errors="replace")


class _Policy(paramiko.MissingHostKeyPolicy):
    """Unknown host key: refuse (one line, with the fingerprint), or trust on first use and record it."""

    def __init__(self, conn: SshConnection, known: Path, tofu: bool, where: str):
        self.conn, self.known, self.tofu, self.where = conn, known, tofu, where

    def missing_host_key(self, client, hostname, key) -> None:
        fp = fingerprint(key)
        if not self.tofu:
            raise DeviceError(f"{self.where}: unknown host key {fp}: add it to {self.known} (e.g. ssh-keyscan "
                              "-p PORT ADDRESS >> known_hosts) or set trust_on_first_use: true")
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known.parent.mkdir(parents=True, exist_ok=True)
        client.save_host_keys(str(self.known))
        self.conn.fingerprint, self.conn.trusted_on_first_use = fp, True
