"""``SimulatedCluster``: the ``Cluster`` protocol in simulated time, driven by the ``decode`` cost model.

No processes, no network, no model: every token's latency (and its compute/transfer split, bytes per
link) is what ``testbed.partition.cost.latency.decode_cost`` predicts for the current placement on the
CURRENT simulated link/host state; a migration takes what ``testbed.partition.cost.migration`` predicts.
Token ids are pseudo-random but deterministic (a hash of seed, position and the previous id): the
simulated backend runs no model.

Topology input is plain data (so this module does not depend on the config module):
  hosts: [(name, mem_limit_bytes, cpu_cores, is_source[, DeviceRates | None]), ...]
  links: [(a, b, bandwidth_bytes_per_s, latency_s), ...]   # may go through switch nodes; or
         [(a, b, a->b bytes/s, a->b latency_s, b->a bytes/s, b->a latency_s), ...] per direction
Links are directed: each direction has its own rate, latency and loss, and a scenario may change
one direction only. Paths from a host: least total latency over the directions they travel
(Dijkstra; ties -> fewer hops), bandwidth = the path's bottleneck, latency = the sum; recomputed
only after ``apply_link``. Loss is stored, not modelled.
Compute speed of a host with ``DeviceRates`` (a device profile): its roofline (FLOP/s for the model's
format, memory bandwidth, call overhead), scaled by ``cpu_cores / rates.cores`` (1 unless a scenario
changes ``cpu_cores``); of a host without: ``per_core_flops * cpu_cores`` (see
``testbed.backends.simulated.build.device_speed``: this machine's roofline on the model's blocks
where the model can be built here — then at most one core and a per-call cost, exactly as a paced
emulated agent — else a generic gemv figure).
Memory of a host = its blocks (weights + KV at the current context) + embed/LM head on the source +
``mem_overhead_bytes``. During a migration a host holds max(old, new) (blocks stream one at a time
and are freed as sent); its duration is ``migration_estimate``'s, waves included, and a change with
no memory-safe order is refused (``MigrationRefused``) before anything moves. Exceeding the limit
raises ``AlgorithmFailure("OOM on h3: ...")``.
"""
from __future__ import annotations

import heapq
import math

import numpy as np
from dataclasses import asdict, dataclass, replace

from testbed.core.cluster import MigrationRecord, TokenRecord

from testbed.core.errors import AlgorithmFailure, BackendError, MigrationRefused
from testbed.partition.cost.latency import Net, decode_cost, placement_memory
from testbed.partition.cost.migration import migration_estimate
from testbed.core.paths import PathMatrix
from testbed.core.placement import Placement
from testbed.core.snapshot import ClusterSnapshot, DeviceState, LinkState, ModelDims

_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class DeviceRates:
    """A simulated device at ``cores`` cpu_cores: FLOP/s for the model's format, bytes/s, s/call."""

    flops_per_s: float
    mem_bw_bytes_per_s: float
    call_overhead_s: float
    cores: float
    profile: str = ""

    def at(self, cpu_cores: float) -> tuple[float, float, float]:
        """(FLOP/s, bytes/s, s per call) at ``cpu_cores`` (rates scale, the call cost inversely)."""
        k = cpu_cores / self.cores
        return self.flops_per_s * k, self.mem_bw_bytes_per_s * k, self.call_overhead_s / k

    def to_json(self) -> dict:
        return asdict(self)


def pseudo_token(seed: int, position: int, prev: int, vocab: int) -> int:
    """splitmix64 of (seed, position, prev) modulo the vocabulary."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + prev * 0x94D049BB133111EB) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return int((z ^ (z >> 31)) % vocab)


def _link_state(a: str, b: str, bw: float, lat: float, bw_back: float | None = None, lat_back: float | None = None) -> dict:
    """A link's live state: up, and per direction (keyed by the node it leaves) rate, latency, loss."""
    back = (bw if bw_back is None else bw_back, lat if lat_back is None else lat_back)
    return {"up": True, "dir": {a: {"bandwidth": float(bw), "latency_s": float(lat), "loss_pct": 0.0},
                                b: {"bandwidth": float(back[0]), "latency_s": float(back[1]), "loss_pct": 0.0}}}


def _tree(adj: dict, s: str) -> dict:
    """Dijkstra from ``s``: node -> (latency, hops, bottleneck bandwidth); least latency, ties -> fewer hops."""
    best = {s: (0.0, 0, float("inf"))}
    heap = [(0.0, 0, s, float("inf"))]
    while heap:
        lat, hops, u, bw = heapq.heappop(heap)
        if best[u][:2] < (lat, hops):
            continue
        for v, st in adj[u]:  # st: the u -> v direction
            cand = (lat + st["latency_s"], hops + 1, min(bw, st["bandwidth"]))
            if v not in best or cand[:2] < best[v][:2]:
                best[v] = cand
                heapq.heappush(heap, (cand[0], cand[1], v, cand[2]))
    return best


def shortest_paths(nodes: list[str], links: dict[tuple[str, str], dict], sources: list[str]) -> PathMatrix:
    """(a, b) -> LinkState for every pair of ``sources``: least latency, bottleneck bandwidth
    (a ``PathMatrix``: arrays, no object per pair).

    A source with a single link (a host on one switch port, the usual case) reaches everything
    through that link's other end, so its paths are that link plus the other end's: one Dijkstra
    per switch such hosts hang off (one in a star) instead of one per host."""
    adj: dict[str, list[tuple[str, dict]]] = {n: [] for n in nodes}
    for (a, b), st in links.items():
        if st["up"]:
            adj[a].append((b, st["dir"][a]))
            adj[b].append((a, st["dir"][b]))
    leaf = {h: adj[h][0] for h in sources if len(adj[h]) == 1}
    roots = {w for w, _ in leaf.values()} | (set(sources) - set(leaf))
    rows = {r: _tree_row(_tree(adj, r), sources) for r in roots}
    n = len(sources)
    lat, bw, up = np.full((n, n), np.inf), np.zeros((n, n)), np.zeros((n, n), dtype=bool)
    for i, s in enumerate(sources):
        if s in leaf:
            w, st = leaf[s]
            t_lat, t_bw, t_in = rows[w]
            t_lat, t_bw = st["latency_s"] + t_lat, np.minimum(st["bandwidth"], t_bw)
        else:
            t_lat, t_bw, t_in = rows[s]
        lat[i], bw[i], up[i] = np.where(t_in, t_lat, np.inf), np.where(t_in, t_bw, 0.0), t_in
    np.fill_diagonal(up, False)
    return PathMatrix(sources, bw, lat, up)


def _tree_row(tree: dict, sources: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latency, bottleneck bandwidth, reachable) from a ``_tree`` to each of ``sources``."""
    got = [tree.get(t) for t in sources]
    return (np.array([g[0] if g else np.inf for g in got]), np.array([g[2] if g else 0.0 for g in got]),
            np.array([g is not None for g in got]))


class SimulatedCluster:
    """Implements ``testbed.core.cluster.Cluster`` in simulated time (see module docstring)."""

    def __init__(self, hosts, links, dims: ModelDims, per_core_flops: float, mem_overhead_bytes: int = 0,
                 seed: int = 0, weights_shipped: bool = True, per_core_call_s: float = 0.0, one_thread: bool = False):
        self.weights_shipped = weights_shipped  # False: migrations move KV caches only
        # roofline-timed hosts (as the emulated backend paces them): at most one core each, and a
        # fixed cost per block call of per_core_call_s over the host's share
        self.per_core_call_s, self.one_thread = float(per_core_call_s), one_thread
        self.dims, self.per_core_flops, self.overhead, self.seed = dims, float(per_core_flops), mem_overhead_bytes, seed
        self._init_hosts = {h[0]: {"mem": int(h[1]), "cores": float(h[2]), "source": bool(h[3]), "up": True,
                                   "rates": h[4] if len(h) > 4 else None} for h in hosts}
        self._init_links = {(l[0], l[1]): _link_state(*l) for l in links}
        if sum(h["source"] for h in self._init_hosts.values()) != 1:
            raise BackendError("exactly one host must be the source")
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        self.host_state = {k: dict(v) for k, v in self._init_hosts.items()}
        self.link_state = {k: {"up": v["up"], "dir": {n: dict(d) for n, d in v["dir"].items()}}
                           for k, v in self._init_links.items()}
        self.placement: Placement | None = None
        self.context_len = 0
        self._peak: dict[str, int] = dict.fromkeys(self.host_state, 0)
        self._current: dict[str, int] = dict.fromkeys(self.host_state, 0)
        self._paths = None
        self._devices: tuple | None = None  # the hosts as DeviceStates, until a host changes
        self._net: Net | None = None

    def hosts(self) -> list[str]:
        return list(self.host_state)

    def _share(self, cores: float) -> float:
        return min(1.0, cores) if self.one_thread else cores

    def _nodes(self) -> list[str]:
        nodes = dict.fromkeys(self.host_state)
        for a, b in self.link_state:
            nodes.setdefault(a)
            nodes.setdefault(b)
        return list(nodes)

    def _snapshot(self, context_len: int, until_next: int) -> ClusterSnapshot:
        if self._paths is None:
            self._paths = shortest_paths(self._nodes(), self.link_state, self.hosts())
        if self._devices is None:
            self._devices = tuple(self._device(n, h) for n, h in self.host_state.items())
        return ClusterSnapshot(self._devices, self._paths, context_len, until_next, self.placement,
                               weights_shipped=self.weights_shipped)

    def _device(self, name: str, h: dict) -> DeviceState:
        if h["rates"] is None:
            share = self._share(h["cores"])
            return DeviceState(name, h["mem"], self.overhead, self.per_core_flops * share, h["source"], h["up"],
                               self.per_core_call_s / share)
        flops, bw, call = h["rates"].at(h["cores"])
        return DeviceState(name, h["mem"], self.overhead, flops, h["source"], h["up"], call_overhead_s=call,
                           mem_bw_bytes_per_s=bw)

    def snapshot(self, context_len: int, tokens_until_next_decision: int) -> ClusterSnapshot:
        return self._snapshot(context_len, tokens_until_next_decision)

    def _netview(self) -> Net:
        if self._net is None:
            self._net = Net(self._snapshot(self.context_len, 0))
        return self._net

    def _invalidate(self, paths: bool) -> None:
        self._net = None
        self._devices = None
        if paths:
            self._paths = None

    # ------------------------------------------------------------------ scenario changes
    def apply_link(self, a: str, b: str, *, bandwidth_mbps: float | None = None, delay_ms: float | None = None,
                   loss_pct: float | None = None, up: bool | None = None, direction: str | None = None) -> dict:
        """Change link a-b: both directions, or only the traffic leaving ``direction`` (a or b)."""
        key = (a, b) if (a, b) in self.link_state else (b, a)
        if key not in self.link_state:
            raise BackendError(f"no link {a}-{b} in the simulated topology")
        if direction is not None and direction not in key:
            raise BackendError(f"link {a}-{b}: direction must leave {a} or {b}, got {direction!r}")
        st = self.link_state[key]
        before = self._link_view(st, direction or a)
        for d in ([direction] if direction else [a, b]):
            one = st["dir"][d]
            if bandwidth_mbps is not None:
                one["bandwidth"] = bandwidth_mbps * 1e6 / 8.0
            if delay_ms is not None:
                one["latency_s"] = delay_ms / 1e3
            if loss_pct is not None:
                one["loss_pct"] = float(loss_pct)
        if up is not None:
            st["up"] = bool(up)
        self._invalidate(paths=True)
        after = {f"{u}->{v}": self._link_view(st, u) for u, v in ((a, b), (b, a))}
        return {"link": [a, b], **self._link_view(st, direction or a), **after, "before": before}

    @staticmethod
    def _link_view(st: dict, src: str) -> dict:
        """The state of the direction leaving ``src``, in the config's units."""
        d = st["dir"][src]
        return {"bandwidth_mbps": d["bandwidth"] * 8 / 1e6, "delay_ms": d["latency_s"] * 1e3,
                "loss_pct": d["loss_pct"], "up": st["up"]}

    def set_host_limits(self, host: str, *, mem_limit_mib: float | None = None,
                        cpu_cores: float | None = None) -> dict:
        if host not in self.host_state:
            raise BackendError(f"no host {host} in the simulated topology")
        h = self.host_state[host]
        before = {"mem_limit_mib": h["mem"] / 2**20, "cpu_cores": h["cores"]}
        if mem_limit_mib is not None:
            h["mem"] = int(mem_limit_mib * 2**20)
        if cpu_cores is not None:
            h["cores"] = float(cpu_cores)
        self._invalidate(paths=False)
        return {"host": host, "mem_limit_mib": h["mem"] / 2**20, "cpu_cores": h["cores"], "before": before}

    def kill_agent(self, host: str) -> None:
        self.host_state[host]["up"] = False
        self._invalidate(paths=False)

    # ------------------------------------------------------------------ memory
    def _host_mem(self, placement: Placement, context_len: int) -> dict[str, int]:
        snap = self._snapshot(context_len, 0)
        mem = placement_memory(placement, snap, self.dims, context_len)
        return {h: mem.get(h, 0) + self.overhead for h in self.host_state}

    def _charge(self, mem: dict[str, int]) -> None:
        """Record peaks; raise AlgorithmFailure when a host exceeds its limit or is down."""
        self._current = dict(mem)
        for h, used in mem.items():
            self._peak[h] = max(self._peak[h], used)
            st = self.host_state[h]
            if used > st["mem"]:
                raise AlgorithmFailure(f"OOM on {h}: needs {used} bytes, limit {st['mem']}")
            if not st["up"] and used > self.overhead:
                raise AlgorithmFailure(f"host {h} is down but holds blocks")

    def peak_mem_bytes(self) -> dict[str, int]:
        return dict(self._peak)

    def mem_bytes(self) -> dict[str, int]:
        return {h: self._current.get(h, 0) for h in self.host_state}

    # ------------------------------------------------------------------ tokens
    def _record(self, n_tokens: int, prev: int) -> TokenRecord:
        assert self.placement is not None
        snap = self._netview().snap
        res = decode_cost(self.placement, snap, self.dims, self.context_len, n_tokens, net=self._netview())
        if not math.isfinite(res.token_latency_s):
            raise AlgorithmFailure(f"no usable path for this token ({self._unreachable()}): a block is on an "
                                   "unreachable or stopped host, so the token has no finite latency")
        tok = pseudo_token(self.seed, self.context_len, prev, self.dims.vocab_size)
        return TokenRecord(tok, res.token_latency_s, res.compute_s, res.transfer_s, 0.0, res.bytes_moved,
                           dict(res.bytes_by_link))

    def _unreachable(self, placement: Placement | None = None) -> str:
        """The pairs of the placement's devices with no route between them (or the hosts down)."""
        used = sorted((placement or self.placement).devices() | {(placement or self.placement).source})
        snap = self._snapshot(self.context_len, 0)
        pairs = [f"{a}-{b}" for i, a in enumerate(used) for b in used[i + 1:]
                 if not snap.path(a, b).up or not math.isfinite(snap.path(a, b).latency_s)]
        down = [h for h in used if not self.host_state[h]["up"]]
        return "; ".join(filter(None, [pairs and "no route between " + ", ".join(pairs),
                                       down and "hosts down: " + ", ".join(down)])) or "no finite time"

    def load(self, placement: Placement, prompt_ids: list[int]) -> TokenRecord:
        """Place the blocks and run the prompt as one prefill step (all prompt tokens at once)."""
        placement.validate(self.dims.n_layers, self.dims.n_kv_heads, self.dims.ffn_dim)
        unknown = placement.devices() - set(self.host_state)
        if unknown:
            raise BackendError(f"placement uses unknown hosts {sorted(unknown)}")
        self.placement, self.context_len = placement, len(prompt_ids)
        self._charge(self._host_mem(placement, self.context_len))
        return self._record(max(1, len(prompt_ids)), prompt_ids[-1] if prompt_ids else 0)

    def step(self, token_id: int) -> TokenRecord:
        if self.placement is None:
            raise BackendError("step() before load()")
        self.context_len += 1
        self._charge(self._host_mem(self.placement, self.context_len))
        return self._record(1, token_id)

    def migrate(self, new: Placement) -> MigrationRecord:
        if self.placement is None:
            raise BackendError("migrate() before load()")
        new.validate(self.dims.n_layers, self.dims.n_kv_heads, self.dims.ffn_dim)
        snap = self._netview().snap
        est = migration_estimate(self.placement, new, replace(snap, context_len=self.context_len), self.dims,
                                 self.context_len, net=self._netview())
        if est.blocked:  # nothing moved: the controller goes on with the current placement
            raise MigrationRefused(f"migration refused: {est.blocked}")
        if not math.isfinite(est.delay_s):
            raise AlgorithmFailure(f"migration over an unreachable path ({self._unreachable(new)})")
        old_mem, new_mem = self._host_mem(self.placement, self.context_len), self._host_mem(new, self.context_len)
        self._charge({h: max(old_mem[h], new_mem[h]) for h in old_mem})
        self.placement = new
        return MigrationRecord(est.delay_s, est.bytes_moved, est.moves)

    def close(self) -> None:
        self.placement = None
