"""Shared planner plumbing: a numpy view of a snapshot (``Problem``), memory checks with the
numbers in the error, placement assembly from per-device counts, and plan evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

import numpy as np

from testbed.partition.cost import blocks as B
from testbed.partition.cost.latency import COST_MODELS, CostResult, memory, paper_constants
from testbed.partition.cost.roofline import matvec_rate
from testbed.core.errors import HeadroomError, InfeasiblePlan
from testbed.core.paths import PathMatrix
from testbed.core.placement import FfnShard, LayerPlacement, Placement
from testbed.core.snapshot import ClusterSnapshot, ModelDims


class NoFit(HeadroomError):
    """A greedy pass found no device with room for ``block`` (``nbytes``); RA retries, then turns
    it into ``InfeasiblePlan`` with the numbers."""

    code = "no_fit"

    def __init__(self, block: str, nbytes: float):
        super().__init__(block)
        self.block, self.nbytes = block, nbytes


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


@dataclass
class Sizes:
    """Bytes (at the memory horizon) and FLOPs (at T) per block under one cost model."""

    head_b: float
    proj_b: float
    ffn_col_b: float  # bytes per FFN column
    head_f: float
    proj_f: float
    ffn_col_f: float
    x_b: float  # hidden state message
    head_out_b: float  # one group's output message
    # bytes a migration ships per block (at T): all of it, or only the KV cache when the receiver
    # copies weights from its own copy (``snapshot.weights_shipped`` False)
    mig_head_b: float = 0.0
    mig_proj_b: float = 0.0
    mig_col_b: float = 0.0


def sizes_for(dims: ModelDims, cost_model: str, T: int, T_mem: int, weights_shipped: bool = True) -> Sizes:
    F = dims.ffn_dim
    if cost_model == "paper":
        k, km = paper_constants(dims, T), paper_constants(dims, T_mem)
        s = Sizes(km["head_bytes"], km["proj_bytes"], km["ffn_bytes"] / F, k["head_flops"], k["proj_flops"],
                  k["ffn_flops"] / F, k["hidden_bytes"], k["head_out_bytes"])
    else:
        s = Sizes(B.block_memory_bytes(dims, "head", T_mem), B.proj_bytes(dims), B.ffn_col_bytes(dims),
                  B.head_flops(dims, T), B.proj_flops(dims), B.ffn_flops(dims, 1), B.hidden_bytes(dims),
                  B.head_out_bytes(dims))
    if weights_shipped:
        s.mig_head_b, s.mig_proj_b, s.mig_col_b = s.head_b, s.proj_b, s.ffn_col_b
    else:
        s.mig_head_b = B.head_kv_bytes(dims, T)
    return s


class Problem:
    """Arrays over ``snapshot.devices`` (index order) that planners work on."""

    def __init__(self, snapshot: ClusterSnapshot, dims: ModelDims, cost_model: str = "decode",
                 mem_tokens: int | None = None):
        if cost_model not in COST_MODELS:
            raise ValueError(f"unknown cost model {cost_model!r}; expected one of {sorted(COST_MODELS)}")
        self.snap, self.dims, self.cost_model = snapshot, dims, cost_model
        self.names = [d.name for d in snapshot.devices]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.src = self.index[snapshot.source]
        self.T = snapshot.context_len
        self.N = max(1, snapshot.tokens_until_next_decision)
        # memory horizon: KV growth until the next decision (planners may ask for more headroom),
        # never past the end of generation (``snapshot.tokens_remaining``)
        self.T_end = snapshot.end_context_len
        self.T_mem = self.cap(self.T + (snapshot.tokens_until_next_decision if mem_tokens is None else mem_tokens))
        # a device's decode rate under its roofline (FLOP/s of a matrix-vector product in the
        # model's format): planners rank by FLOPs / C; the cost model they are judged by is exact
        self.C = np.array([matvec_rate(d.flops_per_s, d.mem_bw_bytes_per_s, dims.weight_bytes) if d.up else 0.0
                           for d in snapshot.devices], dtype=float)
        ok = np.array([d.up and d.flops_per_s > 0 for d in snapshot.devices])
        ok[self.src] &= snapshot.allow_blocks_on_source
        self.allowed = ok
        self.budget = np.array([float(d.mem_budget_bytes) for d in snapshot.devices])
        self.budget[self.src] -= B.source_bytes(dims)
        self.lat, self.spb = self._matrices()
        self.sz = sizes_for(dims, cost_model, self.T, self.T_mem, snapshot.weights_shipped)
        self.memo: dict = {}  # planners' caches of pure functions of this problem (plan costs, tables)

    def _matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """(latency, seconds per byte) between every ordered pair (``inf`` when the path is down)."""
        n, index = len(self.names), self.index
        lat, spb = np.full((n, n), np.inf), np.full((n, n), np.inf)
        np.fill_diagonal(lat, 0.0)
        np.fill_diagonal(spb, 0.0)
        paths = self.snap.paths
        arrays = paths.arrays(self.names) if isinstance(paths, PathMatrix) else None
        if arrays is not None:
            bw, delay, up = arrays
            good = up & (bw > 0)
            np.fill_diagonal(good, False)
            lat[good] = delay[good]
            spb[good] = 1.0 / bw[good]
        elif paths:
            src, dst = zip(*paths)
            i = np.array(list(map(index.get, src, repeat(-1))))
            j = np.array(list(map(index.get, dst, repeat(-1))))
            links = paths.values()
            delay = np.array([ls.latency_s for ls in links], dtype=float)
            rate = np.array([ls.bandwidth_bytes_per_s if ls.up else 0.0 for ls in links], dtype=float)
            good = (i >= 0) & (j >= 0) & (i != j) & (rate > 0)
            lat[i[good], j[good]] = delay[good]
            spb[i[good], j[good]] = 1.0 / rate[good]
        return lat, spb

    def cap(self, context_len: float) -> int:
        """A memory horizon capped at the end of generation (``ClusterSnapshot.mem_horizon``)."""
        return self.snap.mem_horizon(context_len)

    def allowed_names(self) -> list[str]:
        return [n for n, ok in zip(self.names, self.allowed) if ok]

    def layer_bytes(self) -> float:
        d = self.dims
        return d.n_kv_heads * self.sz.head_b + self.sz.proj_b + d.ffn_dim * self.sz.ffn_col_b

    def check_totals(self) -> None:
        """Raise InfeasiblePlan when the model cannot fit even ignoring fragmentation."""
        need = self.dims.n_layers * self.layer_bytes()
        avail = float(np.clip(self.budget[self.allowed], 0, None).sum())
        if self.budget[self.src] < 0:
            raise InfeasiblePlan(
                f"source {self.names[self.src]} cannot hold the embedding/LM head: "
                f"{int(-self.budget[self.src])} bytes short (needs {B.source_bytes(self.dims)} bytes = "
                f"{mib(B.source_bytes(self.dims))}, has {int(self.budget[self.src] + B.source_bytes(self.dims))})")
        if not self.allowed.any():
            raise InfeasiblePlan("no device may hold blocks (all down, or only the source, which is excluded)")
        if need > avail:
            raise InfeasiblePlan(
                f"model needs {mib(need)} ({int(need)} bytes) at T={self.T_mem} but the devices allowed to hold "
                f"blocks have {mib(avail)} ({int(avail)} bytes) in total: {mib(need - avail)} short")

    def no_fit(self, block: str, nbytes: float, resid: np.ndarray) -> InfeasiblePlan:
        r = np.where(self.allowed, resid, -np.inf)
        j = int(np.argmax(r))
        need = self.dims.n_layers * self.layer_bytes()
        avail = float(np.clip(self.budget[self.allowed], 0, None).sum())
        return InfeasiblePlan(
            f"block {block} needs {int(nbytes)} bytes at T={self.T_mem} and fits on no device: the roomiest, "
            f"{self.names[j]}, has {int(max(r[j], 0))} bytes left ({int(nbytes - max(r[j], 0))} bytes short); "
            f"total needed {int(need)} bytes vs total available {int(avail)} bytes")


def check_memory(placement: Placement, snapshot: ClusterSnapshot, dims: ModelDims, cost_model: str,
                 context_len: int) -> None:
    """Raise InfeasiblePlan naming the first device whose blocks exceed its budget at
    ``context_len`` (capped at the end of generation, ``snapshot.mem_horizon``)."""
    context_len = snapshot.mem_horizon(context_len)
    mem = memory(placement, snapshot, dims, cost_model, context_len)
    for d in snapshot.devices:
        used = mem.get(d.name, 0)
        if used > d.mem_budget_bytes:
            total = sum(mem.values())
            avail = sum(x.mem_budget_bytes for x in snapshot.devices)
            raise InfeasiblePlan(
                f"device {d.name} needs {used} bytes at T={context_len} but has {d.mem_budget_bytes} "
                f"({used - d.mem_budget_bytes} bytes short); total needed {total} vs total available {avail}")


def fits_until(placement: Placement, snapshot: ClusterSnapshot, dims: ModelDims, cost_model: str,
               context_len: int) -> float:
    """Largest context length up to which ``placement`` fits every device's budget (``inf`` when no
    over-committed device grows, or when it fits until the end of generation,
    ``snapshot.end_context_len``), ``-inf`` when it does not fit at ``context_len`` already.

    Memory is affine in the context length under both cost models (only the KV caches grow), so the
    per-device slope from two evaluations gives the exact crossing; the crossing is re-checked once
    (integer rounding of shard bytes)."""
    step = 1024
    m0 = memory(placement, snapshot, dims, cost_model, context_len)
    m1 = memory(placement, snapshot, dims, cost_model, context_len + step)
    last = float("inf")
    for d in snapshot.devices:
        used = m0.get(d.name, 0)
        if used > d.mem_budget_bytes:
            return float("-inf")
        slope = (m1.get(d.name, 0) - used) / step
        if slope > 0:
            last = min(last, context_len + (d.mem_budget_bytes - used) // slope)
    if last != float("inf"):
        try:
            check_memory(placement, snapshot, dims, cost_model, int(last))
        except InfeasiblePlan:
            last -= 1
    return float("inf") if last >= snapshot.end_context_len else last


def assign_heads(counts: dict[str, int], current: tuple[str, ...] | None, n_groups: int) -> tuple[str, ...]:
    """Turn per-device head counts into a heads tuple, keeping groups where they already are."""
    left = dict(counts)
    out: list[str | None] = [None] * n_groups
    if current is not None and len(current) == n_groups:
        for g, dev in enumerate(current):
            if left.get(dev, 0) > 0:
                out[g] = dev
                left[dev] -= 1
    pool = [dev for dev, n in left.items() for _ in range(n)]
    for g in range(n_groups):
        if out[g] is None:
            out[g] = pool.pop(0)
    return tuple(out)  # type: ignore[arg-type]


def assign_ffn(counts: dict[str, int], aggregator: str, ffn_dim: int, n_chunks: int,
               current: tuple[FfnShard, ...] | None) -> tuple[FfnShard, ...]:
    """Contiguous shards from per-device chunk counts; devices ordered by their current columns, new
    devices after them in ``counts`` order (planners pass their send order; the aggregator's shard
    goes first either way)."""
    bounds = B.ffn_chunk_bounds(ffn_dim, n_chunks)
    first = {s.device: s.col_start for s in current} if current else {}
    order = sorted((d for d, n in counts.items() if n > 0), key=lambda d: first.get(d, ffn_dim + 1))
    shards, pos = [], 0
    for dev in order:
        n = counts[dev]
        shards.append(FfnShard(dev, bounds[pos][0], bounds[pos + n - 1][1]))
        pos += n
    shards.sort(key=lambda s: s.device != aggregator)
    return tuple(shards)


def uniform_layers(device_per_layer: list[str], dims: ModelDims) -> tuple[LayerPlacement, ...]:
    return tuple(LayerPlacement((d,) * dims.n_kv_heads, d, (FfnShard(d, 0, dims.ffn_dim),)) for d in device_per_layer)


def evaluate(placement: Placement, snapshot: ClusterSnapshot, dims: ModelDims, cost_model: str) -> CostResult:
    return COST_MODELS[cost_model](placement, snapshot, dims)
