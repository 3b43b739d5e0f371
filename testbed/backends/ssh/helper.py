"""Running the device helper (``testbed.backends.ssh.device``) on a device from the orchestrator:
piped to the device's Python as one program, so that it works before the bundle is pushed (the
bring-up check) and after it is gone (``headroom clean``). The helper imports one project module,
``testbed.core.cgroupfs`` (standard library only); the program carries its source and registers it
in ``sys.modules`` before running the helper as ``__main__``.
"""
from __future__ import annotations

import json
from pathlib import Path

from testbed.backends.ssh.transport import DeviceError, Result

HELPER = Path(__file__).with_name("device.py")
INLINED = {"testbed.core.cgroupfs": Path(__file__).resolve().parents[2] / "core" / "cgroupfs.py"}


def helper_program() -> str:
    """Python source for ``python - COMMAND ...``: the inlined modules, then the helper."""
    lines = ["import sys, types"]
    for name, path in INLINED.items():
        lines.append(f"_m = types.ModuleType({name!r}); sys.modules[{name!r}] = _m; "
                     f"exec(compile({path.read_text()!r}, {str(path.name)!r}, 'exec'), _m.__dict__)")
    lines.append(f"exec(compile({HELPER.read_text()!r}, 'device.py', 'exec'), {{'__name__': '__main__'}})")
    return "\n".join(lines) + "\n"


def run_helper(conn, python: str, args: list[str]) -> Result:
    """The helper's ``args`` on ``conn``'s device with ``python``; the result unchecked."""
    return conn.run([python, "-", *args], input=helper_program(), check=False)


def helper_json(conn, python: str, args: list[str]) -> dict:
    """The helper's JSON answer; ``DeviceError`` naming the device when it failed."""
    r = run_helper(conn, python, args)
    if r.rc != 0:
        raise DeviceError(f"device {conn.name}: {' '.join(args[:1])} failed: {(r.err.strip().splitlines() or ['?'])[-1]}")
    return json.loads(r.out.strip().splitlines()[-1])
