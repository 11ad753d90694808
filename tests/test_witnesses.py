"""Known divergences are strict: each built-in entry has a witness that runs first on every
seed, and an entry whose witness now agrees is reported as fixed (issue 18)."""
from __future__ import annotations

import fnmatch
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tests.preload  # noqa: F401  (before any pytester run: see tests/preload.py)
from equivcheck import Floats, Inputs, Pair, RunSettings, unary
from equivcheck.engine import KnownDivergences, settle, versioned
from equivcheck.engine.search import Search


def test_explicit_examples_run_first_in_order_on_every_seed():
    from hypothesis import strategies as st

    class Stop(Exception):
        pass

    for seed in (1, 2):
        seen = []
        Search(RunSettings(examples=3), Stop)(seen.append, st.integers(100, 200), digest="d", seed=seed,
                                              explicit=[1, 2, 3])
        assert seen[:3] == [1, 2, 3] and len(seen) == 6 and all(100 <= s <= 200 for s in seen[3:])


def test_a_witness_that_diverges_fails_the_check_on_a_seed_that_draws_nothing_near_it():
    # abs'(0): torch 0, JAX 1. Drawn inputs in [1, 2] never reach 0; the witness does.
    p = Pair("abs_at_zero", torch.abs, jnp.abs, Inputs(unary().shapes, (Floats(1.0, 2.0),)), checks=("vjp",))
    run = RunSettings(examples=5, seed=3)
    assert [r.outcome for r in p.run_checks(dtype="float32", run=run)] == ["passed"]
    rec, = p.replace(witnesses=(([0.0],),)).run_checks(dtype="float32", run=run)
    assert rec.outcome == "failed" and rec.witnessed == 1
    assert "0" in rec.inputs


def test_witnesses_are_cast_to_each_dtype_and_validated():
    p = Pair("exp", torch.exp, jnp.exp, unary(), witnesses=(([1.5, -2.0],),))
    (x,) = p.inputs.cast(p.witnesses[0], "float64")
    assert x.dtype == np.float64 and x.tolist() == [1.5, -2.0]
    with pytest.raises(ValueError, match="witness 0: 2 arguments given; the inputs draw 1"):
        Pair("exp", torch.exp, jnp.exp, unary(), witnesses=(([1.0], [2.0]),))


def _record(outcome="xpass", witnessed=1, **kw):
    from equivcheck.engine import CheckRecord

    return CheckRecord("abs", "vjp", "float32", "cpu", "highest", outcome, examples=6, witnessed=witnessed,
                       **{"known_pattern": "abs::vjp", "known_reason": "abs'(0) differs"} | kw)


def test_settle_fails_a_known_divergence_whose_witness_now_agrees():
    rec = _record()
    assert settle([rec]) == []
    assert rec.outcome == "failed" and rec.kind == "fixed" and rec.side is None
    assert "'abs::vjp' no longer shows" in rec.message and "remove the entry" in rec.message
    assert "Either the port was fixed, the installed torch/jax changed" in rec.message
    assert "witness and 5 drawn examples agree" in rec.message


def test_settle_lenient_keeps_xpass_and_warns():
    rec = _record()
    warnings = settle([rec], lenient=True)
    assert rec.outcome == "xpass" and len(warnings) == 1 and "no longer shows" in warnings[0]


def test_settle_without_a_witness_keeps_xpass_with_a_note():
    rec = _record(witnessed=0)
    assert settle([rec]) == [] and rec.outcome == "xpass"
    assert any("no witness ran" in n for n in rec.notes)
    for outcome in ("passed", "failed", "known-divergence"):
        other = _record(outcome)
        settle([other])
        assert other.outcome == outcome


def test_settle_fails_a_known_divergence_whose_side_raised_or_timed_out():
    """An entry is about values that differ: a crash behind it would read as the known difference."""
    raised = _record("known-divergence", kind="error", side="jax",
                     message="the jax side raised TypeError in forward: unsupported operand (f.py:3)")
    hung = _record("known-divergence", kind="timeout", side="torch", message="the torch side did not return",
                   known_reason="torch raises nothing; it hangs")
    assert settle([raised, hung]) == []
    assert raised.outcome == "failed" and raised.kind == "error" and raised.known_pattern == "abs::vjp"
    assert raised.message.startswith("known divergence 'abs::vjp' matched, but the jax side raised instead of "
                                     "giving other values: the jax side raised TypeError")
    assert hung.outcome == "failed" and "the torch side did not return instead" in hung.message  # never covered
    # An entry whose reason says the side raises expects it; values that differ stay known too.
    expected = _record("known-divergence", kind="error", side="jax", known_reason="the naive port raises TypeError")
    values = _record("known-divergence", kind="values", side="jax")
    settle([expected, values])
    assert expected.outcome == values.outcome == "known-divergence"


def test_the_built_in_entry_of_a_port_that_raises_says_so_and_still_covers_it():
    from suites.test_models import MODELS

    known = KnownDivergences.load(["suites/known_divergences.txt"])
    naive = next(m for m in MODELS if m.name == "mlp_naive")
    records = naive.run_checks(dtype="float32", run=RunSettings(examples=2, seed=1), known=known.match_check)
    settle(records)
    assert [(r.outcome, r.kind, r.side) for r in records] == [("known-divergence", "error", "jax")]


def test_versioned_paths_name_the_installed_versions(tmp_path):
    import importlib.metadata

    torch_mm = ".".join(importlib.metadata.version("torch").split("+")[0].split(".")[:2])
    assert versioned("k-torch{torch}.txt") == f"k-torch{torch_mm}.txt"
    assert versioned("plain.txt") == "plain.txt"
    (tmp_path / f"k-torch{torch_mm}.txt").write_text("abs::vjp  measured here\n")
    loaded = KnownDivergences.load([str(tmp_path / "k-torch{torch}.txt"), str(tmp_path / "k-jax{jax}.txt")])
    assert [e.pattern for e in loaded.entries] == ["abs::vjp"]  # the missing jax file is no error
    with pytest.raises(ValueError, match="plain.txt"):
        KnownDivergences.load([str(tmp_path / "plain.txt")])  # a plain path must exist


SUITE = """
import jax.numpy as jnp, torch
from equivcheck import Floats, Inputs, Pair, unary

X = Inputs(unary().shapes, (Floats(1.0, 2.0),))
SAME = Pair("relu_fixed", torch.relu, lambda x: jnp.maximum(x, 0), X, checks=("vjp",), witnesses=(([0.5],),))
DIVERGES = Pair("abs_kink", torch.abs, jnp.abs, X, checks=("vjp",), witnesses=(([0.0],),))

def test_same(equiv):
    equiv.check(SAME)

def test_diverges(equiv):
    equiv.check(DIVERGES)
"""


def _run(pytester, *extra):
    pytester.makepyfile(test_k=SUITE)
    known = pytester.makefile(".txt", known="relu_fixed::vjp  was once apart\nabs_kink::vjp  abs'(0): torch 0, JAX 1\n")
    args = ["--equiv", "-p", "no:cacheprovider", "--equiv-dtypes", "float32", "--equiv-examples", "3",
            "--equiv-seed", "1", "--equiv-known-divergences", str(known), "--equiv-report", str(pytester.path / "r"),
            *extra]
    return pytester.runpytest_subprocess(*args)


def test_a_fixed_known_divergence_fails_and_a_live_one_xfails(pytester):
    result = _run(pytester)
    result.assert_outcomes(failed=1, xfailed=1)
    result.stdout.fnmatch_lines(["*'relu_fixed::vjp' no longer shows*remove the entry*"])
    records = {r["pair"]: r for r in json.loads((pytester.path / "r" / "latest.json").read_text())["records"]}
    assert records["relu_fixed"]["outcome"] == "failed" and records["relu_fixed"]["kind"] == "fixed"
    assert records["abs_kink"]["outcome"] == "known-divergence" and records["abs_kink"]["witnessed"] == 1


def test_lenient_turns_a_fixed_divergence_into_a_warning(pytester):
    result = _run(pytester, "--equiv-known-lenient")
    result.assert_outcomes(xpassed=1, xfailed=1, warnings=1)  # XPASS, as equivcheck's table says
    xpass = "XPASS relu_fixed::vjp::float32::cpu: known divergence 'relu_fixed::vjp' no longer shows*"
    result.stdout.fnmatch_lines(["*KnownDivergenceFixed*relu_fixed*no longer shows*", xpass])


def test_every_built_in_known_divergence_has_a_witness():
    """Each entry of the suites' files matches at least one built-in check, and every check it
    matches runs a witness first: the entry is hit on every seed, so it is strict."""
    from suites import built_in_kinds

    kinds = built_in_kinds()
    known = KnownDivergences.load(["suites/known_divergences.txt", versioned("suites/known_divergences-torch{torch}.txt")])
    without = []
    for entry in known.entries:
        matched = [k for k in kinds if fnmatch.fnmatchcase(k.name, entry.pattern.split("::")[0])]
        if not matched:
            without.append(f"{entry.pattern} ({entry.source}): matches no built-in check")
        without += [f"{entry.pattern} ({entry.source}): {k.name} has no witness"
                    for k in matched if not getattr(k, "witnesses", ())]
    assert not without, "\n".join(without)
