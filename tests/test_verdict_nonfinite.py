"""No acceptance takes one side's result as the truth: a NaN or an infinity on one side is never
"ill-conditioned" nor "beyond the dtype's range", in float32 or float64, in any check."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equivcheck import Pair, RunSettings, run_pair, unary
from tests.verdicts import verdict_on

SEED = 20261211
REPLAY = "pytest --equiv tests/test_verdict_nonfinite.py"
POISON = {"nan": float("nan"), "inf": float("inf")}


def poisoned(side: str, poison: str) -> Pair:
    """tanh, with one side multiplied by NaN or divided by zero (inf away from 0)."""
    bad_t = (lambda x: torch.tanh(x) * POISON["nan"]) if poison == "nan" else (lambda x: torch.tanh(x) / 0.0)
    bad_j = (lambda x: jnp.tanh(x) * POISON["nan"]) if poison == "nan" else (lambda x: jnp.tanh(x) / 0.0)
    return Pair(f"tanh_{poison}_on_{side}", bad_t if side == "torch" else torch.tanh,
                bad_j if side == "jax" else jnp.tanh, unary(), reference=np.tanh, checks=("forward", "vjp", "hvp"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("poison", ["nan", "inf"])
@pytest.mark.parametrize("side", ["torch", "jax"])
@pytest.mark.parametrize("check", ["forward", "vjp", "hvp"])
def test_a_nonfinite_side_is_never_accepted_and_is_named(check, side, poison, dtype):
    args = [np.array([0.5, -1.25], dtype)]
    verdict = verdict_on(poisoned(side, poison), check, args, dtype)
    assert verdict.side == side, (verdict.message, verdict.diagnosis)
    assert f"{side} is off" in verdict.diagnosis


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("poison", ["nan", "inf"])
@pytest.mark.parametrize("side", ["torch", "jax"])
def test_a_nonfinite_side_fails_every_check_of_a_run(side, poison, dtype):
    records = run_pair(poisoned(side, poison), dtype=dtype, run=RunSettings(examples=10, seed=SEED), replay=REPLAY)
    for rec in records:
        assert rec.outcome == "failed" and rec.side == side, rec.failure_text()
        assert rec.ill_conditioned == 0
        assert f"replay: {REPLAY}" in rec.failure_text() and f"which side: {side}" in rec.failure_text()


# Without a reference: NaN, +inf and -inf alike. exp is positive, so the forward takes the poison's
# own sign; every derivative of exp(x) * poison is not finite either.
SIGNED = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def bare_poisoned(side: str, poison: str) -> Pair:
    value = SIGNED[poison]
    return Pair(f"exp_{poison}_on_{side}_bare",
                (lambda x: torch.exp(x) * value) if side == "torch" else torch.exp,
                (lambda x: jnp.exp(x) * value) if side == "jax" else jnp.exp, unary())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("poison", list(SIGNED))
@pytest.mark.parametrize("side", ["torch", "jax"])
@pytest.mark.parametrize("check", ["forward", "vjp", "jvp"])
def test_without_a_reference_a_lone_nonfinite_side_is_named_and_no_reference_is_asked(check, side, poison, dtype):
    verdict = verdict_on(bare_poisoned(side, poison), check, [np.array([0.5, -1.25], dtype)], dtype)
    assert verdict.side == side, (verdict.message, verdict.diagnosis)
    assert verdict.diagnosis.endswith(f"{side} is off"), verdict.diagnosis
    # Naming a side and asking for a reference to decide one would contradict each other.
    assert "reference" not in verdict.diagnosis, verdict.diagnosis
    assert "a finite answer exists" in verdict.diagnosis or "finite differences" in verdict.diagnosis


class _InfGrad(torch.autograd.Function):
    """sin, whose backward multiplies by inf: the forwards agree, only the derivative is not finite."""

    @staticmethod
    def forward(ctx, x):
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_a_lone_nonfinite_derivative_with_agreeing_forwards_is_decided_by_finite_differences():
    pair = Pair("sin_inf_grad_bare", _InfGrad.apply, jnp.sin, unary(), checks=("forward", "vjp"))
    verdict = verdict_on(pair, "vjp", [np.array([0.3, 1.0], np.float32)], "float32")
    assert verdict.side == "torch" and "torch is off" in verdict.diagnosis, verdict.diagnosis
    assert "both sides' float64 forwards" in verdict.diagnosis and "reference" not in verdict.diagnosis


# exp(100) is 2.7e43, past float32's largest: torch's inf is that answer, rounded, and JAX's clamp to
# 3e38 is the finite one that is off. Neither a finite float64 gap against an inf ("agreement")
# nor "the finite side is right" may blame torch.
CLAMPED = Pair("exp_clamped_on_jax", torch.exp, lambda x: jnp.minimum(jnp.exp(x), 3e38), unary())


def test_an_honest_overflow_is_not_blamed_on_the_side_that_overflows():
    args = [np.array([100.0, 1.0], np.float32)]
    bare = verdict_on(CLAMPED, "forward", args, "float32")
    assert bare.side is None and "give the Pair a float64 `reference`" in bare.diagnosis, bare.diagnosis
    decided = verdict_on(CLAMPED.replace(reference=np.exp), "forward", args, "float32")
    assert decided.side == "jax" and "the pair's NumPy reference decides" in decided.diagnosis, decided.diagnosis


@pytest.mark.parametrize("poison", list(SIGNED))
@pytest.mark.parametrize("side", ["torch", "jax"])
def test_without_a_reference_a_lone_nonfinite_side_fails_every_check_of_a_run(side, poison):
    records = run_pair(bare_poisoned(side, poison).replace(checks=("forward", "vjp", "jvp")), dtype="float32",
                       run=RunSettings(examples=10, seed=SEED), replay=REPLAY)
    for rec in records:
        assert rec.outcome == "failed" and rec.side == side, rec.failure_text()
        assert "reference" not in rec.diagnosis, rec.failure_text()


def test_an_infinity_at_a_pole_against_a_clamp_names_no_side():
    # 1/x at 0: torch's inf is IEEE's answer, the port clamps the divisor to 1e-30. Without a
    # reference neither is wrong by itself: the record says it is a pole and asks for a reference.
    pair = Pair("reciprocal_clamped", lambda x: 1 / x, lambda x: 1 / jnp.where(x == 0, 1e-30, x), unary(),
                checks=("forward",))
    verdict = verdict_on(pair, "forward", [np.array([0.0, 1.0], np.float32)], "float32")
    assert verdict.side is None and "a pole" in verdict.diagnosis, verdict.diagnosis


def test_an_infinity_where_the_function_settles_nearby_is_still_named():
    # exp(x) / (x != 0) is inf at 0 where exp's limit is 1, which the other side gives.
    pair = Pair("exp_div_mask", lambda x: torch.exp(x) / (x != 0), jnp.exp, unary(), checks=("forward",))
    verdict = verdict_on(pair, "forward", [np.array([0.0, 1.0], np.float32)], "float32")
    assert verdict.side == "torch" and "pole" not in verdict.diagnosis, verdict.diagnosis
