"""Known divergences as a user meets them through the plugin (a new-user trial's findings): a side
that raises is no known divergence, node-id entries behave as check-id ones, entries a -k
selection left out are not called stale in the report, the "fixed" message fits a user's own
pair, and a known divergence that did not show is XPASS in pytest as in equivcheck's table."""
from __future__ import annotations

import json

from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

# The user's pair from the trial: torch uses eps 1e-6; JAX_EPS is the port's (a float that
# agrees, one that diverges, or a string that makes the JAX side raise TypeError).
SUITE = """
import jax.numpy as jnp, pytest, torch
from equivcheck import Floats, Pair, unary

X = unary(Floats(-1, 1))
PAIRS = [
    Pair("kd_eps", lambda x: x / torch.sqrt(x * x + 1e-6), lambda x: x / jnp.sqrt(x * x + JAX_EPS), X,
         witnesses=(([0.5],),), checks=("forward", "vjp")),
    Pair("kd_same", torch.tanh, jnp.tanh, X, checks=("forward",)),
]

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
"""
AGREES, DIVERGES, RAISES = "1e-6", "1e-2", '"str"'
FAST = ("--equiv", "--equiv-dtypes", "float32", "--equiv-examples", "3", "--equiv-seed", "1",
        "-p", "no:cacheprovider", "--equiv-known-divergences", "known.txt")


def run(pytester, jax_eps, known, *extra, suite=SUITE):
    pytester.makepyfile(test_kd=suite.replace("JAX_EPS", jax_eps))
    (pytester.path / "known.txt").write_text(known)
    result = pytester.runpytest(*FAST, *extra)
    rep = json.loads((pytester.path / "reports" / "latest.json").read_text())
    return result, rep, {r["id"]: r for r in rep["records"]}


def test_a_side_that_raises_stays_a_failure_though_an_entry_matches(pytester):
    result, rep, records = run(pytester, RAISES, "kd_eps  jax port uses eps 1e-5\n", "-k", "kd_eps")
    result.assert_outcomes(failed=1, deselected=1)
    result.stdout.fnmatch_lines(["*known divergence 'kd_eps' matched, but the jax side raised*TypeError*"])
    forward = records["kd_eps::forward::float32::cpu"]
    assert forward["outcome"] == "failed" and forward["kind"] == "error" and forward["known_pattern"] == "kd_eps"
    assert rep["summary"]["failed"] == 2 and rep["summary"]["known-divergence"] == 0
    # An entry whose reason says the side raises expects exactly that (the built-in mlp_naive).
    result, _, records = run(pytester, RAISES, "kd_eps  the jax port raises TypeError on a string eps\n",
                             "-k", "kd_eps")
    result.assert_outcomes(xfailed=1, deselected=1)
    assert records["kd_eps::forward::float32::cpu"]["outcome"] == "known-divergence"


NODE_ENTRY = "test_kd.py::test_pair[kd_eps-*]  nodeid form\n"


def test_a_node_id_entry_is_a_known_divergence_while_it_diverges_and_fixed_once_it_agrees(pytester):
    result, rep, records = run(pytester, DIVERGES, NODE_ENTRY)
    result.assert_outcomes(passed=1, xfailed=1)
    out = result.stdout.str()
    assert "FAIL" not in out and "failed checks" not in out
    for check in ("forward", "vjp"):
        rec = records[f"kd_eps::{check}::float32::cpu"]
        assert rec["outcome"] == "known-divergence", rec
        assert rec["known_pattern"] == "test_kd.py::test_pair[kd_eps-*]" and rec["known_reason"] == "nodeid form"
    assert rep["summary"]["failed"] == 0 and rep["summary"]["known-divergence"] == 2
    assert rep["run"]["unmatched_known"] == []
    # The port is fixed: the witness runs and agrees, so the entry must go (strict, as for pair::check).
    result, rep, records = run(pytester, AGREES, NODE_ENTRY)
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret != 0
    assert "'test_kd.py::test_pair[kd_eps-*]' no longer shows" in result.stdout.str()
    assert records["kd_eps::forward::float32::cpu"]["kind"] == "fixed"


def test_the_fixed_message_fits_a_user_s_own_pair(pytester):
    result, _, records = run(pytester, AGREES, "kd_eps  jax port uses eps 1e-5\n", "-k", "kd_eps")
    result.assert_outcomes(failed=1, deselected=1)
    message = records["kd_eps::forward::float32::cpu"]["message"]
    assert ("Either the port was fixed, the installed torch/jax changed or this device (cpu) rounds otherwise: "
            "remove the entry") in message
    assert "per-version file (`{torch}` or `{jax}` in its path" in message
    assert "name theirs in its pattern" in message
    assert "suites/" not in message  # the project's own files are none of a user's business


def test_entries_a_k_selection_left_out_are_not_checked_in_the_report_too(pytester):
    known = "kd_eps  jax port uses eps 1e-5\nnothing::*  stale entry\n"
    result, rep, _ = run(pytester, DIVERGES, known, "-k", "kd_same")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*1 known divergences are for checks this selection (-k, -m) left out*"])
    assert [e["pattern"] for e in rep["run"]["unmatched_known"]] == ["nothing::*"]
    assert [(e["pattern"], e["why"]) for e in rep["run"]["unchecked_known"]] == [
        ("kd_eps", "checks this selection (-k, -m) left out")]
    md = (pytester.path / "reports" / "latest.md").read_text()
    stale = md.split("matched nothing in this run:")[1].split("\n\n")[1]
    assert "`nothing::*`" in stale and "kd_eps" not in stale
    assert "- `kd_eps` (known.txt:1): for checks this selection (-k, -m) left out" in md


def test_a_known_divergence_without_a_witness_that_passes_is_xpass_in_pytest_and_the_terminal(pytester):
    after = SUITE + """
def test_own_assertion_after_an_xpass(equiv):
    equiv.check(PAIRS[1])
    assert False, "the test's own assertion"
"""
    result, _, records = run(pytester, AGREES, "kd_same  listed, but it agrees\n", "-rX",
                             "-k", "kd_same or own_assertion", suite=after)
    result.assert_outcomes(xpassed=1, failed=1, deselected=1)  # the failure after the check still fails
    result.stdout.fnmatch_lines([  # equivcheck's summary, then pytest's
        "XPASS kd_same::forward::float32::cpu: known divergence 'kd_same' did not show: no witness ran*",
        "XPASS*test_pair*kd_same*forward: known divergence 'kd_same' did not show: no witness ran*",
    ])
    assert records["kd_same::forward::float32::cpu"]["outcome"] == "xpass"
    md = (pytester.path / "reports" / "latest.md").read_text()
    assert "| xpass | listed, but it agrees | known divergence 'kd_same' did not show: no witness ran" in md
