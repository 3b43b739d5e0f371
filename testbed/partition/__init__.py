"""Partitioners: pure functions ``snapshot -> placement`` plus the cost models they optimise.

Grouped by concern: cost models (``cost/``: block sizes, ``paper`` and ``decode`` latency, migration
delay), the resource-aware head-level planner (``ra/``), the exact solver (``exact/``), layer- and
block-level baselines (``layer/``: EdgeShard, Galaxy, greedy, round-robin), the one table of
algorithms and their typed parameters (``registry``) and the one entry point ``plan``.
No I/O, no torch. Infeasible requests raise ``InfeasiblePlan`` with the numbers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from testbed.partition.cost.blocks import block_flops, block_memory_bytes
from testbed.partition.cost.latency import COST_MODELS, CostResult, cost, memory
from testbed.core.errors import InfeasiblePlan, OutOfScope
from testbed.partition import registry
from testbed.partition.cost.migration import migration_delay
from testbed.core.placement import Placement
from testbed.core.snapshot import ClusterSnapshot, ModelDims

ALGORITHMS = registry.PLANNERS
DYNAMIC_ALGORITHMS = registry.DYNAMIC

__all__ = ["ALGORITHMS", "DYNAMIC_ALGORITHMS", "COST_MODELS", "CostResult", "InfeasiblePlan", "OutOfScope",
           "PlanResult", "block_flops", "block_memory_bytes", "cost", "migration_delay", "plan"]


@dataclass
class PlanResult:
    algorithm: str
    placement: Placement
    predicted_token_latency_s: float
    predicted_mem_bytes: dict[str, int]
    solve_time_s: float
    dynamic: bool  # True: re-plans every decision epoch; False: the first plan is kept forever
    cost_model: str = "decode"
    compute_s: float = 0.0
    transfer_s: float = 0.0
    migration_delay_s: float = 0.0  # from snapshot.current to this placement
    extra: dict = field(default_factory=dict)
    # bytes per device at ``peak_context_len``: the end of the run when the snapshot knows it (the
    # plan's peak if it were kept to the end), else the next decision
    predicted_peak_mem_bytes: dict[str, int] = field(default_factory=dict)
    peak_context_len: int = 0

    def to_json(self) -> dict:
        return {
            "algorithm": self.algorithm, "cost_model": self.cost_model, "dynamic": self.dynamic,
            "predicted_token_latency_s": self.predicted_token_latency_s, "solve_time_s": self.solve_time_s,
            "compute_s": self.compute_s, "transfer_s": self.transfer_s,
            "migration_delay_s": self.migration_delay_s, "predicted_mem_bytes": self.predicted_mem_bytes,
            "predicted_peak_mem_bytes": self.predicted_peak_mem_bytes, "peak_context_len": self.peak_context_len,
            "placement": self.placement.to_json(), **({"planner": self.extra} if self.extra else {}),
        }


def _static(snapshot: ClusterSnapshot, dims: ModelDims, cost_model: str = "decode", **params) -> Placement:
    """The initial resource-aware plan, kept forever (returns ``snapshot.current`` once there is one)."""
    from dataclasses import replace

    from testbed.partition.ra.planner import resource_aware

    if snapshot.current is not None and len(snapshot.current.layers) == dims.n_layers:
        return snapshot.current
    return resource_aware(replace(snapshot, current=None), dims, cost_model, **params)


def plan(algorithm: str, snapshot: ClusterSnapshot, dims: ModelDims, cost_model: str = "decode",
         **params) -> PlanResult:
    """Place ``dims`` on the snapshot's devices with ``algorithm``; predictions use ``cost_model``."""
    entry = registry.get(algorithm, planner=True)
    if cost_model not in COST_MODELS:
        raise ValueError(f"unknown cost model {cost_model!r}; expected one of {sorted(COST_MODELS)}")
    params = entry.validate(params)
    fn = entry.planner()
    t0 = time.perf_counter()
    placement = fn(snapshot, dims, cost_model, **params)
    solve = time.perf_counter() - t0
    placement.validate(dims.n_layers, dims.n_kv_heads, dims.ffn_dim)
    res = cost(placement, snapshot, dims, cost_model)
    mig = migration_delay(snapshot.current, placement, snapshot, dims, cost_model=cost_model)
    peak_at = peak_context(snapshot)
    return PlanResult(algorithm, placement, res.token_latency_s, res.mem_bytes, solve,
                      entry.dynamic, cost_model, res.compute_s, res.transfer_s, mig,
                      _json_scalars(placement.meta), memory(placement, snapshot, dims, cost_model, peak_at), peak_at)


def peak_context(snapshot: ClusterSnapshot) -> int:
    """Context at which a plan's predicted peak is reported: the end of the run when known, else the
    next decision."""
    end = snapshot.end_context_len
    return int(end) if end != float("inf") else snapshot.context_len + snapshot.tokens_until_next_decision


def _json_scalars(meta: dict) -> dict:
    """What a planner reported about its plan (e.g. ``optimal``'s bound and gap), JSON-able scalars only."""
    return {k: v for k, v in meta.items() if isinstance(v, (bool, int, float, str)) or v is None}
