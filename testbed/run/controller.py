"""The per-algorithm control loop: scenario tick -> apply -> snapshot -> plan -> migrate -> token -> record.

Backend-agnostic: it talks to a ``Cluster`` only, and to the planners through ``testbed.partition``.
An algorithm that fails (infeasible plan, OOM-killed agent) is recorded as a result and the loop
returns; only a ``BackendError`` (the testbed itself broke) propagates.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

from testbed.core.cluster import Cluster, TokenRecord

from testbed.core.errors import AgentLost, AlgorithmFailure, InfeasiblePlan, MigrationRefused
from testbed.core.placement import Placement
from testbed.partition import registry
from testbed.run.recorder import RunRecorder
from testbed.spec.scenario import Change, Timeline
from testbed.core.snapshot import ModelDims

MAX_RECOVERIES = 3  # crashed-agent restarts per token before the algorithm fails


@dataclass
class LoopSettings:
    algorithm: str
    repetition: int
    params: dict
    prompt_ids: list[int]
    new_tokens: int
    repartition_every: int
    cost_model: str
    allow_blocks_on_source: bool
    fixed_placement: Placement | None = None
    threshold_drop_pct: float = 20.0  # a resource drop this large triggers an immediate re-plan


@dataclass
class LoopState:
    placement: Placement | None = None
    elapsed_s: float = 0.0
    replan_now: bool = False
    initial_plan: Placement | None = None
    tokens: list[int] = field(default_factory=list)


def _plan(settings: LoopSettings, cluster: Cluster, dims: ModelDims, context_len: int, current: Placement | None,
          pending_limits: dict[str, float] | None = None):
    """Plan on the measured snapshot told the loop's policy; returns (PlanResult, that snapshot)."""
    from testbed.partition import plan

    snap = cluster.snapshot(context_len, settings.repartition_every)
    # the decision before token ``i`` runs at context prompt + i; the run ends at prompt + new_tokens
    token_index = context_len - len(settings.prompt_ids)
    snap = _with_policy(snap, current, settings.allow_blocks_on_source, pending_limits or {},
                        tokens_remaining=max(0, settings.new_tokens - token_index))
    return plan(settings.algorithm, snap, dims, cost_model=settings.cost_model, **settings.params), snap


def _with_policy(snap, current, allow_on_source, pending_limits: dict[str, float],
                 tokens_remaining: int | None = None):
    """The measured snapshot, told the current placement, the source policy, announced limits and
    how many context positions the run still adds (planners cap their memory horizons there)."""
    from dataclasses import replace

    devices = tuple(replace(d, mem_limit_bytes=int(pending_limits[d.name] * 2**20)) if d.name in pending_limits else d
                    for d in snap.devices)
    return replace(snap, devices=devices, current=current, allow_blocks_on_source=allow_on_source,
                   tokens_remaining=tokens_remaining)


def _is_drop(change: Change, before: dict, threshold_pct: float = 0.0) -> bool:
    """True if the change lowers bandwidth, memory or CPU by more than ``threshold_pct`` % of the
    value before it, raises a link's delay by more than that share (from 0: any rise of at least
    1 ms), raises its loss (any rise), or takes a link down / kills an agent (always)."""
    vals = change.values
    if vals.get("up") is False or vals.get("kill_agent") or vals.get("down") is True:
        return True
    for key in ("bandwidth_mbps", "mem_limit_mib", "cpu_cores"):
        if key in vals and key in before and before[key] and vals[key] < before[key] * (1 - threshold_pct / 100):
            return True
    if "delay_ms" in vals and "delay_ms" in before:
        old = before["delay_ms"]
        if vals["delay_ms"] > (old * (1 + threshold_pct / 100) if old > 0 else old + 1.0):
            return True
    return "loss_pct" in vals and "loss_pct" in before and vals["loss_pct"] > before["loss_pct"]


def apply_change(cluster: Cluster, change: Change) -> dict:
    """Apply one scenario change and return the read-back state the backend reports."""
    if change.link is not None:
        if change.direction is not None:
            return cluster.apply_link(change.link[0], change.link[1], direction=change.direction, **change.values)
        return cluster.apply_link(change.link[0], change.link[1], **change.values)
    values = dict(change.values)
    if "down" in values:
        set_down = getattr(cluster, "set_device_down", None)
        if set_down is None:
            raise AlgorithmFailure(f"backend cannot take device {change.host} down")
        return set_down(change.host, values.pop("down"))
    if values.pop("kill_agent", False):
        kill = getattr(cluster, "kill_agent", None)
        if kill is None:
            raise AlgorithmFailure(f"backend cannot kill the agent on {change.host}")
        kill(change.host)
    return cluster.set_host_limits(change.host, **values) if values else {"killed": change.host}


class AlgorithmLoop:
    """Runs one (algorithm, repetition) through the timeline and records everything."""

    def __init__(self, cluster: Cluster, recorder: RunRecorder, dims: ModelDims, settings: LoopSettings,
                 timeline: Timeline, on_token: Callable[[int], None] | None = None):
        self.cluster, self.rec, self.dims, self.s = cluster, recorder, dims, settings
        self.timeline = timeline
        self.state = LoopState()
        self.on_token = on_token or (lambda i: None)
        self.dynamic = registry.get(settings.algorithm).dynamic
        self._last_values: dict[tuple, dict] = {}
        self._mem_limits: dict[str, int] | None = None  # hosts' limits as last set, read once when needed
        self.applied: list[dict] = []  # scenario changes applied, with the backend's read-back

    def _ev(self, type_: str, **fields) -> None:
        self.rec.event(type_, algorithm=self.s.algorithm, repetition=self.s.repetition, **fields)

    def run(self) -> bool:
        """True if every token was generated; False if the algorithm failed (recorded)."""
        token_index = 0
        try:
            self._apply(0, self._apply_due(0))
            self._initial_plan()
            rec = self.cluster.load(self.state.placement, self.s.prompt_ids)
            self._record_token(0, rec, 0.0, 0, phase="prefill")
            for token_index in range(1, self.s.new_tokens):
                deferred = self._apply_due(token_index)
                stall_s = self._recover_lost(token_index, "agent crash found at the token boundary")
                mig_s, mig_b = self._maybe_replan(token_index, deferred)
                self._apply(token_index, deferred)
                if token_index % self.s.repartition_every == 0:
                    self._ev("mem_sample", token_index=token_index, host_mem_bytes=self.cluster.mem_bytes(),
                             host_peak_mem_bytes=self.cluster.peak_mem_bytes())
                rec, rec_s = self._step(token_index)
                self._record_token(token_index, rec, mig_s + stall_s + rec_s, mig_b, phase="decode")
        except AlgorithmFailure as exc:
            details = getattr(self.cluster, "failure_details", None)
            if details and details.get("kind") == "oom_kill":
                self._ev("oom_kill", token_index=token_index, **details)
            self._ev("algorithm_failed", token_index=token_index, reason=str(exc),
                     **({"details": details} if details else {}))
            return False
        except InfeasiblePlan as exc:  # OutOfScope included: a result, with the planner's numbers
            self._ev("algorithm_failed", token_index=token_index, reason=f"infeasible: {exc}",
                     code=exc.code)
            return False
        return True

    def _step(self, token_index: int) -> tuple[TokenRecord, float]:
        """One decode step; an agent that crashes during it is restarted (``_recover_lost``) and the
        step retried, at most ``MAX_RECOVERIES`` times. Returns the record and the recovery stall."""
        stall = 0.0
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                return self.cluster.step(self.state.tokens[-1]), stall
            except AgentLost as exc:
                if attempt == MAX_RECOVERIES or not hasattr(self.cluster, "recover"):
                    raise
                stall += self._recover_lost(token_index, str(exc))
        raise AssertionError("unreachable")

    def _recover_lost(self, token_index: int, cause: str) -> float:
        """Restart crashed agents (a backend with ``lost_agents``/``recover``): their blocks are rebuilt and
        every KV cache replayed from the history; the replay must give the last token again. A
        device that is gone (``lost_devices``) cannot be restarted: a dynamic algorithm re-places the
        placement on the survivors (its planner, on a snapshot that reports the device down), a
        static one fails naming the device. Returns the stall (seconds, 0 when nothing was lost); a
        recovery event records it."""
        crashed = getattr(self.cluster, "lost_agents", lambda: [])()
        gone = getattr(self.cluster, "lost_devices", lambda: [])()
        if not crashed and not gone:
            return 0.0
        placement = None
        if gone:
            placement = self._replace_lost(token_index, gone)
            cause = f"device {', '.join(gone)} gone: re-placed on the survivors"
        history = list(self.s.prompt_ids) + self.state.tokens[:-1]
        r = self.cluster.recover(history, placement)  # placement None: the current one
        if placement is not None:
            self.state.placement = placement
        if r.token_id != self.state.tokens[-1]:
            raise AlgorithmFailure(f"recovery of {', '.join(r.hosts)}: the replay gave token {r.token_id}, "
                                   f"the run had {self.state.tokens[-1]}")
        self._ev("recovery", token_index=token_index, hosts=r.hosts, duration_s=r.duration_s,
                 replayed_tokens=r.replayed_tokens, replayed_bytes=r.replayed_bytes, cause=cause)
        self.state.elapsed_s += r.duration_s
        return r.duration_s

    def _replace_lost(self, token_index: int, gone: list[str]) -> Placement:
        """A dynamic algorithm's placement without the devices that are gone (planned on a snapshot
        that reports them down); a static one, or a plan that does not fit, fails naming them."""
        if not self.dynamic:
            raise AlgorithmFailure(f"device {', '.join(gone)} is gone and {self.s.algorithm}'s static placement uses "
                                   f"it: a static algorithm does not re-place")
        context = len(self.s.prompt_ids) + token_index
        try:
            result, snap = _plan(self.s, self.cluster, self.dims, context, None)
        except InfeasiblePlan as exc:
            raise AlgorithmFailure(f"device {', '.join(gone)} is gone and its blocks fit nowhere else: {exc}") from None
        self._record_plan(token_index, result, snap)
        return result.placement

    def _initial_plan(self) -> None:
        if self.s.algorithm == "fixed":
            self.state.placement = self.s.fixed_placement
            self._ev("plan", token_index=0, placement=self.state.placement.to_json(),
                     predicted_token_latency_s=None, solve_time_s=0.0)
            return
        result, snap = _plan(self.s, self.cluster, self.dims, len(self.s.prompt_ids), None)
        self.state.placement = self.state.initial_plan = result.placement
        self._record_plan(0, result, snap)

    def _record_plan(self, token_index: int, result, snap) -> None:
        told = {d.name: {"limit_bytes": d.mem_limit_bytes, "overhead_bytes": d.mem_overhead_bytes}
                for d in snap.devices}  # what the planner was told about memory (diagnosing a choice)
        self._ev("plan", token_index=token_index, placement=result.placement.to_json(),
                 predicted_token_latency_s=result.predicted_token_latency_s, solve_time_s=result.solve_time_s,
                 predicted_migration_delay_s=result.migration_delay_s,
                 predicted_mem_bytes=result.predicted_mem_bytes,
                 predicted_peak_mem_bytes=result.predicted_peak_mem_bytes, peak_context_len=result.peak_context_len,
                 snapshot_mem=told,
                 **({"planner": result.extra} if result.extra else {}))

    def _apply_due(self, token_index: int) -> list[Change]:
        """Apply the changes due now, except memory-limit changes, which are returned: they are
        announced to the planner first (a device reports what it is about to have), so a dynamic
        algorithm can move blocks off a squeezed host before the limit is enforced."""
        due = self.timeline.due(token_index, self.state.elapsed_s)
        deferred = [c for c in due if c.host is not None and self._lowers_memory(c, token_index)]
        if deferred:
            self.state.replan_now = True
        self._apply(token_index, [c for c in due if c not in deferred])
        return deferred

    def _lowers_memory(self, change: Change, token_index: int) -> bool:
        """True for a memory-limit change below the host's current limit (raises apply at once)."""
        if "mem_limit_mib" not in change.values or self.state.placement is None:
            return False
        if self._mem_limits is None:
            snap = self.cluster.snapshot(len(self.s.prompt_ids) + token_index, self.s.repartition_every)
            self._mem_limits = {d.name: d.mem_limit_bytes for d in snap.devices}
        new = int(change.values["mem_limit_mib"] * 2**20)
        lower = new < self._mem_limits.get(change.host, new + 1)
        self._mem_limits[change.host] = new
        return lower

    def _apply(self, token_index: int, changes: list[Change]) -> None:
        for change in changes:
            key = (change.link, change.host, change.direction)
            before = self._last_values.get(key, {})
            readback = apply_change(self.cluster, change)
            self._last_values[key] = {**before, **change.values}
            if _is_drop(change, readback.get("before", before), self.s.threshold_drop_pct):
                self.state.replan_now = True
            self._ev("scenario_applied", token_index=token_index, change=change.describe(),
                     link=list(change.link) if change.link else None, host=change.host,
                     **({"direction": change.direction} if change.direction else {}),
                     values=change.values, readback=readback)
            self.applied.append({"token_index": token_index, "change": change.describe(), "readback": readback})

    def _maybe_replan(self, token_index: int, announced: list[Change]) -> tuple[float, int]:
        scheduled = token_index % self.s.repartition_every == 0
        if not self.dynamic or not (scheduled or self.state.replan_now):
            return 0.0, 0
        self.state.replan_now = False
        context = len(self.s.prompt_ids) + token_index
        pending = {c.host: c.values["mem_limit_mib"] for c in announced}
        result, snap = _plan(self.s, self.cluster, self.dims, context, self.state.placement, pending)
        self._record_plan(token_index, result, snap)
        if result.placement == self.state.placement:
            return 0.0, 0
        try:
            mig = self.cluster.migrate(result.placement)
        except MigrationRefused as exc:  # nothing moved: go on with the current placement
            self._ev("migration_refused", token_index=token_index, reason=str(exc))
            return 0.0, 0
        except AgentLost as exc:  # crashed mid-migration: the current placement rebuilt, no move
            if not hasattr(self.cluster, "recover"):
                raise
            return self._recover_lost(token_index, str(exc)), 0
        self.state.placement = result.placement
        self.state.elapsed_s += mig.duration_s
        self._ev("migration", token_index=token_index, duration_s=mig.duration_s, bytes_moved=mig.bytes_moved,
                 moves=[list(m) for m in mig.moves], trigger="schedule" if scheduled else "threshold")
        return mig.duration_s, mig.bytes_moved

    def _record_token(self, index: int, rec: TokenRecord, mig_s: float, mig_b: int, phase: str) -> None:
        times = {"latency_s": rec.latency_s, "compute_s": rec.compute_s, "transfer_s": rec.transfer_s,
                 "wait_s": rec.wait_s, "migration_s": mig_s}
        bad = {k: v for k, v in times.items() if not math.isfinite(v)}
        if bad:  # any backend: a time that is not a number is the algorithm's failure, never a NaN row
            raise AlgorithmFailure(f"token {index}: the backend reported non-finite times {bad}")
        self.state.tokens.append(rec.token_id)
        self.state.elapsed_s += rec.latency_s
        self.rec.token({
            "algorithm": self.s.algorithm, "repetition": self.s.repetition, "token_index": index,
            # a migration before this token stalls it: the user-visible latency includes it
            "token_id": rec.token_id, "context_len": len(self.s.prompt_ids) + index, "latency_s": rec.latency_s + mig_s,
            "compute_s": rec.compute_s, "transfer_s": rec.transfer_s, "wait_s": rec.wait_s,
            "migration_s": mig_s, "bytes_moved": rec.bytes_moved, "migrated_bytes": mig_b, "phase": phase,
            "bytes_by_link": json.dumps(rec.bytes_by_link, sort_keys=True) if rec.bytes_by_link else "",
        })
        self.on_token(index)
