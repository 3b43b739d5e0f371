"""Live state of an emulated network's links: each link's ends and the shaping in force per
direction, and the one-way delays (seconds) the transport applies where the kernel has no netem
(written by ``testbed.emulation.network`` when links change, read by the agents' receivers), and
the path figures (one-way delay, bottleneck rate, loss) over those links."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

from testbed.spec.schema import LinkSpec


class DelayTable:
    """Thread-safe one-way delays (seconds) between hosts, and the jitter of each hop on the way
    (seconds, uniform ±j per hop and frame); agents read it per frame."""

    def __init__(self):
        self._lock = threading.Lock()
        self._d: dict[tuple[str, str], float] = {}
        self._j: dict[tuple[str, str], tuple[float, ...]] = {}

    def replace(self, delays: dict[tuple[str, str], float],
                jitters: dict[tuple[str, str], tuple[float, ...]] | None = None) -> None:
        with self._lock:
            self._d = dict(delays)
            self._j = {k: tuple(v) for k, v in (jitters or {}).items() if any(v)}

    def get(self, src: str, dst: str) -> float:
        with self._lock:
            return self._d.get((src, dst), 0.0)

    def jitter(self, src: str, dst: str) -> tuple[float, ...]:
        """The per-hop jitters (seconds) a transport draws from for a frame src -> dst (empty: none)."""
        with self._lock:
            return self._j.get((src, dst), ())

    def getter(self, src: str, dst: str):
        """A zero-argument callable for ``recv_frame(delay_s=...)`` that follows later changes."""
        return lambda: self.get(src, dst)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {f"{s}->{d}": v for (s, d), v in self._d.items()}


@dataclass
class End:
    node: str
    dev: str
    netns_pid: Optional[int]  # None: root namespace (switch side)


@dataclass
class LiveLink:
    index: int
    spec: LinkSpec
    ends: dict[str, End]  # node name -> its end
    state: dict[str, dict] = field(default_factory=dict)  # src node -> {bandwidth_mbps, delay_ms, loss_pct, jitter_ms}
    up: bool = True

    def other(self, node: str) -> str:
        return self.spec.b if node == self.spec.a else self.spec.a


class LinkPaths:
    """Path figures over live links, shared by the emulated network and the SSH backend's fleet: a
    subclass provides ``links`` (``LiveLink``), ``path(src, dst)`` (routed hops) and ``_lock``."""

    def _live(self, a: str, b: str) -> LiveLink:
        for l in self.links:
            if set(l.ends) == {a, b}:
                return l
        raise KeyError(f"no link between {a} and {b}")

    def one_way_delay_s(self, src: str, dst: str) -> float:
        with self._lock:
            return sum(self._live(u, v).state[u]["delay_ms"] for u, v in self.path(src, dst)) / 1000.0

    def path_rate_bytes_per_s(self, src: str, dst: str) -> float:
        """Bottleneck of the current per-direction rates along the routed path (bytes/s)."""
        with self._lock:
            return min(self._live(u, v).state[u]["bandwidth_mbps"] for u, v in self.path(src, dst)) * 1e6 / 8

    def path_jitter_s(self, src: str, dst: str) -> tuple[float, ...]:
        """The jitter (seconds, uniform ±j) of every hop src -> dst that has any, as specified."""
        with self._lock:
            return tuple(j / 1000.0 for u, v in self.path(src, dst)
                         if (j := self._live(u, v).state[u].get("jitter_ms", 0.0)) > 0)

    def path_loss(self, src: str, dst: str) -> float:
        keep = 1.0
        for u, v in self.path(src, dst):
            keep *= 1 - self._live(u, v).state[u]["loss_pct"] / 100.0
        return 1 - keep

