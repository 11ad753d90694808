"""Finite differences that decide a side must resolve every element they step: inputs of very
different sizes in one direction (1e-38 beside 3), and a reference that matches both sides only
on the drawn inputs. Both cases come from the mutation benchmark (`benchmarks/oracle_mutants.py`),
where each named the side that was right."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from equivcheck.ops.mutants import mutants
from suites.test_autodiff import PAIRS
from tests.verdicts import verdict_on


def _mutant(name, side, kind):
    return next(m for m in mutants(PAIRS[name], "float32") if m.side == side and kind in m.name).pair


# selu's rolled-HVP mutant, torch side: one HVP direction holds 1e-38 and -3.1; a single step set
# by the smallest element moved the -3.1 by less than its float64 ulp, the differences read 0
# everywhere at both steps, and JAX (right) was blamed.
SELU_X = np.array([[[0.0, 1.8367099e-38]], [[1.2638915e-34, 5.0634939e-02]], [[1.8367099e-38, -3.1364341e+00]],
                   [[1.2638915e-34, 1.2638915e-34]], [[-7.6493630e+00, 0.0]]], np.float32)


def test_an_hvp_direction_mixing_tiny_and_large_elements_blames_the_mutated_side():
    verdict = verdict_on(_mutant("selu", "torch", "rolled"), "hvp", [SELU_X], "float32")
    assert verdict.side == "torch", verdict.diagnosis


# cholesky symmetrises on both sides; NumPy's cholesky reads the lower triangle only. As the
# reference it agrees with both sides on symmetric inputs but not along an upper element.
CHOL_X = np.array([[1.0, -4.4450145e-17], [-4.4450145e-17, 1.0]], np.float32)


@pytest.mark.parametrize("check", ["vjp", "hvp"])
def test_a_reference_that_differs_from_both_sides_off_the_drawn_inputs_names_no_side(check):
    lower_only = dataclasses.replace(PAIRS["cholesky"], name="cholesky_lower_reference",
                                     reference=np.linalg.cholesky)
    mutant = next(m for m in mutants(lower_only, "float32") if m.side == "torch" and "rolled" in m.name).pair
    verdict = verdict_on(mutant, check, [CHOL_X], "float32")
    assert verdict.side in (None, "torch"), verdict.diagnosis
    if verdict.side is None:
        assert "reference is not the function either side computes" in verdict.diagnosis


@pytest.mark.parametrize("side", ["torch", "jax"])
@pytest.mark.parametrize("check", ["forward", "vjp", "jvp", "hvp"])
def test_the_builtin_cholesky_reference_blames_the_rolled_side(check, side):
    verdict = verdict_on(_mutant("cholesky", side, "rolled"), check, [CHOL_X], "float32")
    assert verdict.side == side, verdict.diagnosis


# pow's rolled mutant, torch side, with exponents of 1e-32 and below: a step relative to such an
# exponent moves x**y (about 1) by 1e-37, under its float64 ulp, so the differences read an exact
# 0 at both steps, agreeing and wrong, and both sides were blamed. A step the function resolves
# decides where it can; where it cannot, no side is named.
POW_ARGS = [np.array([8.052045, 5.6557555, 4.017424, 3.3064885, 5.5533495], np.float32),
            np.array([1.4637068e-32, 1.9259299e-33, -1.6250034e-34, 1.5428363e-38, -2.3111159e-33], np.float32)]


@pytest.mark.parametrize("check", ["vjp", "jvp", "hvp"])
def test_inputs_far_below_the_functions_scale_never_blame_the_correct_side(check):
    verdict = verdict_on(_mutant("pow", "torch", "rolled"), check, POW_ARGS, "float32")
    assert verdict.side in ("torch", None), verdict.diagnosis
    if verdict.side is None:
        assert "finite differences cannot resolve this example" in verdict.diagnosis
    if check == "vjp":
        assert verdict.side == "torch", verdict.diagnosis
