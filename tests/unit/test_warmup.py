"""The warm-up's memory figures (no root): ``testbed.backends.emulated.warmup.working_overheads`` plans every worker
with the largest worker median and the source with its own, so one transient reading or the
source's weight-shipping charge cannot leave the workers without room."""
from testbed.backends.emulated.warmup import warmup_workers, working_overheads

MIB = 1 << 20


def test_workers_share_the_largest_worker_median_and_the_source_keeps_its_own():
    samples = {"h1": [19 * MIB, 4 * MIB, 4 * MIB],          # source: freed payloads linger at first
               "h2": [7 * MIB, 8 * MIB, 30 * MIB],          # one transient spike
               "h3": [7 * MIB, 7 * MIB, 7 * MIB]}
    got = working_overheads(samples, warmup_workers(list(samples), "h1"))
    assert got == {"h1": 4 * MIB, "h2": 8 * MIB, "h3": 8 * MIB}


def test_a_lone_source_is_its_own_worker():
    assert warmup_workers(["h1"], "h1") == ["h1"]
    assert working_overheads({"h1": [5 * MIB, 6 * MIB]}, ["h1"]) == {"h1": 6 * MIB}
