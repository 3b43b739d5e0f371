"""Removing what an SSH run created on its devices: exactly the ``remote`` entries of the run's
resource journal (agents by PID and start time, root and ingress qdiscs, IFB devices, GRO turned
off, cgroups, the per-run directory), over SSH, in dependency order — by ``SshFleet.stop`` and,
after an interrupted run, by ``headroom clean RUN_DIR`` (which reconnects with the inventory the
journal recorded). Also collects agent logs.
"""
from __future__ import annotations

import stat
from pathlib import Path

from testbed.backends.ssh.helper import helper_json
from testbed.backends.ssh.transport import DeviceError

ORDER = ("process", "qdisc", "ifb", "gro", "cgroup", "dir")


def _remove(conn, python: str, e: dict) -> str | None:
    what, dev = e["what"], e["device"]
    if what == "process":
        if helper_json(conn, python, ["kill", "--pid", str(e["pid"]), "--start-time", str(e["start_time"])])["killed"]:
            return f"{dev}: killed process {e['pid']} ({e.get('label', 'agent')})"
        return None
    if what == "qdisc":
        r = conn.run(["tc", "qdisc", "del", "dev", e["dev"], e.get("parent", "root")], check=False)
        return f"{dev}: deleted {e.get('parent', 'root')} qdisc of {e['dev']}" if r.rc == 0 else None
    if what == "ifb":  # ours by its name (run and device hashed in); deleting it drops its qdiscs
        if "ifb" not in conn.run(["ip", "-d", "link", "show", "dev", e["dev"]], check=False).out:
            return None
        conn.run(["ip", "link", "del", "dev", e["dev"]])
        return f"{dev}: deleted IFB device {e['dev']}"
    if what == "gro":  # recorded only where it was on before the run turned it off
        conn.run(["ethtool", "-K", e["dev"], "gro", "on"])
        return f"{dev}: turned GRO back on for {e['dev']}"
    if what == "cgroup":
        gone = helper_json(conn, python, ["rmcg", e["path"]])["removed"]
        return f"{dev}: removed cgroup {e['path']}" if gone else None
    if what == "dir":
        if conn.run(["test", "-d", e["path"]], check=False).rc != 0:
            return None
        conn.run(["rm", "-rf", "--", e["path"]])
        return f"{dev}: removed directory {e['path']}"
    raise DeviceError(f"device {dev}: unknown remote resource {what!r}")


def remove_entries(entries: list[dict], conn_for, inventory) -> list[str]:
    """Remove ``entries`` (latest first within each kind); ``conn_for(device)`` gives a connection
    or None. Returns one line per removal, ``FAILED: ...`` lines for what could not be removed."""
    out: list[str] = []
    for what in ORDER:
        for e in reversed([e for e in entries if e.get("what") == what]):
            conn = conn_for(e["device"])
            if conn is None or not conn.alive():
                out.append(f"FAILED: {e['device']}: no SSH connection to remove {what} {e.get('path') or e.get('pid')}")
                continue
            try:
                line = _remove(conn, inventory.python_for(e["device"]) if inventory else "python3", e)
            except (DeviceError, OSError, KeyError) as exc:
                out.append(f"FAILED: {e['device']}: {what}: {exc}")
                continue
            if line:
                out.append(line)
    return out


def cleanup_remote(entries: list[dict]) -> list[str]:
    """``headroom clean``: reconnect to the devices the journal names (with its recorded inventory,
    host keys verified as in the run) and remove their ``remote`` entries."""
    remote = [e for e in entries if e.get("kind") == "remote"]
    if not remote:
        return []
    from testbed.backends.ssh.transport import SshConnection
    from testbed.spec.inventory import InventorySpec

    inv_entries = [e["value"] for e in entries if e.get("kind") == "meta" and e.get("key") == "ssh_inventory"]
    if not inv_entries:
        return ["FAILED: remote resources recorded but no ssh_inventory in the journal"]
    inventory = InventorySpec.model_validate(inv_entries[-1])
    conns, out = {}, []
    for dev in sorted({e["device"] for e in remote}):
        try:
            conns[dev] = SshConnection(inventory.device(dev), inventory)
        except DeviceError as exc:
            out.append(f"FAILED: {exc}")
    try:
        out += remove_entries(remote, conns.get, inventory)
    finally:
        for c in conns.values():
            c.close()
    return out


def collect_logs(fleet, dest: Path) -> None:
    """Copy every file of each device's log directory to ``dest/<device>/`` (best effort: a device
    whose connection is gone is skipped and said so in ``dest/<device>.missing``)."""
    for h, conn in fleet.conns.items():
        if h not in fleet.remote_dir:
            continue
        target = dest / h
        target.mkdir(parents=True, exist_ok=True)
        try:
            with conn.client.open_sftp() as sftp:
                for a in sftp.listdir_attr(fleet.log_dir(h)):
                    if stat.S_ISREG(a.st_mode or 0):
                        sftp.get(f"{fleet.log_dir(h)}/{a.filename}", str(target / a.filename))
        except Exception as exc:  # paramiko raises several kinds; a log is never worth failing the tear-down
            (dest / f"{h}.missing").write_text(f"logs not collected: {exc}\n")
