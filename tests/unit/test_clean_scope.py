"""Clean is scoped (issue 15 item 6): ``headroom clean`` removes a device, route or cgroup only when
its name carries the tag of the run that journalled it, a link inside a host only when that host
is the journal's own; a resource that merely appears in a journal (``docker0``, the machine's
cgroups, a foreign namespace) is refused and never touched. No root needed: the removers are
replaced by recorders."""
from __future__ import annotations

import json

import pytest

from testbed.emulation import cleanup
from testbed.emulation.cgroups import V1_MEMORY, V2_ROOTS, group_name
from testbed.emulation.cleanup import Scope, cleanup_entries, guard_metric

TAG, RUN = "a1b2c3", "exp-20261205"
META = [{"kind": "meta", "key": "run_tag", "value": TAG}, {"kind": "meta", "key": "run_id", "value": RUN}]
HOST = {"kind": "host", "name": "h1", "pid": 4242, "start_time": 777, "group": True}
OURS = [
    {"kind": "bridge", "dev": f"hr{TAG}s0", "switch": "s1"},
    {"kind": "veth", "dev": f"hr{TAG}l3a", "netns_pid": None, "start_time": None},
    {"kind": "veth", "dev": "h1-eth0", "netns_pid": 4242, "start_time": 777},
    {"kind": "iptables", "host": "h1", "netns_pid": 4242, "start_time": 777, "rule": ["-A", "INPUT"]},
    {"kind": "route", "route": ["unreachable", "10.0.0.0/8", "metric", str(guard_metric(TAG))]},
    {"kind": "cgroup", "path": str(V1_MEMORY / group_name(RUN, "h1")), "host": "h1"},
    {"kind": "cgroup", "path": str(V2_ROOTS[0] / group_name(RUN, "h2")), "host": "h2"},
    {"kind": "socket_dir", "path": "/tmp/hr-x8y9"},
]
FOREIGN = [
    {"kind": "bridge", "dev": "docker0"},
    {"kind": "bridge", "dev": "hrffffffs0"},  # another run's tag
    {"kind": "veth", "dev": "eth0", "netns_pid": None, "start_time": None},
    {"kind": "veth", "dev": "eth0", "netns_pid": 1, "start_time": 0},  # the root namespace's init
    {"kind": "iptables", "host": "x", "netns_pid": 1, "start_time": 0, "rule": ["-F"]},
    {"kind": "route", "route": ["default", "via", "192.0.2.1", "dev"]},
    {"kind": "route", "route": ["unreachable", "10.0.0.0/8", "metric", "14977"]},  # another run's guard
    {"kind": "cgroup", "path": str(V1_MEMORY / "system.slice"), "host": "h1"},
    {"kind": "cgroup", "path": str(V1_MEMORY / "user.slice" / group_name(RUN, "h1")), "host": "h1"},
    {"kind": "cgroup", "path": str(V1_MEMORY / group_name("other-run", "h1")), "host": "h1"},
    {"kind": "socket_dir", "path": "/var/run"},
    {"kind": "socket_dir", "path": "/tmp/hr-x/../../etc"},
]


@pytest.fixture
def calls(monkeypatch):
    seen = []
    for kind in cleanup._REMOVERS:
        monkeypatch.setitem(cleanup._REMOVERS, kind, lambda e, k=kind: seen.append(e) or f"removed {k}")
    return seen


def test_the_runs_own_resources_are_in_scope_and_removed(calls):
    entries = META + [HOST] + OURS
    scope = Scope.of(entries)
    assert scope.tags == {TAG} and scope.run_ids == {RUN} and scope.netns == {(4242, 777)}
    assert all(scope.refusal(e) is None for e in OURS + [HOST])
    out = cleanup_entries(entries)
    assert not [l for l in out if l.startswith(("REFUSED", "FAILED"))], out
    assert len(calls) == len(OURS) + 1


@pytest.mark.parametrize("entry", FOREIGN, ids=[json.dumps(e)[:60] for e in FOREIGN])
def test_a_resource_that_merely_appears_in_the_journal_is_refused(entry, calls):
    out = cleanup_entries(META + [HOST, entry])
    assert calls == [HOST] or calls == [], calls  # only the recorded host shell (PID + start time)
    assert any(l.startswith(f"REFUSED: {entry['kind']}") for l in out), out


def test_a_journal_without_a_run_tag_removes_no_device_route_or_cgroup(calls):
    out = cleanup_entries([HOST] + OURS)  # an old or hand-written journal: no run_tag / run_id lines
    removed_kinds = {e["kind"] for e in calls}
    assert removed_kinds <= {"host", "veth", "iptables", "socket_dir"}, removed_kinds  # own hosts, /tmp/hr-*
    assert sum(l.startswith("REFUSED") for l in out) == 5


def test_clean_cli_prints_refusals(tmp_path, calls):
    from typer.testing import CliRunner

    from testbed.cli import app

    run = tmp_path / "run"
    run.mkdir()
    (run / "resources.jsonl").write_text("\n".join(json.dumps(e) for e in META + FOREIGN[:1]) + "\n")
    res = CliRunner().invoke(app, ["clean", str(run)])
    assert res.exit_code == 0 and "REFUSED: bridge device 'docker0'" in res.output and not calls
