"""Sweep expansion: an experiment's ``sweep`` (dotted paths into the experiment, each with a list of
values) as the cartesian product of points, each point the experiment's data with those values set.

A key joining several paths with ``+`` (``topology.profiles+topology.source_profile``) moves them
together: each of its values is a list with one value per path (a zipped axis, e.g. a device mix
and its source, or a scenario and its repetitions). A path must name something the experiment has
(a field of the spec, a list index in range); ``SweepError`` says which does not.
"""
from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Iterator

from testbed.core.errors import ConfigError
from testbed.spec.schema import ExperimentSpec


class SweepError(ConfigError, ValueError):
    """A sweep axis names no field of the experiment, or a zipped value has the wrong length."""

    def __init__(self, axis: str, message: str):
        super().__init__(f"sweep.{axis}: {message}")
        self.axis, self.message = axis, message


def points_data(spec: ExperimentSpec, exp_path: Path) -> Iterator[tuple[dict, dict]]:
    """(point, data) per sweep point: ``point`` maps each axis to its value, ``data`` is the
    experiment's plain data with them set (not validated; a generated topology is a generated
    ``TopologySpec``, shared by the points with the same parameters). No sweep: one point, ``{}``."""
    base = spec.model_dump(mode="json")  # lists, not tuples: a path may index into them
    base.pop("sweep")
    if not spec.sweep:
        yield {}, base
        return
    topology = base.pop("topology")
    generated: dict[str, object] = {}
    keys = list(spec.sweep)
    for values in itertools.product(*(spec.sweep[k] for k in keys)):
        data = copy.deepcopy(base)
        data["topology"] = topology  # copied only when a path changes it (set_path)
        point = dict(zip(keys, values))
        regenerate = None
        for key, value in point.items():
            for path, one in zipped(key, value):
                if path.startswith("topology.") and data.get("topology_generated"):
                    regenerate = regenerate or key
                set_path(data, path, one, exp_path, key, topology)
        if regenerate:
            data["topology"] = _generated(data["topology_generated"], generated, regenerate)
        yield point, data


def _generated(params: dict, cache: dict, axis: str):
    """The generated topology of ``params`` (one per distinct parameter set)."""
    import json

    from pydantic import ValidationError

    from testbed.spec.schema import GeneratedTopology
    from testbed.spec.topogen import generate

    key = json.dumps(params, sort_keys=True)
    if key not in cache:
        try:
            cache[key] = generate(GeneratedTopology.model_validate(params))
        except ValidationError as exc:
            raise SweepError(axis, "; ".join(f"topology.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                             for e in exc.errors())) from None
        except (KeyError, ValueError) as exc:
            raise SweepError(axis, f"topology: {str(exc).strip(chr(34))}") from None
    return cache[key]


def zipped(key: str, value) -> list[tuple[str, object]]:
    """(path, value) pairs of one sweep value: one pair, or one per ``+``-joined path."""
    paths = key.split("+")
    if len(paths) == 1:
        return [(key, value)]
    if not isinstance(value, (list, tuple)) or len(value) != len(paths):
        raise SweepError(key, f"each value must be a list of {len(paths)} (one per path), got {value!r}")
    return list(zip(paths, value))


def set_path(data: dict, dotted: str, value, exp_path: Path, axis: str | None = None, shared=None) -> None:
    """Set ``dotted`` in the experiment's data: a topology file path is loaded; a generated
    topology's parameter is set in ``topology_generated`` (``points_data`` generates it again);
    ``shared`` (the base topology, not to be changed in place) is copied before a path changes it."""
    axis = axis or dotted
    if dotted == "topology" and isinstance(value, str):
        from testbed.spec.loader import load_topology

        value = load_topology((exp_path.parent / value).resolve()).model_dump(mode="json")
    if dotted.startswith("topology.") and data.get("topology_generated"):
        from testbed.spec.schema import GeneratedTopology

        field = dotted.split(".", 1)[1]
        if field not in GeneratedTopology.model_fields:
            raise SweepError(axis, f"no such parameter of a generated topology: {field!r}")
        data["topology_generated"][field] = value
        return
    if dotted.startswith("topology.") and shared is not None and data["topology"] is shared:
        data["topology"] = copy.deepcopy(shared)
    node = data
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SweepError(axis, f"no such index {part!r} in {'.'.join(parts[:i]) or 'the experiment'} "
                                 f"(a list of {len(node)})")
            key = int(part)
        elif isinstance(node, dict):
            if part not in node and (i == 0 or not last):
                raise SweepError(axis, f"no such field {'.'.join(parts[:i + 1])!r} in the experiment")
            key = part
        else:
            raise SweepError(axis, f"no such field {'.'.join(parts[:i + 1])!r}: {'.'.join(parts[:i])} is a value")
        if last:
            node[key] = value
        else:
            node = node[key]
