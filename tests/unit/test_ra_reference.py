"""RA's placements on fixed instances (``ra_instances``) are those recorded before the issue-18
speed-ups (``data/ra_reference.json``): a speed-up must not change a plan."""
import json

import pytest

from ra_instances import REFERENCE, instances, outcome

EXPECTED = json.loads(REFERENCE.read_text())
CASES = instances()


def test_every_instance_has_a_reference():
    assert sorted(EXPECTED) == sorted(name for name, *_ in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_ra_plan_is_the_reference(case):
    name, snap, dims, cm, params = case
    assert outcome(snap, dims, cm, params) == EXPECTED[name]
