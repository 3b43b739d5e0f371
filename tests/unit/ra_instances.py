"""Fixed RA instances regenerated from seeds (not a test module): first decisions and
re-decisions (links dropped, a memory limit cut, the end of generation near) on random and
repeated-device (tie-prone) stars, GPT-2, SmolLM2 (GQA), Llama-2-7B and one-layer paper-model
shapes. ``test_ra_reference`` compares RA's placements on them with ``data/ra_reference.json``,
written by this module before the issue-18 speed-ups (``python tests/unit/ra_instances.py``)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from testbed.core.snapshot import DeviceState, LinkState, ModelDims
from testbed.partition.synthetic import GPT2, SMOLLM2, random_star, star_snapshot

REFERENCE = Path(__file__).with_name("data") / "ra_reference.json"
LLAMA7 = ModelDims("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, gated_ffn=True, tie_embeddings=False,
                   weight_format="q4_0")
ONE = {h: ModelDims(f"p{h}", 1, 512, h, h, 64, 2048, 1000) for h in (4, 8, 12, 16)}


def repeated_star(n: int, dims: ModelDims, mem_slack: float = 1.6, context_len: int = 64):
    """n devices cycling through four identical classes (ties between equal devices)."""
    from testbed.partition.cost.blocks import block_memory_bytes, source_bytes

    T = context_len + 8
    per_layer = (dims.n_kv_heads * block_memory_bytes(dims, "head", T) + block_memory_bytes(dims, "proj", T)
                 + block_memory_bytes(dims, "ffn", T))
    cls = [(1.5e9, 3.0, 40e6, 1e-3), (1.0e9, 2.0, 20e6, 2e-3), (0.5e9, 1.0, 10e6, 2e-3), (2.0e9, 2.0, 5e6, 4e-3)]
    pick = [cls[i % 4] for i in range(n)]
    share = np.array([c[1] for c in pick])
    mems = per_layer * dims.n_layers * mem_slack * share / share[1:].sum()
    mems[0] = source_bytes(dims) + per_layer * dims.n_layers
    return star_snapshot([c[0] for c in pick], mems, [c[2] for c in pick], [c[3] for c in pick],
                         context_len=context_len)


def _dropped(snap, cur, devices, factor=0.1, tokens=8):
    paths = {k: (LinkState(v.bandwidth_bytes_per_s * factor, v.latency_s) if devices & set(k) else v)
             for k, v in snap.paths.items()}
    return replace(snap, paths=paths, current=cur, context_len=snap.context_len + tokens)


def _cut(snap, cur, device: str, frac: float, tokens=8):
    devs = tuple(replace(d, mem_limit_bytes=int(d.mem_limit_bytes * frac)) if d.name == device else d
                 for d in snap.devices)
    return replace(snap, devices=devs, current=cur, context_len=snap.context_len + tokens)


def bases():
    """(name, snapshot, dims, cost model, params) of the first decisions."""
    out = []
    for n, seed, slack in ((5, 0, 2.0), (9, 1, 1.3), (17, 2, 2.0), (25, 3, 1.15), (49, 4, 2.0)):
        out.append((f"gpt2-star{n}-s{seed}", random_star(np.random.default_rng(seed), n, GPT2, mem_slack=slack,
                                                           context_len=32), GPT2, "decode", {}))
    out.append(("smollm2-star12", random_star(np.random.default_rng(5), 12, SMOLLM2, context_len=64), SMOLLM2,
                "decode", {}))
    out.append(("gpt2-rep20", repeated_star(20, GPT2), GPT2, "decode", {}))
    out.append(("gpt2-rep8-tight", repeated_star(8, GPT2, mem_slack=1.1), GPT2, "decode", {}))
    out.append(("llama7-star65", random_star(np.random.default_rng(1), 65, LLAMA7), LLAMA7, "decode", {}))
    out.append(("llama7-rep33", repeated_star(33, LLAMA7, mem_slack=1.3), LLAMA7, "decode", {}))
    out.append(("gpt2-star9-greedy", random_star(np.random.default_rng(6), 9, GPT2), GPT2, "decode",
                {"layer_split": False, "portfolio": False}))
    for h, seed in ((4, 7), (8, 8), (16, 9)):
        snap = random_star(np.random.default_rng(seed), 5, ONE[h], mem_slack=1.5, context_len=128)
        out.append((f"paper-h{h}", snap, ONE[h], "paper", {"headroom_epochs": 1}))
        out.append((f"decode1-h{h}", snap, ONE[h], "decode", {"headroom_epochs": 1}))
    return out


def instances(first_plans: dict | None = None):
    """Every instance: the first decisions, then per base three re-decisions from its first plan
    (``first_plans``: name -> Placement, else planned here)."""
    from testbed.partition import plan

    out = []
    for name, snap, dims, cm, params in bases():
        out.append((name, snap, dims, cm, params))
        cur = (first_plans or {}).get(name) or plan("resource_aware", snap, dims, cm, **params).placement
        names = [d.name for d in snap.devices]
        used = sorted(cur.devices() - {snap.source})
        out.append((f"{name}/drop", _dropped(snap, cur, set(names[1::3])), dims, cm, params))
        out.append((f"{name}/cut", _cut(snap, cur, used[len(used) // 2], 0.6), dims, cm, params))
        out.append((f"{name}/end", replace(_dropped(snap, cur, {names[1]}, 0.3, tokens=16), tokens_remaining=24),
                    dims, cm, params))
    return out


def outcome(snap, dims, cm, params) -> dict:
    from testbed.partition import InfeasiblePlan, plan

    try:
        r = plan("resource_aware", snap, dims, cm, **params)
    except InfeasiblePlan as exc:
        return {"infeasible": str(exc)}
    return {"placement": r.placement.to_json(), "planner": r.extra}


if __name__ == "__main__":
    ref = {name: outcome(s, d, c, p) for name, s, d, c, p in instances()}
    REFERENCE.write_text(json.dumps(ref, indent=0, sort_keys=True))
    print(f"{len(ref)} instances -> {REFERENCE}")
