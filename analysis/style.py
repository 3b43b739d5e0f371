"""Shared figure style: units (ms, MiB), one colour per algorithm, the latency-part colours.

Colours follow the order of ``testbed.partition.registry`` (fixed, so an algorithm keeps its colour
across figures and runs); an unknown name gets a stable colour from its characters.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from testbed.partition.registry import NAMES  # noqa: E402

MS, MIB = 1e3, 2.0 ** 20  # seconds -> ms, bytes -> MiB
PART_COLORS = {"compute_s": "#4c72b0", "transfer_s": "#dd8452", "wait_s": "#8c8c8c", "migration_s": "#c44e52"}
FAIL_COLOR = "#b00020"


def linestyle(algo: str, k: int) -> object:
    """Distinct dashes so that algorithms with identical curves stay visible on top of each other."""
    return ["-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (3, 3))][k % 5]


def color(algo: str) -> str:
    cmap = plt.get_cmap("tab10")
    idx = NAMES.index(algo) if algo in NAMES else len(NAMES) + sum(map(ord, algo))
    return matplotlib.colors.to_hex(cmap(idx % 10))
