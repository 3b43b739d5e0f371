"""RA's incremental re-decision (``resource_aware(..., incremental=True)``): when the snapshot
differs from the one the current placement was decided on only in links, limits or speeds that
got WORSE, only the layers whose dataflow touches a changed path or device are placed again by
the greedy (fewer anchors), and step 5 (``ra.choice.choose_plan``: stay, the new plan or a
per-layer mix; forced and anticipated memory repairs) decides as in a full decision. Step 6
(leveling) then moves blocks only within the layers step 5 changed: the others were leveled when
they were made (re-leveling all of them made one 64-device re-decision 45 ms instead of 8).

What the last decision saw travels with its placement: ``placement.meta["ra_basis"]``, a
``Basis`` (device names, path matrices, budgets, speeds, the parameters). The context grows
between decisions, so nothing computed for the last snapshot is reused as a number: every
candidate is evaluated at the new context (latency, migration, fit), and the current
placement's fit at the new memory horizon is checked by ``choose_plan`` as always. What is
reused is the search's outcome: layers nothing changed for keep their blocks unless a forced
repair moves them (a full decision could still move them for the context's growth alone; the
last decision judged them where they are). Anything else — a device or path that got better
(a recovery can attract blocks of any layer), other devices or parameters, no basis — falls
back to the full decision (``None``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.core.placement import Placement
from testbed.partition.common import NoFit, Problem


@dataclass(frozen=True, eq=False)
class Basis:
    """The snapshot a placement was decided on, as the planner saw it."""

    names: tuple
    lat: np.ndarray
    spb: np.ndarray
    budget: np.ndarray
    C: np.ndarray
    allowed: np.ndarray
    dims: object
    cost_model: str
    params: tuple


def basis(prob: Problem, params: tuple) -> Basis:
    return Basis(tuple(prob.names), prob.lat, prob.spb, prob.budget, prob.C, prob.allowed, prob.dims,
                 prob.cost_model, params)


def with_basis(pl: Placement, prob: Problem, params: tuple) -> Placement:
    """``pl`` carrying the snapshot it was decided on (``meta["ra_basis"]``; meta is not part of
    a placement's identity, and ``PlanResult`` reports only scalar meta)."""
    return Placement(pl.source, pl.layers, meta={**pl.meta, "ra_basis": basis(prob, params)})


def _worse_only(prob: Problem, b: Basis) -> tuple[np.ndarray, np.ndarray] | None:
    """(changed paths [from, to], changed devices) when every change is for the worse, else None."""
    if b.names != tuple(prob.names) or b.dims != prob.dims or b.cost_model != prob.cost_model:
        return None
    with np.errstate(invalid="ignore"):
        up_lat, up_spb = prob.lat > b.lat, prob.spb > b.spb
        down = (prob.lat < b.lat) | (prob.spb < b.spb)
    if down.any() or (prob.budget > b.budget).any() or (prob.C > b.C).any() or (prob.allowed & ~b.allowed).any():
        return None
    dev = (prob.budget < b.budget) | (prob.C < b.C) | (b.allowed & ~prob.allowed)
    return up_lat | up_spb, dev


def _touched(prob: Problem, cur: Placement, paths: np.ndarray, dev: np.ndarray) -> set[int]:
    """Layers whose blocks sit on a changed device or whose messages use a changed path."""
    idx, out, A = prob.index, set(), prob.src
    L = len(cur.layers)
    for l, lp in enumerate(cur.layers):
        P, agg = idx[lp.proj], idx[lp.ffn[0].device]
        heads = np.array([idx[d] for d in dict.fromkeys(lp.heads)])
        shards = np.array([idx[s.device] for s in lp.ffn])
        # (the diagonal never changes: a block's message to its own device is free)
        if (dev[heads].any() or dev[shards].any() or dev[P] or dev[A] or paths[A, heads].any() or paths[A, P]
                or paths[heads, P].any() or paths[P, shards].any() or paths[shards, agg].any()
                or (l == L - 1 and paths[agg, prob.src])):
            out.add(l)
        A = agg
    return out


def redecide(prob: Problem, K: int, params: tuple, decide) -> Placement | None:
    """The incremental re-decision, or None (full decision needed). ``decide(new, budget,
    changed_only)`` is steps 5-6 of a full decision (``choose_plan`` with the planner's settings,
    then leveling — here only of the layers step 5 changed)."""
    from testbed.partition.ra.greedy import replan_layers

    cur = prob.snap.current
    b = cur.meta.get("ra_basis") if cur is not None else None
    if not isinstance(b, Basis) or b.params != params or len(cur.layers) != prob.dims.n_layers:
        return None
    if cur.source != prob.snap.source or not cur.devices() <= set(prob.names):
        return None
    diff = _worse_only(prob, b)
    if diff is None:
        return None
    which = _touched(prob, cur, *diff)
    paths, dev = diff
    moved = dev | (paths.mean(axis=1) > 0.5) | (paths.mean(axis=0) > 0.5)  # its own link or limits
    if len(which) == prob.dims.n_layers:
        return None
    new = cur
    if which:
        try:
            new = Placement(cur.source, replan_layers(prob, K, 1, cur.layers, which, prob.budget, moved),
                            meta={**cur.meta, "incremental_layers": len(which)})
        except NoFit:
            return None
    return decide(new, prob.budget, changed_only=True)
