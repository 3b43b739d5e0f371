"""The ``Cluster`` protocol: the one interface between the controller and a backend.

Backends: emulated (Mininet + cgroups + node agents), simulated (cost-model replay in simulated
time), ssh (the same agents on real devices over SSH). The controller only ever calls
these methods. Their errors (``BackendError``, ``AlgorithmFailure``, ``MigrationRefused``) live in
``testbed.core.errors``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from testbed.core.placement import Placement
from testbed.core.snapshot import ClusterSnapshot


@dataclass
class TokenRecord:
    """One generated token and where its time went (seconds, bytes)."""

    token_id: int  # the sampled token
    latency_s: float
    compute_s: float  # on the critical path
    transfer_s: float  # on the critical path
    wait_s: float = 0.0  # everything else on the critical path (queueing, scheduling)
    bytes_moved: int = 0  # activation bytes sent between devices for this token
    bytes_by_link: dict[str, int] = field(default_factory=dict)  # "h1->h2": bytes


@dataclass
class RecoveryRecord:
    """A restart of crashed agents: their blocks reloaded and every KV cache rebuilt by replaying
    the token history as one prefill (whose output must be the last token generated)."""

    hosts: list[str]
    duration_s: float
    replayed_tokens: int
    replayed_bytes: int  # activations the replay moved between hosts
    token_id: int  # the replay's next token


@dataclass
class MigrationRecord:
    duration_s: float
    bytes_moved: int
    moves: list[tuple[str, str, str]]  # (block_id, from, to)


class Cluster(Protocol):
    def hosts(self) -> list[str]: ...

    def apply_link(self, a: str, b: str, *, bandwidth_mbps: float | None = None,
                   delay_ms: float | None = None, loss_pct: float | None = None,
                   up: bool | None = None, direction: str | None = None) -> dict:
        """Change a link in place — both directions, or only the traffic leaving ``direction``
        (a or b) — and return the read-back state, with the state before under ``"before"``."""
        ...

    def set_host_limits(self, host: str, *, mem_limit_mib: float | None = None,
                        cpu_cores: float | None = None) -> dict:
        """Change a host's limits; return the read-back state."""
        ...

    def load(self, placement: Placement, prompt_ids: list[int]) -> TokenRecord:
        """Instantiate blocks as placed, run the prompt (prefill) and return the first token."""
        ...

    def step(self, token_id: int) -> TokenRecord:
        """Feed ``token_id`` and decode the next token."""
        ...

    def migrate(self, new: Placement) -> MigrationRecord:
        """Move blocks (weights + KV) so that ``new`` holds; routing switches between tokens."""
        ...

    def snapshot(self, context_len: int, tokens_until_next_decision: int) -> ClusterSnapshot:
        """Measured device and path state (rates, memory, compute speed) and the current placement."""
        ...

    def peak_mem_bytes(self) -> dict[str, int]:
        """Per-host peak memory charged since ``reset``."""
        ...

    def mem_bytes(self) -> dict[str, int]:
        """Per-host memory charged now."""
        ...

    def reset(self) -> None:
        """Drop all blocks and restore the topology's initial link and host state."""
        ...

    def close(self) -> None: ...
