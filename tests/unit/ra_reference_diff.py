"""Not a test module: compare RA's plans now with a recorded reference (default
``data/ra_reference.json``; e.g. an older one from ``git show REV:tests/unit/data/ra_reference.json``)
on the same instances — re-decisions built from the REFERENCE's first plans — and say, per changed
instance, whether the new plan is within ``1 + tol`` of the old one's objective (latency + migration
delay / H, H = 4 epochs as RA's default) with a largest worker peak (at the end of the run when known,
else 4 epochs ahead) that is not higher. Issue 19 allowed a reference update only when every change passes.

    PYTHONPATH=. python tests/unit/ra_reference_diff.py [REFERENCE.json] [--tol 0.02]
Exit 0 when every change passes, 1 otherwise."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ra_instances import REFERENCE, instances, outcome  # noqa: E402

from testbed.core.placement import Placement  # noqa: E402
from testbed.partition.common import Problem  # noqa: E402
from testbed.partition.cost.latency import cost  # noqa: E402
from testbed.partition.cost.migration import migration_delay  # noqa: E402
from testbed.partition.ra.leveling import worker_peaks  # noqa: E402


def measure(snap, dims, cm, pj: dict) -> tuple[float, float, float]:
    """(latency, objective, largest worker peak) of a recorded placement on ``snap``."""
    pl, prob, N = Placement.from_json(pj), Problem(snap, dims, cm), max(1, snap.tokens_until_next_decision)
    lat = cost(pl, snap, dims, cm).token_latency_s
    mig = migration_delay(snap.current, pl, snap, dims, cost_model=cm)
    until = int(snap.end_context_len) if snap.tokens_remaining is not None else snap.context_len + 4 * N
    peaks = worker_peaks(prob, pl, until)
    peaks[prob.src] = 0
    return lat, lat + mig / snap.amortisation_tokens(4 * N), float(peaks.max())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("reference", nargs="?", default=str(REFERENCE))
    ap.add_argument("--tol", type=float, default=0.02)
    args = ap.parse_args()
    old_ref = json.loads(Path(args.reference).read_text())
    firsts = {n: Placement.from_json(v["placement"]) for n, v in old_ref.items() if "/" not in n and "placement" in v}
    same = bad = 0
    for name, snap, dims, cm, params in instances(firsts):
        new, old = outcome(snap, dims, cm, params), old_ref[name]
        if new.get("placement") == old.get("placement"):
            same += 1
            continue
        if "placement" not in new or "placement" not in old:
            bad += 1
            print(f"{name}: FAIL feasibility changed ({sorted(old)} -> {sorted(new)})")
            continue
        (lo, oo, po), (ln, on, pn) = measure(snap, dims, cm, old["placement"]), measure(snap, dims, cm, new["placement"])
        ok = on <= (1 + args.tol) * oo + 1e-12 and pn <= po
        bad += not ok
        print(f"{name}: {'ok  ' if ok else 'FAIL'} latency {lo * 1e3:.2f} -> {ln * 1e3:.2f} ms ({ln / lo:.3f}), "
              f"objective x{on / oo:.3f}, largest peak {po / 2**20:.2f} -> {pn / 2**20:.2f} MiB (x{pn / po:.3f})")
    print(f"{same} unchanged, {len(old_ref) - same} changed, {bad} failing (tolerance {args.tol})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
