"""Shards for CI fleets: `--equiv-shard i/n` runs a deterministic, balanced share of the checks,
and `python -m equivcheck merge` makes the shards' reports the whole run's, refusing shards that
overlap, are missing or come from different runs. Driven through pytester."""
from __future__ import annotations

import json
import random

import pytest

from equivcheck.__main__ import main
from equivcheck.report import build
from equivcheck.report.shards import assign, describe, merge, parse_shard, tally
from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

# Seven tests: five pairs that agree, one off by a factor (a failure with its diagnosis), one a
# known divergence, so merged records carry every outcome a real run has.
SEVEN = """
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

PAIRS = [ec.Pair(n, f, g, ec.unary(), checks=("forward", "vjp")) for n, f, g in [
    ("tanh", torch.tanh, jnp.tanh), ("sin", torch.sin, jnp.sin), ("exp", torch.exp, jnp.exp),
    ("cos", torch.cos, jnp.cos), ("sigmoid", torch.sigmoid, lambda x: 1 / (1 + jnp.exp(-x))),
    ("off", torch.sinh, lambda x: jnp.sinh(x) * 1.01), ("known", torch.cosh, lambda x: jnp.cosh(x) * 1.01)]]

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
"""
FAST = ("--equiv", "--equiv-examples", "3", "--equiv-seed", "7", "--equiv-dtypes", "float32", "-p", "no:cacheprovider",
        "--equiv-jax-cache", "none", "--equiv-known-divergences", "known.txt")
SAME = ("id", "outcome", "examples", "worst_ratio", "max_abs_err", "inputs", "side", "nodeid")


@pytest.fixture
def seven(pytester):
    pytester.makepyfile(test_seven=SEVEN)
    (pytester.path / "known.txt").write_text("known::* cosh scaled on purpose\n")
    return pytester


def _run(pytester, name, *args):
    pytester.runpytest(*FAST, "--equiv-report", name, *args)
    return pytester.path / name / "latest.json"


def _records(path):
    return sorted(({k: r.get(k) for k in SAME} for r in json.loads(path.read_text())["records"]),
                  key=lambda r: r["id"])


@pytest.mark.parametrize("text, right", [("1/1", (1, 1)), ("2/3", (2, 3)), (" 3 / 3 ", (3, 3))])
def test_a_share_is_read_as_i_of_n(text, right):
    assert parse_shard(text) == right


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "1", "a/b", "-1/2", "1/2/3"])
def test_a_share_outside_1_to_n_is_refused(text):
    with pytest.raises(ValueError, match="i/n|between 1 and n"):
        parse_shard(text)


def test_the_assignment_is_the_same_whatever_order_tests_come_in():
    ids = [f"t.py::test[{i}]" for i in range(40)]
    seconds = {i: float(k % 7 + 1) for k, i in enumerate(ids[:30])}  # ten without a duration
    first = assign(ids, 3, seconds)
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert assign(shuffled, 3, seconds) == first
    assert sorted(first) == sorted(ids)


def test_by_count_shards_differ_by_at_most_one_test():
    for n in (2, 3, 5):
        counts = [list(assign([str(i) for i in range(23)], n).values()).count(k) for k in range(1, n + 1)]
        assert max(counts) - min(counts) <= 1, (n, counts)


def test_by_duration_one_long_test_is_balanced_by_many_short_ones():
    # By count this would put the 10 s test with three 1 s tests (13 s against 4 s).
    seconds = {"long": 10.0, **{f"s{i}": 1.0 for i in range(7)}}
    share = assign(seconds, 2, seconds)
    load = [sum(seconds[t] for t, k in share.items() if k == j) for j in (1, 2)]
    assert sorted(load) == [7.0, 10.0]
    # A test the durations do not know counts as their median (1 s here), not as nothing.
    share = assign([*seconds, "new"], 2, seconds)
    assert sorted(sum(seconds.get(t, 1.0) for t, k in share.items() if k == j) for j in (1, 2)) == [8.0, 10.0]


@pytest.mark.parametrize("n", [2, 3])
def test_the_merged_shards_are_the_unsharded_run(seven, n, capsys):
    whole = _records(_run(seven, "whole"))
    assert {r["outcome"] for r in whole} == {"passed", "failed", "known-divergence"}
    parts = [_run(seven, f"shard{i}", "--equiv-shard", f"{i}/{n}") for i in range(1, n + 1)]
    tests = [json.loads(p.read_text())["run"]["shard"]["tests"] for p in parts]
    assert all(tests) and sum(map(len, tests)) == 7 and len(set().union(*tests)) == 7
    out = seven.path / "all.json"
    assert main(["merge", *map(str, parts), "-o", str(out)]) == 0
    assert f"{n} shards, 14 records" in capsys.readouterr().out
    assert _records(out) == whole
    merged = json.loads(out.read_text())
    assert merged["summary"]["failed"] == sum(r["outcome"] == "failed" for r in whole) >= 1
    assert merged["summary"]["total"] == 14
    assert "shard" not in merged["run"] and len(merged["run"]["merged_from"]) == n
    counts = [json.loads(p.read_text())["run"]["jax_compilations"]["count"] for p in parts]
    assert merged["run"]["jax_compilations"]["count"] == sum(counts)  # the run's, not shard 1's
    assert merged["run"]["unmatched_known"] == []  # the known entry matched in one shard only


def test_a_shard_says_what_it_ran_and_how_it_was_balanced(seven):
    durations = _run(seven, "whole")
    result = seven.runpytest(*FAST, "--equiv-report", "s", "--equiv-shard", "2/2", "--equiv-shard-durations",
                             str(durations))
    result.stdout.fnmatch_lines([f"shard 2/2: * of 7 selected tests (balanced by durations from {durations}); *"])
    shard = json.loads((seven.path / "s" / "latest.json").read_text())["run"]["shard"]
    assert shard["balanced_by"] == f"durations from {durations}"


def test_the_merge_refuses_missing_overlapping_and_foreign_shards(seven, capsys):
    one, two = (_run(seven, f"s{i}", "--equiv-shard", f"{i}/2") for i in (1, 2))
    other_seed = seven.path / "other.json"
    seven.runpytest(*FAST[:4], "8", *FAST[5:], "--equiv-report", "o", "--equiv-shard", "2/2")
    other_seed.write_text((seven.path / "o" / "latest.json").read_text())
    whole = _run(seven, "whole")
    out = str(seven.path / "all.json")
    other_torch = seven.path / "other_torch.json"
    edited = json.loads(two.read_text())
    edited["run"]["versions"]["torch"] = "2.13.0"
    other_torch.write_text(json.dumps(edited))
    not_object = seven.path / "not_object.json"
    edited["run"]["shard"] = "2/2"
    not_object.write_text(json.dumps(edited))
    lost = seven.path / "lost.json"  # one record deleted by hand: the shard's tally still names it
    edited = json.loads(two.read_text())
    gone = edited["records"].pop()
    lost.write_text(json.dumps(edited))
    cases = [
        ([one, lost], f"{lost}: record {gone['id']} of test {gone['nodeid']} is missing"),
        ([one, other_torch], "run setting versions "),
        ([one, not_object], "run.shard is a str, not an object"),
        ([one], "shards 2/2 missing: the merge would not be the whole run"),
        ([one, one], "shard 1/2 is also"),
        ([one, other_seed], "run setting seed 8 differs"),
        ([one, whole], "not a shard's report (its run had no --equiv-shard)"),
    ]
    for paths, message in cases:
        assert main(["merge", *map(str, paths), "-o", out]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (seven.path / "all.json").exists()
    assert main(["merge", str(one), str(two), "-o", out]) == 0


def test_a_shard_under_xdist_reports_its_share(seven):
    result = seven.runpytest(*FAST, "--equiv-report", "x", "--equiv-shard", "1/2", "-n", "2", "-p", "xdist")
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
    shard = json.loads((seven.path / "x" / "latest.json").read_text())["run"]["shard"]
    assert shard["index"] == 1 and shard["selected"] == 7 and 3 <= len(shard["tests"]) <= 4


@pytest.mark.parametrize("args, message", [
    (("--equiv-shard", "3/2"), "ERROR: --equiv-shard '3/2': the share i must be between 1 and n, and n at least 1"),
    (("--equiv-shard-durations", "r.json"), "ERROR: --equiv-shard-durations balances shards: give --equiv-shard I/N too"),
    (("--equiv-shard", "1/2", "--equiv-shard-durations", "nothere.json"),
     "ERROR: --equiv-shard-durations: nothere.json: cannot read (No such file or directory)"),
])
def test_bad_shard_options_are_a_usage_error_before_any_check(seven, args, message):
    result = seven.runpytest(*FAST, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert result.stderr.lines[0] == message


TWO_BUILT_INSIDE = """
import torch, jax.numpy as jnp
import equivcheck as ec

def test_one(equiv):
    equiv.check(ec.Pair("inline", torch.tanh, jnp.tanh, ec.unary(), checks=("forward",)))

def test_two(equiv):
    equiv.check(ec.Pair("inline", torch.tanh, jnp.tanh, ec.unary(ec.Floats(-3.0, 3.0)), checks=("forward",)))
"""


def test_one_record_id_made_by_tests_in_two_shards_is_named_at_the_merge(pytester, capsys):
    # Each shard saw one of the two tests, so neither could refuse the second record.
    pytester.makepyfile(test_inline=TWO_BUILT_INSIDE)
    (pytester.path / "known.txt").write_text("")
    parts = [_run(pytester, f"s{i}", "--equiv-shard", f"{i}/2") for i in (1, 2)]
    assert main(["merge", *map(str, parts), "-o", str(pytester.path / "all.json")]) == 2
    err = capsys.readouterr().err
    assert "record inline::forward::float32::cpu is made by two tests, test_inline.py::test_" in err
    assert "every check's id must be unique in a run" in err and "overlapping" not in err


def test_a_share_with_no_tests_passes_and_still_writes_its_report(seven, capsys):
    # More shards than selected tests: a CI machine with nothing to do must not fail the fleet,
    # and merge needs every share's report.
    parts = [_run(seven, f"e{i}", "--equiv-shard", f"{i}/3", "-k", "tanh or sin") for i in (1, 2, 3)]
    result = seven.runpytest(*FAST, "--equiv-report", "e3b", "--equiv-shard", "3/3", "-k", "tanh or sin")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["shard 3/3: 0 of 2 selected tests *"])
    assert json.loads(parts[2].read_text())["run"]["shard"]["tests"] == []
    assert main(["merge", *map(str, parts), "-o", str(seven.path / "all.json")]) == 0
    assert "3 shards, 4 records" in capsys.readouterr().out


TESTS = [f"t.py::test[{name}]" for name in ("a", "b", "c", "d", "e")]


def _shards(compilations=({"count": 3, "seconds": 1.5}, {"count": 4, "seconds": 0.25})):
    """Two shard reports of TESTS as (path, report), as the plugin writes them: each test made two
    records but t.py::test[e], which made none (a test need not check anything)."""
    share = assign(TESTS, 2)
    out = []
    for index, made in zip((1, 2), compilations):
        mine = [t for t in TESTS if share[t] == index]
        records = [{"id": f"{t[-2]}::{check}::float32::cpu", "outcome": "passed", "nodeid": t}
                   for t in mine if not t.endswith("[e]") for check in ("forward", "vjp")]
        run = {"id": f"r{index}", "started": "2026-12-01T00:00:00+00:00", "finished": "2026-12-01T00:01:00+00:00",
               "seconds": 60.0, "versions": {}, "jax_compilations": made,
               "shard": {**describe(index, 2, mine, TESTS, "count"), "records": tally(records)}}
        out.append((f"s{index}.json", build(records, run)))
    return out


def test_merge_refuses_a_shard_whose_records_are_not_the_ones_it_wrote():
    assert merge(_shards())["summary"]["total"] == 8
    cases = {
        "deleted": (lambda rep: rep["records"].pop(0), "record {id} of test {nodeid} is missing: the shard wrote it"),
        "added": (lambda rep: rep["records"].append({**rep["records"][0], "id": "x::forward::float32::cpu"}),
                  "record x::forward::float32::cpu of test {nodeid} is not one the shard wrote"),
        "foreign": (lambda rep: rep["records"].append({**rep["records"][0], "nodeid": "t.py::test[zz]"}),
                    "record {id} is of test t.py::test[zz], which is not in this shard's share"),
        "untallied": (lambda rep: rep["run"]["shard"].pop("records"), "run.shard.records missing, which s1.json has"),
    }
    for name, (edit, message) in cases.items():
        shards = _shards()
        first = dict(shards[1][1]["records"][0])
        edit(shards[1][1])
        with pytest.raises(ValueError) as exc:
            merge(shards)
        assert str(exc.value).startswith("s2.json: "), name
        assert message.format(**first) in str(exc.value), (name, str(exc.value))


def test_shards_of_an_older_version_without_a_tally_are_still_checked_against_their_tests():
    # Without run.shard.records a deleted record cannot be told from a test that made none.
    shards = _shards()
    for _, rep in shards:
        del rep["run"]["shard"]["records"]
    shards[0][1]["records"].pop()
    assert merge(shards)["summary"]["total"] == 7
    shards[0][1]["records"].append({**shards[1][1]["records"][0], "id": "y::forward::float32::cpu"})
    with pytest.raises(ValueError, match=r"s1.json: record y::forward::float32::cpu is of test .* not in this shard"):
        merge(shards)


def test_the_merged_run_counts_every_shards_jax_compilations():
    assert merge(_shards())["run"]["jax_compilations"] == {"count": 7, "seconds": 1.75}
    # A shard run under xdist counts none (its controller compiles nothing): the run's count is unknown.
    assert merge(_shards(({"count": 3, "seconds": 1.5}, None)))["run"]["jax_compilations"] is None
