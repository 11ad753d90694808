"""A run's records survive its process: each test's records go to a journal as they are made
(reports/unfinished-<start>-<pid>.jsonl), deleted once the report is written; a run that dies in
native code (a segfault in XLA's compiler ended a 19-minute serial run of the suites with nothing
kept) leaves the journal, `python -m equivcheck recover` makes its report, and the next run's header
names it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from equivcheck.__main__ import main
from equivcheck.report import read_report
from equivcheck.report.journal import CRASHED, leftovers, recover
from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)
from tests.test_report import RUN as REPORT_RUN

SUITE = """
import ctypes
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

def crashes(x):
    ctypes.string_at(0)  # a segmentation fault, as native code's
    return torch.tanh(x)

PAIRS = [ec.Pair("first", torch.tanh, jnp.tanh, ec.unary(), checks=("forward",)),
         ec.Pair("second", torch.sin, jnp.sin, ec.unary(), checks=("forward",)),
         ec.Pair("third", crashes, jnp.tanh, ec.unary(), checks=("forward",))]

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
"""
FAST = ["--equiv-examples", "3", "--equiv-seed", "1", "--equiv-dtypes", "float32", "-p", "no:cacheprovider",
        "--equiv-jax-cache", "none", "-p", "no:randomly"]


def _run(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONFAULTHANDLER": "0"}
    return subprocess.run([sys.executable, "-m", "pytest", "--equiv", *FAST, "--equiv-report=reports", *args],
                          cwd=project, capture_output=True, text=True, timeout=600, check=False, env=env)


def test_a_run_that_crashes_keeps_its_records_and_recover_makes_the_report(tmp_path):
    (tmp_path / "test_crash.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    crashed = _run(tmp_path)
    assert crashed.returncode != 0 and "Segmentation fault" in crashed.stderr + crashed.stdout, crashed.returncode
    reports = tmp_path / "reports"
    assert not list(reports.glob("*.json")), "a crashed run cannot have written its report"
    [journal] = leftovers(reports)
    built = recover(journal)
    assert [r["pair"] for r in built["records"]] == ["first", "second"]
    assert all(r["outcome"] == "passed" for r in built["records"])
    run = built["run"]
    assert run["interrupted"] and run["crashed"] == CRASHED and run["partial"] == {"ran": 2, "collected": 3}
    assert run["seed"] == 1
    # the next run names the journal in its header, and recover turns it into a readable report
    again = _run(tmp_path, "-k", "first")
    assert f"left its records in reports/{journal.name}: python -m equivcheck recover" in again.stdout, again.stdout
    assert main(["recover", str(journal)]) == 0
    assert not journal.exists()
    [written] = [p for p in reports.glob("2*.json") if read_report(str(p))["run"].get("crashed")]
    assert read_report(str(written))["summary"]["passed"] == 2


def test_a_run_that_writes_its_report_leaves_no_journal(pytester):
    safe = SUITE.replace('"third", crashes', '"third", torch.tanh')  # never the segfault in this process
    assert "crashes, jnp" not in safe
    pytester.makepyfile(test_pairs=safe)
    pytester.runpytest("--equiv", *FAST, "--equiv-report=reports").assert_outcomes(passed=3)
    reports = pytester.path / "reports"
    assert list(reports.glob("*.json")) and not list(reports.glob("unfinished-*"))


def test_recover_refuses_what_is_not_a_journal_and_drops_a_cut_last_line(tmp_path, capsys):
    bad = tmp_path / "unfinished-20261201-000000-1.jsonl"
    bad.write_text('{"records": []}\n')
    assert main(["recover", str(bad)]) == 2
    assert "a record journal starts with its run section" in capsys.readouterr().err
    assert main(["recover", str(_journal(bad, run={"started": "2026-12-01T00:00:00+00:00"}))]) == 2
    assert "the run section lacks id, versions, machine, which the report needs" in capsys.readouterr().err
    run = {**RUN, "id": "r-cut"}
    record = {"id": "p::forward::float32::cpu", "pair": "p", "check": "forward", "dtype": "float32", "device": "cpu", "outcome": "passed",
              "nodeid": "t.py::test[p]"}
    cut = tmp_path / "cut.jsonl"
    cut.write_text(json.dumps({"run": run}) + "\n" + json.dumps({"record": record}) + '\n{"record": {"pair": "q"')
    built = recover(cut)
    assert [r["pair"] for r in built["records"]] == ["p"] and built["run"]["partial"] == {"ran": 1, "collected": 4}
    assert built["run"]["journal"] == {"path": str(cut), "cut_line": 3}
    assert main(["recover", str(cut)]) == 0  # and says so: the dropped line was a record of some test
    assert "line 3, cut off by the crash, dropped: the test it was written for may lack records" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"cut2.jsonl:2: not a JSON line"):
        (tmp_path / "cut2.jsonl").write_text(json.dumps({"run": run}) + "\n{oops\n" + json.dumps({"record": record}))
        recover(tmp_path / "cut2.jsonl")


RUN = {**REPORT_RUN, "id": "r-crashed", "started": "2026-12-01T00:00:00+00:00", "partial": {"ran": 0, "collected": 4}}
RECORD = {"id": "p::forward::float32::cpu", "pair": "p", "check": "forward", "dtype": "float32", "device": "cpu",
          "outcome": "passed", "nodeid": "t.py::test[p]"}


def _journal(path: Path, run: dict | None = None, writer: dict | None = None) -> Path:
    head = {"run": run or RUN, **({"writer": writer} if writer else {})}
    path.write_text(json.dumps(head) + "\n" + json.dumps({"record": RECORD}) + "\n")
    return path


def test_recover_refuses_the_journal_of_a_run_still_running(tmp_path, capsys):
    """recover made a partial report of a live run and deleted the journal it was still writing."""
    from equivcheck.report.journal import identity

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = _journal(tmp_path / f"unfinished-20261201-000000-{child.pid}-abc123.jsonl", writer=identity(child.pid))
        assert main(["recover", str(live)]) == 2
        err = capsys.readouterr().err
        assert f"the run writing it is still running (PID {child.pid})" in err and err.count("\n") == 1
        assert live.exists() and not list(tmp_path.glob("*.json"))
        # the same PID started at another time (reused), or on another host: not the writer
        for other in ({**identity(child.pid), "start": -1}, {**identity(child.pid), "host": "elsewhere"}):
            gone = _journal(tmp_path / f"unfinished-20261201-000000-{child.pid}-def456.jsonl", writer=other)
            assert leftovers(tmp_path) == [gone]
            gone.unlink()
        assert main(["recover", "--force", str(live)]) == 0 and not live.exists()
    finally:
        child.kill()
        child.wait()
    # recover's own PID (PID 1 in a container, say) can never be the writer of what it recovers
    mine = _journal(tmp_path / f"unfinished-20261201-000000-{os.getpid()}-abc123.jsonl", run={**RUN, "id": "r-own"})
    assert main(["recover", str(mine)]) == 0 and not mine.exists()


def test_a_run_section_without_a_start_time_is_refused_before_anything_is_written(tmp_path, capsys):
    """A journal without `started` crashed recover after it had written the JSON, and every retry
    was then refused as a run that already had its report."""
    for run, cause in (({k: v for k, v in RUN.items() if k != "started"}, "the run section lacks started"),
                       ({**RUN, "started": "2026-12-01T00:00:00"}, "is not an ISO 8601 time with its UTC offset")):
        journal = _journal(tmp_path / "unfinished-20261201-000000-999999999-abc123.jsonl", run=run)
        assert main(["recover", str(journal)]) == 2
        assert cause in capsys.readouterr().err
        assert journal.exists() and not list(tmp_path.glob("*.json"))


def test_recover_keeps_a_report_the_run_already_has_and_latest_on_a_newer_run(tmp_path, capsys):
    from equivcheck import report

    newer = report.build([RECORD], {**RUN, "id": "r-newer", "started": "2026-12-02T00:00:00+00:00"})
    report.write(newer, tmp_path)
    journal = _journal(tmp_path / "unfinished-20261201-000000-999999999-abc123.jsonl")
    assert main(["recover", str(journal)]) == 0
    assert "latest.* left on the run started 2026-12-02" in capsys.readouterr().err
    assert json.loads((tmp_path / "latest.json").read_text())["run"]["id"] == "r-newer"
    assert read_report(str(tmp_path / "r-crashed.json"))["run"]["crashed"] == CRASHED
    # the same run's journal again: its report exists, and a second one would duplicate or replace it
    _journal(journal)
    assert main(["recover", str(journal)]) == 2
    assert f"its run already has a report, {tmp_path / 'r-crashed.json'}" in capsys.readouterr().err
    assert journal.exists()
