"""At a pole no side owes its derivative: torch's log(0) = -inf has an infinite derivative, a port
that clamps (log(max(x, 1e-30))) a finite one. The derivative checks named torch, the side with
the infinity, while the forward check blamed the clamp (with a reference) or named no side; and
for a 0-d input the pole test itself raised inside the engine (a NumPy scalar passed to torch),
so the forward check blamed torch too. Found by a planted-bug trial (a clamp slipped into the
JAX side)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equivcheck import Floats, Pair, unary
from equivcheck.ops.poles import pole as _pole
from tests.verdicts import verdict_on

CLAMPED = lambda x: jnp.log(jnp.maximum(x, 1e-30))


def test_the_pole_test_takes_a_0d_input():
    pair = Pair("log_clamped_0d", torch.log, CLAMPED, unary(Floats(0, 10, special=(0.0,))))
    assert "a pole" in _pole(pair, [np.array(0.0)], None, "torch", "out", np.array(-np.inf))


@pytest.mark.parametrize("x", [np.float32(0.0), np.array([0.0, 2.0], np.float32)], ids=["0d", "1d"])
@pytest.mark.parametrize("reference", [None, np.log], ids=["bare", "reference"])
def test_a_clamped_port_at_a_pole_never_blames_the_side_with_the_infinity(x, reference):
    pair = Pair("log_clamped", torch.log, CLAMPED, unary(Floats(0, 10, special=(0.0,))), reference=reference)
    forward = verdict_on(pair, "forward", [np.asarray(x)], "float32")
    assert forward.side in ((None,) if reference is None else ("jax",)), forward.diagnosis
    for check in ("vjp", "jvp"):
        verdict = verdict_on(pair, check, [np.asarray(x)], "float32")
        assert verdict.side is None, (check, verdict.diagnosis)
        assert "forward is infinite at a pole at this input" in verdict.diagnosis
