"""Regression tests for the ONNX path's trial findings (O9-O12 in the trial of 2026-12-01)."""
from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime", reason="pip install equivcheck[onnx]")
pytest.importorskip("onnxscript", reason="pip install equivcheck[onnx]")

import torch

from equivcheck import Pair, unary
from equivcheck.engine.records import RunSettings
from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)
from tests.test_onnx_layers import LAYER_SUITE

RUN = RunSettings(examples=5, seed=20261201, shrink_seconds=2)


def _tanh_scaled(x):
    import jax.numpy as jnp

    return jnp.tanh(x) * 1.001  # the trial's planted port bug: 0.1% off everywhere but 0


def test_onnx_runtimes_vote_is_shown_where_the_forward_check_cannot_decide():
    # O10: the forward check alone leaves the side undecided (no float64 reference on the Pair); the onnx
    # record had counted ONNX Runtime siding with torch, but said it nowhere and its torch-jax figure read 0.0
    pair = Pair("tanh_bug", torch.tanh, _tanh_scaled, unary(), checks=("forward", "onnx"))
    recs = {r.check: r for r in pair.run_checks(dtype="float32", run=RUN)}
    fwd, rec = recs["forward"], recs["onnx"]
    assert rec.outcome == "passed", rec.message
    votes = rec.extra["torch_jax_only"]["jax"]
    assert votes >= 1
    said = f"ONNX Runtime agrees with torch in {votes} of {rec.examples} examples"
    assert rec.message.startswith(said), rec.message
    assert fwd.outcome == "failed" and fwd.side is None, (fwd.outcome, fwd.side)
    assert f"onnx check: {said}" in fwd.diagnosis, fwd.diagnosis
    assert f"onnx check: {said}" in fwd.failure_text()
    # the pairs' figures cover every example counted: torch-jax past the bound, torch-onnx within it
    pairs = rec.extra["pairs"]
    assert pairs["torch-jax"]["worst_ratio"] > 1 and pairs["torch-jax"]["max_abs"] > 0, pairs
    assert pairs["onnx-jax"]["worst_ratio"] > 1 and pairs["torch-onnx"]["worst_ratio"] <= 1, pairs



def test_equiv_onnx_names_the_pairs_it_leaves_out(pytester):
    # O9: a user's own Pair (no family) ran no onnx check under --equiv-onnx, and nothing said so
    pytester.makepyfile(test_layers=LAYER_SUITE)  # a layer pair and an operation pair
    fast = ("--equiv", "--equiv-examples", "3", "--equiv-seed", "1", "--equiv-dtypes", "float32",
            "-p", "no:cacheprovider", "--equiv-report", "none")
    result = pytester.runpytest(*fast, "--equiv-onnx")
    result.assert_outcomes(passed=2)
    said = "--equiv-onnx: 1 pair with a forward check ran no onnx check (op_tanh): the option adds it to layer pairs"
    assert said in " ".join(line.strip() for line in result.outlines), result.outlines
    # without the option there is nothing it left out
    plain = pytester.runpytest(*fast)
    assert not any("--equiv-onnx:" in line for line in plain.outlines), plain.outlines
