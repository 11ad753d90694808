"""'both' when both sides are off: not only when their errors are within DECISIVE of each other (F3 of
the planted-bug trial), and for derivatives when each follows its own wrong forward (F4)."""
from __future__ import annotations

import math

import jax
import numpy as np
import torch.nn.functional as F

from equivcheck import Floats, Pair, unary
from tests.verdicts import verdict_on


def _erf_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _pair(jax_fn):
    return Pair("gelu_two_approximations", lambda x: F.gelu(x, approximate="tanh"), jax_fn, unary(Floats(-3, 3)),
                checks=("forward",), reference=_erf_gelu)


def test_a_side_past_the_bound_is_named_even_when_the_other_is_much_further_off():
    # torch (tanh approximation) 1.53e-4 from erf's gelu, 15x float32's bound; JAX (sigmoid
    # approximation) 4.45e-3, 29x further: the verdict read "jax is off" alone.
    verdict = verdict_on(_pair(lambda x: x * jax.nn.sigmoid(1.702 * x)), "forward", [np.array(1.0, np.float32)],
                         "float32")
    assert verdict.side == "both", verdict.diagnosis
    assert "both are off: jax most, and torch too" in verdict.diagnosis


def test_the_far_side_alone_is_named_when_the_near_side_is_within_the_bound():
    pair = _pair(lambda x: x * jax.nn.sigmoid(1.702 * x)).replace(
        name="gelu_exact_vs_sigmoid", torch_fn=lambda x: F.gelu(x), jax_fn=lambda x: x * jax.nn.sigmoid(1.702 * x))
    verdict = verdict_on(pair, "forward", [np.array(1.0, np.float32)], "float32")
    assert verdict.side == "jax", verdict.diagnosis


def test_derivatives_of_two_wrong_forwards_are_both_off():
    # Planted-bug trial F4: with both forwards off the reference, the derivative checks read "the
    # pair's float64 reference is not the function either side computes near this point" and
    # named no side; each side's derivative is its own forward's.
    pair = _pair(lambda x: x * jax.nn.sigmoid(1.702 * x))
    for check in ("vjp", "jvp"):
        verdict = verdict_on(pair.replace(checks=(check,)), check, [np.array(1.0, np.float32)], "float32")
        assert verdict.side == "both", verdict.diagnosis
        assert "each side's derivative is that of its own forward" in verdict.diagnosis
    # The guard's own case, a reference slip, stays undecided: tests/test_verdict_scales.py.

