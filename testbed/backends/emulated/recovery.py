"""Lost agents and lost devices on the emulated cluster (``EmulatedCluster``'s failure handling).

A crashed agent (died without an OOM kill, ``kill_agent``) is restarted in its host and rebuilt
from the checkpoint plus a replay of the tokens so far (``recover``); a device that goes away
(``set_device_down``) is reported down to the planners, and the run either re-plans on the
survivors (``recover(placement=...)``) or fails naming it. A mixin over the cluster's pool,
cgroups and placement state.
"""
from __future__ import annotations

import time

from testbed.core.cluster import RecoveryRecord
from testbed.core.errors import AlgorithmFailure, BackendError
from testbed.core.placement import Placement


class AgentRecovery:
    """``EmulatedCluster``'s lost-agent and lost-device handling (module docstring)."""

    def kill_agent(self, host: str) -> None:
        self.pool.kill(self.pool.agents[host])

    def set_device_down(self, host: str, down: bool) -> dict:
        """``down``: the device is gone — its agent is killed and not restarted, snapshots report it
        down (planners place nothing there), and a placement using it must be re-placed
        (``lost_devices``, ``recover(placement=...)``). Back up: a fresh agent with no blocks."""
        if host not in self.hosts():
            raise BackendError(f"no host {host} in the emulated topology")
        if down and host == self.topology.source:
            raise AlgorithmFailure(f"the source {host} cannot go down: it issues the tokens")
        before = {"down": host in self.down}
        if down and host not in self.down:
            self.down.add(host)
            self.pool.kill(self.pool.agents[host])
        elif not down and host in self.down:
            self.down.discard(host)
            self.pool.respawn(host)
            self.pool.configure_all(self.live_hosts())
        self._changed_hosts.add(host)
        return {"host": host, "down": host in self.down, "before": before}

    def live_hosts(self) -> list[str]:
        return [h for h in self.hosts() if h not in self.down]

    def lost_devices(self) -> list[str]:
        """Hosts of the current placement that are gone (``set_device_down``)."""
        return sorted(self.placement.devices() & self.down) if self.placement is not None else []

    def lost_agents(self) -> list[str]:
        """Hosts of the current placement whose agent died without an OOM kill (crashed; the device
        is up, so ``recover`` can restart it). An OOM-killed agent is a result, not a crash."""
        if self.placement is None:
            return []
        used = self.placement.devices() - self.down
        dead = [h for h in self.pool.dead() if h in used]
        return [h for h in dead if self._cg(h).oom_kills() <= self._oom_seen.get(h, 0)]

    def recover(self, history: list[int], placement: Placement | None = None) -> RecoveryRecord:
        """Restart the crashed agents of the current placement (``lost_agents``) in their hosts,
        rebuild the placement's blocks (every agent drops and rebuilds its own from the checkpoint,
        so a crash in the middle of a migration leaves nothing half-moved), and rebuild every KV cache
        by replaying ``history`` (prompt and tokens generated so far, the last excluded) as one
        prefill from position 0. ``placement``: switch to it (after a device is gone: the planner's
        placement on the survivors). Returns what it took, with the replay's next token (the caller
        checks it against the run's)."""
        lost = self.lost_agents()
        gone = self.lost_devices()
        if not lost and not gone:
            raise BackendError("recover(): no crashed agent or lost device on the current placement")
        target = placement or self.placement
        if target.devices() & self.down:
            raise AlgorithmFailure(f"recovery: the placement still uses lost device(s) {sorted(target.devices() & self.down)}")
        t0 = time.time()
        for h in lost:
            self.pool.respawn(h)
        live = self.live_hosts()
        self.pool.configure_all(live)  # peers' sockets to the old process closed, delays and pacing again
        self.pv += 1
        self.placement, pj = target, target.to_json()
        self._guard("recovery", lambda: self.pool.each(
            lambda h: self.pool.call(h, "load", 300.0, placement=pj, pv=self.pv), live))
        self.context_len = 0
        rec = self._forward(list(history))
        self.dirty = False
        return RecoveryRecord(lost + gone, time.time() - t0, len(history), rec.bytes_moved, rec.token_id)
