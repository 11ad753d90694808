"""The failures database (`--equiv-failures-db`, Hypothesis's example database): a check's failing
example is saved and tried first by the next run. Driven through pytester."""
from __future__ import annotations

import json
import shlex

import pytest

from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

# The JAX side is off only where an element lies in (0.3, 0.35): the first example drawn at this
# seed has none, so a one-example run finds the slip only if it replays a saved failing example.
RARE = """
import os
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

def port(x):
    return jnp.where((x > 0.3) & (x < 0.35), 1.5 * x, x) if os.environ.get("EQUIV_TEST_BUG") else x

PAIR = ec.Pair("rare", lambda x: x * 1.0, port, ec.unary(ec.Floats(-1.0, 1.0)), checks=("forward",),
               reference=lambda x: x)

def test_rare(equiv):
    equiv.check(PAIR)
"""
RUN = ("--equiv", "--equiv-seed", "3", "--equiv-dtypes", "float32", "--equiv-jax-cache", "none",
       "--equiv-report", "none")


@pytest.fixture
def rare(pytester):
    pytester.makepyfile(test_rare=RARE)
    return pytester


def _saved(db):
    return [f for f in db.rglob("*") if f.is_file()]


def test_a_saved_failing_example_is_tried_first_by_the_next_run(rare, monkeypatch):
    db = rare.path / "failures"
    monkeypatch.setenv("EQUIV_TEST_BUG", "1")
    # One example without the database: the drawn one passes, so the slip goes unseen.
    rare.runpytest(*RUN, "--equiv-examples", "1", "--equiv-failures-db", "none").assert_outcomes(passed=1)
    # Thirty examples find it and save the failing example.
    rare.runpytest(*RUN, "--equiv-examples", "30", "--equiv-failures-db", str(db)).assert_outcomes(failed=1)
    assert _saved(db)
    # The next run, one example again: the saved example runs first and fails.
    result = rare.runpytest(*RUN, "--equiv-examples", "1", "--equiv-failures-db", str(db))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*jax is off*"])
    # Fixed: the saved examples pass, and the check with them.
    monkeypatch.delenv("EQUIV_TEST_BUG")
    rare.runpytest(*RUN, "--equiv-examples", "1", "--equiv-failures-db", str(db)).assert_outcomes(passed=1)


def test_auto_keeps_the_database_in_pytests_cache_and_the_replay_line_carries_it(rare, monkeypatch):
    monkeypatch.setenv("EQUIV_TEST_BUG", "1")
    result = rare.runpytest(*RUN[:-2], "--equiv-examples", "30", "--equiv-failures-db", "auto")
    result.assert_outcomes(failed=1)
    db = rare.path / ".pytest_cache" / "d" / "equivcheck-failures"
    assert _saved(db)
    run = json.loads((rare.path / "reports" / "latest.json").read_text())["run"]
    assert run["failures_db"] == str(db)
    # A database, even an empty one, draws other examples than none: the replay must say which.
    replay = next(ln for ln in result.stdout.lines if ln.strip().startswith("replay: "))
    assert replay.endswith("--equiv-failures-db=auto")  # one word: pytest never takes it for a test path
    replayed = rare.runpytest(*shlex.split(replay.split("replay: pytest ", 1)[1]))
    replayed.assert_outcomes(failed=1)


def test_without_the_option_there_is_no_database_and_a_seed_replays_alone(rare, monkeypatch):
    monkeypatch.setenv("EQUIV_TEST_BUG", "1")
    result = rare.runpytest(*RUN[:-2], "--equiv-examples", "30")
    result.assert_outcomes(failed=1)
    assert not (rare.path / ".pytest_cache" / "d" / "equivcheck-failures").exists()
    assert "--equiv-failures-db" not in result.stdout.str()
    assert json.loads((rare.path / "reports" / "latest.json").read_text())["run"]["failures_db"] is None


def test_an_unusable_database_directory_is_a_usage_error(rare):
    (rare.path / "afile").write_text("")
    result = rare.runpytest(*RUN, "--equiv-failures-db", "afile/db")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert result.stderr.lines[0] == "ERROR: --equiv-failures-db afile/db: afile is a file, not a directory"


def test_auto_without_pytests_cache_is_a_usage_error(rare):
    result = rare.runpytest(*RUN, "--equiv-failures-db", "auto", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--equiv-failures-db auto keeps the database in pytest's cache dir" in result.stderr.lines[0]
