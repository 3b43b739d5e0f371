"""The one list of algorithms: name -> planner function, typed parameters, dynamic or static.

Everything that needs algorithm names uses this table: the config loader (names and ``params``
validated at load time, with the line of the mistake), ``testbed.partition.plan``, the control loop
(dynamic algorithms re-plan every epoch; static ones keep their first plan) and the figures' colours.
Planners are imported when first called, so reading the table costs no numpy or solver import.

``fixed`` is not a planner: the control loop uses the experiment's ``placement`` as given.
A params model's defaults are the planner function's keyword defaults (a unit test checks that).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from testbed.core.errors import ConfigError


class AlgorithmError(ConfigError, ValueError):
    """Unknown algorithm or invalid parameters for one."""


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    pass


class ResourceAwareParams(Params):
    """``testbed.partition.ra.planner.resource_aware`` (its docstring says what each one does)."""

    ffn_chunks: Optional[int] = Field(None, ge=1)
    proj_candidates: int = Field(4, ge=1)
    headroom_epochs: int = Field(4, ge=0)
    horizon_epochs: int = Field(4, ge=0)
    horizon_tokens: Optional[int] = Field(None, ge=1)
    mem_balance: Optional[float] = Field(1.25, ge=0)
    balance_slack: float = Field(0.1, ge=0)
    thorough: Optional[bool] = None
    headroom_gain: float = Field(0.05, ge=0)
    anticipate_epochs: int = Field(2, ge=0)
    preempt: float = Field(1.0, ge=0)
    layer_split: bool = True
    split_slack: float = Field(0.1, ge=0)
    portfolio: bool = True
    portfolio_slack: float = Field(0.01, ge=0, lt=1)
    rate_hedge: Optional[float] = Field(0.5, gt=0, le=1)
    incremental: bool = False
    headroom_to_end: bool = True
    level_tol: float = Field(0.02, ge=0, lt=1)
    level_evals: int = Field(2000, ge=1)
    level_bind_frac: float = Field(0.9, gt=0, le=1)
    level_tol_free: float = Field(0.001, ge=0, lt=1)


class OptimalParams(Params):
    """``testbed.partition.exact.optimal.optimal``: budgets are work counts (``local_search_evals``
    plan evaluations, ``milp_max_nodes`` branch-and-bound nodes: the plan does not depend on the
    machine's speed or load); ``time_limit_s`` only guards the MILP (reaching it is a failure,
    never a different plan)."""

    ffn_chunks: Optional[int] = Field(None, ge=1)
    time_limit_s: float = Field(60.0, gt=0)
    max_devices: int = Field(16, ge=1)
    horizon_epochs: int = Field(4, ge=0)
    horizon_tokens: Optional[int] = Field(None, ge=1)
    local_search_evals: int = Field(20_000, ge=1)
    milp_max_nodes: int = Field(200_000, ge=1)
    level_tol: float = Field(0.0, ge=0, lt=1)


class EdgeShardDynamicParams(Params):
    horizon_epochs: int = Field(4, ge=0)
    horizon_tokens: Optional[int] = Field(None, ge=1)


class GalaxyParams(Params):
    max_group: Optional[int] = Field(None, ge=1)


@dataclass(frozen=True)
class Algorithm:
    name: str
    target: Optional[str]  # "module:function" of the planner; None for ``fixed``
    params: type[Params]
    dynamic: bool  # True: re-plans every decision epoch; False: the first plan is kept forever
    summary: str

    def planner(self) -> Callable:
        if self.target is None:
            raise AlgorithmError(f"{self.name!r} is not a planner (the experiment's placement is used)")
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` checked and completed with the defaults; raises ``AlgorithmError``."""
        try:
            return self.params(**params).model_dump()
        except ValidationError as exc:
            msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<params>'}: {e['msg']}" for e in exc.errors())
            raise AlgorithmError(f"algorithm {self.name!r}: {msgs}") from None


_P = "testbed.partition"
# order = the figures' colour order (kept from before the registry existed)
REGISTRY: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("resource_aware", f"{_P}.ra.planner:resource_aware", ResourceAwareParams, True,
              "the paper's resource-aware head-level planner, re-planned every epoch"),
    Algorithm("edgeshard", f"{_P}.layer.edgeshard:edgeshard", NoParams, False,
              "EdgeShard: contiguous layer shards by DP, planned once"),
    Algorithm("edgeshard_dynamic", f"{_P}.layer.edgeshard:edgeshard_dynamic", EdgeShardDynamicParams, True,
              "EdgeShard re-planned every epoch"),
    Algorithm("galaxy", f"{_P}.layer.baselines:galaxy", GalaxyParams, False,
              "Galaxy: per-layer tensor parallelism over the fastest devices"),
    Algorithm("greedy", f"{_P}.layer.baselines:first_fit", NoParams, False, "first fit in block order"),
    Algorithm("round_robin", f"{_P}.layer.baselines:round_robin", NoParams, False, "blocks dealt out cyclically"),
    Algorithm("static", f"{_P}:_static", ResourceAwareParams, False, "the first resource-aware plan, kept"),
    Algorithm("optimal", f"{_P}.exact.optimal:optimal", OptimalParams, True,
              "the exact solver (certified where its scope allows)"),
    Algorithm("fixed", None, NoParams, False, "the experiment's placement, as given"),
)}
NAMES = tuple(REGISTRY)
PLANNERS = tuple(n for n, a in REGISTRY.items() if a.target is not None)
DYNAMIC = frozenset(n for n, a in REGISTRY.items() if a.dynamic)


def get(name: str, *, planner: bool = False) -> Algorithm:
    """The entry of ``name``; ``planner=True`` also rejects ``fixed``. Raises ``AlgorithmError``."""
    names = PLANNERS if planner else NAMES
    if name not in names:
        raise AlgorithmError(f"unknown algorithm {name!r}; expected one of {', '.join(names)}")
    return REGISTRY[name]
