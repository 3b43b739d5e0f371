"""The several-layer exact search's shared pieces (``exact.chain``): its tolerances, the
shortest-path bounds over the chain of layers, and the small records the search passes
around (columns, nodes, a node MILP's outcome, the result)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.core.placement import Placement

INF = float("inf")
REL_TOL = 1e-9  # relative slack for float noise between the tables and decode_cost
MIP_REL_GAP = 1e-9  # the MILPs' optimality: relative gap, and no absolute one (HiGHS' default
MIP_ABS_GAP = 0.0  # 1e-6 would stop 0.3 us above the optimum of a 17 ms objective)
OBJ_SCALE = 1e3  # the MILPs' objective in milliseconds (HiGHS' tolerances are absolute)


# --------------------------------------------------------------------------------------- bounds
@dataclass
class ChainBounds:
    """Shortest paths over the chain of layers for one per-layer table ``layer[A, r]`` (least
    cost of a layer from input A to output on r): ``fwd[l][A]`` the least cost until layer
    ``l``'s input is on A (layer 0's input is the source), ``bwd[l][A]`` the least cost from
    layer ``l``'s input on A to the end (``bwd[L]``: the final send and the LM head)."""

    fwd: np.ndarray  # (L + 1, n_all)
    bwd: np.ndarray  # (L + 1, n_all)
    total: float  # the least cost of the whole chain (from the source)


def chain_bounds(layer: np.ndarray, src: int, final: np.ndarray, L: int) -> ChainBounds:
    n_all = layer.shape[0]
    fwd = np.full((L + 1, n_all), INF)
    fwd[0, src] = 0.0
    for l in range(L):
        fwd[l + 1] = (fwd[l][:, None] + layer).min(axis=0)
    bwd = np.full((L + 1, n_all), INF)
    bwd[L] = final
    for l in range(L - 1, -1, -1):
        bwd[l] = (layer + bwd[l + 1][None, :]).min(axis=1)
    return ChainBounds(fwd, bwd, float(bwd[0, src]))


def layer_table(att: np.ndarray, ffn: np.ndarray) -> np.ndarray:
    """``att[A, iP]`` (input A to the proj's finish) and ``ffn[iP, r]`` (to the output on r):
    the least cost of one layer from A to r over the proj's position."""
    return (att[:, :, None] + ffn[None, :, :]).min(axis=1)


# --------------------------------------------------------------------------------------- search
@dataclass
class ChainResult:
    placement: Placement
    latency_s: float  # decode_cost of the placement
    lower_bound_s: float  # no plan of the space is faster than this
    certified: bool
    meta: dict


@dataclass(frozen=True)
class Column:
    """A master column: layer l, and either an attention option (A, iP, head-count row) or an
    FFN option (index ``f``)."""

    l: int
    A: int = -1
    iP: int = -1
    row: int = -1
    f: int = -1


@dataclass
class MilpOutcome:
    """A node MILP's answer: its best solution (None: none below the cutoff or none found), a
    proven lower bound on its solutions (capped at the cutoff), whether its search finished."""

    cols: list | None
    bound: float
    complete: bool


@dataclass(frozen=True)
class Node:
    """A branch of the search over which devices serve as some layer's output (aggregator):
    ``entered`` devices are, so some layer brings its output there from another device (the chain
    starts on the source, so the first layer ending on one of them comes from elsewhere);
    ``unused`` devices are no layer's output. Every plan lies in exactly one leaf."""

    entered: frozenset = frozenset()
    unused: frozenset = frozenset()
