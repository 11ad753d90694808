"""Localisation of ports that have no taps (issue 12 section 1): the port's jaxpr evaluated
value by value (equivcheck.models.trace), each torch module's output looked up among those
values (equivcheck.models.untapped)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equivcheck import Custom, Floats, Inputs
from equivcheck.engine.records import RunSettings
from equivcheck.engine.tolerance import Tolerance
from equivcheck.models import ModelPair, mse, zoo
from equivcheck.models.trace import Matcher, Value, evaluate
from equivcheck.models.zoo import _dense, cnn_apply, cnn_pair, mlp_pair
from equivcheck.optim import optimizer_pair

RUN = RunSettings(examples=3, seed=20261126, shrink_seconds=5)
TOL = Tolerance(1e-5, 1e-5, "test")


def _first(rec):
    return [r["layer"] for r in rec.extra.get("layers", []) if r["first"]]


def test_the_trace_sees_inside_jit_and_custom_vjp_and_labels_each_value():
    @jax.jit
    def doubled_tanh(x):
        return jnp.tanh(x) * 2

    @jax.custom_vjp
    def relu(x):
        return jnp.maximum(x, 0)

    relu.defvjp(lambda x: (relu(x), x), lambda x, g: (g * (x > 0),))

    def port(p, x):
        h = doubled_tanh(relu(x @ p["w"] + p["b"]))
        return jax.lax.scan(lambda c, a: (c + a, c * a), jnp.zeros(3), h)[1].T

    w, b, x = np.eye(3) * 0.5, np.arange(3.0), np.linspace(-1, 1, 6).reshape(2, 3)
    values = evaluate(port, {"w": w, "b": b}, x)
    match = Matcher(values, TOL)
    h = np.maximum(x @ w + b, 0)
    assert match.find(h).ok and match.find(np.tanh(h)).ok  # inside custom_vjp and jit
    assert match.find(np.tanh(h) * 2).layout == ""
    assert match.find((np.tanh(h) * 2).T).layout == "axes (1, 0)"
    assert match.find(x).ok and values[0].label.startswith("the port's argument [0]")
    assert "tanh at test_models_traced.py:31 (doubled_tanh)" in [v.label for v in values], values
    body = [v.label for v in values if "stacked over the 2 steps of the scan" in v.label]
    assert body and match.find(np.cumsum(np.tanh(h) * 2, axis=0)).ok, body  # the carry, stacked over the steps


def test_the_matcher_undoes_layouts_and_names_the_closest_computed_value():
    nchw = np.arange(24.0).reshape(1, 2, 3, 4)
    computed = [Value("the port's argument [0]", np.zeros(24)), Value("conv at port.py:3", nchw.transpose(0, 2, 3, 1) + 1),
                Value("reshape at port.py:4", nchw.reshape(1, 2, 12))]
    match = Matcher(computed, TOL)
    assert match.find(nchw).ok and match.find(nchw).layout == "reshaped"
    off = match.find(nchw + 0.5)
    assert not off.ok and off.ratio > 1
    missing = Matcher(computed[:2], TOL).find(nchw)
    assert not missing.ok and missing.layout == "conv at port.py:3, axes (0, 3, 1, 2)"
    assert missing.max_abs == pytest.approx(1.0)


def _relu_mlp(params, x, train=False, transposed=False, scale=1.0):
    kernel = params["fc1"]["kernel"].T if transposed else params["fc1"]["kernel"]
    h = jax.nn.relu(x @ kernel + params["fc1"]["bias"])
    return _dense(params["fc2"], h) * scale


@pytest.mark.parametrize("check", ["forward", "grad"])
def test_an_untransposed_kernel_is_localised_and_explained_without_taps(check):
    port = lambda p, x, train=False: _relu_mlp(p, x, train, transposed=True)
    (rec,) = mlp_pair("traced_fc1", port, checks=(check,)).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert _first(rec) == ["fc1"], rec.extra["layers"]
    assert "the port differs from torch at layer fc1" in rec.diagnosis, rec.diagnosis
    assert "its inputs are among the port's values, its output is not" in rec.diagnosis, rec.diagnosis
    assert "located without taps" in rec.diagnosis and "untransposed" in rec.diagnosis, rec.diagnosis


def test_untapped_code_after_the_last_module_is_named_there():
    port = lambda p, x, train=False: _relu_mlp(p, x, train, scale=1.001)
    (rec,) = mlp_pair("traced_head", port, checks=("forward",)).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and _first(rec) == [], rec.extra["layers"]
    assert "every torch module's output is among the values the port computes" in rec.diagnosis, rec.diagnosis
    assert "the divergence lies after the last module 'fc2'" in rec.diagnosis, rec.diagnosis


def test_a_correct_untapped_port_passes_with_every_row_matched():
    (rec,) = mlp_pair("traced_ok", _relu_mlp, checks=("forward",)).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "passed", rec.failure_text()
    assert rec.extra["layers"] and all(r["ok"] for r in rec.extra["layers"]), rec.extra["layers"]


class _Residual(torch.nn.Module):
    """The residual sum lives in forward(), in no module: a port that drops it diverges between
    fc and norm, and norm's input is nowhere in the port."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.head = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.norm(x + self.fc(x)))


def _no_residual(params, x, train=False):
    h = _dense(params["fc"], x)
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / jnp.sqrt(var + 1e-5) * params["norm"]["scale"] + params["norm"]["bias"]
    return _dense(params["head"], h)


def test_a_slip_in_forward_code_outside_any_module_is_at_or_before_the_next_module():
    inputs = Inputs(Custom(lambda rng: ((4, 4), (4, 1)), ((4, 4), (4, 1))), (Floats(-1, 1), Floats(-1, 1)))
    pair = ModelPair("traced_residual", _Residual, _no_residual, inputs, loss=mse(),
                     optimizer=optimizer_pair("traced_residual.sgd", "SGD", lr=0.1), checks=("forward",))
    (rec,) = pair.run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and _first(rec) == ["norm"], rec.extra["layers"]
    assert "at or before norm (LayerNorm): neither its output nor its input is among" in rec.diagnosis
    assert "after fc" in rec.diagnosis, rec.diagnosis


@pytest.fixture
def no_taps(monkeypatch):
    """The zoo's ports with their taps removed: ports as users write them."""
    monkeypatch.setattr(zoo, "tap", lambda name, value, to_torch=None: value)


def test_batch_norm_statistics_are_compared_without_taps(no_taps):
    """Flax's momentum convention (weight of the old statistic) given torch's value: every
    module's output agrees in train mode, the running statistics do not."""
    port = lambda p, x, train=False: cnn_apply(p, x, train, bn_momentum=0.1)
    (rec,) = cnn_pair("traced_bn", port, checks=("modes",)).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and _first(rec) == ["bn1 (running stats)"], rec.extra["layers"]
    assert "momentum" in rec.diagnosis, rec.diagnosis


def test_an_nhwc_conv_padding_slip_is_localised_without_taps(no_taps):
    """The port pads W by (0, 2) where torch pads (1, 1): same shapes, shifted windows."""
    port = lambda p, x, train=False: cnn_apply(p, x, train, padding=((1, 1), (0, 2)))
    (rec,) = cnn_pair("traced_pad", port, checks=("forward",)).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and _first(rec) == ["conv1"], rec.extra["layers"]
    assert "first diverging layer: conv1 (Conv2d): its inputs are among the port's values" in rec.diagnosis


def test_a_port_that_cannot_be_traced_keeps_the_taps_text():
    def concrete(params, x, train=False):
        if float(jnp.sum(x)) > 1e9:  # a Python branch on a value: make_jaxpr cannot trace it
            return x
        return _relu_mlp(params, x, train, scale=1.001)

    (rec,) = mlp_pair("traced_concrete", concrete, checks=("forward",)).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed", rec.failure_text()
    assert "the port taps no layer (models.tap) and the model's output differs" in rec.diagnosis, rec.diagnosis


def test_a_loss_that_differs_on_the_same_output_is_named():
    """torch's mean squared error against a port that sums: every layer and the output agree,
    the loss and so every gradient do not; the loss is the cause, not the first parameter."""
    import torch.nn.functional as F

    from equivcheck.models import Loss

    summed = Loss("mse", F.mse_loss, lambda out, y: ((out - y) ** 2).sum())
    (rec,) = mlp_pair("traced_loss", _relu_mlp, checks=("grad",)).replace(loss=summed).run_checks(
        dtype="float32", run=RUN)
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert "the model's output agrees but the loss does not" in rec.diagnosis, rec.diagnosis
    assert "the gradient of" not in rec.diagnosis, rec.diagnosis


class _TwoBranches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.a(x) + self.b(x))


def _folded(params, x, train=False):
    """Correct, but a and b folded into one matmul: their outputs exist nowhere in the port."""
    w = params["a"]["kernel"] + params["b"]["kernel"]
    return _dense(params["head"], x @ w + (params["a"]["bias"] + params["b"]["bias"]))


def test_outputs_the_port_computes_in_another_form_are_not_blamed():
    """With the model's output agreeing, a and b (never materialised) are no divergence: the
    grad failure is the loss's (summed where torch averages), and no layer is named."""
    import torch.nn.functional as F

    from equivcheck.models import Loss

    inputs = Inputs(Custom(lambda rng: ((4, 4), (4, 1)), ((4, 4), (4, 1))), (Floats(-1, 1), Floats(-1, 1)))
    summed = Loss("mse", F.mse_loss, lambda out, y: ((out - y) ** 2).sum())
    pair = ModelPair("traced_folded", _TwoBranches, _folded, inputs, loss=summed,
                     optimizer=optimizer_pair("traced_folded.sgd", "SGD", lr=0.1), checks=("forward", "grad"))
    fwd, grad = pair.run_checks(dtype="float64", run=RUN)
    assert fwd.outcome == "passed", fwd.failure_text()
    assert grad.outcome == "failed" and _first(grad) == [], grad.extra["layers"]
    assert "1 of 3 torch modules' outputs are among the values the port computes (the rest it computes in " \
           "another form), and the model's output is within tolerance" in grad.diagnosis, grad.diagnosis
    assert "the loss does not" in grad.diagnosis, grad.diagnosis


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.o = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x)))  # tanh: the block's own code, in no module


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.block, self.head = torch.nn.Linear(4, 4), _Block(), torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.block(self.inp(x)))


def _stack_port(params, x, train=False, inside=jnp.tanh, scaled=1.0):
    h = _dense(params["inp"], x) * scaled
    h = _dense(params["block"]["o"], inside(_dense(params["block"]["q"], h)))
    return _dense(params["head"], h)


def _stack_pair(name, port):
    inputs = Inputs(Custom(lambda rng: ((4, 4), (4, 1)), ((4, 4), (4, 1))), (Floats(-1, 1), Floats(-1, 1)))
    return ModelPair(name, _Stack, port, inputs, loss=mse(), optimizer=optimizer_pair(f"{name}.sgd", "SGD", lr=0.1),
                     checks=("forward",))


def test_a_slip_in_a_modules_own_forward_code_is_named_at_that_module():
    port = lambda p, x, train=False: _stack_port(p, x, inside=jax.nn.sigmoid)
    (rec,) = _stack_pair("traced_block", port).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and _first(rec) == ["block"], rec.extra["layers"]
    assert "inside it block.q agree and the input of block.o is nowhere: the divergence is in block's own " \
           "forward code, between block.q and block.o" in rec.diagnosis, rec.diagnosis


def test_a_module_output_changed_before_the_next_module_is_named_with_the_change():
    port = lambda p, x, train=False: _stack_port(p, x, scaled=2.0)
    (rec,) = _stack_pair("traced_scaled", port).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and _first(rec) == ["inp"], rec.extra["layers"]
    assert "the port differs from torch after layer inp, before layer block.q" in rec.diagnosis, rec.diagnosis
    assert "and then changes it (mul at test_models_traced.py" in rec.diagnosis, rec.diagnosis


class _Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(5, 3, padding_idx=0), torch.nn.Linear(3, 1)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


def _bag_port(params, tokens, train=False):
    return _dense(params["head"], params["embed"]["embedding"][tokens].mean(1))


def test_a_padding_row_that_gets_a_gradient_names_padding_idx():
    from equivcheck import Ints

    inputs = Inputs(Custom(lambda rng: ((4, 3), (4, 1)), ((4, 3), (4, 1))), (Ints(0, 4), Floats(-1, 1)))
    pair = ModelPair("traced_pad", _Bag, _bag_port, inputs, loss=mse(),
                     optimizer=optimizer_pair("traced_pad.sgd", "SGD", lr=0.1), checks=("grad",))
    (rec,) = pair.run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed", rec.failure_text()
    assert "the gradient of 'embed.weight' differs first" in rec.diagnosis, rec.diagnosis
    assert "only row 0, the padding_idx: torch gives the padding row no gradient" in rec.diagnosis, rec.diagnosis


def test_patch_tokens_match_through_a_permutation_and_a_merge_and_keys_are_skipped():
    """torch's (B, C, H, W) patch embedding against a port's (B, H*W, C) tokens; a port that makes
    a typed PRNG key (jax.random.key) still traces (the key has no NumPy form: skipped)."""
    nchw = np.random.default_rng(0).normal(size=(2, 8, 2, 3))
    tokens = nchw.transpose(0, 2, 3, 1).reshape(2, 6, 8)
    found = Matcher([Value("dot_general at port.py:9", tokens)], TOL).find(nchw)
    assert found.ok and found.layout.startswith("reshaped to (2, 2, 3, 8)"), found
    heads = Matcher([Value("einsum", tokens.reshape(2, 6, 2, 4).transpose(0, 2, 1, 3))], TOL).find(tokens)
    assert heads.ok, heads  # (B, heads, L, D) against torch's merged (B, L, heads*D)
    values = evaluate(lambda x: x + jax.random.normal(jax.random.key(0), x.shape), np.zeros(3))
    assert Matcher(values, TOL).find(np.zeros(3)).ok


class _Unrolled(torch.nn.Module):
    """One Linear applied three times in a loop (a decoder cell): hooks record three calls."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

    def forward(self, x):
        for _ in range(3):
            x = torch.tanh(self.cell(x))
        return self.head(x)


def _scanned(params, x, train=False, slip=1.0):
    def step(h, _):
        h = jnp.tanh(_dense(params["cell"], h) * slip)
        return h, None

    return _dense(params["head"], jax.lax.scan(step, x, None, length=3)[0])


def test_a_module_called_in_a_loop_matches_the_ports_scan_step_by_step():
    inputs = Inputs(Custom(lambda rng: ((4, 4), (4, 1)), ((4, 4), (4, 1))), (Floats(-1, 1), Floats(-1, 1)))
    ok = ModelPair("traced_loop", _Unrolled, _scanned, inputs, loss=mse(),
                   optimizer=optimizer_pair("traced_loop.sgd", "SGD", lr=0.1), checks=("forward",))
    (rec,) = ok.run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "passed" and all(r["ok"] for r in rec.extra["layers"]), rec.extra["layers"]
    slipped = ok.replace(name="traced_loop_slip", jax_apply=lambda p, x, train=False: _scanned(p, x, slip=1.01))
    (rec,) = slipped.run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed", rec.failure_text()
    # step 0's cell output agrees (a slice of the scan's stacked values); the scale after it, in
    # the loop's own code, feeds step 1's cell: named there, "after cell"
    assert "first diverging layer: at or before cell (Linear)" in rec.diagnosis, rec.diagnosis
    assert "outside the torch modules that feeds it" in rec.diagnosis and "after cell;" in rec.diagnosis
