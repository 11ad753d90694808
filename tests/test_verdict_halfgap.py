"""Acceptance never halves a gap: two sides a constant apart (between one and two table bounds)
are not "rounding" or "ill-conditioned" because each sits within the bound of their mean.
The float64 sides must agree to float64's own rounding (issue 11, fault 1's family)."""
from __future__ import annotations

import jax.numpy as jnp
import torch

from equivcheck import Floats, Inputs, Pair, RunSettings, unary
from equivcheck.engine import tolerance
from equivcheck.optim.trajectory import Example

RUN = RunSettings(examples=5, seed=1)


def test_a_constant_factor_between_one_and_two_bounds_fails_and_names_torch():
    tol = tolerance.lookup("float32")
    # At x ~ 1, exp ~ 2.7: a relative offset of 1.5 bounds, so each side is 0.75 bounds from the mean.
    k = 1.5 * (tol.atol / 2.7 + tol.rtol)
    p = Pair("exp_off", lambda x: torch.exp(x) * (1 + k), jnp.exp, Inputs(unary().shapes, (Floats(0.99, 1.01),)),
             checks=("forward",), reference=__import__("numpy").exp)
    rec, = p.run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and rec.side == "torch", (rec.outcome, rec.message, rec.notes)
    assert rec.ill_conditioned == 0


def test_naive_adamw_weight_decay_default_fails_in_float32():
    # optax.adamw's weight decay 1e-4 against torch's 1e-2: at p = 2 and lr = 1e-3 the first step
    # is 1.98e-5 apart (1.6 bounds). It passed as "ill-conditioned: accepted" before.
    from suites.test_optimizers import NAIVE

    pair = next(p for p in NAIVE if p.name == "naive_adamw")
    w = Example("quadratic", {"p0": [2.0, -2.0]}, {"a": {"p0": [1.0, 1.0]}, "c": {"p0": [[0.0, 0.0]]}}, 5)
    rec, = pair.replace(witnesses=(w,)).run_checks(dtype="float32", run=RunSettings(examples=1, seed=5),
                                                   known=lambda _id: None)
    assert rec.outcome == "failed" and rec.ill_conditioned == 0, (rec.outcome, rec.notes)
    assert "step 1" in rec.message
