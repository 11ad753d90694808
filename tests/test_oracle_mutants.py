"""The engine's mutation test, a fast subset (the full table: benchmarks/oracle_mutants.py).

Every mutant of tanh on either side, sized against the engine's own bound, must get the verdict
a trustworthy engine gives: far past the bound (x10), NaN/inf, a negated or rolled output fail
and blame the mutated side; inside the bound (x0.5, one ulp) passes.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equivcheck import Pair, RunSettings, unary
from equivcheck.ops.mutants import Mutant, mutants
from equivcheck.ops.runner import run_pair

TANH = Pair("tanh", torch.tanh, jnp.tanh, unary(), reference=np.tanh)
RUN = RunSettings(examples=5, seed=4)
MUTANTS = mutants(TANH, "float32", sizes=(0.5, 10.0))


def test_the_set_covers_every_family_on_both_sides():
    families = {(m.family, m.side) for m in MUTANTS}
    for family in ("value", "nonfinite", "sign", "permuted", "ulp", "vjp", "jvp"):
        assert {(family, "torch"), (family, "jax")} <= families, family


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: f"{m.side}-{m.name}")
def test_the_engine_catches_and_blames_or_passes_each_mutant(mutant: Mutant):
    records = run_pair(mutant.pair, dtype="float32", run=RUN)
    failed = [r for r in records if r.outcome == "failed"]
    if mutant.expect == "pass":
        assert not failed, [r.failure_text() for r in failed]
        return
    assert failed, f"{mutant.name} on {mutant.side} passed: {[(r.check, r.outcome) for r in records]}"
    assert {r.side for r in failed} == {mutant.side}, [r.failure_text() for r in failed]


def test_a_pair_with_a_convention_whose_forward_failed_still_judges_its_derivatives():
    # Once the forward check fails, later passes run the derivative checks alone; the convention
    # read the output's shape from the forward's values and raised ValueError there.
    from tests.helpers import SUITE

    norm2 = SUITE["norm2"]
    (negated,) = [m for m in mutants(norm2, "float32", sides=("torch",), sizes=()) if m.family == "sign"]
    records = run_pair(negated.pair, dtype="float32", run=RUN)
    assert {r.check: r.outcome for r in records}["forward"] == "failed"
    assert {r.side for r in records if r.outcome == "failed"} == {"torch"}, [r.failure_text() for r in records]


def test_a_rolled_softsign_hvp_is_blamed_on_the_rolled_side_not_on_the_kinks_elsewhere():
    # Found by the 20-pair benchmark run (seed 1): softsign'' jumps at 0, so the differences at the
    # 0s read a value JAX does not give, and the leaf-wide errors named JAX; the failing element
    # (the 1, smooth) shows the rolled torch side off.
    from suites.test_autodiff import PAIRS
    from tests.verdicts import verdict_on

    rolled, = (m for m in mutants(PAIRS["softsign"], "float32") if m.family == "permuted" and m.side == "torch")
    x = np.array([[[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], np.float32)
    verdict = verdict_on(rolled.pair, "hvp", [x], "float32")
    assert verdict.side == "torch", verdict.diagnosis
    assert "at the failing element" in verdict.diagnosis


@pytest.mark.parametrize("side", ["torch", "jax"])
def test_a_mutant_keeps_a_namedtuple_result(side):
    """jnp.linalg.slogdet returns a namedtuple: rebuilding it from one iterable raised, so the
    JAX side's inside-bound mutants 'failed' forward with a TypeError of the benchmark's own."""
    from suites.test_autodiff import PAIRS

    inside = next(m for m in mutants(PAIRS["slogdet"], "float32") if m.side == side and m.name == "ulp:one ulp up")
    records = run_pair(inside.pair, dtype="float32", run=RunSettings(examples=3, seed=4))
    assert all(r.outcome == "passed" for r in records), [r.failure_text() for r in records]


def test_the_table_counts_a_resumed_run_with_the_one_it_resumes():
    """The full run died after 68 of 84 pairs (XLA's LLVM out of memory, then a segfault); --resume
    runs the rest, and the table counts both: the crashed run's file (one line per false alarm, no
    clean-check count) and the new one's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "oracle_mutants.py"
    spec = importlib.util.spec_from_file_location("oracle_mutants", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    old = [{"pair": "exp", "mutant": None, "false_alarm": "exp::hvp::float32::cpu"},
           {"pair": "exp", "mutant": "value:x10 one", "side": "torch", "expect": "fail",
            "outcomes": {"forward": "failed"}, "blamed": ["torch"]},
           {"pair": "exp", "mutant": "permuted:rolled", "side": "jax", "expect": "fail",
            "outcomes": {"forward": "failed", "vjp": "failed"}, "blamed": ["both", "jax"]}]
    new = [{"pair": "pow", "mutant": None, "clean_checks": 4, "false_alarms": []},
           {"pair": "pow", "mutant": "value:x10 one", "side": "jax", "expect": "fail",
            "outcomes": {"forward": "passed"}, "blamed": []},
           {"pair": "pow", "mutant": "value:x0.5 one", "side": "jax", "expect": "pass",
            "outcomes": {"forward": "passed"}, "blamed": []},
           {"pair": "pow", "mutant": "vjp:x10", "side": "torch", "no_effect": True},
           {"pair": "pow", "mutant": "ulp:one ulp", "side": "torch", "expect": "pass", "crash": "KeyError()"}]
    lines = bench.table(old + new, {"exp": 4, "pow": 4}, 100)
    rows = {tuple(line.split()[:3]): line.split()[3:] for line in lines[1:] if line.split()[0] in ("value", "permuted",
                                                                                                     "ulp")}
    assert rows[("value", "x10", "(one)")] == ["fail", "2", "1/2", "50.0%", "100.0%", "0"]
    assert rows[("value", "x0.5", "(one)")] == ["pass", "1", "1/1", "100.0%", "-", "0"]
    assert rows[("permuted", "rolled", "fail")] == ["1", "1/1", "100.0%", "0.0%", "0"]
    assert rows[("ulp", "one", "ulp")] == ["pass", "1", "0/1", "0.0%", "-", "1"]
    assert "left out, no effect on the mutated side's results (1): pow torch vjp:x10" in lines
    assert "unmutated: 1 false alarms in 8 checks of 2 pairs (100 examples each)" in lines
