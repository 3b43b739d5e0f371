"""An import's memory estimate (what the agent's budget check reserves) against the peak resident
memory the import really reaches, measured in a fresh process (VmHWM reset via clear_refs)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RSS_SLOP = 256 * 1024
# an over-reservation this small is a quarter of the agent's 2 MiB refusal margin: it refuses no import
# that would fit, so the "not gross" bound allows it on top of 1.6x (small imports: the allocator serves
# part of them from memory freed earlier, and the measured peak reads low)
SMALL_OVER = 512 * 1024

PROBE = textwrap.dedent("""
    import gc, json, sys, torch
    from node_agent.model import AttentionShard
    from node_agent.budget import Budget, return_freed_memory, tune_allocator
    from node_agent.shards import BlockStore, model_state
    tune_allocator(); torch.set_num_threads(1)
    name, T = sys.argv[1], int(sys.argv[2])

    def rss():
        d = {}
        for line in open("/proc/self/status"):
            k, v = line.split(":", 1)
            if k in ("VmRSS", "VmHWM"):
                d[k] = int(v.split()[0]) * 1024
        return d

    cfg, sd = model_state(name)
    last = cfg.n_groups - 1
    store = BlockStore("probe", name, 0, Budget("probe", None, None))
    x = torch.randn(1, T, cfg.d_model)

    def exported(layer):
        sender = AttentionShard(cfg, layer, [last], sd)
        sender(x, 0)
        header, payload = sender.export_group(last)
        return header, payload.to_bytearray()  # as received from the wire

    for layer in (1, 0):
        store.attn[layer] = AttentionShard(cfg, layer, list(range(last)), sd)
        store.attn[layer](x, 0)
    store.import_(*exported(1))  # warm-up: code pages and allocator state touched once, not measured
    header, payload = exported(0)
    gc.collect(); return_freed_memory()
    estimate = store.import_needed(header, len(payload))
    open("/proc/self/clear_refs", "w").write("5")
    before = rss()["VmRSS"]
    store.import_(header, payload)
    peak = rss()["VmHWM"] - before
    print(json.dumps({"estimate": estimate, "peak": peak, "payload": len(payload)}))
""")


def _probe(name: str, T: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, name, str(T)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,T", [("mini-gpt2", 64), ("mini-gpt2", 200), ("gpt2-small", 64), ("gpt2-small", 300)])
def test_import_estimate_covers_the_measured_peak_without_gross_overreservation(name, T):
    got = _probe(name, T)
    # The kernel's RSS counters are synced in batches (up to 64 pages a thread), so a peak read from
    # VmHWM is known to about +-RSS_SLOP.
    assert got["estimate"] >= got["peak"] - RSS_SLOP, got  # never lets an import exceed its reservation
    # ... and does not refuse imports that would fit: at most 1.6x the measured peak. A probe now and
    # then reads a far lower peak (262 KB for a 734 KB estimate at mini-gpt2 T=200, also at ab623d8:
    # the allocator served the import from memory freed before the reset), so the largest of up to
    # three fresh probes is the peak this bound is checked against; every probe checks the first.
    peaks = [got["peak"]]
    while got["estimate"] > 1.6 * max(peaks) + SMALL_OVER and len(peaks) < 3:
        again = _probe(name, T)
        assert again["estimate"] >= again["peak"] - RSS_SLOP, again
        peaks.append(again["peak"])
    assert got["estimate"] <= 1.6 * max(peaks) + SMALL_OVER, (got, peaks)
