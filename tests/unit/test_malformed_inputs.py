"""``headroom validate`` on a corpus of malformed inputs (issue 15 item 2): every file in
``tests/unit/malformed/`` gets exit 2 and ``FILE:LINE: field: message`` lines, never a traceback,
never a silent accept. Each file's first line says what is expected:

    # expect: LINE FIELD MESSAGE-REGEX

(the regex is searched, case-insensitively, in the message of one reported problem at that line
and field). ``ok/`` holds valid files the experiments point to, ``traces/`` malformed trace CSVs.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from testbed.cli import app

CORPUS = Path(__file__).parent / "malformed"
FILES = sorted(p for p in CORPUS.iterdir() if p.is_file() and p.suffix == ".yaml")
PROBLEM = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<field>\S+): (?P<message>.+)$")


def _expectation(path: Path) -> tuple[int, str, str]:
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    m = re.match(r"# expect: (\d+) (\S+) (.+)$", first)
    assert m, f"{path.name}: first line must be '# expect: LINE FIELD REGEX'"
    return int(m.group(1)), m.group(2), m.group(3)


def test_the_corpus_is_large_enough():
    assert len(FILES) >= 60


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_malformed_file_is_reported_with_file_line_field(path: Path):
    line, field, pattern = _expectation(path)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, (result.exit_code, result.output)
    out = [l for l in result.output.splitlines() if l.strip()]
    assert out, "no problem reported"
    problems = []
    for text in out:
        m = PROBLEM.match(text)
        assert m, f"not FILE:LINE: field: message: {text!r}"
        problems.append(m)
    hits = [m for m in problems if int(m["line"]) == line and m["field"] == field
            and re.search(pattern, m["message"], re.IGNORECASE)]
    assert hits, f"expected {line} {field} /{pattern}/, got:\n" + "\n".join(out)


def test_validate_reports_every_file_in_one_call_and_does_not_import_torch():
    """One process over the whole corpus: exit 2, one or more problems per file, and neither torch
    nor numpy-heavy modules are imported (validate stays fast)."""
    code = ("import sys, runpy\n"
            "sys.argv = ['headroom', 'validate', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('testbed', run_name='__main__')\n"
            "except SystemExit as e:\n    print('EXIT', e.code, 'torch' in sys.modules, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code, *map(str, FILES)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[2])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == "EXIT 2 False"
    reported = {PROBLEM.match(l)["file"] for l in out.stderr.splitlines()[:-1] if PROBLEM.match(l)}
    missing = [p.name for p in FILES if str(p) not in reported and not _reported_elsewhere(p)]
    assert not missing, missing


def _reported_elsewhere(path: Path) -> bool:
    """Trace problems are reported at the trace CSV's own line, not at the experiment."""
    return "trace" in path.name


ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
*\t0000000A\t00000000\t0201\t0\t0\t14977\t000000FF\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
"""


def test_subnet_overlapping_this_machines_routes(tmp_path, monkeypatch):
    """Routes are read from /proc/net/route: the default route and reject routes (another run's
    unreachable guard for 10.0.0.0/8) do not count; a subnet over a real interface's route does."""
    from testbed.spec import checks
    from testbed.spec.loader import load_topology
    from testbed.core.errors import ConfigError

    (tmp_path / "route").write_text(ROUTES)
    routes = checks.machine_routes(str(tmp_path / "route"))
    assert [(str(n), d) for n, d in routes] == [("192.0.2.0/24", "eth0"), ("172.17.0.0/16", "docker0")]
    monkeypatch.setattr(checks, "machine_routes", lambda: routes)
    body = (CORPUS / "ok" / "star3.yaml").read_text()
    (tmp_path / "ok.yaml").write_text(body)
    load_topology(tmp_path / "ok.yaml")  # 10.0.0.0/8: only the reject route overlaps
    (tmp_path / "bad.yaml").write_text(body + "subnet: 172.16.0.0/12\n")
    with pytest.raises(ConfigError) as exc:
        load_topology(tmp_path / "bad.yaml")
    (p,) = exc.value.problems
    assert (p.line, p.field) == (12, "subnet") and "route 172.17.0.0/16 (dev docker0)" in p.message


def test_shipped_files_still_validate_and_quickly():
    import time

    root = Path(__file__).parents[2]
    files = [*root.glob("topologies/*.yaml"), *root.glob("experiments/*.yaml"), *root.glob("experiments/paper/*.yaml")]
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["validate", *map(str, files)])
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - t0 < 30  # regime_map's 1200 sweep points, each validated: ~1 s here
