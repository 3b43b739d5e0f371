"""Addressing and routing of an emulated topology: pure functions of the spec, no system calls.

Switch graphs must be forests (Linux bridges run no STP here); each host gets one address in the
topology's subnet; every host routes to every other host along a BFS tree, through forwarding
hosts where the topology has no switch in between.
"""
from __future__ import annotations

import ipaddress
from collections import deque
from typing import Optional

from testbed.spec.schema import TopologySpec
from testbed.core.errors import ConfigError


class TopologyError(ConfigError, ValueError):
    """The topology cannot be emulated as specified (loops, a subnet too small, no route)."""


class Routing:
    """Host addresses, per-host routing tables and directed hop paths for one topology."""

    def __init__(self, topology: TopologySpec):
        self.topology = topology
        self.ips: dict[str, str] = {}
        self.routes: dict[str, dict[str, tuple[int, Optional[str]]]] = {}  # src -> dst -> (link, gw)
        self._check()
        self._compute_routes()

    def _check(self) -> None:
        """Switch graph must be a forest (no STP); each host at most one link into one L2 segment."""
        parent = {s: s for s in self.topology.switches}

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for i, l in enumerate(self.topology.links):
            if l.a in parent and l.b in parent:
                ra, rb = find(l.a), find(l.b)
                if ra == rb:
                    raise TopologyError(f"links[{i}]: switch links form a loop through {l.a}-{l.b} (no STP here)")
                parent[ra] = rb
        for h in self.topology.hosts:
            segs: dict[str, int] = {}
            for i, l in enumerate(self.topology.links):
                other = l.b if l.a == h.name else l.a
                if h.name in (l.a, l.b) and other in parent:
                    if find(other) in segs:
                        raise TopologyError(f"links[{i}]: host {h.name} has two links into one switched segment "
                                            f"(links[{segs[find(other)]}] and links[{i}])")
                    segs[find(other)] = i
        net = ipaddress.ip_network(self.topology.subnet)
        if net.num_addresses < len(self.topology.hosts) + 2:
            raise TopologyError(f"subnet: {net} too small for {len(self.topology.hosts)} hosts")
        self.ips = {h.name: str(net.network_address + i + 1) for i, h in enumerate(self.topology.hosts)}

    def _adjacency(self) -> dict[str, list[tuple[str, int]]]:
        adj: dict[str, list[tuple[str, int]]] = {n: [] for n in [h.name for h in self.topology.hosts] + list(self.topology.switches)}
        for i, l in enumerate(self.topology.links):
            adj[l.a].append((l.b, i))
            adj[l.b].append((l.a, i))
        return adj

    def _compute_routes(self) -> None:
        """Per source host: BFS tree; a route to each host names the first link and the next host."""
        adj = self._adjacency()
        hosts = {h.name for h in self.topology.hosts}
        for src in hosts:
            prev: dict[str, tuple[str, int]] = {}
            seen, queue = {src}, deque([src])
            while queue:
                n = queue.popleft()
                for m, i in adj[n]:
                    if m not in seen:
                        seen.add(m)
                        prev[m] = (n, i)
                        queue.append(m)
            table = {}
            for dst in hosts - {src}:
                if dst not in seen:
                    continue
                nodes = [dst]
                while nodes[-1] != src:
                    nodes.append(prev[nodes[-1]][0])
                nodes.reverse()
                gw = next(n for n in nodes[1:] if n in hosts)
                table[dst] = (prev[nodes[1]][1], None if gw == dst else gw)
            self.routes[src] = table

    def path(self, src: str, dst: str) -> list[tuple[str, str]]:
        """Directed hops ``(from, to)`` the packets from ``src`` to ``dst`` take (as routed)."""
        hops: list[tuple[str, str]] = []
        cur = src
        while cur != dst:
            if dst not in self.routes.get(cur, {}):
                raise TopologyError(f"no route from {cur} to {dst}")
            first, gw = self.routes[cur][dst]
            target = gw or dst
            hops += self._segment(cur, target, first)
            cur = target
        return hops

    def _segment(self, src: str, dst: str, first_link: int) -> list[tuple[str, str]]:
        """Hops inside one L2 segment (a tree of switches) from host src to host dst."""
        l = self.topology.links[first_link]
        nxt = l.b if l.a == src else l.a
        if nxt == dst:
            return [(src, dst)]
        adj = self._adjacency()
        prev, queue = {nxt: None}, deque([nxt])
        while queue:
            n = queue.popleft()
            for m, _ in adj[n]:
                if m not in prev and (m in self.topology.switches or m == dst):
                    prev[m] = n
                    if m != dst:
                        queue.append(m)
        nodes = [dst]
        while nodes[-1] != nxt:
            nodes.append(prev[nodes[-1]])
        nodes = [src] + nodes[::-1]
        return list(zip(nodes, nodes[1:]))
