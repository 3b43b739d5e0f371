"""The Vagrant fleet: the Vagrantfile validates (where vagrant is installed; from a scratch directory),
and the inventory, topology and experiment its controller writes load as a valid ``backend: ssh``
experiment whose hosts all map to inventory devices."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from fleet_inventory import main as fleet_inventory  # noqa: E402


def test_generated_fleet_files_load(tmp_path):
    from testbed.spec.inventory import load_inventory
    from testbed.spec.loader import load_experiment

    fleet_inventory(["--devices", "4", "--net", "192.168.60", "--key", "/root/k", "--out", str(tmp_path)])
    inv = load_inventory(tmp_path / "inventory.yaml")
    assert [d.address for d in inv.devices] == [f"192.168.60.{i}" for i in (11, 12, 13, 14)]
    assert inv.trust_on_first_use and inv.known_hosts == str(tmp_path / "known_hosts")
    spec = load_experiment(tmp_path / "experiment.yaml")
    assert spec.backend == "ssh" and spec.ssh.inventory == str(tmp_path / "inventory.yaml")
    assert [h.name for h in spec.topology.hosts] == ["d1", "d2", "d3", "d4"]


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant not installed (HEADROOM_VAGRANT=1 setup.sh)")
@pytest.mark.parametrize("devices", ["3", "5"])
def test_vagrantfile_validates(tmp_path, devices):
    shutil.copy(REPO / "Vagrantfile", tmp_path / "Vagrantfile")
    out = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=180, env={**__import__("os").environ, "HEADROOM_DEVICES": devices})
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"d{devices}" in out.stdout and "controller" in out.stdout and "validated successfully" in out.stdout
