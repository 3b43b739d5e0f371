"""Checks of specs beyond their own fields: what pydantic cannot see from one model.

Topologies: routing (switch loops, two links into one segment, subnet size), every host reachable
from the source, the subnet against this machine's routes. Experiments: references to the
topology, registry and files; the model (checkpoint path, dims) and its positions; scenario changes
inside the run; a ``fixed`` placement against the model and hosts; trace CSVs. Each returns
``ConfigProblem`` items located with ``testbed.spec.yamltext.Where``; nothing here imports torch.
"""
from __future__ import annotations

import ipaddress
import math
import socket
import struct
from pathlib import Path
from typing import Any

from testbed.partition import registry
from testbed.spec.schema import ExperimentSpec, RampItem, RandomWalkItem, ScenarioEvent, TopologySpec, TraceItem
from testbed.spec.yamltext import ConfigProblem, Where

_RTF_REJECT = 0x0200


def machine_routes(path: str = "/proc/net/route") -> list[tuple[ipaddress.IPv4Network, str]]:
    """(network, interface) of this machine's IPv4 routes, without the default route, reject routes
    (the unreachable guards emulated networks add) and the testbed's own bridges (``hr...``)."""
    try:
        lines = Path(path).read_text().splitlines()[1:]
    except OSError:
        return []
    out = []
    for line in lines:
        f = line.split()
        if len(f) < 8 or int(f[3], 16) & _RTF_REJECT or f[0].startswith("hr"):
            continue
        dest, mask = (socket.inet_ntoa(struct.pack("<L", int(x, 16))) for x in (f[1], f[7]))
        net = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
        if net.prefixlen:
            out.append((net, f[0]))
    return out


def topology_problems(topo: TopologySpec, where: Where) -> list[ConfigProblem]:
    from testbed.emulation.routing import Routing, TopologyError

    try:
        routing = Routing(topo)
    except TopologyError as exc:
        return [where.at((), str(exc), parse=True)]
    problems = []
    reach = set(routing.routes.get(topo.source, {})) | {topo.source}
    for i, h in enumerate(topo.hosts):
        if h.name not in reach:
            problems.append(where.at(("hosts", i), f"host {h.name} has no path to the source {topo.source}: "
                                     "link it to the rest of the topology"))
    net = ipaddress.ip_network(topo.subnet)
    for route, dev in machine_routes():
        if net.overlaps(route):
            problems.append(where.at(("subnet",), f"{net} overlaps this machine's route {route} (dev {dev}): "
                                     "emulated traffic would leave through it; choose another subnet"))
    return problems


def experiment_problems(spec: ExperimentSpec, where: Where, base_dir: Path) -> list[ConfigProblem]:
    """Problems of a validated experiment: model, positions, scenario timing, placement, traces."""
    from testbed.spec.modelref import ModelRefError, resolve_model

    problems = []
    try:
        model = resolve_model(spec.model, base_dir)
    except ModelRefError as exc:
        return [where.at(("model",), str(exc), parse=True)] + _scenario_problems(spec, where, base_dir)
    w = spec.workload
    if w.prompt_tokens + w.new_tokens > model.config.max_positions:
        problems.append(where.at(("workload",), f"prompt_tokens + new_tokens = {w.prompt_tokens + w.new_tokens} "
                                 f"exceed the model's {model.config.max_positions} positions"))
    if spec.placement is not None and isinstance(spec.topology, TopologySpec):
        problems += _placement_problems(spec, model.config, where)
    return problems + _scenario_problems(spec, where, base_dir)


def _placement_problems(spec: ExperimentSpec, cfg, where: Where) -> list[ConfigProblem]:
    from testbed.core.placement import Placement

    try:
        placement = Placement.from_json(spec.placement)
        placement.validate(cfg.n_layers, cfg.n_kv_heads, cfg.ffn_dim)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        return [where.at(("placement",), f"{what} (expected Placement.to_json form: source, layers of "
                         f"heads, proj, ffn [[host, start, end], ...] for {cfg.n_layers} layers)")]
    hosts = {h.name for h in spec.topology.hosts}
    unknown = sorted(placement.devices() - hosts)
    if unknown:
        return [where.at(("placement",), f"hosts {unknown} are not in the topology (hosts: {sorted(hosts)})")]
    if placement.source != spec.topology.source:
        return [where.at(("placement", "source"), f"source {placement.source!r} is not the topology's source "
                         f"{spec.topology.source!r}")]
    return []


def _scenario_problems(spec: ExperimentSpec, where: Where, base_dir: Path) -> list[ConfigProblem]:
    """Changes that would never fire (after the run's last token) and malformed trace CSVs."""
    from testbed.spec.scenario import TraceError, read_trace, trace_path

    last = spec.workload.new_tokens - 1
    problems = []

    def late(loc: tuple, token: int) -> None:
        problems.append(where.at(loc, f"token {token} is after the run's last token ({last}: new_tokens "
                                 f"{spec.workload.new_tokens}); the change would never happen"))
    for i, item in enumerate(spec.scenario):
        if isinstance(item, ScenarioEvent) and item.at_token is not None and item.at_token > last:
            late(("scenario", i, "at_token"), item.at_token)
        elif isinstance(item, RampItem) and item.ramp.to_token > last:
            late(("scenario", i, "ramp", "to_token"), item.ramp.to_token)
        elif isinstance(item, RandomWalkItem) and item.random_walk.start_token > last:
            late(("scenario", i, "random_walk", "start_token"), item.random_walk.start_token)
        elif isinstance(item, TraceItem):
            path = trace_path(item.trace.file, base_dir)
            if not path.exists():
                continue  # reported with the references
            try:
                read_trace(path)
            except TraceError as exc:
                problems.append(ConfigProblem(exc.file, exc.line, f"scenario[{i}].trace.file", exc.message))
    return problems


def reference_problems(data: dict, topo: Any, where: Where, base_dir: Path) -> list[ConfigProblem]:
    """References in the raw experiment mapping (reported next to field errors): scenario hosts,
    links and trace files against the topology, the model name, algorithm names and params."""
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
            problems.append(where.at(("scenario", i, "host"), f"unknown host {host!r} (hosts: {sorted(hosts)})"))
        if isinstance(trace_file, str) and not trace_path(trace_file, base_dir).exists():
            problems.append(where.at(("scenario", i, "trace", "file"),
                                     f"file not found: {trace_path(trace_file, base_dir)}"))
        if topo and isinstance(link, list) and len(link) == 2 and all(isinstance(x, str) for x in link):
            try:
                topo.find_link(*link)
            except KeyError:
                problems.append(where.at(("scenario", i, "link"), f"no link between {link[0]!r} and {link[1]!r} "
                                         f"in topology {topo.name!r}"))
    return problems + _model_name(data, where) + _algorithm_problems(data, where)


def trace_path(file: str, base_dir: Path) -> Path:
    from testbed.spec.scenario import trace_path as path

    return path(file, base_dir)


def _model_name(data: dict, where: Where) -> list[ConfigProblem]:
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str):
        from testbed.spec.models import known_models

        if model["name"] not in known_models():
            return [where.at(("model", "name"), f"unknown model {model['name']!r} (known: {', '.join(known_models())})")]
    return []


def _algorithm_problems(data: dict, where: Where) -> list[ConfigProblem]:
    problems = []
    algorithms = data.get("algorithms") if isinstance(data.get("algorithms"), list) else []
    for i, algo in enumerate(algorithms):
        name = algo.get("name") if isinstance(algo, dict) else algo
        if isinstance(name, str) and name not in registry.NAMES:
            problems.append(where.at(("algorithms", i), f"unknown algorithm {name!r} (expected one of "
                                     f"{', '.join(registry.NAMES)})"))
        elif isinstance(name, str) and isinstance(algo, dict) and isinstance(algo.get("params"), dict):
            bad = {k: v for k, v in algo["params"].items() if isinstance(v, float) and not math.isfinite(v)}
            if bad:  # the planners take inf from code (tests); a config gives finite numbers
                problems.append(where.at(("algorithms", i, "params", next(iter(bad))),
                                         f"Input should be a finite number, got {next(iter(bad.values()))}"))
                continue
            try:
                registry.get(name).validate(algo["params"])
            except registry.AlgorithmError as exc:
                problems.append(where.at(("algorithms", i, "params"), str(exc)))
        if name == "fixed" and data.get("placement") is None:
            problems.append(where.at(("algorithms", i), "algorithm 'fixed' needs a top-level 'placement'"))
    return problems
