"""Why an emulated step failed: dead agents, links down or lossy on a placement's paths.

``FailureDiagnosis`` is a mixin of ``testbed.backends.emulated.cluster.EmulatedCluster``: it reads
the cluster's ``pool`` (agents, their exit status), ``net`` (live links, routed paths), cgroups
(``_cg``, OOM-kill counters against ``_oom_seen``), ``placement`` and ``_path_state``, and turns what it
finds into ``AlgorithmFailure`` (a recorded result) or ``BackendError`` (a testbed fault). The
watchdog runs while a token or migration is in flight, so a failure ends the wait at once instead of
at the token timeout.
"""
from __future__ import annotations

import time

from node_agent import protocol as P
from node_agent.budget import BudgetError
from testbed.backends.emulated.agents import AgentCallError
from testbed.core.errors import AgentLost, AlgorithmFailure, BackendError, TokenFailed
from testbed.core.placement import Placement


class FailureDiagnosis:
    """Failure descriptions for ``EmulatedCluster`` (see the module docstring)."""

    def _failure(self) -> str | None:
        """A description of a dead agent that holds blocks (OOM kill or killed), else None."""
        used = self.placement.devices() if self.placement else set(self.hosts())
        dead = {h: rc for h, rc in self.pool.dead().items() if h in used}
        if not dead:
            self.failure_details = None
            return None
        host, rc = next(iter(dead.items()))
        st = self._cg(host).stats()
        oom = st["oom_kills"] > self._oom_seen.get(host, 0)
        what = "OOM-killed" if oom else "killed"
        self.failure_details = {"host": host, "kind": "oom_kill" if oom else "killed", "returncode": rc,
                                "oom_kills": st["oom_kills"], "usage_bytes": st["usage_bytes"],
                                "peak_bytes": st["peak_bytes"], "limit_bytes": st["memory_limit_bytes"]}
        return (f"agent on {host} was {what} (returncode {rc}, oom_kill {st['oom_kills']}); cgroup usage "
                f"{st['usage_bytes']} B, peak {st['peak_bytes']} B, limit {st['memory_limit_bytes']} B")

    def _watchdog(self) -> None:
        """Called while waiting for a token or migration: a dead agent or a link taken down on the
        placement's paths fails the algorithm at once instead of at the token timeout."""
        msg = self._failure()
        down = [] if msg else self._down_links(self.placement)
        if down:
            msg = f"link {', '.join(down)} went down on the placement's paths"
        if msg:
            self.dirty = True
            raise self._lost(msg)

    def _placement_links(self, placement: Placement | None) -> list:
        """The live links on any path between two devices of ``placement`` (all hosts if None)."""
        devs = sorted(placement.devices()) if placement else self.hosts()
        seen: dict[int, object] = {}
        for a in devs:
            for b in devs:
                if a != b:
                    for u, v in self.net.path(a, b):
                        link = self.net._live(u, v)
                        seen.setdefault(link.index, link)
        return [seen[i] for i in sorted(seen)]

    def _down_links(self, placement: Placement | None) -> list[str]:
        """Links that are down on the paths ``placement`` uses, as "a-b"."""
        if all(l.up for l in self.net.links):  # the common case, checked by the watchdog 5x a second
            return []
        return [f"{l.spec.a}-{l.spec.b}" for l in self._placement_links(placement) if not l.up]

    def _diagnose(self, grace_s: float = 1.0) -> str | None:
        """Why a token or migration could not finish: a dead agent (waiting up to ``grace_s`` for
        its exit to be reaped), a link down on the placement's paths, or lossy links; else None."""
        deadline = time.monotonic() + grace_s
        while True:
            msg = self._failure()
            if msg:
                return msg
            down = self._down_links(self.placement)
            if down:
                return f"link {', '.join(down)} is down on the placement's paths"
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        lossy = [f"{l.spec.a}-{l.spec.b} ({max(st['loss_pct'] for st in l.state.values()):g}% loss)"
                 for l in self._placement_links(self.placement) if any(st["loss_pct"] for st in l.state.values())]
        return f"lossy links on the placement's paths: {', '.join(lossy)}" if lossy else None

    def _lost(self, message: str) -> AlgorithmFailure:
        """``AgentLost`` when the diagnosis found an agent killed without an OOM kill (a crash the
        device survives), else a plain ``AlgorithmFailure``."""
        d = self.failure_details or {}
        if d.get("kind") == "killed":
            return AgentLost(message, [d["host"]])
        return AlgorithmFailure(message)

    def _guard(self, what: str, fn):
        try:
            return fn()
        except AlgorithmFailure as exc:  # from the watchdog: say what it interrupted
            raise self._lost(f"{what}: {exc}") from None
        except P.RemoteError as exc:
            if exc.code == BudgetError.code:
                raise AlgorithmFailure(f"{what} refused: {exc.message}") from None
            self.dirty = True
            if exc.code not in ("timeout", "runtime", TokenFailed.code):
                msg = self._diagnose(0.0)
                if not msg:
                    raise BackendError(f"{what}: {exc}") from None
            else:
                msg = self._diagnose()
            raise self._lost(f"{what}: {msg} ({exc.message})" if msg else f"{what}: {exc.message}") from None
        except (AgentCallError, P.CallTimeout) as exc:
            self.dirty = True
            msg = self._diagnose()
            raise self._lost(f"{what}: {msg} ({exc})" if msg else f"{what}: {exc}") from None

    def _check_paths(self, placement: Placement) -> None:
        devs = sorted(placement.devices())
        for a in devs:
            for b in devs:
                if a != b and not self._path_state(a, b).up:
                    raise AlgorithmFailure(f"placement needs {a}->{b} but link "
                                           f"{', '.join(self._down_links(placement))} is down")
        self._watchdog()
