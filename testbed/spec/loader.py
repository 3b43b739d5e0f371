"""Load topology and experiment YAML into frozen specs; report every problem as FILE:LINE: field: message.

YAML is composed into a node tree first so that each pydantic error location can be mapped back
to the line it came from. Cross-file checks (scenario events naming hosts and links of the
topology) happen here too, since only here both files are known.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from testbed.partition import registry
from testbed.spec.schema import ExperimentSpec, TopologySpec
from testbed.core.errors import ConfigError


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"



def _to_python(node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return {_to_python(k): _to_python(v) for k, v in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v) for v in node.value]
    return yaml.safe_load(yaml.serialize(node)) if node.tag != "tag:yaml.org,2002:str" else node.value


def _line_of(node: yaml.Node | None, loc: tuple) -> int:
    """1-based line of the deepest node reachable along ``loc``."""
    line = node.start_mark.line + 1 if node is not None else 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == key), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _compose(path: Path) -> yaml.Node:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(path), 1, "<file>", f"cannot read: {exc.strerror}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ConfigError([ConfigProblem(str(path), line, "<yaml>", f"syntax error: {getattr(exc, 'problem', exc)}")]) from None
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError([ConfigProblem(str(path), 1, "<root>", "expected a mapping at the top level")])
    return node


def _field_name(loc: tuple) -> str:
    parts: list[str] = []
    for key in loc:
        if isinstance(key, int):
            parts.append(f"[{key}]")
        elif key in ("TopologySpec", "AlgorithmSpec", "str", "function-after[_check_references(), TopologySpec]"):
            continue
        else:
            parts.append(("." if parts else "") + str(key))
    return "".join(parts) or "<root>"


_SCENARIO_TAGS = ("event", "ramp", "random_walk", "trace")


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch markers (class, type or scenario-kind tags) from an error location."""
    out: list = []
    for i, k in enumerate(loc):
        if isinstance(k, int):
            out.append(k)
        elif k[:1].isupper() or k == "str" or k.startswith("function-"):
            continue
        elif k in _SCENARIO_TAGS and i >= 2 and loc[i - 2] == "scenario" and isinstance(loc[i - 1], int):
            continue
        else:
            out.append(k)
    return tuple(out)


def _problems_from(exc: ValidationError, file: str, root: yaml.Node, under: tuple = ()) -> list[ConfigProblem]:
    """One problem per distinct error; ``under`` is where the validated mapping sits in the file."""
    problems = []
    seen = set()
    for err in exc.errors():
        loc = under + _clean_loc(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        key = (loc, msg)
        if key in seen:
            continue
        seen.add(key)
        problems.append(ConfigProblem(file, _line_of(root, loc), _field_name(loc), msg))
    return problems


def load_topology(path: str | Path) -> TopologySpec:
    path = Path(path)
    root = _compose(path)
    return _validate_topology(_to_python(root), str(path), root)


def _validate_topology(data: Any, file: str, root: yaml.Node) -> TopologySpec:
    try:
        return TopologySpec.model_validate(data)
    except ValidationError as exc:
        problems = [p for p in _problems_from(exc, file, root) if "at least 1 item" not in p.message]
        raise ConfigError(problems + _dangling_links(data, file, root)) from None


def _dangling_links(data: Any, file: str, root: yaml.Node) -> list[ConfigProblem]:
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
                problems.append(ConfigProblem(file, _line_of(root, ("links", i, end)), f"links[{i}].{end}",
                                              f"unknown node {node!r} (known: {sorted(n for n in known if n)})"))
    return problems


def load_experiment(path: str | Path) -> ExperimentSpec:
    """Load, resolve the topology (path relative to the file, or inline) and cross-check."""
    path = Path(path)
    root = _compose(path)
    data = _to_python(root)
    problems: list[ConfigProblem] = []
    topo = data.get("topology") if isinstance(data, dict) else None
    if isinstance(topo, dict) and "generate" in topo:
        problems += _generate_topology(data, str(path), root)
    elif isinstance(topo, str):
        topo_path = (path.parent / topo).resolve()
        try:
            data["topology"] = load_topology(topo_path)
        except ConfigError as exc:
            problems.extend(exc.problems)
            if not topo_path.exists():
                problems = [ConfigProblem(str(path), _line_of(root, ("topology",)), "topology",
                                          f"file not found: {topo_path}")]
            data["topology"] = None
    if isinstance(data, dict):
        problems += _resolve_inventory(data, path, root)
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        problems.extend(p for p in _problems_from(exc, str(path), root) if not
                        (p.field == "topology" and data.get("topology") is None and problems))
        spec = None
    # references are checked on the raw mapping, so they are reported alongside field errors
    topology = data.get("topology") if isinstance(data, dict) else None
    known = {(p.line, p.field) for p in problems}
    problems += [p for p in _cross_check(data if isinstance(data, dict) else {}, topology, str(path), root)
                 if (p.line, p.field) not in known]
    if problems or spec is None:
        raise ConfigError(sorted(problems, key=lambda p: p.line))
    return spec


def _resolve_inventory(data: dict, path: Path, root: yaml.Node) -> list[ConfigProblem]:
    """``ssh.inventory``: made absolute, loaded (its own problems), every topology host mapped to a
    device; ``backend: ssh`` without one is a problem."""
    from testbed.spec.inventory import check_hosts_mapped, load_inventory

    ssh = data.get("ssh")
    inv = ssh.get("inventory") if isinstance(ssh, dict) else None
    if not isinstance(inv, str):
        if data.get("backend") == "ssh" and not isinstance(ssh, dict):
            return [ConfigProblem(str(path), _line_of(root, ("backend",)), "ssh",
                                  "backend: ssh needs ssh: {inventory: FILE}")]
        return []
    inv_path = (path.parent / inv).resolve()
    data["ssh"] = {**ssh, "inventory": str(inv_path)}
    try:
        inventory = load_inventory(inv_path)
    except ConfigError as exc:
        if not inv_path.exists():
            return [ConfigProblem(str(path), _line_of(root, ("ssh", "inventory")), "ssh.inventory",
                                  f"file not found: {inv_path}")]
        return list(exc.problems)
    topo = data.get("topology")
    return [ConfigProblem(str(path), _line_of(root, ("ssh", "inventory")), "ssh.inventory", msg)
            for msg in (check_hosts_mapped(topo, inventory) if isinstance(topo, TopologySpec) else [])]


def _generate_topology(data: dict, file: str, root: yaml.Node) -> list[ConfigProblem]:
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
        return _problems_from(exc, file, root, under=("topology",))
    except KeyError as exc:
        data["topology"] = None
        return [ConfigProblem(file, _line_of(root, ("topology",)), "topology", str(exc).strip('"'))]


def _cross_check(data: dict, topo: Any, file: str, root: yaml.Node) -> list[ConfigProblem]:
    """References in the raw experiment mapping: scenario hosts, links and trace files against the
    topology (when it loaded), the model name against the registry, the algorithm names."""
    problems = []
    topo = topo if isinstance(topo, TopologySpec) else None
    hosts = {h.name for h in topo.hosts} if topo else set()
    scenario = data.get("scenario") if isinstance(data.get("scenario"), list) else []
    for i, item in enumerate(scenario):
        if not isinstance(item, dict):
            continue
        nested = next((item[k] for k in ("ramp", "random_walk", "trace") if isinstance(item.get(k), dict)), None)
        event = nested if nested is not None else item
        host, link, trace_file = event.get("host"), event.get("link"), event.get("file")
        if topo and isinstance(host, str) and host not in hosts:
            problems.append(ConfigProblem(file, _line_of(root, ("scenario", i, "host")), f"scenario[{i}].host",
                                          f"unknown host {host!r} (hosts: {sorted(hosts)})"))
        if isinstance(trace_file, str) and not (Path(file).parent / trace_file).exists():
            problems.append(ConfigProblem(file, _line_of(root, ("scenario", i)), f"scenario[{i}].trace.file",
                                          f"file not found: {Path(file).parent / trace_file}"))
        if topo and isinstance(link, list) and len(link) == 2 and all(isinstance(x, str) for x in link):
            try:
                topo.find_link(*link)
            except KeyError:
                problems.append(ConfigProblem(file, _line_of(root, ("scenario", i, "link")), f"scenario[{i}].link",
                                              f"no link between {link[0]!r} and {link[1]!r} in topology {topo.name!r}"))
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str):
        from testbed.spec.models import known_models

        if model["name"] not in known_models():
            problems.append(ConfigProblem(file, _line_of(root, ("model", "name")), "model.name",
                                          f"unknown model {model['name']!r} (known: {', '.join(known_models())})"))
    algorithms = data.get("algorithms") if isinstance(data.get("algorithms"), list) else []
    for i, algo in enumerate(algorithms):
        name = algo.get("name") if isinstance(algo, dict) else algo
        if isinstance(name, str) and name not in registry.NAMES:
            problems.append(ConfigProblem(file, _line_of(root, ("algorithms", i)), f"algorithms[{i}]",
                                          f"unknown algorithm {name!r} (expected one of {', '.join(registry.NAMES)})"))
        elif isinstance(name, str) and isinstance(algo, dict) and isinstance(algo.get("params"), dict):
            try:
                registry.get(name).validate(algo["params"])
            except registry.AlgorithmError as exc:
                problems.append(ConfigProblem(file, _line_of(root, ("algorithms", i, "params")),
                                              f"algorithms[{i}].params", str(exc)))
        if name == "fixed" and data.get("placement") is None:
            problems.append(ConfigProblem(file, _line_of(root, ("algorithms", i)), f"algorithms[{i}]",
                                          "algorithm 'fixed' needs a top-level 'placement'"))
    return problems


def load_any(path: str | Path):
    """Topology, experiment or SSH inventory, told apart by their keys (``algorithms``/``model``: an
    experiment; ``devices``: an inventory)."""
    root = _compose(Path(path))
    keys = {k.value for k, _ in root.value}
    if "devices" in keys:
        from testbed.spec.inventory import load_inventory

        return load_inventory(path)
    return load_experiment(path) if "algorithms" in keys or "model" in keys else load_topology(path)
