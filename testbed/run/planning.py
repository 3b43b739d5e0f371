"""``headroom plan``: place the model for an experiment's initial snapshot, without any network.

The initial snapshot is the topology as specified (the simulated backend's exact state), at the
prompt's context length, with the run's ``new_tokens`` still to come (as the first decision of a run).
"""
from __future__ import annotations

from testbed.spec.modelref import ModelRefError, resolve_model
from testbed.spec.schema import ExperimentSpec
from testbed.core.errors import HeadroomError


class PlanningError(HeadroomError):
    """The algorithm could not place the model (unknown name, infeasible, out of the solver's scope)."""

    code = "planning"


def plan_initial(spec: ExperimentSpec, algorithm: str) -> dict:
    from dataclasses import replace

    from testbed.partition import InfeasiblePlan, plan, registry
    from testbed.partition.regime import regime_of
    from testbed.backends.simulated.build import build_simulated_cluster

    try:
        registry.get(algorithm, planner=True)
    except registry.AlgorithmError as exc:
        raise PlanningError(str(exc)) from None
    try:
        model = resolve_model(spec.model)
    except ModelRefError as exc:
        raise PlanningError(str(exc)) from None
    cluster = build_simulated_cluster(spec.topology, model, host_overhead_mib=spec.simulation.host_overhead_mib,
                                      weights_from=spec.migration.weights_from)
    snap = cluster.snapshot(spec.workload.prompt_tokens, spec.repartition_every_tokens)
    # as a run's first decision sees it: the run adds ``new_tokens`` positions (memory horizons end there)
    snap = replace(snap, allow_blocks_on_source=spec.allow_blocks_on_source, tokens_remaining=spec.workload.new_tokens)
    params = next((a.params for a in spec.algorithm_specs() if a.name == algorithm), {})
    try:
        result = plan(algorithm, snap, model.dims, cost_model=spec.cost_model, **params)
    except InfeasiblePlan as exc:
        raise PlanningError(f"infeasible: {exc}") from None
    except registry.AlgorithmError as exc:
        raise PlanningError(str(exc)) from None
    regime = regime_of(snap, model.dims)
    return {
        "algorithm": algorithm,
        "cost_model": spec.cost_model,
        "predicted_token_latency_s": result.predicted_token_latency_s,
        "solve_time_s": result.solve_time_s,
        "predicted_mem_bytes": result.predicted_mem_bytes,
        "predicted_peak_mem_bytes": result.predicted_peak_mem_bytes,
        "peak_context_len": result.peak_context_len,
        "placement": result.placement.to_json(),
        **({"planner": result.extra} if result.extra else {}),
        **({"regime": regime.to_json()} if regime is not None else {}),
    }
