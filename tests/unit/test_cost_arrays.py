"""``cost.arrays`` (the planners' array evaluation of the ``decode`` model) gives the same floats
as ``latency.decode_cost`` (serialised NICs): token latency and bytes on the links, on RA's plans
and on random plans that exercise every branch (heads on the input device and on the proj,
the proj holding a non-aggregator shard, shards on the input device, unequal shards)."""
import random

import numpy as np
import pytest

from testbed.core.snapshot import ModelDims
from testbed.core.placement import FfnShard, LayerPlacement, Placement
from testbed.core.errors import InfeasiblePlan
from testbed.partition import plan
from testbed.partition.layer.baselines import galaxy_plans
from testbed.partition.common import Problem
from testbed.partition.cost.arrays import PlanArrays
from testbed.partition.cost.latency import decode_cost
from testbed.partition.synthetic import GPT2, SMOLLM2, random_star


def _random_plan(rng: random.Random, prob: Problem, dims, wide: bool = False) -> Placement:
    """Layers over 1-6 devices (or, ``wide``, up to 20: computed one by one, as the reference)."""
    names = prob.allowed_names() + [prob.names[prob.src]]
    layers = []
    for _ in range(dims.n_layers):
        devs = rng.sample(names, min(len(names), rng.randint(1, 30 if wide else 6)))
        heads = tuple(rng.choice(devs) for _ in range(dims.n_kv_heads))
        k = rng.randint(1, 16 if wide else 4)
        b = [0, *sorted(rng.sample(range(1, dims.ffn_dim), k - 1)), dims.ffn_dim]
        ffn = tuple(FfnShard(rng.choice(devs), b[i], b[i + 1]) for i in range(k))
        layers.append(LayerPlacement(heads, rng.choice(devs), ffn))
    return Placement(prob.snap.source, tuple(layers))


LLAMA7 = ModelDims("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, gated_ffn=True, tie_embeddings=False,
                   weight_format="q4_0")


@pytest.mark.parametrize("dims,n,seed", [(GPT2, 9, 0), (GPT2, 25, 1), (SMOLLM2, 12, 2), (LLAMA7, 33, 3)])
def test_array_latency_is_decode_cost_exactly(dims, n, seed):
    snap = random_star(np.random.default_rng(seed), n, dims, context_len=48)
    prob = Problem(snap, dims)
    arrays = PlanArrays(prob)
    rng = random.Random(seed)
    plans = [_random_plan(rng, prob, dims, wide=i % 3 == 2) for i in range(12)]
    plans.append(plan("resource_aware", snap, dims).placement)
    # Galaxy over 12-32 devices: FFN split over more than ``WIDE_FFN`` devices (``PlanArrays._one``)
    plans += [pl for _, pl in galaxy_plans(prob, [2, 4, 8, 12, 24, 32]) if not isinstance(pl, InfeasiblePlan)]
    for pl in plans:
        ref = decode_cost(pl, snap, dims)
        got = arrays.latency(pl)
        assert got.token_latency_s == ref.token_latency_s
        assert got.bytes_moved == ref.bytes_moved
    # the memo per (layer, input device) answers a plan again with the same numbers
    assert arrays.latency(plans[0]) == arrays.latency(plans[0])


def test_down_paths_give_what_decode_cost_gives():
    """A device whose paths are down: inf (or nan, inf - inf in a queue) exactly where decode_cost has it."""
    import math
    from dataclasses import replace

    from testbed.core.snapshot import LinkState

    snap = random_star(np.random.default_rng(4), 12, GPT2, context_len=48)
    paths = {k: (LinkState(v.bandwidth_bytes_per_s, v.latency_s, up=False) if "d3" in k else v)
             for k, v in snap.paths.items()}
    snap = replace(snap, paths=paths)
    prob = Problem(snap, GPT2)
    arrays, rng, finite = PlanArrays(prob), random.Random(1), 0
    for _ in range(40):
        pl = _random_plan(rng, prob, GPT2)
        got, ref = arrays.latency(pl).token_latency_s, decode_cost(pl, snap, GPT2).token_latency_s
        assert got == ref or (math.isnan(got) and math.isnan(ref))
        finite += math.isfinite(ref)
    assert 0 < finite < 40
    # wide layers (``PlanArrays._one``, one by one) over the down paths: the same inf / nan
    for _ in range(20):
        pl = _random_plan(rng, prob, GPT2, wide=True)
        got, ref = arrays.latency(pl).token_latency_s, decode_cost(pl, snap, GPT2).token_latency_s
        assert got == ref or (math.isnan(got) and math.isnan(ref))


@pytest.mark.parametrize("dims,n,seed,down", [(GPT2, 9, 5, False), (LLAMA7, 33, 6, False), (GPT2, 12, 7, True)])
def test_swapped_latencies_are_latency_exactly(dims, n, seed, down):
    """``latencies_swapped`` (a plan with one layer replaced, many at once: leveling's candidates,
    the last layer and the aggregator's change included) gives each plan's ``latency`` exactly."""
    import math
    from dataclasses import replace

    from testbed.core.snapshot import LinkState

    snap = random_star(np.random.default_rng(seed), n, dims, context_len=48)
    if down:
        snap = replace(snap, paths={k: (LinkState(v.bandwidth_bytes_per_s, v.latency_s, up=False) if "d3" in k else v)
                                    for k, v in snap.paths.items()})
    prob = Problem(snap, dims)
    rng = random.Random(seed)
    for _ in range(4):
        base, other = _random_plan(rng, prob, dims), _random_plan(rng, prob, dims, wide=rng.random() < 0.3)
        swaps = [(l, other.layers[l]) for l in rng.sample(range(dims.n_layers), dims.n_layers // 2)]
        swaps.append((dims.n_layers - 1, other.layers[-1]))
        got = PlanArrays(prob).latencies_swapped(base, swaps)
        ref = PlanArrays(prob)
        for (l, lp), g in zip(swaps, got):
            r = ref.latency(Placement(base.source, base.layers[:l] + (lp,) + base.layers[l + 1:]))
            assert g.bytes_moved == r.bytes_moved
            assert g.token_latency_s == r.token_latency_s or (math.isnan(g.token_latency_s)
                                                              and math.isnan(r.token_latency_s))


def test_placement_memory_counts_a_repeated_layer_object_as_its_copies():
    """``placement_memory`` counts a layer object repeated (Galaxy's ``(layer,) * L``) once times its
    repeats: the same bytes, in the same device order, as the same layers as distinct objects."""
    from dataclasses import replace as copy

    from testbed.partition.cost.latency import placement_memory

    snap = random_star(np.random.default_rng(5), 33, LLAMA7, context_len=48)
    prob = Problem(snap, LLAMA7)
    rng = random.Random(5)
    for _, pl in galaxy_plans(prob, [1, 3, 12, 32]):
        if isinstance(pl, InfeasiblePlan):
            continue
        mixed = [pl.layers[0]] * 20 + [_random_plan(rng, prob, LLAMA7).layers[0]] * 12
        for layers in (pl.layers, tuple(mixed)):
            distinct = tuple(copy(lp) for lp in layers)
            assert len({id(lp) for lp in distinct}) == len(layers)
            got = placement_memory(Placement(snap.source, layers), snap, LLAMA7, 100)
            ref = placement_memory(Placement(snap.source, distinct), snap, LLAMA7, 100)
            assert got == ref and list(got) == list(ref)


@pytest.mark.parametrize("dims,n,seed,down", [(GPT2, 25, 0, False), (LLAMA7, 65, 1, False), (GPT2, 25, 2, True),
                                             (LLAMA7, 33, 3, True)])
def test_compiled_walk_gives_the_python_walks_floats(dims, n, seed, down):
    """``PlanArrays._compute`` (the compiled walk, ``layer_kernel``) gives every layer the Python
    walk's (``_one``) (compute, transfer, bytes), from every input device kind (source, a device of
    the layer, another one), on narrow and wide layers (up to 30 devices); ``down``: d3's paths
    down (inf, or nan where a queue subtracts inf: the rows the kernel leaves to the Python walk)."""
    import math
    from dataclasses import replace

    from testbed.core.snapshot import LinkState

    snap = random_star(np.random.default_rng(seed), n, dims, context_len=48)
    if down:
        snap = replace(snap, paths={k: (LinkState(v.bandwidth_bytes_per_s, v.latency_s, up=False) if "d3" in k else v)
                                    for k, v in snap.paths.items()})
    prob = Problem(snap, dims)
    arrays, rng = PlanArrays(prob), random.Random(seed)
    rows = []
    for i in range(12):
        pl = _random_plan(rng, prob, dims, wide=i % 3 == 2)
        for lp in pl.layers:
            rows.append((lp, rng.choice([prob.src, prob.index[lp.proj], rng.randrange(len(prob.names))])))
    compiled = arrays._compute(rows)
    same = lambda x, y: x == y or (math.isnan(x) and math.isnan(y))  # noqa: E731
    for (lp, A), got in zip(rows, compiled):
        ref = arrays._one(lp, A)
        assert same(got[0], ref[0]) and same(got[1], ref[1]) and got[2] == ref[2]
    finite = [math.isfinite(r[0] + r[1]) for r in compiled]
    assert any(not f for f in finite) == down and sum(finite) > len(rows) // 2
