"""Divergences the port's taps do not bound, and the side of a model check.

A new-user trial: a port ending `out = tap("fc2", ...); return out * 1.001` was reported as
"undecided: every tapped layer is within tolerance" (forward) and as fc1's gradient with "every
layer's output agrees" (grad, train), though the model's output differs. Untapped code after the
last tap must be named as such, before the first tap as "at or before" it; and a slip in the
torch model (torch is the specification) must read as the port differing from torch, not as a
float64 verdict that JAX is off.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from equivcheck import Custom, Floats, Inputs
from equivcheck.engine import tolerance
from equivcheck.engine.records import RunSettings
from equivcheck.layers import flax_bridge
from equivcheck.models import ModelPair, mse, tap
from equivcheck.models import sides as ms
from equivcheck.models.evaluate import mapping
from equivcheck.models.localise import localise
from equivcheck.models.zoo import _dense, mlp_pair
from equivcheck.optim import optimizer_pair

RUN = RunSettings(examples=3, seed=20261126, shrink_seconds=5)
SLIP = 1.001  # a scale the port applies where torch has none: far past any tolerance, a plausible slip


def _scaled_after(params, x, train=False):
    """fc1 and fc2 tapped; the scale after fc2's tap (a head computed without a tap)."""
    h = tap("fc1", _dense(params["fc1"], x))
    out = tap("fc2", _dense(params["fc2"], jax.nn.relu(h)))
    return out * SLIP


def _scaled_before(params, x, train=False):
    """The input scaled before fc1 (preprocessing the torch model does not do)."""
    h = tap("fc1", _dense(params["fc1"], x * SLIP))
    return tap("fc2", _dense(params["fc2"], jax.nn.relu(h)))


@pytest.mark.parametrize("check", ["forward", "grad", "train"])
def test_a_slip_after_the_last_tap_is_named_there(check):
    (rec,) = mlp_pair("p_after", _scaled_after, checks=(check,)).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert "the divergence lies after the last tapped layer 'fc2'" in rec.diagnosis, rec.diagnosis
    assert "but the model's output is not" in rec.diagnosis, rec.diagnosis
    assert "every layer's output agrees" not in rec.diagnosis and "gradient of" not in rec.diagnosis, rec.diagnosis
    assert not any(r["first"] for r in rec.extra["layers"]), rec.extra["layers"]


@pytest.mark.parametrize("check", ["forward", "grad"])
def test_a_slip_before_the_first_tap_is_at_or_before_it(check):
    (rec,) = mlp_pair("p_before", _scaled_before, checks=(check,)).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert "the port differs from torch at or before layer fc1" in rec.diagnosis, rec.diagnosis
    assert "first diverging layer: fc1 (Linear)" in rec.diagnosis, rec.diagnosis
    assert "it is the first tapped layer" in rec.diagnosis, rec.diagnosis


def test_a_correct_port_says_its_output_agrees_too():
    """"every tapped layer is within tolerance" (the layer table of a passing check, an optimizer
    slip's diagnosis) is said with the model's output compared, not assumed."""
    pair = mlp_pair("p_ok")
    ents = mapping(pair, "float32", "cpu")
    x = list(ms.numpy_batch(pair.inputs, ((8, 10), (8, 1)), "float32", np.random.default_rng(0))[:-1])
    tol = tolerance.lookup("float32", device="cpu", precision="highest", check="forward", tags=pair.tags)
    loc = localise(pair, ms.build_torch(pair, 0, "float32", "cpu"), ents, x, {}, train=False, seed=0,
                   dtype="float32", device="cpu", tol=tol)
    assert loc.first is None and not loc.output_off, loc.text
    assert "every tapped layer is within tolerance (3 rows), and so is the model's output" in loc.text, loc.text


class _NormedMLP(torch.nn.Module):
    """The trial's torch model: its LayerNorm built with Flax's eps, the port with torch's default."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = torch.nn.Linear(8, 16), torch.nn.LayerNorm(16, eps=1e-6), torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)))


def _torch_default_eps(params, x, train=False):
    h = tap("fc1", _dense(params["fc1"], x))
    ln = flax_bridge.nnx_layer(nnx.LayerNorm, params["ln"], num_features=16, use_fast_variance=False,
                               epsilon=torch.nn.LayerNorm(16).eps)
    return tap("fc2", _dense(params["fc2"], tap("ln", ln(h))))


# small inputs, so the variance LayerNorm divides by is near its eps (as nn.trap.layer_norm_eps draws them)
_INPUTS = Inputs(Custom(lambda rng: ((4, 8), (4, 1)), ((4, 8), (4, 1))), (Floats(-0.01, 0.01), Floats(-1, 1)))


def test_a_torch_side_slip_reads_as_the_port_differing_from_torch():
    """torch is the specification of a model check (no float64 arbiter): the side is the port by
    construction, and the text says so instead of claiming JAX computes LayerNorm wrongly."""
    pair = ModelPair("p_ln_torch", _NormedMLP, _torch_default_eps, _INPUTS, loss=mse(),
                     optimizer=optimizer_pair("p_ln_torch.sgd", "SGD", lr=0.1), steps=3, checks=("forward",))
    (rec,) = pair.run_checks(dtype="float64", run=RUN)
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert "the port differs from torch at layer ln (torch is the specification" in rec.diagnosis, rec.diagnosis
    assert "first diverging layer: ln (LayerNorm)" in rec.diagnosis, rec.diagnosis
    assert "eps=1e-05 where torch's module has eps=1e-06" in rec.diagnosis, rec.diagnosis
