"""Write an SSH-backend inventory for a fleet of devices on one private network (the Vagrant fleet),
with a matching star topology and a small experiment that runs on it:

    python scripts/fleet_inventory.py --devices 3 --net 192.168.56 --key KEY --out DIR

Devices d1..dN at NET.11, NET.12, ... (user root, the data interface ``--interface``, default eth1:
Vagrant's private network on Debian boxes; the device check says so if it is wrong). Host keys are
trusted on first use and recorded (``known_hosts`` in DIR). The topology's links describe the
private network (``--link-mbps``) and are not shaped unless ``--shape`` is given.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def fleet_files(devices: int, net: str, key: str, python: str, interface: str, link_mbps: float,
                shape: bool, mem_limit_mib: float) -> dict[str, dict]:
    names = [f"d{i + 1}" for i in range(devices)]
    inventory = {"name": "vagrant-fleet", "known_hosts": "known_hosts", "trust_on_first_use": True,
                 "python": python,
                 "devices": [{"name": n, "address": f"{net}.{11 + i}", "user": "root", "key_file": key,
                              "interface": interface} for i, n in enumerate(names)]}
    topology = {"name": f"fleet{devices}", "switches": ["s1"],
                "hosts": [{"name": n, "mem_limit_mib": mem_limit_mib, "cpu_cores": 1, "source": i == 0}
                          for i, n in enumerate(names)],
                "links": [{"a": n, "b": "s1", "bandwidth_mbps": link_mbps, **({"shape": True} if shape else {})}
                          for n in names]}
    experiment = {"name": f"fleet{devices}-smollm2", "topology": "topology.yaml", "model": {"name": "smollm2-135m"},
                  "workload": {"prompt_tokens": 16, "new_tokens": 32, "seed": 0},
                  "algorithms": ["resource_aware", "edgeshard", "galaxy"], "repartition_every_tokens": 8,
                  "backend": "ssh", "ssh": {"inventory": "inventory.yaml"}}
    return {"inventory.yaml": inventory, "topology.yaml": topology, "experiment.yaml": experiment}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--net", default="192.168.56")
    ap.add_argument("--key", required=True)
    ap.add_argument("--python", default="/headroom/.venv/bin/python")
    ap.add_argument("--interface", default="eth1")
    ap.add_argument("--link-mbps", type=float, default=1000.0)
    ap.add_argument("--mem-limit-mib", type=float, default=2048.0)
    ap.add_argument("--shape", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, data in fleet_files(a.devices, a.net, a.key, a.python, a.interface, a.link_mbps, a.shape,
                                  a.mem_limit_mib).items():
        (a.out / name).write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"wrote {', '.join(sorted(fleet_files(1, '', '', '', '', 1, False, 1)))} to {a.out}")


if __name__ == "__main__":
    main()
