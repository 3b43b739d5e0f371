"""``PathMatrix``: the pairwise paths of a snapshot as dense arrays behind the mapping interface.

``ClusterSnapshot.paths`` is a mapping ``(a, b) -> LinkState`` with both orders present and no
``(a, a)``. At 100+ devices that is 10 000+ objects that every snapshot builds and every planner
turns back into matrices; a backend that computes paths as arrays hands them over as a
``PathMatrix`` instead (``LinkState`` objects are made only when one pair is looked up), and
``PathMatrix.arrays`` gives planners the matrices without a Python loop over the pairs.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator

import numpy as np

from testbed.core.snapshot import LinkState


class PathMatrix(Mapping):
    """``(a, b) -> LinkState`` over ``names`` from ``bandwidth`` (bytes/s), ``latency`` (s) and
    ``up`` (n x n; the diagonal is ignored: no ``(a, a)`` key). Read-only."""

    def __init__(self, names: list[str], bandwidth: np.ndarray, latency: np.ndarray, up: np.ndarray):
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.bandwidth, self.latency = np.asarray(bandwidth, dtype=float), np.asarray(latency, dtype=float)
        self.up = np.asarray(up, dtype=bool)
        for a in (self.bandwidth, self.latency, self.up):
            a.setflags(write=False)

    def __getitem__(self, key: tuple[str, str]) -> LinkState:
        a, b = key
        i, j = self.index.get(a), self.index.get(b)
        if i is None or j is None or i == j:
            raise KeyError(key)
        return LinkState(float(self.bandwidth[i, j]), float(self.latency[i, j]), up=bool(self.up[i, j]))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        names = self.names
        return ((a, b) for a in names for b in names if a != b)

    def __len__(self) -> int:
        n = len(self.names)
        return n * (n - 1)

    def divided(self, devices: set[str], divisor: float) -> "PathMatrix":
        """A copy with the bandwidth of every path to or from one of ``devices`` divided by
        ``divisor`` (a scenario's "these links drop" without a loop over the pairs)."""
        hit = np.isin(np.asarray(self.names), list(devices))
        touch = hit[:, None] | hit[None, :]
        return PathMatrix(self.names, np.where(touch, self.bandwidth / divisor, self.bandwidth), self.latency, self.up)

    def arrays(self, names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(bandwidth, latency, up) rows and columns in ``names`` order, or None when a name is
        not one of this matrix's."""
        idx = [self.index.get(n, -1) for n in names]
        if min(idx, default=0) < 0:
            return None
        ix = np.asarray(idx)
        sel = np.ix_(ix, ix)
        return self.bandwidth[sel], self.latency[sel], self.up[sel]
