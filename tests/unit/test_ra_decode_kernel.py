"""RA's compiled greedy passes (``ra.decode_kernel``, called through ``decode.heads_compiled`` and
``ffn_compiled``) give what the Python passes (``decode._heads_decode``, ``_ffn_decode``) give:
the same finish time and penalties (the same floats), the same blocks per device in the same
first-pick order, the same bytes left per device, and NoFit at the same block — on first plans and
re-decisions (migration penalties), with memory tight enough that devices fill up, and with
devices whose compute is unknown (NaN keys: the Python pass takes over)."""
from dataclasses import replace

import numpy as np
import pytest

from testbed.core.errors import InfeasiblePlan
from testbed.core.snapshot import ModelDims
from testbed.partition import plan
from testbed.partition.common import NoFit, Problem
from testbed.partition.ra.decode import _ffn_decode, _heads_decode, ffn_compiled, heads_compiled
from testbed.partition.ra.greedy import _Layer
from testbed.partition.synthetic import GPT2, random_star

LLAMA7 = ModelDims("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, gated_ffn=True, tie_embeddings=False,
                   weight_format="q4_0")


def _run(fn, ly, P, r, *agg):
    """(result or the NoFit's block, bytes left after) of one pass on a copy of ``r``."""
    try:
        return fn(ly, P, r, *agg), list(r)
    except NoFit as exc:
        return ("nofit", exc.args[0]), None


def _same(a, b) -> bool:
    return a == b or (a != a and b != b)


@pytest.mark.parametrize("dims,n,seed,slack,current", [(GPT2, 9, 0, 3.0, False), (GPT2, 25, 1, 1.05, False),
                                                       (LLAMA7, 65, 2, 1.3, False), (LLAMA7, 33, 3, 1.1, True),
                                                       (GPT2, 17, 4, 1.02, True)])
def test_compiled_passes_are_the_python_passes(dims, n, seed, slack, current):
    snap = random_star(np.random.default_rng(seed), n, dims, mem_slack=slack, context_len=64)
    if current:
        try:
            cur = plan("resource_aware", snap, dims).placement
        except InfeasiblePlan:
            pytest.skip("no first plan to start from")
        snap = replace(snap, paths=snap.paths.divided({"d1", "d2"}, 10), current=cur, context_len=72)
    prob = Problem(snap, dims)
    rng = np.random.default_rng(seed)
    compared = nofit = 0
    for l in range(dims.n_layers):
        A = int(rng.choice([prob.src, *np.flatnonzero(prob.allowed)[:4].tolist()]))
        ly = _Layer(prob, l, A, 4)
        for P in np.flatnonzero(prob.allowed)[:6].tolist():
            # bytes left: the budget, some devices (randomly) nearly full
            r = prob.budget * np.where(rng.random(len(prob.names)) < 0.5, rng.uniform(0.0, 0.05), 1.0)
            r = r.astype(float)
            ref, ref_r = _run(_heads_decode, ly, P, r.tolist())
            got, got_r = _run(heads_compiled, ly, P, r.copy())
            assert got == ref and got_r == ref_r
            for agg in (None, P, A):
                ref, ref_r = _run(_ffn_decode, ly, P, r.tolist(), agg)
                got, got_r = _run(ffn_compiled, ly, P, r.copy(), agg)
                assert got[:2] == ref[:2] and list(got[2].items()) == list(ref[2].items()) and got[3:] == ref[3:] \
                    if got[0] != "nofit" else got == ref
                assert got_r == ref_r
                compared += 1
                nofit += got[0] == "nofit"
    assert compared > 100 and 0 < nofit < compared  # both outcomes exercised


def test_a_device_without_compute_falls_back_to_the_python_pass():
    """A device whose rate is 0 has NaN keys (0 FLOP/s -> NaN in the tables): the compiled pass
    hands the layer to the Python pass, which gives its own answer (here: the same as always)."""
    snap = random_star(np.random.default_rng(5), 9, GPT2, context_len=64)
    devices = tuple(replace(d, flops_per_s=0.0) if d.name == "d2" else d for d in snap.devices)
    prob = Problem(replace(snap, devices=devices), GPT2)
    prob.allowed[prob.index["d2"]] = True  # as if allowed: its keys are NaN
    ly = _Layer(prob, 0, prob.src, 4)
    r = prob.budget.astype(float)
    for P in np.flatnonzero(prob.allowed).tolist():
        ref, ref_r = _run(_heads_decode, ly, P, r.tolist())
        got, got_r = _run(heads_compiled, ly, P, r.copy())
        assert got == ref and got_r == ref_r
