"""A derivative failure that shrinks onto a kink is decided just off it. relu6's mutants with a
derivative moved by 10x the bound shrank to x = 0, where each side picks its own derivative and
no side can be named; a fresh search heads for the drawn specials (0 and 6) again, so every one
of relu6's twelve derivative mutants was left undecided in the mutation benchmark
(benchmarks/oracle_mutants.py). equivcheck.ops.nudge moves the example by 1e-3 each way."""
from __future__ import annotations

import pytest

from equivcheck import RunSettings, run_pair
from equivcheck.ops.mutants import mutants
from suites.test_autodiff import PAIRS


@pytest.mark.parametrize("name", ["vjp:x10", "jvp:x2"])
@pytest.mark.parametrize("side", ["torch", "jax"])
def test_a_derivative_slip_shrunk_onto_relu6s_kink_is_blamed_on_its_side(name, side):
    m = next(m for m in mutants(PAIRS["relu6"], "float32") if m.name == name and m.side == side)
    check = name.split(":")[0]
    [rec] = [r for r in run_pair(m.pair, dtype="float32", run=RunSettings(examples=10, seed=0)) if r.check == check]
    assert rec.outcome == "failed" and rec.side == side, rec.failure_text()
    assert "decided at another failing example (arg0: float32[] " in rec.diagnosis, rec.diagnosis


def test_a_pair_that_differs_only_at_the_kink_stays_undecided():
    """Off the kink the sides agree: nothing to decide with, and no side is named."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from equivcheck import Fixed, Floats, Inputs, Pair

    @jax.custom_jvp
    def relu_half(x):
        return jnp.maximum(x, 0)

    relu_half.defjvp(lambda p, t: (relu_half(p[0]), jnp.where(p[0] > 0, 1.0, jnp.where(p[0] == 0, 0.5, 0.0)) * t[0]))
    pair = Pair("relu_half_at_zero", torch.relu, relu_half, Inputs(Fixed((((),),)), (Floats(-1, 1, special=(0.0,)),)),
                checks=("vjp",), reference=lambda x: np.maximum(x, 0))
    [rec] = run_pair(pair, dtype="float32", run=RunSettings(examples=10, seed=0))
    assert rec.outcome == "failed" and rec.side is None, rec.failure_text()
    assert "kink" in rec.diagnosis, rec.diagnosis
