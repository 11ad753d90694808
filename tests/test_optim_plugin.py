"""Optimizer pairs through the `equiv` fixture (pytester): the same test shape as for
operations, records in the report with columns of their own, known divergences, skips."""
from __future__ import annotations

import json

import equivcheck.optim  # noqa: F401
from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

SUITE = """
import pytest, optax
from equivcheck.optim import optimizer_pair
from equivcheck.optim.mapping import ADAM_STATE, Mapped

PAIRS = [
    optimizer_pair("sgd_momentum", "SGD", lr=0.05, momentum=0.9, checks=("step", "quadratic")),
    optimizer_pair("adamw_defaults", "AdamW", lr=1e-2, checks=("step",),
                   optax_map=lambda cls, hp, lr: Mapped(optax.adamw(hp["lr"]), ADAM_STATE, ("naive",))),
    optimizer_pair("lion", "Lion", lr=1e-3),
]

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_optimizer(pair, equiv):
    equiv.check(pair)
"""
FAST = ("--equiv", "--equiv-examples", "8", "--equiv-seed", "2", "--equiv-dtypes", "float32", "-p", "no:cacheprovider")


def test_optimizer_pairs_run_through_the_equiv_fixture(pytester):
    pytester.makepyfile(test_opt=SUITE)
    known = pytester.path / "known.txt"
    known.write_text("adamw_defaults::step   AdamW weight decay: torch 1e-2, optax 1e-4\n")
    result = pytester.runpytest(*FAST, "--equiv-known-divergences", str(known), "-rsx")
    torch_has_lion = __import__("torch").optim.__dict__.get("Lion") is not None
    result.assert_outcomes(passed=1 + torch_has_lion, xfailed=1, skipped=1 - torch_has_lion)
    out = result.stdout.str()
    assert "step: AdamW weight decay: torch 1e-2, optax 1e-4" in out
    if not torch_has_lion:
        assert "has no torch.optim.Lion" in out
    assert "step" in out and "quadratic" in out  # the grid's own columns
    rep = json.loads((pytester.path / "reports" / "latest.json").read_text())
    outcome = {r["id"]: r["outcome"] for r in rep["records"]}
    assert outcome["sgd_momentum::quadratic::float32::cpu"] == "passed"
    assert outcome["adamw_defaults::step::float32::cpu"] == "known-divergence"
    md = (pytester.path / "reports" / "latest.md").read_text()
    assert "| `adamw_defaults::step::float32::cpu` | known-divergence | AdamW weight decay" in md


def test_selecting_optimizer_checks_by_name(pytester):
    pytester.makepyfile(test_sel="""
from equivcheck.optim import optimizer_pair

def test_one(equiv):
    records = equiv.check(optimizer_pair("adam", "Adam", lr=1e-2), checks=("step",))
    assert [r.check for r in records] == ["step"]

def test_unknown(equiv):
    import pytest
    with pytest.raises(ValueError, match="unknown checks"):
        equiv.check(optimizer_pair("adam", "Adam", lr=1e-2), checks=("forward",))
""")
    pytester.runpytest(*FAST).assert_outcomes(passed=2)
