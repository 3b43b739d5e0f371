"""Errors raised by planners. ``InfeasiblePlan`` carries the numbers (device, shortfall, totals)."""
from __future__ import annotations


class InfeasiblePlan(ValueError):
    """No placement satisfies the memory limits (or the request is out of an algorithm's scope)."""


class OutOfScope(InfeasiblePlan):
    """The instance is larger than an exact solver is documented to handle."""


class NoFit(Exception):
    """A greedy pass found no device with room for ``block`` (``nbytes``); RA retries, then turns
    it into ``InfeasiblePlan`` with the numbers."""

    def __init__(self, block: str, nbytes: float):
        super().__init__(block)
        self.block, self.nbytes = block, nbytes


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"
