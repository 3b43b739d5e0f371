"""Fixtures of the SSH backend tests: a fresh ``SshdRig`` (3 devices with sshd, keys made for this
test) per test, always torn down."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.ssh.rig import SSHD, SshdRig

NEEDS = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mnexec") is None or not os.path.exists(SSHD),
                           reason="needs root, Mininet and openssh-server (scripts/setup.sh)")


@pytest.fixture
def rig(tmp_path):
    r = SshdRig(tmp_path).start()
    try:
        yield r
    finally:
        r.stop()
