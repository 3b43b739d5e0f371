"""Load topology and experiment YAML into frozen specs; report every problem as FILE:LINE: field: message.

The text is read and composed into a checked node tree by ``testbed.spec.yamltext`` (encoding,
syntax, duplicate keys, tags, aliases), so that each pydantic error location can be mapped back to
the line it came from; a validator's message that starts with ``path: `` is placed at that path.
Then ``testbed.spec.checks`` looks beyond single fields (routing, the model and its positions,
scenario timing, placement, traces, references), and every sweep point is validated as an
experiment of its own, its problems reported at the sweep axis that made it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from testbed.core.errors import ConfigError
from testbed.spec import checks
from testbed.spec.schema import ExperimentSpec, TopologySpec
from testbed.spec.yamltext import ConfigProblem, Where, compose, field_name, line_of, to_python

__all__ = ["ConfigProblem", "load_any", "load_experiment", "load_topology"]

_SCENARIO_TAGS = ("event", "ramp", "random_walk", "trace")
MAX_SWEEP_PROBLEMS = 20


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch markers (class, type or scenario-kind tags) from an error location."""
    out: list = []
    for i, k in enumerate(loc):
        if isinstance(k, int):
            out.append(k)
        elif k[:1].isupper() or k in ("str", "int", "float") or k.startswith("function-") or "[" in k:
            continue
        elif k in _SCENARIO_TAGS and i >= 2 and loc[i - 2] == "scenario" and isinstance(loc[i - 1], int):
            continue
        else:
            out.append(k)
    return tuple(out)


def _problems_from(exc: ValidationError, where: Where) -> list[ConfigProblem]:
    """One problem per distinct error; a custom validator's ``path: message`` goes to that path."""
    problems, seen = [], set()
    errors = exc.errors()
    locs = [_clean_loc(tuple(e["loc"])) for e in errors]
    for err, loc in zip(errors, locs):
        if "at least 1 item" in err["msg"] and any(len(o) > len(loc) and o[:len(loc)] == loc for o in locs):
            continue  # a list whose every item failed: the items' errors say why
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif isinstance(err.get("input"), int) and abs(err["input"]) > 1e300:
            msg = f"number out of range ({len(str(abs(err['input'])))} digits)"
        problem = where.at(loc, msg, parse=err["type"] == "value_error")
        if (problem.line, problem.field, problem.message) not in seen:
            seen.add((problem.line, problem.field, problem.message))
            problems.append(problem)
    return problems


def _dedupe(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    out, seen = [], set()
    for p in problems:
        if (p.file, p.line, p.field) not in seen:
            seen.add((p.file, p.line, p.field))
            out.append(p)
    return out


def load_topology(path: str | Path) -> TopologySpec:
    path = Path(path)
    root = compose(path)
    return _validate_topology(to_python(root), Where(str(path), root))


def _validate_topology(data: Any, where: Where) -> TopologySpec:
    try:
        topo = TopologySpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_dedupe(_problems_from(exc, where) + _dangling_links(data, where))) from None
    problems = checks.topology_problems(topo, where)
    if problems:
        raise ConfigError(problems)
    return topo


def _dangling_links(data: Any, where: Where) -> list[ConfigProblem]:
    """Links naming unknown nodes, found on the raw data (so they show next to field errors)."""
    if not isinstance(data, dict) or not isinstance(data.get("links"), list):
        return []
    known = {h.get("name") for h in data.get("hosts") or [] if isinstance(h, dict)}
    known.update(s for s in data.get("switches") or [] if isinstance(s, str))
    problems = []
    for i, link in enumerate(data["links"]):
        for end in ("a", "b"):
            node = link.get(end) if isinstance(link, dict) else None
            if isinstance(node, str) and node not in known:
                problems.append(where.at(("links", i, end),
                                         f"unknown node {node!r} (known: {sorted(n for n in known if n)})"))
    return problems


def load_experiment(path: str | Path) -> ExperimentSpec:
    """Load, resolve the topology (path relative to the file, or inline), cross-check, and
    validate every sweep point."""
    path = Path(path)
    root = compose(path)
    data = to_python(root)
    where = Where(str(path), root)
    problems = _resolve_topology(data, path, where)
    if isinstance(data, dict):
        problems += _resolve_inventory(data, path, where)
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        problems.extend(p for p in _problems_from(exc, where) if not
                        (p.field.startswith("topology") and data.get("topology") is None and problems))
        spec = None
    problems += checks.reference_problems(data, data.get("topology"), where, path.parent)
    if spec is not None:
        problems += checks.experiment_problems(spec, where, path.parent)
        if not problems and spec.sweep:
            problems += _sweep_problems(spec, path, where)
    problems = _dedupe(problems)
    if problems or spec is None:
        raise ConfigError(sorted(problems, key=lambda p: (p.file != str(path), p.line)))
    return spec


def _resolve_inventory(data: dict, path: Path, where: Where) -> list[ConfigProblem]:
    """``ssh.inventory``: made absolute, loaded (its own problems), every topology host mapped to a
    device; ``backend: ssh`` without one is a problem."""
    from testbed.spec.inventory import check_hosts_mapped, load_inventory

    ssh = data.get("ssh")
    inv = ssh.get("inventory") if isinstance(ssh, dict) else None
    if not isinstance(inv, str):
        if data.get("backend") == "ssh" and not isinstance(ssh, dict):
            return [where.at(("backend",), "backend: ssh needs ssh: {inventory: FILE}")]
        return []
    inv_path = (path.parent / inv).resolve()
    data["ssh"] = {**ssh, "inventory": str(inv_path)}
    if not inv_path.exists():
        return [where.at(("ssh", "inventory"), f"file not found: {inv_path}")]
    try:
        inventory = load_inventory(inv_path)
    except ConfigError as exc:
        return list(exc.problems)
    topo = data.get("topology")
    return [where.at(("ssh", "inventory"), msg)
            for msg in (check_hosts_mapped(topo, inventory) if isinstance(topo, TopologySpec) else [])]


def _resolve_topology(data: dict, path: Path, where: Where) -> list[ConfigProblem]:
    """Replace ``topology:`` (a file, an inline mapping, or ``{generate: ...}``) by its spec."""
    topo = data.get("topology")
    if isinstance(topo, dict) and "generate" in topo:
        return _generate_topology(data, where)
    if isinstance(topo, dict):
        try:
            data["topology"] = _validate_topology(topo, where.deeper(("topology",)))
        except ConfigError as exc:
            data["topology"] = None
            return list(exc.problems)
    elif isinstance(topo, str):
        topo_path = (path.parent / topo).resolve()
        if not topo_path.exists():
            data["topology"] = None
            return [where.at(("topology",), f"file not found: {topo_path}")]
        try:
            data["topology"] = load_topology(topo_path)
        except ConfigError as exc:
            data["topology"] = None
            return list(exc.problems)
    return []


def _generate_topology(data: dict, where: Where) -> list[ConfigProblem]:
    """Replace ``topology: {generate: ...}`` by the generated spec, keeping the parameters."""
    from testbed.spec.schema import GeneratedTopology
    from testbed.spec.topogen import generate

    try:
        params = GeneratedTopology.model_validate(data["topology"])
        data["topology"] = generate(params)
        data["topology_generated"] = params
        return []
    except ValidationError as exc:
        data["topology"] = None
        return _problems_from(exc, where.deeper(("topology",)))
    except (KeyError, ValueError) as exc:
        data["topology"] = None
        return [where.at(("topology",), str(exc).strip('"'))]


def _sweep_problems(spec: ExperimentSpec, path: Path, where: Where) -> list[ConfigProblem]:
    """Each sweep point validated as an experiment; a problem is reported once, at the axis that
    set the field it is about (or the only axis), with the first point that shows it."""
    from testbed.spec.sweep import SweepError, points_data

    problems: list[ConfigProblem] = []
    seen: set = set()
    axes = list(spec.sweep or {})
    points = points_data(spec, path)
    topo_seen: dict[int, list] = {}
    while len(problems) < MAX_SWEEP_PROBLEMS:
        try:
            point, data = next(points)
        except StopIteration:
            break
        except (SweepError, ConfigError) as exc:
            axis = getattr(exc, "axis", axes[0])
            msg = getattr(exc, "message", None) or "; ".join(str(p) for p in exc.problems)
            return problems + [where.at(("sweep", axis), msg)]
        for field, message in _point_problems(data, path, topo_seen):
            axis = _axis_of(field, axes)
            key = (axis, field, message)
            if key not in seen:
                seen.add(key)
                problems.append(where.at(("sweep", axis) if axis else ("sweep",),
                                         f"point {point}: {field}: {message}"))
    return problems


def _point_problems(data: dict, path: Path, topo_seen: dict) -> list[tuple[str, str]]:
    """(field, message) of one sweep point's experiment (no lines: the point has no text);
    ``topo_seen`` keeps each topology object's problems (generated ones are shared by points)."""
    here = Where(str(path), None)
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        return [(p.field, p.message) for p in _problems_from(exc, here)]
    problems = checks.experiment_problems(spec, here, path.parent)
    if isinstance(spec.topology, TopologySpec):
        if id(data["topology"]) not in topo_seen:
            topo_seen[id(data["topology"])] = (data["topology"], checks.topology_problems(spec.topology,
                                                                                        here.deeper(("topology",))))
        problems += topo_seen[id(data["topology"])][1]
    return [(p.field, p.message) for p in problems]


def _axis_of(field: str, axes: list[str]) -> str | None:
    """The sweep axis whose path is, or contains, ``field``; the only axis when there is one."""
    for axis in axes:
        for p in axis.split("+"):
            dotted = field.replace("[", ".").replace("]", "")
            if dotted == p or dotted.startswith(p + ".") or p.startswith(dotted + "."):
                return axis
    return axes[0] if len(axes) == 1 else None


def load_any(path: str | Path):
    """Topology, experiment or SSH inventory, told apart by their keys (``algorithms``/``model``: an
    experiment; ``devices``: an inventory)."""
    root = compose(Path(path))
    keys = {k.value for k, _ in root.value}
    if "devices" in keys:
        from testbed.spec.inventory import load_inventory

        return load_inventory(path)
    return load_experiment(path) if "algorithms" in keys or "model" in keys else load_topology(path)
