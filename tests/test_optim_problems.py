"""The closed-form torch gradients of the optimizer problems are autograd's, bit for bit: the
trajectory checks use them for speed and must still test what a torch user's loop computes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equivcheck.optim.problems import LINEAR, QUADRATIC
from equivcheck.optim.sides import _backward, _to_torch, treedef_of


def _grads(problem, params, data, micro, closed):
    treedef = treedef_of(params)
    leaves = [torch.tensor(np.array(x)).requires_grad_() for x in treedef.flatten_up_to(params)]
    tdata = _to_torch(data, torch.device("cpu"))
    if not closed:
        problem = problem.__class__(**{**problem.__dict__, "torch_grad": None})
    loss = sum(_backward(problem, treedef, leaves, tdata, j, micro) for j in range(micro))
    return loss, [p.grad.numpy().copy() for p in leaves]


@pytest.mark.parametrize("problem", [LINEAR, QUADRATIC], ids=lambda p: p.name)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("micro", [1, 4])
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_closed_form_gradient_is_autograds_bit_for_bit(problem, dtype, micro, seed, data):
    shapes = problem.sample(np.random.default_rng(seed))
    params, tree = data.draw(problem.draw(shapes, dtype, micro))
    loss_a, autograd = _grads(problem, params, tree, micro, closed=False)
    loss_c, closed = _grads(problem, params, tree, micro, closed=True)
    assert loss_a == loss_c
    for a, c in zip(autograd, closed):
        assert a.dtype == c.dtype and a.shape == c.shape
        np.testing.assert_array_equal(a, c)
