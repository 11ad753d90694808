"""Derivative verdicts are arbitrated by central differences of the pair's reference, or of both
sides' float64 forwards where they agree; never by one side's forward alone. Where the forwards
differ and there is no reference, no side is named."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equivcheck import Pair, RunSettings, run_pair, unary
from tests.helpers import by_check
from tests.verdicts import verdict_on

SEED = 20261211

SINH = Pair("sinh_torch_scaled", lambda x: torch.sinh(x) * 1.01, jnp.sinh, unary(), reference=np.sinh)


@pytest.mark.parametrize("check", ["forward", "vjp", "jvp", "hvp"])
def test_a_torch_forward_bug_is_blamed_on_torch_in_every_derivative(check):
    verdict = verdict_on(SINH, check, [np.array([4.0], np.float32)], "float32")
    assert verdict.side == "torch", verdict.diagnosis
    assert "torch is off" in verdict.diagnosis and "reference" in verdict.diagnosis


@pytest.mark.parametrize("check", ["vjp", "jvp", "hvp"])
def test_without_a_reference_differing_forwards_name_no_side(check):
    bare = SINH.replace(name="sinh_torch_scaled_bare", reference=None)
    verdict = verdict_on(bare, check, [np.array([4.0], np.float32)], "float32")
    assert verdict.side is None, verdict.diagnosis
    assert "the two forwards differ" in verdict.diagnosis and "cannot be arbitrated" in verdict.diagnosis


# The trial's pair: the VJP failure shrinks to x = 0, where the two forwards agree exactly; around
# it they do not, so the mean of the forwards (derivative 1.005) cannot tell the sides apart.
TANH_SCALED_BARE = Pair("tanh_torch_scaled_bare", lambda x: torch.tanh(1.01 * x), jnp.tanh, unary())


@pytest.mark.parametrize("check", ["vjp", "jvp"])
def test_forwards_that_agree_only_at_the_example_name_no_side_and_are_called_the_cause(check):
    verdict = verdict_on(TANH_SCALED_BARE, check, [np.array([0.0], np.float32)], "float32")  # still fails
    assert verdict.side is None, verdict.diagnosis
    assert "the two forwards differ near this point, so their derivatives cannot be arbitrated" in verdict.diagnosis
    assert "A forward difference near this point is the likely cause" in verdict.diagnosis
    assert "Each side's derivative matches its own forward" in verdict.diagnosis
    assert "both sides are off" not in verdict.diagnosis and "tolerance too tight" not in verdict.diagnosis


def test_forwards_that_agree_only_at_the_example_fail_undecided_in_a_run():
    pair = TANH_SCALED_BARE.replace(checks=("vjp", "jvp"))
    for rec in run_pair(pair, dtype="float32", run=RunSettings(examples=10, seed=SEED)):
        assert rec.outcome == "failed" and rec.side is None, rec.failure_text()
        assert "cannot be arbitrated" in rec.diagnosis and "both sides are off" not in rec.diagnosis


class _DoubledSin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * g * torch.cos(x)


def test_without_a_reference_agreeing_forwards_arbitrate_the_derivative():
    bare = Pair("sin_torch_grad_doubled_bare", _DoubledSin.apply, jnp.sin, unary(), checks=("forward", "vjp"))
    verdict = verdict_on(bare, "vjp", [np.array([0.3, -2.0], np.float32)], "float32")
    assert verdict.side == "torch", verdict.diagnosis
    assert "both sides' float64 forwards" in verdict.diagnosis


def test_a_torch_forward_bug_is_blamed_on_torch_in_a_run():
    records = by_check(run_pair(SINH, dtype="float32", run=RunSettings(examples=10, seed=SEED)))
    for check in ("forward", "vjp", "hvp"):
        assert records[check].outcome == "failed" and records[check].side == "torch", records[check].failure_text()
