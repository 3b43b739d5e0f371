"""A node agent's memory budget: the host cgroup's limit and usage (v1 or v2), the refusal rule
(loads keep a margin free; an import's transient copies may use it down to a small reserve), and
the allocator settings that make freed tensor memory go back to the kernel at once.
"""
from __future__ import annotations

from pathlib import Path

from testbed.core.errors import AgentError

MIB = 1 << 20
TRANSIENT_RESERVE = 512 * 1024  # left free even at an import's peak (interpreter, socket buffers)


class BudgetError(AgentError):
    """A load or import would exceed the host's memory limit."""

    code = "budget"

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


class Budget:
    """Reads the host cgroup's limit and usage (v1 or v2 memory directory); no dir = unlimited."""

    def __init__(self, host: str, mem_dir: str | None, version: str | None, margin_bytes: int = 2 * MIB):
        self.host, self.dir, self.version, self.margin = host, Path(mem_dir) if mem_dir else None, version, margin_bytes

    def read(self) -> tuple[int, int]:
        """(limit_bytes, usage_bytes); limit -1 when unlimited."""
        if self.dir is None:
            return -1, rss_bytes()
        if self.version == "v1":
            limit = int((self.dir / "memory.limit_in_bytes").read_text())
            return (limit if limit < (1 << 60) else -1), int((self.dir / "memory.usage_in_bytes").read_text())
        text = (self.dir / "memory.max").read_text().strip()
        return (-1 if text == "max" else int(text)), int((self.dir / "memory.current").read_text())

    def available(self) -> int:
        limit, usage = self.read()
        return 1 << 62 if limit < 0 else limit - usage - self.margin

    def check(self, needed: int, what: str, transient: bool = False) -> None:
        """Refuse ``needed`` more bytes unless they fit. Memory a load keeps must leave the margin
        free; a ``transient`` peak (an import's copies, freed when it completes) may use the margin
        down to ``TRANSIENT_RESERVE`` — that is what the margin is kept for."""
        limit, usage = self.read()
        if limit < 0:
            return
        keep = min(self.margin, TRANSIENT_RESERVE) if transient else self.margin
        if needed > limit - usage - keep:
            return_freed_memory()  # freed tensors may still sit in malloc's arenas, charged to us
            limit, usage = self.read()
        avail = limit - usage - keep
        if needed > avail:
            raise BudgetError(
                f"{self.host}: {what} needs {needed} B {'at its peak ' if transient else ''}but only "
                f"{max(avail, 0)} B are available (limit {limit} B, usage {usage} B, "
                f"{'reserve' if transient else 'margin'} {keep} B)",
                {"host": self.host, "needed_bytes": needed, "available_bytes": avail, "limit_bytes": limit,
                 "usage_bytes": usage})


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
    return _LIBC


def tune_allocator() -> None:
    """Serve large allocations (tensors) by mmap so that freeing a block returns its pages to the
    kernel at once: the cgroup then charges what the agent holds, not what it once held."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc = _libc()
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)


def return_freed_memory() -> None:
    """Give free heap pages back to the kernel (glibc malloc_trim)."""
    _libc().malloc_trim(0)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
