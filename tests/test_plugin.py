"""The pytest plugin, driven through pytester: options, selection, reports, known
divergences, devices, replay."""
from __future__ import annotations

import json
import re
import shlex

import pytest

from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

PAIRS = """
import pytest, torch, jax, jax.numpy as jnp, torch.nn.functional as F
import equivcheck as ec

PAIRS = ec.Registry([
    ec.Pair("tanh", torch.tanh, jnp.tanh, ec.unary()),
    ec.Pair("gelu_bug", F.gelu, jax.nn.gelu, ec.unary(), checks=("forward",)),
])

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)

def test_plain():
    assert True
"""
FAST = ("--equiv-examples", "10", "--equiv-seed", "1", "--equiv-dtypes", "float32", "-p", "no:cacheprovider")


@pytest.fixture
def project(pytester):
    pytester.makepyfile(test_pairs=PAIRS)
    return pytester


def report(pytester, name="reports"):
    return json.loads((pytester.path / name / "latest.json").read_text())


def test_help_lists_the_options(pytester):
    out = pytester.runpytest("--help").stdout.str()
    for opt in ("--equiv ", "--device=", "--equiv-examples", "--equiv-seed", "--equiv-precision", "--equiv-dtypes",
                "--equiv-report", "--equiv-known-divergences", "--equiv-profile", "--equiv-shapes"):
        assert opt in out, opt


def test_without_equiv_a_plain_run_is_untouched(project):
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, deselected=2)
    assert "== equivcheck ==" not in result.stdout.str() and "equivcheck: seed" not in result.stdout.str()
    assert not (project.path / "reports").exists()


def test_with_equiv_only_the_checks_run_and_a_report_is_written(project):
    result = project.runpytest("--equiv", *FAST, "--equiv-seed", "3")
    result.assert_outcomes(passed=1, failed=1, deselected=1)
    out = result.stdout.str()
    assert "equivcheck: seed 3 (replay with --equiv-seed 3)" in out
    assert re.search(r"tanh\s+float32\s+cpu\s+ok \S+\s+ok \S+\s+ok \S+\s+ok", out)
    rep = report(project)
    assert rep["schema"] == "equivcheck.report/1"
    assert rep["run"]["seed"] == 3 and rep["run"]["precision"] == "highest" and rep["run"]["versions"]["torch"]
    assert rep["summary"] == {"passed": 4, "failed": 1, "known-divergence": 0, "xpass": 0, "skipped": 0, "total": 5}
    ids = [r["id"] for r in rep["records"]]
    assert "tanh::hvp::float32::cpu" in ids and "gelu_bug::forward::float32::cpu" in ids
    md = (project.path / "reports" / "latest.md").read_text()
    assert "## Failures" in md and "gelu_bug::forward::float32::cpu" in md


def test_a_failure_prints_its_diagnosis_and_a_replay_that_reproduces_it(project):
    out = project.runpytest("--equiv", *FAST, "--equiv-seed", "11").stdout.str()
    assert "gelu_bug::forward::float32::cpu [precision highest] failed" in out
    assert "minimal inputs: arg0: float32" in out
    replay = re.search(r"replay: (pytest .*)", out).group(1)
    args = shlex.split(replay)[1:] + ["-p", "no:cacheprovider"]
    again = project.runpytest(*args).stdout.str()
    first_inputs = re.search(r"minimal inputs: (.*)", out).group(1)
    assert f"minimal inputs: {first_inputs}" in again


def test_a_replay_names_the_test_from_where_the_run_started(pytester, monkeypatch):
    """Node ids are relative to the rootdir: run from a subdirectory, the replay named
    `sub/test_pairs.py::...`, which is no file when pasted there."""
    pytester.makeini("[pytest]\n")
    sub = pytester.mkpydir("sub")
    (sub / "test_pairs.py").write_text(PAIRS)
    monkeypatch.chdir(sub)
    out = pytester.runpytest("--equiv", *FAST, "-k", "gelu").stdout.str()
    replay = re.search(r"replay: (pytest .*)", out).group(1)
    assert shlex.split(replay)[2] == "test_pairs.py::test_pair[gelu_bug-float32-cpu]", replay
    again = pytester.runpytest(*shlex.split(replay)[1:], "-p", "no:cacheprovider")
    again.assert_outcomes(failed=1)


def test_a_replay_repeats_every_option_that_changes_the_outcome(project):
    # gelu_bug's forward is listed as known; its vjp still fails. A replay without the file
    # would fail the forward check too: one failure more than the run it replays.
    (project.path / "known.txt").write_text("gelu_bug::forward   tanh approximation by default\n")
    project.makepyfile(test_pairs=PAIRS.replace('checks=("forward",)', 'checks=("forward", "vjp")'))
    opts = ("--equiv-known-divergences", "known.txt", "--equiv-precision", "default", "--equiv-shapes", "2",
            "-W", "ignore::DeprecationWarning")
    result = project.runpytest("--equiv", *opts, *FAST, "-k", "gelu")
    result.assert_outcomes(failed=1, deselected=2)
    out = result.stdout.str()
    replay = re.search(r"replay: (pytest .*)", out).group(1)
    words = shlex.split(replay)
    assert "--equiv-known-divergences=known.txt" in words, replay  # a path option as one word
    for opt in opts[2:]:
        assert opt in words, (opt, replay)
    again = project.runpytest(*shlex.split(replay)[1:])
    again.assert_outcomes(failed=1)
    for text in (out, again.stdout.str()):
        assert "gelu_bug::vjp::float32::cpu [precision default] failed" in text
        assert "gelu_bug::forward::float32::cpu [precision default] failed" not in text


def test_known_divergences_become_xfail_and_stale_entries_are_reported(project):
    known = project.path / "known.txt"
    known.write_text("gelu_bug::forward   tanh approximation by default\nnothing::*   stale entry\n"
                     "test_pairs.py::test_plain   a node id pattern\ntanh::hvp::float16   a dtype not run\n")
    result = project.runpytest("--equiv", "--equiv-known-divergences", str(known), "-rx", *FAST)
    result.assert_outcomes(passed=1, xfailed=1, deselected=1)
    out = result.stdout.str()
    assert "forward: tanh approximation by default" in out
    assert "WARNING known divergence 'nothing::*'" in out
    assert "WARNING known divergence 'test_pairs.py::test_plain'" in out  # deselected: matched nothing run
    # float16 was not selected: the entry cannot match, which is no sign that it is stale
    assert "WARNING known divergence 'tanh::hvp::float16'" not in out
    assert "1 known divergences are for dtypes or devices this run did not select" in out
    rep = report(project)
    outcomes = {r["id"]: r["outcome"] for r in rep["records"]}
    assert outcomes["gelu_bug::forward::float32::cpu"] == "known-divergence"
    assert {e["pattern"] for e in rep["run"]["unmatched_known"]} == {"nothing::*", "test_pairs.py::test_plain"}
    assert [(e["pattern"], e["why"]) for e in rep["run"]["unchecked_known"]] == [
        ("tanh::hvp::float16", "dtypes or devices this run did not select")]


def test_entries_for_checks_a_k_selection_left_out_are_summarised_not_warned(project):
    known = project.path / "known.txt"
    known.write_text("gelu_bug::forward   tanh approximation by default\ntanh::hvp   left out by -k\n"
                     "tan?::vjp::float32   left out by -k\ntest_pairs.py::test_pair[tanh-*]   left out by -k\n"
                     "nothing::*   stale entry\n")
    result = project.runpytest("--equiv", "--equiv-known-divergences", str(known), *FAST, "-k", "gelu")
    result.assert_outcomes(xfailed=1, deselected=2)
    out = result.stdout.str()
    assert "WARNING known divergence 'nothing::*'" in out  # matches nothing collected: stale or a typo
    assert "WARNING known divergence 'tanh" not in out and "WARNING known divergence 'tan?" not in out
    assert "WARNING known divergence 'test_pairs.py::test_pair[tanh" not in out
    assert "3 known divergences are for checks this selection (-k, -m) left out" in out
    # Only the file named ran: entries for other pairs are not judged; one in that file still is.
    (project.path / "test_other.py").write_text(PAIRS.replace('"tanh"', '"tanh2"').replace('"gelu_bug"', '"gelu2"'))
    known.write_text("gelu2::forward   in a file this run did not collect\ntanh::jvpp   a typo\n")
    out = project.runpytest("--equiv", "--equiv-known-divergences", str(known), *FAST, "test_pairs.py").stdout.str()
    assert "WARNING known divergence 'gelu2" not in out and "WARNING known divergence 'tanh::jvpp'" in out
    assert "1 known divergences are for pairs or files this run did not collect" in out


def test_under_xdist_entries_left_out_by_k_are_summarised_from_the_workers_collection(project):
    """The xdist controller collects nothing: the workers send what they collected."""
    known = project.path / "known.txt"
    known.write_text("gelu_bug::forward   tanh approximation by default\ntanh::hvp   left out by -k\n"
                     "test_pairs.py::test_pair[tanh-*]   left out by -k\nnothing::*   stale entry\n")
    result = project.runpytest_subprocess("--equiv", "--equiv-known-divergences", str(known), *FAST, "-k", "gelu",
                                          "-n", "2")
    result.assert_outcomes(xfailed=1)
    out = result.stdout.str()
    assert "WARNING known divergence 'nothing::*'" in out
    assert "WARNING known divergence 'tanh" not in out and "WARNING known divergence 'test_pairs.py" not in out
    assert "2 known divergences are for checks this selection (-k, -m) left out" in out


def test_a_known_divergence_that_agrees_is_reported_as_xpass(project):
    known = project.path / "known.txt"
    known.write_text("tanh::vjp   listed, but it agrees\n")
    project.runpytest("--equiv", "--equiv-known-divergences", str(known), *FAST)
    outcomes = {r["id"]: r["outcome"] for r in report(project)["records"]}
    assert outcomes["tanh::vjp::float32::cpu"] == "xpass"


def test_gpu_without_a_gpu_skips_with_the_reason(project):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = project.runpytest("--equiv", "--device=gpu", "-rs", *FAST)
    result.assert_outcomes(skipped=2, deselected=1)
    assert "no GPU here" in result.stdout.str()


def test_device_all_runs_cpu_and_skips_an_absent_gpu(project):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = project.runpytest("--equiv", "--device=all", *FAST)
    result.assert_outcomes(passed=1, failed=1, skipped=2, deselected=1)


@pytest.mark.parametrize("args, message", [
    (("--equiv-dtypes", "float8"), "--equiv-dtypes: unknown ['float8']"),
    (("--equiv-examples", "0"), "--equiv-examples must be >= 1"),
    (("--device", "tpu"), "invalid choice: 'tpu'"),
])
def test_bad_options_are_usage_errors(project, args, message):
    result = project.runpytest("--equiv", *args)
    assert result.ret != 0 and message in result.stderr.str() + result.stdout.str()


def test_a_malformed_known_divergence_file_names_the_line(project):
    bad = project.path / "bad.txt"
    bad.write_text("tanh::vjp\n")
    result = project.runpytest("--equiv", "--equiv-known-divergences", str(bad))
    assert result.ret != 0 and "bad.txt:1: 'tanh::vjp' has no reason" in result.stderr.str()


def test_a_dtype_given_twice_runs_once(project):
    result = project.runpytest("--equiv", "--equiv-dtypes", "float32,float32, float64,float32", "--equiv-examples", "3",
                               "-p", "no:cacheprovider", "-k", "tanh", "--collect-only", "-q")
    ids = [line for line in result.stdout.lines if "test_pair[" in line]
    assert ids == ["test_pairs.py::test_pair[tanh-float32-cpu]", "test_pairs.py::test_pair[tanh-float64-cpu]"]


def test_undeclared_dtypes_skip_with_the_pair_s_declaration(project):
    result = project.runpytest("--equiv", "--equiv-dtypes", "float32,bfloat16", "-rs", "--equiv-examples", "3",
                               "-p", "no:cacheprovider", "-k", "tanh")
    result.assert_outcomes(passed=1, skipped=1, deselected=3)
    assert "tanh declares dtypes float32, float64; not bfloat16" in result.stdout.str()


DUPLICATES = """
import pytest, torch, jax.numpy as jnp, equivcheck as ec
A = ec.Pair("same", torch.exp, jnp.exp, ec.unary(), checks=("forward",))
@pytest.mark.parametrize("pair", [A], ids=str)
def test_a(pair, equiv): equiv.check(pair)
def test_c(equiv): equiv.check(A)
def test_d(equiv): equiv.check(A.replace(inputs=ec.unary(ec.Floats(-3.0, 3.0))))
def test_e(equiv):
    equiv.check(A.replace(inputs=ec.unary(ec.Floats(-3.0, 3.0))))
    equiv.check(A.replace(inputs=ec.unary(ec.Floats(-2.0, 2.0))))
"""
DIFFERENT = DUPLICATES + """
B = ec.Pair("same", torch.log, jnp.log, ec.unary(ec.Floats(0.5, 2.0)), checks=("forward",))
@pytest.mark.parametrize("pair", [B], ids=str)
def test_b(pair, equiv): equiv.check(pair)
"""


def test_two_different_pairs_of_one_name_are_refused(pytester):
    pytester.makepyfile(test_names=DIFFERENT)
    result = pytester.runpytest("--equiv", *FAST)
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "two different pairs are named 'same'" in result.stderr.str()
    assert "PARTIAL RUN" not in result.stdout.str()  # nothing ran, by the user's error: no run to report on
    assert not (pytester.path / "reports" / "latest.json").exists()


def test_two_different_pairs_of_one_name_under_xdist_fail_naming_both_tests(pytester):
    # A worker's UsageError at collection was an xdist INTERNALERROR without the reason.
    pytest.importorskip("xdist")
    pytester.makepyfile(test_names=DIFFERENT)
    result = pytester.runpytest("--equiv", *FAST, "-n", "2", "-k", "test_a or test_b")
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1, failed=1)
    assert ("record same::forward::float32::cpu was already made by test_names.py::test_" in result.stdout.str()
            and "every check's id (pair::check::dtype::device) must be unique in a run" in result.stdout.str())


@pytest.mark.parametrize("second", ["test_c", "test_d", "test_e"])
def test_one_record_id_made_by_two_tests_or_twice_fails_the_second(pytester, second):
    # The same pair in another test (test_c), a pair built inside a test (test_d), one test
    # checking a pair twice (test_e): collection cannot see these; the records' ids collide.
    pytester.makepyfile(test_names=DUPLICATES)
    twice = second == "test_e"
    result = pytester.runpytest("--equiv", *FAST, "-k", second if twice else f"test_a or {second}")
    result.assert_outcomes(passed=0 if twice else 1, failed=1)
    where = "this test too" if twice else "test_names.py::test_a[same-float32-cpu]"
    assert f"record same::forward::float32::cpu was already made by {where}: every check's id" in result.stdout.str()
    result.stdout.fnmatch_lines(["same  float32  cpu     ok *"])  # one row: the first test's


def test_profiles_set_the_example_budget(project):
    out = project.runpytest("--equiv", "--equiv-profile", "nightly", "--collect-only").stdout.str()
    assert "profile nightly, 300 examples" in out


def test_xdist_workers_send_their_records_to_the_report(project):
    pytest.importorskip("xdist")
    result = project.runpytest("--equiv", "-n", "2", *FAST)
    result.assert_outcomes(passed=1, failed=1)
    rep = report(project)
    assert rep["summary"]["total"] == 5
    # the controller collects nothing itself: the selection it compares against is its workers'
    assert rep["run"]["partial"] is None and "PARTIAL RUN" not in result.stdout.str()


def test_a_path_option_pytest_took_for_a_test_path_is_a_usage_error(tmp_path):
    """pytest picks its rootdir before plugins load, so `--equiv-report /outside` (two words) counted
    as a test path and moved the rootdir above the project: no ini file, so no known divergences and no
    testpaths (a `-n 2` run of the suites failed 100 known-divergence checks). The one-word form works."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    outside = tmp_path / "reports"
    outside.mkdir()
    base = [sys.executable, "-m", "pytest", "--equiv", "--collect-only", "-q", "-p", "no:cacheprovider",
            "-k", "sqrt and float32"]
    two = subprocess.run([*base, "--equiv-report", str(outside)], cwd=root, capture_output=True, text=True, timeout=300,
                         check=False)
    assert two.returncode == 4, two.stdout[-2000:] + two.stderr[-2000:]
    assert f"--equiv-report {outside}: pytest took {outside} for a test path" in two.stderr
    assert f"write --equiv-report={outside}" in two.stderr
    # the same command before the directory exists: refused too, not accepted once and refused after
    fresh = tmp_path / "new-reports"
    first = subprocess.run([*base, "--equiv-report", str(fresh)], cwd=root, capture_output=True, text=True,
                           timeout=300, check=False)
    assert first.returncode == 4 and not fresh.exists(), first.stdout[-2000:] + first.stderr[-2000:]
    assert f"--equiv-report {fresh}: given as two words, pytest takes {fresh} for a test path" in first.stderr
    # an option's value that is an existing path is no test path: still refused
    ignored = subprocess.run([*base, "--ignore", "suites/test_data.py", "--equiv-report", str(fresh)], cwd=root,
                             capture_output=True, text=True, timeout=300, check=False)
    assert ignored.returncode == 4 and "given as two words" in ignored.stderr, ignored.stdout[-2000:]
    one = subprocess.run([*base, f"--equiv-report={outside}"], cwd=root, capture_output=True, text=True, timeout=300,
                         check=False)
    assert one.returncode == 0 and "suites/test_autodiff.py::test_autodiff[sqrt-float32-cpu]" in one.stdout, \
        one.stdout[-2000:] + one.stderr[-2000:]
    # beside a test path or node id the ini file is still the project's (benchmarks/seed_sweep.py runs so):
    # no refusal, whether the directory exists or not
    for where in (outside, fresh):
        for test in ("suites/test_autodiff.py", "suites/test_autodiff.py::test_autodiff"):
            swept = subprocess.run([*base, test, "--equiv-report", str(where)], cwd=root,
                                   capture_output=True, text=True, timeout=300, check=False)
            assert swept.returncode == 0, (where, test, swept.stdout[-2000:] + swept.stderr[-2000:])
