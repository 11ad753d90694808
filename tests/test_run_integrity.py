"""A run's report can be trusted: a bad report directory is refused before any check runs, a
report that cannot be written at the end leaves the summary and the exit status alone, and a
run cut short says so in every rendering and to `compare`. Driven through pytester."""
from __future__ import annotations

import json

import pytest

from equivcheck.__main__ import main
from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

# Three tests, one check each; an environment variable makes one of them stop the run, fail, or
# put a file in place of the report directory.
THREE = """
import os, shutil
from pathlib import Path
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

PAIRS = [ec.Pair(n, torch.tanh, jnp.tanh, ec.unary(), checks=("forward",)) for n in ("a", "b", "c")]

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    if pair.name == os.environ.get("EQUIV_TEST_CTRL_C"):
        raise KeyboardInterrupt
    if pair.name == os.environ.get("EQUIV_TEST_BLOCK_REPORTS"):
        if Path("reports").is_dir():  # created when the run started; it holds the record journal
            shutil.rmtree("reports")
        Path("reports").write_text("in the way")
    equiv.check(pair)
    assert pair.name != os.environ.get("EQUIV_TEST_FAIL")
"""
FAST = ("--equiv", "--equiv-examples", "3", "--equiv-seed", "1", "--equiv-dtypes", "float32", "-p", "no:cacheprovider",
        "--equiv-jax-cache", "none")


@pytest.fixture
def three(pytester):
    pytester.makepyfile(test_three=THREE)
    return pytester


def latest(pytester):
    return json.loads((pytester.path / "reports" / "latest.json").read_text())


@pytest.mark.parametrize("where, cause", [
    ("afile/reports", "afile is a file, not a directory"),
    ("/dev/null", "/dev/null is not a directory"),
    ("/proc/equivcheck-reports", "cannot create /proc/equivcheck-reports (No such file or directory)"),
])
def test_an_unwritable_report_directory_is_a_usage_error_before_any_check(three, where, cause):
    (three.path / "afile").write_text("")
    result = three.runpytest(*FAST, "--equiv-report", where)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert result.stderr.lines[0] == f"ERROR: --equiv-report {where}: {cause}"
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert "passed" not in result.stdout.str()  # refused before a check ran


def test_a_report_that_cannot_be_written_at_the_end_leaves_the_summary_and_exit_status(three, monkeypatch):
    monkeypatch.setenv("EQUIV_TEST_BLOCK_REPORTS", "b")  # the directory was fine at the start
    result = three.runpytest(*FAST)
    assert result.ret == pytest.ExitCode.OK
    out = result.stdout.str()
    assert "Traceback" not in out + result.stderr.str()
    result.stdout.fnmatch_lines(["*= equivcheck =*", "3 passed checks",
                                 "no report written to reports: reports is a file, not a directory", "*3 passed in *"])
    assert (three.path / "reports").read_text() == "in the way"


def test_ctrl_c_marks_the_run_partial_in_every_rendering_and_compare_refuses_it(three, monkeypatch, capsys):
    result = three.runpytest(*FAST)
    result.assert_outcomes(passed=3)
    assert latest(three)["run"]["partial"] is None and "PARTIAL" not in result.stdout.str()
    full = three.path / "full.json"
    full.write_text((three.path / "reports" / "latest.json").read_text())

    monkeypatch.setenv("EQUIV_TEST_CTRL_C", "b")
    result = three.runpytest(*FAST, no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    run = latest(three)["run"]
    assert run["interrupted"] is True and run["partial"] == {"ran": 1, "collected": 3}
    flagged = "PARTIAL RUN: interrupted; partial: 1 of 3 collected tests ran; the checks above are not the whole run"
    result.stdout.fnmatch_lines(["1 passed checks", flagged, "report: *"])
    md = (three.path / "reports" / "latest.md").read_text()
    assert "> **Partial run** (interrupted; partial: 1 of 3 collected tests ran)" in md
    capsys.readouterr()
    assert main(["compare", str(full), str(three.path / "reports" / "latest.json")]) == 3
    assert "a partial run (interrupted; partial: 1 of 3 collected tests ran)" in capsys.readouterr().err


def test_a_run_stopped_by_x_is_partial_though_not_interrupted(three, monkeypatch):
    monkeypatch.setenv("EQUIV_TEST_FAIL", "b")
    result = three.runpytest(*FAST, "-x")
    result.assert_outcomes(passed=1, failed=1)
    run = latest(three)["run"]
    assert run["interrupted"] is False and run["partial"] == {"ran": 2, "collected": 3}
    assert "PARTIAL RUN: stopped early; partial: 2 of 3 collected tests ran" in result.stdout.str()
