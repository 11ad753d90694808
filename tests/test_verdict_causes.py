"""The diagnosis names the right cause, or none: finite differences on the input's own scale
(and undecided where two steps disagree), a dtype-dependent threshold that is no rounding, a
kink without a declared convention, and a user's failure that matches a known divergence."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from equivcheck import Fixed, Floats, Index, Inputs, Pair, RunSettings, Same, Square, unary
from equivcheck.engine import tolerance
from equivcheck.ops.autodiff import evaluate, keyed, leaf_at, widen
from equivcheck.ops.diagnose import _precision_hint
from tests.verdicts import verdict_on


def _float64_leaf(pair, check, args, side, path):
    ev = evaluate(pair, args, 0, dtype="float32", device="cpu", checks=(check,))
    args64, vec64 = widen(args, ev)
    ev64 = evaluate(pair, args64, 0, dtype="float64", device="cpu", checks=(check,), vectors=vec64)
    res = ev64.torch if side == "torch" else ev64.jax
    return leaf_at(keyed(pair, check, res.values[check]), path)


def _np_norm_eps(x):
    return x / (np.linalg.norm(x) + 1e-8)


def _np_cosine(x, y):
    return np.sum(x * y, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


NORMALIZE = Pair("normalize_eps_forms", lambda x: x / (torch.linalg.norm(x) + 1e-8),
                 lambda x: x / jnp.maximum(jnp.linalg.norm(x), 1e-8), unary(), reference=_np_norm_eps)
COSINE = Pair("cosine_tiny", lambda x, y: F.cosine_similarity(x, y, dim=-1),
              lambda x, y: jnp.sum(x * y, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)),
              Inputs(Same(n=2), (Floats(), Floats())), diff_args=(0, 1), reference=_np_cosine)


@pytest.mark.parametrize("pair, args, right", [
    (NORMALIZE, [np.array([7e-9, -5e-9, 6e-9], np.float32)], "torch"),
    (COSINE, [np.array([1e-9, 2e-9, -1e-9], np.float32), np.array([2e-9, -1e-9, 3e-9], np.float32)], "jax"),
])
def test_finite_differences_step_on_the_input_s_own_scale(pair, args, right):
    verdict = verdict_on(pair, "vjp", args, "float32")
    wrong = "jax" if right == "torch" else "torch"
    assert verdict.side == wrong, verdict.diagnosis
    worst = verdict.worst
    exact = _float64_leaf(pair, "vjp", args, right, verdict.path)
    # Differences are accurate relative to the gradient's scale (1/|x| here), not to an element
    # that cancels: compare norm-wise.
    tol = tolerance.lookup("float64", check="vjp")
    allowed = tol.atol + tol.rtol * np.max(np.abs(exact))
    assert abs(worst.reference_value - exact[worst.worst_index]) <= allowed, (worst.reference_value, exact)


def test_unstable_finite_differences_name_no_side():
    # sin(1/x) near 0 oscillates faster than any step on x's scale can follow: the two steps
    # disagree, so the differences cannot arbitrate the planted factor.
    pair = Pair("sin_inverse_scaled", lambda x: torch.sin(1 / x) * 1.5, lambda x: jnp.sin(1 / x), unary(),
                reference=lambda x: np.sin(1 / x), checks=("forward", "vjp"))
    verdict = verdict_on(pair, "vjp", [np.array([3e-6], np.float32)], "float32")
    assert verdict.side is None, verdict.diagnosis
    assert "finite differences are unstable here" in verdict.diagnosis


PINV = Pair("pinv_square", torch.linalg.pinv, jnp.linalg.pinv, Inputs(Square(), (Floats(-1, 1),)),
            reference=np.linalg.pinv, checks=("forward", "vjp", "jvp"))


def test_a_cutoff_relative_to_eps_is_a_threshold_not_rounding():
    # JAX's default rcond is 10 * max(m, n) * eps, torch's max(m, n) * eps: in float32 JAX drops
    # the singular value 1e-6, torch inverts it; in float64 both keep it.
    verdict = verdict_on(PINV, "forward", [np.diag([1, 1, 1, 1e-6]).astype(np.float32)], "float32")
    assert "a dtype-dependent threshold or default differs" in verdict.diagnosis, verdict.diagnosis
    assert "the gap is rounding" not in verdict.diagnosis
    assert verdict.side == "jax", verdict.diagnosis


ABS = Pair("abs_no_convention", torch.abs, jnp.abs, unary())  # abs'(0): torch 0, JAX 1
RELU = Pair("relu_as_maximum", torch.relu, lambda x: jnp.maximum(x, 0.0), unary())  # relu'(0): torch 0, JAX 0.5


@pytest.mark.parametrize("pair", [ABS, RELU], ids=str)
@pytest.mark.parametrize("check", ["vjp", "jvp"])
def test_a_kink_without_a_convention_names_no_side(pair, check):
    verdict = verdict_on(pair, check, [np.array([1.5, 0.0, -2.0], np.float32)], "float32")
    assert verdict.side is None, verdict.diagnosis
    assert "the function has a kink here (left derivative" in verdict.diagnosis, verdict.diagnosis
    assert "declare a Convention: Convention(name, where=..., torch=..., jax=..., doc=...)" in verdict.diagnosis


# relu(x)^2 has a first derivative 2 relu(x) with a kink at 0: the second derivative there is each
# framework's relu'(0) (torch 0, JAX's maximum 0.5, a `where` 1), not a bug of either side.
RELU_SQUARED = [
    Pair("relu_squared_as_maximum", lambda x: torch.relu(x) ** 2, lambda x: jnp.maximum(x, 0.0) ** 2, unary()),
    Pair("relu_squared_as_where", lambda x: torch.relu(x) ** 2, lambda x: jnp.where(x >= 0, x * x, 0.0), unary(),
         reference=lambda x: np.maximum(x, 0.0) ** 2),
]


@pytest.mark.parametrize("pair", RELU_SQUARED, ids=str)
def test_a_kink_of_the_first_derivative_names_no_side_in_the_hvp(pair):
    verdict = verdict_on(pair, "hvp", [np.array([1.5, 0.0, -2.0], np.float32)], "float32")
    assert verdict.side is None, verdict.diagnosis
    assert "the function's first derivative has a kink here (left second derivative" in verdict.diagnosis
    assert "Convention(name, where=..., torch=..., jax=..., doc=..., hvp=(torch, jax))" in verdict.diagnosis


EMBED = Inputs(Fixed((((4,), (3, 2)),)), (Index(of=1, axis=0), Floats(-1, 1)))
ARGS = [np.array([0, 2, 0, 1]), np.array([[0.5, -1.0], [0.25, 0.75], [-0.5, 1.0]], np.float32)]


def test_a_user_embedding_without_padding_idx_is_told_the_known_cause():
    pair = Pair("my_embedding", lambda i, w: F.embedding(i, w, padding_idx=0), lambda i, w: jnp.take(w, i, axis=0),
                EMBED, diff_args=(1,), checks=("forward", "vjp"))
    verdict = verdict_on(pair, "vjp", ARGS, "float32")
    assert "this matches a known divergence" in verdict.diagnosis, verdict.diagnosis
    assert "padding_idx" in verdict.diagnosis and "reconcile: " in verdict.diagnosis


def test_a_different_embedding_bug_is_not_matched_to_padding_idx():
    pair = Pair("my_embedding_doubled", lambda i, w: F.embedding(i, w), lambda i, w: jnp.take(2 * w, i, axis=0),
                EMBED, diff_args=(1,), checks=("forward", "vjp"))
    verdict = verdict_on(pair, "vjp", ARGS, "float32")
    assert "known divergence" not in verdict.diagnosis, verdict.diagnosis


# A constant factor of 1.001 has the relative error bfloat16 rounding gives, but persists in float64:
# a real difference, never "does it compute in bfloat16?".
EXP_SCALED = Pair("exp_torch_scaled_1001", lambda x: torch.exp(x) * 1.001, jnp.exp, unary())
SPREAD = [np.array([0.5, -1.3, 2.2, 0.9], np.float32)]


@pytest.mark.parametrize("reference", [None, np.exp], ids=["bare", "reference"])
@pytest.mark.parametrize("check", ["forward", "vjp", "jvp"])
def test_a_constant_factor_gets_no_low_precision_hint(check, reference):
    verdict = verdict_on(EXP_SCALED.replace(reference=reference), check, SPREAD, "float32")
    assert "rounding gives" not in verdict.diagnosis and "compute in" not in verdict.diagnosis, verdict.diagnosis
    what = "functions" if check == "forward" else f"derivatives ({check.upper()}s)"
    assert f"they compute different {what}" in verdict.diagnosis, verdict.diagnosis
    if reference is None:
        assert verdict.side is None, verdict.diagnosis
    else:
        assert verdict.side == "torch" and verdict.diagnosis.endswith("torch is off"), verdict.diagnosis


def test_a_result_rounded_to_bfloat16_in_float64_too_gets_the_hint():
    pair = Pair("exp_via_bfloat16", lambda x: torch.exp(x.double()).to(torch.bfloat16).to(x.dtype), jnp.exp, unary(),
                reference=np.exp, checks=("forward",))
    verdict = verdict_on(pair, "forward", SPREAD, "float32")
    assert verdict.side == "torch", verdict.diagnosis
    assert "its values lie on the bfloat16 grid" in verdict.diagnosis, verdict.diagnosis


def test_a_float32_only_rounding_to_bfloat16_that_vanishes_in_float64_gets_the_hint():
    def torch_fn(x):
        y = torch.exp(x)
        return y.to(torch.bfloat16).to(x.dtype) if x.dtype == torch.float32 else y

    verdict = verdict_on(Pair("exp_bfloat16_in_float32", torch_fn, jnp.exp, unary(), checks=("forward",)),
                         "forward", SPREAD, "float32")
    assert verdict.side == "torch", verdict.diagnosis
    assert "is what bfloat16 rounding gives, and the gap vanishes in float64" in verdict.diagnosis, verdict.diagnosis


def test_the_bfloat16_hint_names_cancellation_too_since_its_values_cannot_tell_them_apart():
    # The planted-bug trial's naive variance E[x^2] - E[x]^2 at [100, 100.90625] in float32: the side
    # was right (torch), the hint asked only "does it compute in bfloat16?"
    pair = Pair("var_naive", lambda x: (x * x).mean(-1) - x.mean(-1) ** 2, lambda x: jnp.var(x, axis=-1),
                unary(Floats(100, 101)), checks=("forward",), reference=lambda x: np.var(x, axis=-1))
    verdict = verdict_on(pair, "forward", [np.array([100.0, 100.90625], np.float32)], "float32")
    assert verdict.side == "torch", verdict.diagnosis
    assert "or its float32 formula cancels much larger terms" in verdict.diagnosis, verdict.diagnosis


def _relu_grad_off(x):
    """relu with its forward exact and its derivative 0.5 too large where x <= 0."""
    return torch.relu(x) + 0.5 * (x - x.detach()) * (x <= 0)


def test_a_minimal_example_at_a_kink_is_decided_by_another_failing_example():
    # Shrinking heads for 0, relu's kink, where torch's 0.5 lies between the one-sided 0 and 1
    # and no side can be named; a failure below 0 shows torch 0.5 against 0. Never JAX, never
    # "both" (differences across a kink at another element of a larger example).
    pair = Pair("relu_grad_off", _relu_grad_off, jax.nn.relu,
                unary(Floats(-1.0, 1.0, special=(0.0,))), reference=lambda x: np.maximum(x, 0), checks=("vjp",))
    recs = [pair.run_checks(dtype="float32", run=RunSettings(examples=10, seed=seed))[0] for seed in range(6)]
    assert all(r.outcome == "failed" and r.side in ("torch", None) for r in recs)
    decided = [r for r in recs if r.side == "torch"]
    assert len(decided) >= 4
    for rec in decided:
        there, minimal = rec.diagnosis.split("At the minimal example shown: ")
        assert there.startswith("decided at another failing example") and "torch is off" in there
        assert "kink" in minimal and "no side is named" in minimal
        assert rec.inputs.endswith(" 0.")  # the minimal example is still the one shown


def test_differences_across_a_kink_at_another_element_do_not_blame_the_right_side():
    # relu at the drawn 0s: central differences read 0.5 * cotangent there, which JAX's 0 is
    # not; the failing element (-0.5, where torch says 0.5 * cotangent and the truth is 0, the
    # largest cotangent of vector seed 0 at 6 elements) is smooth.
    pair = Pair("relu_grad_off", _relu_grad_off, jax.nn.relu,
                unary(Floats(-1.0, 1.0, special=(0.0,))), reference=lambda x: np.maximum(x, 0), checks=("vjp",))
    x = np.array([0.0, 0.3, -0.5, 0.25, 0.0, 0.1], np.float32)
    verdict = verdict_on(pair, "vjp", [x], "float32")
    assert verdict.side == "torch", verdict.diagnosis
    assert "at the failing element [2]" in verdict.diagnosis and "torch is off" in verdict.diagnosis
    assert "similar amounts" not in verdict.diagnosis


def test_another_failing_example_differing_only_where_printing_elides_is_tried():
    # The printed form summarises large arrays, so comparing printed forms called two examples
    # that differ in their middle elements the same, and the other was never diagnosed.
    from equivcheck.engine.compare import format_args
    from equivcheck.ops.runner import _same_args

    a, b = np.zeros(4000, np.float32), np.zeros(4000, np.float32)
    a[1000], b[2000] = 1.0, 1.0
    assert format_args([a]) == format_args([b])
    assert not _same_args([a], [b])
    assert _same_args([a, 3], [a.copy(), 3])
    assert _same_args([np.array([np.nan], np.float32)], [np.array([np.nan], np.float32)])
    assert not _same_args([a], [a.astype(np.float64)])
    assert not _same_args([a, 3], [a, 4])


def _bce_port(p, y):
    """BCE as ports write it: each log clamped at -100 as torch does, so the forward agrees, but
    the gradient at p = 0 or 1 is 0 * inf = NaN."""
    return -(y * jnp.maximum(jnp.log(p), -100.0) + (1 - y) * jnp.maximum(jnp.log1p(-p), -100.0))


def test_a_bce_port_with_nan_gradients_at_saturated_probabilities_is_told_the_known_cause():
    pair = Pair("my_bce", lambda p, y: F.binary_cross_entropy(p, y, reduction="none"), _bce_port,
                Inputs(Same(2), (Floats(0.0, 1.0), Floats(0.0, 1.0))), checks=("vjp",))
    args = [np.array([0.0, 0.5, 0.25], np.float32), np.array([1.0, 0.0, 1.0], np.float32)]
    verdict = verdict_on(pair, "vjp", args, "float32")
    assert "this matches a known divergence: at p = 0 or 1 torch's BCE backward" in verdict.diagnosis


def test_a_nan_at_an_input_of_zero_in_another_op_is_not_matched_to_bce():
    # The shrunk input of a tanh port that returns NaN at one element is 0: not a probability
    # of 0 against a target, so BCE's clamp is no cause to tell.
    def port(x):  # NaN at the first element, forward and gradient
        return jnp.tanh(x) * jnp.where(jnp.arange(x.size).reshape(x.shape) == 0, jnp.nan, 1.0)

    pair = Pair("tanh_jaxnan", torch.tanh, port, unary(), reference=np.tanh, checks=("vjp",))
    verdict = verdict_on(pair, "vjp", [np.array([0.0, 0.0], np.float32)], "float32")
    assert verdict.side == "jax" and "known divergence" not in verdict.diagnosis, verdict.diagnosis



def test_a_nonfinite_side_gets_no_low_precision_hint():
    # Seed 1557109316 of the CI sweep: torch's cumprod JVP gave NaN at float32's smallest normal
    # (its tangent/input sum overflows) beside a 6.3e-05 relative error elsewhere, and the
    # diagnosis called that "what float16 or TF32 rounding gives".
    ref = np.array([0.0, 1.0, 2.0])
    finite = np.array([0.0, 1.0 + 6.3e-5, 2.0])
    assert "float16 or TF32 rounding" in _precision_hint(finite, ref, "float32", "vanishes")
    for poison in (np.nan, np.inf):
        assert _precision_hint(np.where([True, False, False], poison, finite), ref, "float32", "vanishes") == ""


def test_the_cumprod_jvp_overflow_names_torch():
    tiny = float(np.finfo(np.float32).tiny)
    pair = Pair("cumprod_at_smallest_normal", lambda x: torch.cumprod(x, -1), lambda x: jnp.cumprod(x, axis=-1),
                unary(), reference=lambda x: np.cumprod(x, -1), checks=("forward", "jvp"))
    # Direction seed 0 gives the last row a tangent sum of 4.25: over 4 * tiny it overflows.
    args = [np.array([[1.0] * 4] * 7 + [[tiny] * 4], np.float32)]
    verdict = verdict_on(pair, "jvp", args, "float32")
    assert verdict.kind == "nonfinite" and verdict.side == "torch", verdict.diagnosis
    assert verdict.diagnosis.endswith("torch is off"), verdict.diagnosis


_LN = Inputs(Fixed((((3, 8),),)), (Floats(-0.01, 0.01),))
KNOWN_BY_SYMPTOM = [
    (Pair("my_mse", lambda a, b: F.mse_loss(a, b), lambda a, b: jnp.mean(optax.l2_loss(a, b)),
          Inputs(Same(2), (Floats(-1, 1), Floats(-1, 1))), checks=("forward",)),
     [np.array([0.5, -1.0, 0.25, 0.75], np.float32), np.array([0.0, 0.5, -0.5, 1.0], np.float32)],
     "optax.l2_loss is 0.5 * (x - y)^2"),
    (Pair("my_gelu", F.gelu, jax.nn.gelu, unary(Floats(-8, 8)), checks=("forward",)),
     [np.array([-3.0, -1.0, 0.5, 1.5, 2.5], np.float32)], "GELU: torch exact erf, Flax/JAX gelu approximate=True"),
    (Pair("my_layer_norm", lambda x: F.layer_norm(x, (8,)),
          lambda x: (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6), _LN,
          checks=("forward",)),
     [np.linspace(-0.01, 0.01, 24, dtype=np.float32).reshape(3, 8)], "LayerNorm eps: torch 1e-5, Flax"),
]


@pytest.mark.parametrize(("pair", "args", "cause"), KNOWN_BY_SYMPTOM, ids=[p.name for p, _, _ in KNOWN_BY_SYMPTOM])
def test_a_user_pair_failing_like_a_known_trap_is_told_its_cause(pair, args, cause):
    # Audit of issue 11 (fault 9's kind): these rows of the trap table had no symptom, so a user's
    # mse against optax.l2_loss, approximate gelu or LayerNorm eps 1e-6 read a bare "undecided".
    verdict = verdict_on(pair, "forward", args, "float32")
    assert f"this matches a known divergence: {cause}" in verdict.diagnosis, verdict.diagnosis


def test_a_plain_wrong_op_is_told_no_known_cause():
    pair = Pair("my_tanh", torch.tanh, lambda x: jnp.tanh(1.01 * x), unary(), checks=("forward",))
    verdict = verdict_on(pair, "forward", [np.array([0.5, -1.0, 2.0], np.float32)], "float32")
    assert "matches a known divergence" not in verdict.diagnosis, verdict.diagnosis
