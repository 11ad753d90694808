"""What is not a difference: ill-conditioned inputs, answers beyond the dtype's range, and the
frameworks' own low-precision arithmetic. Each acceptance is shown to refuse a real bug."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from equivcheck import Floats, Inputs, Pair, RunSettings, Square, run_pair
from equivcheck.engine import tolerance
from equivcheck.engine.dtypes import np_dtype
from equivcheck.ops.autodiff import evaluate, judge
from equivcheck.ops.conditioning import explained_by_precision, explained_by_rounding
from suites.test_layers import PAIRS as LAYERS
from tests.helpers import SUITE


def failing(pair, check, args, dtype, seed=0):
    ev = evaluate(pair, args, seed, dtype=dtype, device="cpu", checks=(check,))
    tol = tolerance.lookup(dtype, check=check, override=pair.tolerance_for(dtype, check))
    verdict = judge(pair, ev, check, tol, args)
    assert not verdict.ok, "the example must be past the table bound for the test to mean anything"
    return ev, verdict, tol


def test_erfinv_near_one_is_ill_conditioned_not_wrong():
    args = [np.array([0.99899995], np.float32)]
    ev, verdict, tol = failing(SUITE["erfinv"], "vjp", args, "float32")
    assert explained_by_rounding(SUITE["erfinv"], "vjp", args, ev, verdict, "float32", tol, seed=0)


def test_a_wrong_formula_is_not_explained_by_rounding():
    bad = SUITE["log1p"].replace(name="log_one_plus", jax_fn=lambda x: jnp.log(1 + x))
    args = [np.array([1e-4, 3e-3], np.float32)]
    ev, verdict, tol = failing(bad, "forward", args, "float32")
    assert not explained_by_rounding(bad, "forward", args, ev, verdict, "float32", tol, seed=0)


def test_an_answer_beyond_the_dtype_s_range_is_not_comparable():
    tiny = np.array(np.finfo(np.float32).tiny, np.float32)  # logit'' = -1/x^2 ~ -7e75 overflows float32
    ev, verdict, tol = failing(SUITE["logit"], "hvp", [tiny], "float32")
    assert verdict.kind == "nonfinite"
    assert explained_by_rounding(SUITE["logit"], "hvp", [tiny], ev, verdict, "float32", tol, seed=0)


def test_low_precision_arithmetic_is_accepted_when_float32_agrees():
    args = [np.array([0, 0, 0, 0, 5], np_dtype("bfloat16"))]
    ev, verdict, _ = failing(SUITE["softmax"], "vjp", args, "bfloat16")
    assert explained_by_precision(SUITE["softmax"], "vjp", args, ev, verdict, "bfloat16")


def test_a_real_difference_in_low_precision_is_not_excused():
    bad = SUITE["softmax"].replace(name="softmax_axis0", jax_fn=functools.partial(jax.nn.softmax, axis=0))
    args = [np.array([[0, 1, 2], [3, 0, 1], [2, 2, 0]], np_dtype("bfloat16"))]
    ev, verdict, _ = failing(bad, "forward", args, "bfloat16")
    assert not explained_by_precision(bad, "forward", args, ev, verdict, "bfloat16")


def _off_in(low, k, fn):
    """fn, scaled by 1 + k in `low` dtypes only: a formula wrong where float32 cannot see it."""
    def off(x):
        y = fn(x)
        return y * (1 + k) if str(x.dtype) in low else y
    return off


@pytest.mark.parametrize(("dtype", "k"), [("bfloat16", 0.2), ("bfloat16", 0.1), ("float16", 0.03)])
@pytest.mark.parametrize("side", ["torch", "jax"])
def test_a_result_wrong_in_low_precision_only_is_not_the_frameworks_arithmetic(dtype, k, side):
    # Audit of issue 11: tanh x 1.2 in bfloat16 only passed as "within 64 ulps at the leaf's scale"
    # (26 ulps): XLA's per-primitive rounding moves tanh by about one.
    low = ("bfloat16", "float16", "torch.bfloat16", "torch.float16")
    pair = SUITE["tanh"].replace(name=f"tanh_off_in_{dtype}", **(
        {"jax_fn": _off_in(low, k, jnp.tanh)} if side == "jax" else {"torch_fn": _off_in(low, k, torch.tanh)}))
    args = [np.linspace(-3, 3, 8).astype(np_dtype(dtype))]
    ev, verdict, _ = failing(pair, "forward", args, dtype)
    assert not explained_by_precision(pair, "forward", args, ev, verdict, dtype)


def test_a_derivative_wrong_in_low_precision_only_is_not_excused():
    class TanhGradOff(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return torch.tanh(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(output)

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            grad = g * (1 - y * y)
            return grad * 1.2 if g.dtype == torch.bfloat16 else grad

    pair = SUITE["tanh"].replace(name="tanh_grad_off_in_bfloat16", torch_fn=TanhGradOff.apply)
    args = [np.linspace(-2, 2, 8).astype(np_dtype("bfloat16"))]
    ev, verdict, _ = failing(pair, "vjp", args, "bfloat16")
    assert not explained_by_precision(pair, "vjp", args, ev, verdict, "bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_precision_acceptance_is_for_low_precision_only(dtype):
    bad = SUITE["tanh"].replace(name="tanh_f16", jax_fn=lambda x: jnp.tanh(x.astype(jnp.float16)).astype(x.dtype))
    args = [np.array([0.3, 1.7], dtype)]
    ev, verdict, _ = failing(bad, "forward", args, dtype)
    assert not explained_by_precision(bad, "forward", args, ev, verdict, dtype)


# Linear algebra rounds norm-wise: pinv's float32 derivatives err with cond^2 even on a diagonal
# matrix, whose zeros an elementwise nudge never moves.
PINV = Pair("pinv_square", torch.linalg.pinv, jnp.linalg.pinv, Inputs(Square(), (Floats(-1, 1),)),
            reference=np.linalg.pinv, checks=("forward", "vjp", "jvp"))


@pytest.mark.parametrize("matrix, check, seed", [
    (np.diag([-0.75, 0.03125]), "jvp", 0),  # cond 24: 64 ulp
    (np.diag([0.5, 0.5, 0.025]), "jvp", 1),  # cond 20: 128 ulp
    ([[0, 1], [0.015625, 0]], "jvp", 0),
    ([[0, 1], [0.001953125, 0]], "vjp", 0),
])
def test_pinv_derivatives_on_well_posed_matrices_are_rounding(matrix, check, seed):
    args = [np.asarray(matrix, np.float32)]
    ev, verdict, tol = failing(PINV, check, args, "float32", seed=seed)
    assert explained_by_rounding(PINV, check, args, ev, verdict, "float32", tol, seed=0)


def test_pinv_on_plain_floats_raises_no_false_alarm():
    records = run_pair(PINV, dtype="float32", run=RunSettings(examples=30, seed=1))
    assert [r.outcome for r in records] == ["passed"] * 3, [r.failure_text() for r in records]
    assert sum(r.ill_conditioned for r in records) > 0


# suites/test_layers.py nn.layer_norm_offset, seed 1738067960: a row with a small spread against a
# large mean, where the float32 mean's rounding shifts every element of the row on both sides.
LN_ROWS = [np.array([[11, 11, 11], [11, 11, 11], [10.375, 10.375, 10.4375]], np.float32)]


def test_a_layer_norm_row_with_a_small_spread_is_rounding():
    pair = LAYERS["nn.layer_norm_offset"]
    ev, verdict, tol = failing(pair, "forward", LN_ROWS, "float32")
    assert explained_by_rounding(pair, "forward", LN_ROWS, ev, verdict, "float32", tol, seed=0)


def test_the_fast_variance_formula_on_that_row_is_not_rounding():
    pair = LAYERS["nn.layer_norm_offset"].replace(
        name="layer_norm_fast_variance", jax_fn=lambda x: nnx.LayerNorm(x.shape[-1], epsilon=1e-5, rngs=nnx.Rngs(0))(x))
    ev, verdict, tol = failing(pair, "forward", LN_ROWS, "float32")
    assert not explained_by_rounding(pair, "forward", LN_ROWS, ev, verdict, "float32", tol, seed=0)
