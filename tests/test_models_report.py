"""Model pairs through the `equiv` fixture (pytester) and in the report: the per-layer table,
loss curves (numbers in JSON, a PNG where matplotlib imports) and known divergences."""
from __future__ import annotations

import json

import equivcheck.models  # noqa: F401
from equivcheck.report import models as report_models
from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

SUITE = """
import pytest
from equivcheck.models.zoo import mlp_apply, mlp_pair, planted

MODELS = [
    mlp_pair("mlp", checks=("forward", "train")),
    mlp_pair("mlp_transposed", planted(mlp_apply, transpose_bug=True), checks=("forward",)),
]

@pytest.mark.parametrize("pair", MODELS, ids=str)
def test_model(pair, equiv):
    equiv.check(pair)
"""
FAST = ("--equiv", "--equiv-examples", "5", "--equiv-seed", "3", "--equiv-dtypes", "float32", "-p", "no:cacheprovider")


def test_model_pairs_run_through_the_equiv_fixture(pytester):
    pytester.makepyfile(test_models=SUITE)
    known = pytester.path / "known.txt"
    known.write_text("mlp_transposed::forward   a square Linear's weight used untransposed\n")
    result = pytester.runpytest(*FAST, "--equiv-known-divergences", str(known), "-rx")
    result.assert_outcomes(passed=1, xfailed=1)
    rep = json.loads((pytester.path / "reports" / "latest.json").read_text())
    by_id = {r["id"]: r for r in rep["records"]}
    train = by_id["mlp::train::float32::cpu"]
    assert train["outcome"] == "passed" and len(train["extra"]["curves"]["torch"]) >= 1
    assert "x n at step n" in train["tolerance"]["reason"]
    wrong = by_id["mlp_transposed::forward::float32::cpu"]
    assert wrong["outcome"] == "known-divergence"
    assert [r["layer"] for r in wrong["extra"]["layers"] if r["first"]] == ["fc1"]
    md = (pytester.path / "reports" / "latest.md").read_text()
    assert "## Models" in md and "| fc1 | Linear |" in md and "**first**" in md
    assert "| step | torch loss | jax loss | difference |" in md


def test_curves_plot_and_table(tmp_path):
    rec = {"id": "m::train::float32::cpu", "outcome": "passed", "tolerance": {"rtol": 1e-6, "atol": 1e-5, "reason": "r"},
           "extra": {"curves": {"torch": [1.0, 0.5, 0.25], "jax": [1.0, 0.5, 0.2500001]},
                     "layers": [{"layer": "fc", "module": "Linear", "max_abs": 0.0, "max_rel": 0.0, "ratio": 0.0,
                                 "ok": True, "first": False, "note": ""}]}}
    images = report_models.plots([rec], tmp_path, "run")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert images == {}
    else:
        assert (tmp_path / images[rec["id"]]).stat().st_size > 0
    md = "\n".join(report_models.markdown_section([rec], images))
    assert "| 3 | 0.25 | 0.2500001 | 1e-07 |" in md and "| fc | Linear | 0 | 0 | 0 |" in md
